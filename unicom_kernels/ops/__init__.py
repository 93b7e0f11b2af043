"""Backend registry and the contract every backend module meets.

Inputs are gathered, dimension-selected and L2-normalised already (see
:mod:`unicom_kernels.loss`): ``xn [N, k]``, ``wn [n, k]`` (fp32, or fp64), ``target [N]``
int64, each row's column in ``wn`` or ``-1``; keyword arguments ``scale, margin,
margin_type, margin_grad, compute_dtype`` (the GEMM operand dtype). A backend module exports

- ``lse_and_target(...) -> (lse [N], z_t [N])``: per-row log-sum-exp over the columns of
  ``wn`` and the margined target logit (0 where ``target`` is ``-1``), differentiable.
  Enough for any loss over classes split across ranks.
- optionally ``margin_softmax_loss(...) -> 0-dim loss``: the single-process mean over
  rows with a target, fused (it may form the gradients during the forward).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

_BACKENDS = {
    "reference": "unicom_kernels.reference",
    "torch": "unicom_kernels.ops.torch_chunked",
}

BACKENDS = ("auto", *_BACKENDS)


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend ``"auto"`` stands for on ``device``; other names pass through."""
    if name != "auto":
        return name
    return "triton" if device.type == "cuda" and "triton" in _BACKENDS else "torch"


def get_backend(name: str, device: torch.device) -> ModuleType:
    """The module of backend ``name`` (``"auto"`` resolved for ``device``)."""
    return importlib.import_module(_BACKENDS[resolve_backend(name, device)])


def mean_loss(backend: ModuleType, xn: Tensor, wn: Tensor, target: Tensor, **kwargs) -> Tensor:
    """Single-process loss: mean of ``lse - z_t`` over rows with a target (0 if none)."""
    fused = getattr(backend, "margin_softmax_loss", None)
    if fused is not None:
        return fused(xn, wn, target, **kwargs)
    lse, z_t = backend.lse_and_target(xn, wn, target, **kwargs)
    valid = target >= 0
    return torch.where(valid, lse - z_t, 0.0).sum() / valid.sum().clamp_min(1)
