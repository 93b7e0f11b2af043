"""The ``triton`` backend: fused kernels behind PyTorch custom ops.

It exports both entry points of the backend contract (:mod:`unicom_kernels.ops`):
:func:`margin_softmax_loss` (single process: the fused mean loss) and
:func:`lse_and_target` (per-row statistics for a loss whose classes are split over ranks).

Custom ops, so that ``torch.compile`` traces through (each op is one opaque node with a
fake implementation giving its output shapes) and autograd works in eager and compiled
code alike:

- ``unicom_kernels::triton_margin_softmax(x, w, target, scale, margin, margin_type,
  margin_grad, compute_dtype) -> (loss, lse, tcoef, count)``: the mean loss. ``lse`` and
  ``tcoef = (p_t - 1) dz_t/dc`` (``[N]`` fp32, 0 for ignored rows) and ``count`` (0-dim fp32,
  the rows with a target, at least 1) serve the backward; they are non-differentiable and
  :func:`margin_softmax_loss` returns only ``loss``.
- ``unicom_kernels::triton_lse_and_target(...same...) -> (lse, z_t, dz_dc)``: per-row
  log-sum-exp and margined target logit (0 without a target); ``dz_dc`` is for the backward.
- ``unicom_kernels::triton_margin_softmax_backward(x, w, target, lse, rowscale, tcoef,
  gscale, scale, compute_dtype, storage_dtype) -> (grad_x, grad_w)``: shared by both (see
  :func:`unicom_kernels.triton.margin_softmax_backward` for the arguments).

The ops take the raw rows ``x``, ``w`` and normalise them themselves with
:mod:`unicom_kernels.triton.unit_rows` (fp32 norms, unit rows written in the compute dtype
with ``k`` zero-padded to a multiple of 16, one kernel per operand; the backward applies the
normalisation's Jacobian analytically in one kernel per operand instead of autograd of
``F.normalize``). The forward computes each row's raw target cosine with a row-wise dot (fp32 products of the
compute-dtype values: the idea of CCE's ``indexed_dot``) and the formulas of
:func:`unicom_kernels.margin.target_logit` for ``z_t`` and ``dz/dc`` per row (one small
kernel, :mod:`unicom_kernels.triton.target_logit`), and hands these to the fused kernels,
which substitute the target entry. Forward launches: 2 normalisations + 4 kernels. The backward recasts the
operands (cheaper than keeping copies alive between the passes); for bf16 it holds the
bf16-rounded values in fp16 for the mean loss (see :func:`_backward_storage`).

Memory beyond inputs and gradients: the compute-dtype copies of ``x``/``w``; forward
``8 * S * N`` bytes of LSE partials (:mod:`unicom_kernels.triton.lse_forward`); backward
``N * chunk * itemsize`` bytes of workspace (32 MiB, or the size of the fp32 ``grad_x`` when
larger; see
:mod:`unicom_kernels.triton.backward`) plus ``O(N + n)`` index vectors. Nothing of size
``N * n`` in fp32. No host synchronisation: every data-dependent quantity (counts, sort
order, scales) stays on the device, and Python control flow depends on shapes only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..triton import lse_forward, margin_softmax_backward, mean_loss, target_logit
from ..triton.unit_rows import unit_rows
from . import once_differentiable

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_INT32_LIMIT = 2**31


def _operands(
    x: Tensor, w: Tensor, compute_dtype: torch.dtype, storage_dtype: torch.dtype | None = None
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((xc, x_norm), (wc, w_norm))``: unit rows of the raw ``x``, ``w`` rounded to ``compute_dtype``
    (held in ``storage_dtype``), ``k`` zero-padded to a multiple of 16, and the fp32 row norms
    ``max(|v|, EPS)`` the backward's Jacobian divides by. One kernel per operand.

    Zero columns change no dot product; they give every row a 32-byte aligned stride and the
    kernels a ``k`` divisible by 16, which Triton needs to vectorise the loads and pipeline
    the K loop (it specialises integer arguments on divisibility by 16).
    """
    storage_dtype = storage_dtype or compute_dtype
    k_pad = -(-x.shape[1] // 16) * 16
    return (
        unit_rows(x.detach(), compute_dtype, storage_dtype, k_pad),
        unit_rows(w.detach(), compute_dtype, storage_dtype, k_pad),
    )


def _backward_storage(compute_dtype: torch.dtype, row_weights_vary: bool) -> torch.dtype:
    """Operand dtype of the backward kernels: fp16 for bf16 compute when every row weighs the
    same, else the compute dtype.

    The backward multiplies the softmax gradient (stored in the workspace as ``r_i s p_ij``,
    bounded by ``s``) with the operands. bf16 keeps 8 bits of it, fp16 11. Normalised bf16
    operands are exactly representable in fp16 (every component of magnitude >= 2^-14;
    smaller ones move by < 3e-8, far below fp32 accumulation error), so the mean loss, whose
    row weights ``r_i`` are 0 or 1, runs its bf16 problem on fp16 tensor cores, at the same
    speed, with an 8x finer gradient workspace. The per-row statistics serve losses whose row
    weights differ by orders of magnitude (a rank's share ``exp(LSE_local - LSE_global)`` of
    each row across ranks): there a row weighing 1e-8 of the largest would sink into fp16's
    subnormals (below 6e-5), so the workspace keeps bf16's range.
    """
    return torch.float16 if compute_dtype == torch.bfloat16 and not row_weights_vary else compute_dtype


def _forward(x, w, target, scale, margin, margin_type, margin_grad, compute_dtype):
    """Shared forward of the raw ``x``, ``w``: ``(lse, row_loss, tcoef, z_t, dz_dc)``, all ``[N]`` fp32."""
    (xc, _), (wc, _) = _operands(x, w, compute_dtype)
    # The formulas of unicom_kernels.margin.target_logit, fused with the target cosine.
    z_t, dz_dc = target_logit(
        xc, wc, target, scale=scale, margin=margin, margin_type=margin_type, margin_grad=margin_grad
    )
    lse, row_loss, tcoef = lse_forward(xc, wc, target, z_t, dz_dc, scale)
    return lse, row_loss, tcoef, z_t, dz_dc


# --------------------------------------------------------------------------- backward op


@torch.library.custom_op("unicom_kernels::triton_margin_softmax_backward", mutates_args=())
def _backward_op(
    x: Tensor,
    w: Tensor,
    target: Tensor,
    lse: Tensor,
    rowscale: Tensor,
    tcoef: Tensor,
    gscale: Tensor,
    scale: float,
    compute_dtype: torch.dtype,
    storage_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    # The normalisation is part of the op: its Jacobian is applied here analytically (one
    # kernel per operand), not by autograd of F.normalize (a dozen launches and temporaries).
    operands = _operands(x, w, compute_dtype, storage_dtype)
    return margin_softmax_backward(x.detach(), w.detach(), operands, target, lse, rowscale, tcoef, gscale, scale)


@_backward_op.register_fake
def _backward_fake(x, w, target, lse, rowscale, tcoef, gscale, scale, compute_dtype, storage_dtype):
    return torch.empty_like(x), torch.empty_like(w)


def _grads(ctx, rowscale: Tensor, tcoef: Tensor, gscale: Tensor, row_weights_vary: bool):
    """The autograd return tuple of both forward ops (8 inputs, only x/w differentiable)."""
    x, w, target, lse = ctx.saved_tensors[:4]
    grad_x = grad_w = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_x, grad_w = once_differentiable(
            "backend='triton'",
            *_backward_op(
                x,
                w,
                target,
                lse,
                rowscale,
                tcoef,
                gscale.reshape(()),
                ctx.scale,
                ctx.compute_dtype,
                _backward_storage(ctx.compute_dtype, row_weights_vary),
            ),
        )
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        grad_w if ctx.needs_input_grad[1] else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


# --------------------------------------------------------------------------- mean loss op


@torch.library.custom_op("unicom_kernels::triton_margin_softmax", mutates_args=())
def _loss_op(
    x: Tensor,
    w: Tensor,
    target: Tensor,
    scale: float,
    margin: float,
    margin_type: str,
    margin_grad: str,
    compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    lse, row_loss, tcoef, _, _ = _forward(x, w, target, scale, margin, margin_type, margin_grad, compute_dtype)
    loss, count = mean_loss(row_loss, target)
    return loss, lse, tcoef, count


@_loss_op.register_fake
def _loss_fake(x, w, target, scale, margin, margin_type, margin_grad, compute_dtype):
    N = x.shape[0]
    return (
        x.new_empty((), dtype=torch.float32),
        x.new_empty((N,), dtype=torch.float32),
        x.new_empty((N,), dtype=torch.float32),
        x.new_empty((), dtype=torch.float32),
    )


def _loss_setup(ctx, inputs, output) -> None:
    x, w, target, scale, _margin, _margin_type, _margin_grad, compute_dtype = inputs
    _loss, lse, tcoef, count = output
    ctx.mark_non_differentiable(lse, tcoef, count)
    ctx.set_materialize_grads(False)  # no zero gradients made for the non-differentiable outputs
    ctx.save_for_backward(x, w, target, lse, tcoef, count)
    ctx.scale = scale
    ctx.compute_dtype = compute_dtype


def _loss_backward(ctx, grad_loss: Tensor, _grad_lse, _grad_tcoef, _grad_count):
    target, tcoef, count = ctx.saved_tensors[2], ctx.saved_tensors[4], ctx.saved_tensors[5]
    # dL/dLSE_i = g / count for rows with a target, 0 otherwise: A = g / count, r_i = valid_i.
    gscale = grad_loss.to(torch.float32) / count
    return _grads(ctx, (target >= 0).to(torch.float32), tcoef * gscale, gscale, row_weights_vary=False)


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


# --------------------------------------------------------------------------- per-row statistics op


@torch.library.custom_op("unicom_kernels::triton_lse_and_target", mutates_args=())
def _stats_op(
    x: Tensor,
    w: Tensor,
    target: Tensor,
    scale: float,
    margin: float,
    margin_type: str,
    margin_grad: str,
    compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    lse, _, _, z_t, dz_dc = _forward(x, w, target, scale, margin, margin_type, margin_grad, compute_dtype)
    return lse, torch.where(target >= 0, z_t, 0.0), dz_dc


@_stats_op.register_fake
def _stats_fake(x, w, target, scale, margin, margin_type, margin_grad, compute_dtype):
    N = x.shape[0]
    return tuple(x.new_empty((N,), dtype=torch.float32) for _ in range(3))


def _stats_setup(ctx, inputs, output) -> None:
    x, w, target, scale, _margin, _margin_type, _margin_grad, compute_dtype = inputs
    lse, z_t, dz_dc = output
    ctx.mark_non_differentiable(dz_dc)
    ctx.set_materialize_grads(False)  # an unused output gets no zero gradient (handled below)
    ctx.save_for_backward(x, w, target, lse, z_t, dz_dc)
    ctx.scale = scale
    ctx.compute_dtype = compute_dtype


def _stats_backward(ctx, grad_lse: Tensor | None, grad_zt: Tensor | None, _grad_dzdc):
    target, lse, z_t, dz_dc = ctx.saved_tensors[2:]
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(torch.float32)
    grad_zt = torch.zeros_like(lse) if grad_zt is None else grad_zt.to(torch.float32)
    has_target = target >= 0
    # dL/dz_t = dL/dLSE * p_t + dL/dz_t(output); times dz_t/dc for dL/dc_t.
    tcoef = torch.where(has_target, (grad_lse * torch.exp(z_t - lse) + grad_zt) * dz_dc, 0.0)
    # A = max |a_i| keeps the workspace in [-s, s]; the floor avoids 0/0 when a = 0.
    gscale = grad_lse.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    return _grads(ctx, grad_lse / gscale, tcoef, gscale, row_weights_vary=True)


_stats_op.register_autograd(_stats_backward, setup_context=_stats_setup)


# --------------------------------------------------------------------------- public functions


def _check(x: Tensor, w: Tensor, target: Tensor, compute_dtype: torch.dtype) -> None:
    if compute_dtype not in _SUPPORTED:
        raise ValueError(
            f"compute_dtype must be one of torch.float32, torch.float16, torch.bfloat16 for the "
            f"triton backend, got {compute_dtype}; use backend='torch' for float64"
        )
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or target.shape != (x.shape[0],):
        raise ValueError(
            f"expected x [N, k], w [n, k], target [N]; got {tuple(x.shape)}, {tuple(w.shape)}, {tuple(target.shape)}"
        )
    if x.shape[0] == 0 or w.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"the triton kernels need N, n, k >= 1; got x {tuple(x.shape)}, w {tuple(w.shape)}")
    # The kernels address elements with int32 offsets: row * stride + column, k padded to 16.
    k_pad = -(-x.shape[1] // 16) * 16
    largest = max(x.shape[0], w.shape[0]) * k_pad
    if largest >= _INT32_LIMIT:
        raise ValueError(
            f"the triton kernels address at most 2^31 elements per operand; rows x padded dims = {largest} "
            f"(x {tuple(x.shape)}, w {tuple(w.shape)}): shard the classes over more ranks or use "
            "backend='torch'"
        )


def margin_softmax_loss(
    x: Tensor,
    w: Tensor,
    target: Tensor,
    *,
    scale: float,
    margin: float,
    margin_type: str,
    margin_grad: str,
    compute_dtype: torch.dtype,
) -> Tensor:
    """Mean margin-softmax loss over the rows with a target, with fused Triton kernels.

    Args:
        x: ``[N, k]`` embeddings, ``w``: ``[n, k]`` sampled prototypes (not normalised: the
            ops L2-normalise them in fp32; the gradients come back in their dtypes).
        target: ``[N]`` int64 column of each row's label in ``w``, ``-1`` for an ignored row.
        scale, margin, margin_type, margin_grad: see :func:`unicom_kernels.margin.target_logit`.
        compute_dtype: GEMM operand dtype (fp32, fp16 or bf16); accumulation is fp32. fp32
            follows ``torch.get_float32_matmul_precision()`` ("highest": exact, else tf32).

    Returns:
        The 0-dim fp32 loss (``0`` with zero gradients when every row is ignored).

    Raises:
        ValueError: ``compute_dtype`` is not fp32/fp16/bf16 (fp64 is the ``torch`` backend's),
            or the shapes do not match.
    """
    _check(x, w, target, compute_dtype)
    loss, _lse, _tcoef, _count = _loss_op(
        x, w, target, float(scale), float(margin), margin_type, margin_grad, compute_dtype
    )
    return loss


def lse_and_target(
    x: Tensor,
    w: Tensor,
    target: Tensor,
    *,
    scale: float,
    margin: float,
    margin_type: str,
    margin_grad: str,
    compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Per-row log-sum-exp over the columns of ``w`` and the margined target logit, fused.

    Args: as :func:`margin_softmax_loss`; ``target`` is ``-1`` where the row is ignored or
    its class is not among these columns (held by another rank).

    Returns:
        ``(lse [N], z_t [N])`` fp32, differentiable w.r.t. ``x`` and ``w``; ``z_t`` is 0 where
        ``target`` is ``-1`` (and ``lse`` then covers all columns, with no margin).
    """
    _check(x, w, target, compute_dtype)
    lse, z_t, _dz_dc = _stats_op(x, w, target, float(scale), float(margin), margin_type, margin_grad, compute_dtype)
    return lse, z_t
