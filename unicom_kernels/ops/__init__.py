"""Backend registry: each backend module exports ``margin_softmax_loss`` with one contract.

``margin_softmax_loss(xn [N, k], wn [n, k], target [N], *, scale, margin, margin_type,
margin_grad, compute_dtype) -> 0-dim loss``: inputs are L2-normalised, gathered and
dimension-selected already (see :mod:`unicom_kernels.loss`), ``target`` is each row's
column in ``wn`` or ``-1``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

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


def get_backend(name: str, device: torch.device) -> Callable:
    """The ``margin_softmax_loss`` function of backend ``name`` (``"auto"`` resolved for ``device``)."""
    return importlib.import_module(_BACKENDS[resolve_backend(name, device)]).margin_softmax_loss
