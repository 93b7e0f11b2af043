"""Triton kernels of the fused margin-softmax loss (see :mod:`unicom_kernels.ops.triton_op`).

Kernel families, one per module:

- :mod:`.unit_rows`: the operands' row normalisation and its Jacobian (with the target terms).
- :mod:`.lse_forward`: cosine GEMM + online log-sum-exp; then target logit and combine.
- :mod:`.target_logit`: per-row target work (margined target logit, rows grouped by class).
- :mod:`.softmax_grad`: logit recompute + softmax gradient into a bounded workspace.
- :mod:`.grad_gemm`: the ``G @ W`` and ``G^T @ X`` GEMMs, one launch per chunk.

:mod:`.backward` chains the backward kernels over class chunks; :mod:`.configs` holds the
block configurations (and :func:`.configs.override_configs` for tests).

This package needs the optional ``triton`` package (Linux wheels); the rest of
:mod:`unicom_kernels` does not import it.
"""

import importlib.util

if importlib.util.find_spec("triton") is None:
    raise ModuleNotFoundError(
        "unicom_kernels.triton needs the triton package, which is not installed: pip install triton "
        "(or pip install 'unicom-kernels[triton]'); backend='torch' runs without it",
        name="triton",
    )

from .backward import RowCoefficients, margin_softmax_backward
from .configs import Configs, TileConfig, get_configs, override_configs
from .lse_forward import ForwardStats, lse_forward, mean_loss

__all__ = [
    "Configs",
    "ForwardStats",
    "RowCoefficients",
    "TileConfig",
    "get_configs",
    "lse_forward",
    "margin_softmax_backward",
    "mean_loss",
    "override_configs",
]
