"""Backend registry and the contract every backend module meets.

Inputs are gathered and dimension-selected already (see :mod:`unicom_kernels.loss`), not
normalised: ``x [N, k]`` (the embeddings' dtype), ``w [n, k]`` (the prototypes' dtype),
``target [N]`` int64, each row's column in ``w`` or ``-1``; keyword arguments ``scale,
margin, margin_type, margin_grad, compute_dtype`` (the GEMM operand dtype). A backend
L2-normalises the rows (``v / max(|v|, EPS)`` in :func:`accumulation_dtype`; plainly with
:func:`normalize_rows`, or fused) and exports

- ``lse_and_target(...) -> (lse [N], z_t [N])``: per-row log-sum-exp over the rows of
  ``w`` and the margined target logit (0 where ``target`` is ``-1``), differentiable.
  Enough for any loss over classes split across ranks.
- optionally ``margin_softmax_loss(...) -> 0-dim loss``: the single-process mean over
  rows with a target, fused (it may form the gradients during the forward).

Both return the accumulation dtype; gradients come back in the inputs' dtypes.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-12  # norm floor of docs/design.md, section 2.5

_BACKENDS = {
    "reference": "unicom_kernels.reference",
    "torch": "unicom_kernels.ops.torch_chunked",
    "triton": "unicom_kernels.ops.triton_op",
}

BACKENDS = ("auto", *_BACKENDS)
_LOADED: dict[str, ModuleType] = {}


def accumulation_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 problems, fp32 otherwise: logits, margin and log-sum-exp live here."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def normalize_rows(v: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """``v / max(|v|, EPS)`` row by row, in the accumulation dtype, differentiable."""
    return F.normalize(v.to(accumulation_dtype(compute_dtype)), dim=1, eps=EPS)


def unit_rows(v: Tensor, compute_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(v, inv_norm, projects)`` for the normalisation without autograd: ``v`` detached in the
    accumulation dtype, ``[rows]`` ``1 / max(|v|, EPS)``, and where ``|v| > EPS`` (below, the
    norm is the constant ``EPS``: the Jacobian does not project there). The unit rows are
    ``v * inv_norm[:, None]``."""
    v = v.detach().to(accumulation_dtype(compute_dtype))
    norm = torch.linalg.vector_norm(v, dim=1)
    return v, 1.0 / norm.clamp_min(EPS), norm > EPS


def unit_rows_grad_(grad: Tensor, unit: Tensor, inv_norm: Tensor, projects: Tensor) -> Tensor:
    """``dL/dv`` from ``grad = dL/du`` for ``u = v / max(|v|, EPS)``, in place:
    ``(g - u <u, g>) / max(|v|, EPS)``. A few passes over ``[rows, k]``, where autograd of
    ``F.normalize`` makes several temporaries."""
    dots = torch.bmm(unit.unsqueeze(1), grad.unsqueeze(2)).view(-1) * projects
    return grad.addcmul_(unit, dots.unsqueeze(1), value=-1.0).mul_(inv_norm.unsqueeze(1))


def resolve_backend(name: str, device: torch.device, compute_dtype: torch.dtype = torch.float32) -> str:
    """The backend ``"auto"`` stands for: ``triton`` for CUDA tensors (fp64 aside), else ``torch``."""
    if name != "auto":
        return name
    return "triton" if device.type == "cuda" and compute_dtype != torch.float64 else "torch"


def _check_triton_installed(name: str) -> None:
    """Raise ``ValueError`` if the ``triton`` package, an optional dependency, is not installed."""
    # A spec lookup, not an import: this runs on every call, and importing triton is slow.
    if sys.modules.get("triton") is not None or importlib.util.find_spec("triton") is not None:
        return
    chosen = "backend='triton'" if name == "triton" else "backend='auto' picks 'triton' for CUDA tensors and"
    raise ValueError(
        f"{chosen} needs the triton package, which is not installed: pip install triton "
        "(or pip install 'unicom-kernels[triton]'), or pass backend='torch'"
    )


def check_backend(name: str, device: torch.device, compute_dtype: torch.dtype) -> None:
    """Raise ``ValueError`` (naming ``backend``) if ``name`` cannot run these inputs, before any
    computation: triton kernels need the triton package, a non-fp64 dtype and CUDA tensors
    (or ``TRITON_INTERPRET=1``)."""
    if resolve_backend(name, device, compute_dtype) != "triton":
        return
    _check_triton_installed(name)
    if compute_dtype == torch.float64:
        raise ValueError("backend='triton' runs fp32/fp16/bf16; use backend='torch' or 'auto' for float64 inputs")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got {device} (set TRITON_INTERPRET=1 to interpret it on the CPU)"
        )


def get_backend(name: str, device: torch.device, compute_dtype: torch.dtype = torch.float32) -> ModuleType:
    """The module of backend ``name`` (``"auto"`` resolved for ``device`` and ``compute_dtype``).

    Only the triton backend imports triton; without it, asking for that backend raises the
    ``ValueError`` of :func:`check_backend`.
    """
    resolved = resolve_backend(name, device, compute_dtype)
    if resolved not in _LOADED:  # imported once; a dict lookup is what torch.compile traces later
        if resolved == "triton":
            _check_triton_installed(name)
        if torch.compiler.is_compiling():  # torch.compile cannot trace an import
            raise RuntimeError(
                f"the {resolved} backend is imported on first use, which torch.compile cannot trace: call the "
                "loss once outside torch.compile, or construct DualPartialMarginLoss, before compiling"
            )
        _LOADED[resolved] = importlib.import_module(_BACKENDS[resolved])
    return _LOADED[resolved]


class _NotDifferentiableAgain(torch.autograd.Function):
    """Passes gradients through unchanged; differentiating them raises (see :func:`once_differentiable`)."""

    @staticmethod
    def forward(ctx, what: str, _anchor: Tensor, *grads: Tensor) -> tuple[Tensor, ...]:
        ctx.what = what
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *_grads):
        raise RuntimeError(
            f"{ctx.what} forms its gradient without recording how, so it cannot be differentiated again "
            "(a backward through a gradient taken with create_graph=True, e.g. a gradient penalty). "
            "Use backend='reference' without process_group for higher-order gradients."
        )


def once_differentiable(what: str, *grads: Tensor) -> tuple[Tensor, ...]:
    """``grads`` (returned by a backward), marked so that a second backward through them raises.

    Called inside ``backward``: with ``create_graph=True`` grad mode is on there, and a
    gradient computed without autograd would otherwise act as a constant, silently giving a
    wrong higher-order gradient. The first-order gradient itself stays available.
    """
    if not torch.is_grad_enabled():
        return grads
    anchor = torch.zeros((), requires_grad=True)  # makes the outputs part of the graph
    return _NotDifferentiableAgain.apply(what, anchor, *grads)


def mean_over_rows(per_row: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``per_row [N]`` over the ``valid`` rows; 0 (with zero gradients) if there are none."""
    return torch.where(valid, per_row, 0.0).sum() / valid.sum().clamp_min(1)


def mean_loss(backend: ModuleType, x: Tensor, w: Tensor, target: Tensor, **kwargs) -> Tensor:
    """Single-process loss: mean of ``lse - z_t`` over rows with a target (0 if none)."""
    fused = getattr(backend, "margin_softmax_loss", None)
    if fused is not None:
        return fused(x, w, target, **kwargs)
    lse, z_t = backend.lse_and_target(x, w, target, **kwargs)
    return mean_over_rows(lse - z_t, target >= 0)
