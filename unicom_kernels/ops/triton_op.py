"""The ``triton`` backend: fused kernels behind PyTorch custom ops.

It exports both entry points of the backend contract (:mod:`unicom_kernels.ops`):
:func:`margin_softmax_loss` (single process: the fused mean loss) and
:func:`lse_and_target` (per-row statistics for a loss whose classes are split over ranks).

Custom ops, so that ``torch.compile`` traces through (each op is one opaque node with a
fake implementation giving its output shapes) and autograd works in eager and compiled
code alike:

- ``unicom_kernels::triton_margin_softmax(x, w, target, scale, margin, margin_type,
  margin_grad, compute_dtype) -> (loss, lse, tcoef, count, *saved)``: the mean loss.
  ``lse`` and ``tcoef = (p_t - 1) dz_t/dc`` (``[N]`` fp32, 0 for ignored rows), ``count``
  (0-dim fp32, the rows with a target, at least 1) and ``saved = (xc, x_norm, wc, w_norm,
  order, sorted_key)`` (the unit rows the GEMMs read, their fp32 norms, and the rows grouped
  by class) serve the backward; they are non-differentiable and :func:`margin_softmax_loss`
  returns only ``loss``.
- ``unicom_kernels::triton_lse_and_target(...same...) -> (lse, z_t, dz_dc, *saved)``:
  per-row log-sum-exp and margined target logit (0 without a target); the rest is for the
  backward.
- ``unicom_kernels::triton_margin_softmax_backward(x, w, *saved, target, lse, tcoef, gscale,
  count, rowscale, scale) -> (grad_x, grad_w)``: shared by both (see
  :func:`unicom_kernels.triton.margin_softmax_backward` and
  :class:`unicom_kernels.triton.RowCoefficients` for the arguments).

The ops take the raw rows ``x``, ``w`` and normalise them themselves with
:mod:`unicom_kernels.triton.unit_rows` (fp32 norms, unit rows written in the compute dtype
with ``k`` zero-padded to a multiple of 16, one launch for both operands; the backward
applies the normalisation's Jacobian analytically, again one launch for both, instead of
autograd of ``F.normalize``). The forward (:mod:`unicom_kernels.triton.lse_forward`) folds
the off-target logits into per-split log-sum-exp partials, then per row computes the raw
target cosine with a row-wise dot (fp32 products of the compute-dtype values: the idea of
CCE's ``indexed_dot``) and the formulas of :func:`unicom_kernels.margin.target_logit`,
merges, and groups the rows by class for the backward. Launches: 4 forward (3 for the
per-row statistics), ``2 * chunks + 1`` backward. The backward reuses the forward's unit rows
(kept from the forward to the backward: ``(N + n) * k_pad`` elements, 17 MB at shape A,
instead of a second normalisation pass over the raw rows, 51 MB of traffic); for bf16 the
mean loss holds the bf16-rounded values in fp16 (see :func:`_backward_storage`).

Memory beyond inputs and gradients: the unit rows of ``x``/``w`` and the row grouping
(``2 N`` int64); forward ``8 * S * N`` bytes of LSE partials; backward ``N * chunk *
itemsize`` bytes of workspace (40 MiB, or the size of the fp32 ``grad_x`` when larger; see
:mod:`unicom_kernels.triton.backward`) plus the fp32 GEMM sums where a gradient is not fp32.
Nothing of size ``N * n`` in fp32. No host synchronisation: every data-dependent quantity
(counts, row order, scales) stays on the device, and Python control flow depends on shapes
only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..triton import RowCoefficients, lse_forward, margin_softmax_backward, mean_loss
from ..triton.unit_rows import unit_rows
from . import once_differentiable

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_INT32_LIMIT = 2**31


def _k_pad(k: int) -> int:
    """The operands' padded width: ``k`` rounded up to a multiple of 16 (see :func:`_operands`)."""
    return -(-k // 16) * 16


def _operands(
    x: Tensor, w: Tensor, compute_dtype: torch.dtype, storage_dtype: torch.dtype | None = None
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((xc, x_norm), (wc, w_norm))``: unit rows of the raw ``x``, ``w`` rounded to ``compute_dtype``
    (held in ``storage_dtype``), ``k`` zero-padded to a multiple of 16, and the fp32 row norms
    ``max(|v|, EPS)`` the backward's Jacobian divides by. One launch for both.

    Zero columns change no dot product; they give every row a 32-byte aligned stride and the
    kernels a ``k`` divisible by 16, which Triton needs to vectorise the loads and pipeline
    the K loop (it specialises integer arguments on divisibility by 16).
    """
    storage_dtype = storage_dtype or compute_dtype
    return unit_rows(x.detach(), w.detach(), compute_dtype, storage_dtype, _k_pad(x.shape[1]))


def _backward_storage(compute_dtype: torch.dtype, row_weights_vary: bool) -> torch.dtype:
    """Operand dtype of the kernels: fp16 for bf16 compute when every row weighs the same, else
    the compute dtype.

    The backward multiplies the softmax gradient (stored in the workspace as ``r_i s p_ij``,
    bounded by ``s``) with the operands. bf16 keeps 8 bits of it, fp16 11. Normalised bf16
    operands are exactly representable in fp16 (every component of magnitude >= 2^-14;
    smaller ones move by < 3e-8, far below fp32 accumulation error), so the mean loss, whose
    row weights ``r_i`` are 0 or 1, runs its bf16 problem on fp16 tensor cores, at the same
    speed, with an 8x finer gradient workspace (the forward, which hands its operands to the
    backward, reads the same fp16-held bf16 values). The per-row statistics serve losses
    whose row weights differ by orders of magnitude (a rank's share ``exp(LSE_local -
    LSE_global)`` of each row across ranks): there a row weighing 1e-8 of the largest would
    sink into fp16's subnormals (below 6e-5), so the workspace keeps bf16's range.
    """
    return torch.float16 if compute_dtype == torch.bfloat16 and not row_weights_vary else compute_dtype


def _forward(x, w, target, scale, margin, margin_type, margin_grad, compute_dtype, row_weights_vary):
    """Shared forward of the raw ``x``, ``w``: the :class:`~unicom_kernels.triton.ForwardStats` and
    what the backward reuses, ``(xc, x_norm, wc, w_norm, order, sorted_key)``."""
    storage = _backward_storage(compute_dtype, row_weights_vary)
    (xc, x_norm), (wc, w_norm) = _operands(x, w, compute_dtype, storage)
    stats = lse_forward(xc, wc, target, scale=scale, margin=margin, margin_type=margin_type, margin_grad=margin_grad)
    return stats, (xc, x_norm, wc, w_norm, stats.order, stats.sorted_key)


def _saved_fakes(x: Tensor, w: Tensor, compute_dtype: torch.dtype, row_weights_vary: bool) -> tuple[Tensor, ...]:
    """Fake ``(xc, x_norm, wc, w_norm, order, sorted_key)`` of :func:`_forward`."""
    storage = _backward_storage(compute_dtype, row_weights_vary)
    (N, k), n = x.shape, w.shape[0]
    k_pad = _k_pad(k)
    return (
        x.new_empty((N, k_pad), dtype=storage),
        x.new_empty((N,), dtype=torch.float32),
        x.new_empty((n, k_pad), dtype=storage),
        x.new_empty((n,), dtype=torch.float32),
        x.new_empty((N,), dtype=torch.int64),
        x.new_empty((N,), dtype=torch.int64),
    )


# --------------------------------------------------------------------------- backward op


@torch.library.custom_op("unicom_kernels::triton_margin_softmax_backward", mutates_args=())
def _backward_op(
    x: Tensor,
    w: Tensor,
    xc: Tensor,
    x_norm: Tensor,
    wc: Tensor,
    w_norm: Tensor,
    order: Tensor,
    sorted_key: Tensor,
    target: Tensor,
    lse: Tensor,
    tcoef: Tensor,
    gscale: Tensor,
    count: Tensor | None,
    rowscale: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    # The normalisation is part of the op: its Jacobian is applied here analytically (one
    # launch for both operands), not by autograd of F.normalize (a dozen launches and temporaries).
    return margin_softmax_backward(
        x.detach(),
        w.detach(),
        ((xc, x_norm), (wc, w_norm)),
        (order, sorted_key),
        target,
        lse,
        RowCoefficients(gscale, count, rowscale, tcoef),
        scale,
    )


@_backward_op.register_fake
def _backward_fake(x, w, xc, x_norm, wc, w_norm, order, sorted_key, target, lse, tcoef, gscale, count, rowscale, scale):
    return torch.empty_like(x), torch.empty_like(w)


def _save(ctx, x: Tensor, w: Tensor, target: Tensor, saved: tuple[Tensor, ...], *stats: Tensor) -> None:
    """Save what :func:`_grads` reads: the raw rows, the target, the forward's operands and groups, ``stats``."""
    ctx.save_for_backward(x, w, target, *saved, *stats)
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)  # no zero gradients made for the non-differentiable outputs


def _grads(ctx, tcoef: Tensor, gscale: Tensor, count: Tensor | None, rowscale: Tensor | None):
    """The autograd return tuple of both forward ops (8 inputs, only x/w differentiable)."""
    x, w, target, xc, x_norm, wc, w_norm, order, sorted_key, lse = ctx.saved_tensors[:10]
    grad_x = grad_w = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_x, grad_w = once_differentiable(
            "backend='triton'",
            *_backward_op(
                x,
                w,
                xc,
                x_norm,
                wc,
                w_norm,
                order,
                sorted_key,
                target,
                lse,
                tcoef,
                gscale.reshape(()),
                count,
                rowscale,
                ctx.scale,
            ),
        )
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        grad_w if ctx.needs_input_grad[1] else None,
        *([None] * 6),
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    stats, saved = _forward(x, w, target, scale, margin, margin_type, margin_grad, compute_dtype, False)
    loss, count = mean_loss(stats.row_loss, target)
    return loss, stats.lse, stats.tcoef, count, *saved


@_loss_op.register_fake
def _loss_fake(x, w, target, scale, margin, margin_type, margin_grad, compute_dtype):
    N = x.shape[0]
    return (
        x.new_empty((), dtype=torch.float32),
        x.new_empty((N,), dtype=torch.float32),
        x.new_empty((N,), dtype=torch.float32),
        x.new_empty((), dtype=torch.float32),
        *_saved_fakes(x, w, compute_dtype, False),
    )


def _loss_setup(ctx, inputs, output) -> None:
    x, w, target, scale = inputs[:4]
    _loss, lse, tcoef, count, *saved = output
    ctx.mark_non_differentiable(lse, tcoef, count)
    _save(ctx, x, w, target, tuple(saved), lse, tcoef, count)
    ctx.scale = scale


def _loss_backward(ctx, grad_loss: Tensor, *_grad_rest):
    tcoef, count = ctx.saved_tensors[10:]
    # dL/dLSE_i = g / count on rows with a target: the kernels form A = g / count, r_i and t_i * A.
    return _grads(ctx, tcoef, grad_loss.to(torch.float32), count, None)


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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    stats, saved = _forward(x, w, target, scale, margin, margin_type, margin_grad, compute_dtype, True)
    return stats.lse, stats.z_t, stats.dz_dc, *saved


@_stats_op.register_fake
def _stats_fake(x, w, target, scale, margin, margin_type, margin_grad, compute_dtype):
    N = x.shape[0]
    stats = tuple(x.new_empty((N,), dtype=torch.float32) for _ in range(3))
    return *stats, *_saved_fakes(x, w, compute_dtype, True)


def _stats_setup(ctx, inputs, output) -> None:
    x, w, target, scale = inputs[:4]
    lse, z_t, dz_dc, *saved = output
    ctx.mark_non_differentiable(dz_dc)
    _save(ctx, x, w, target, tuple(saved), lse, z_t, dz_dc)  # an unused output gets no zero gradient
    ctx.scale = scale


def _stats_backward(ctx, grad_lse: Tensor | None, grad_zt: Tensor | None, *_grad_rest):
    target = ctx.saved_tensors[2]
    lse, z_t, dz_dc = ctx.saved_tensors[9:]
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(torch.float32)
    grad_zt = torch.zeros_like(lse) if grad_zt is None else grad_zt.to(torch.float32)
    has_target = target >= 0
    # dL/dz_t = dL/dLSE * p_t + dL/dz_t(output); times dz_t/dc for dL/dc_t.
    tcoef = torch.where(has_target, (grad_lse * torch.exp(z_t - lse) + grad_zt) * dz_dc, 0.0)
    # A = max |a_i| keeps the workspace in [-s, s]; the floor avoids 0/0 when a = 0.
    gscale = grad_lse.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    return _grads(ctx, tcoef, gscale, None, grad_lse / gscale)


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
    largest = max(x.shape[0], w.shape[0]) * _k_pad(x.shape[1])
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
    return _loss_op(x, w, target, float(scale), float(margin), margin_type, margin_grad, compute_dtype)[0]


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
    lse, z_t = _stats_op(x, w, target, float(scale), float(margin), margin_type, margin_grad, compute_dtype)[:2]
    return lse, z_t
