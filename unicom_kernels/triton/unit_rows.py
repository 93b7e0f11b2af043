"""Row normalisation around the GEMM kernels: unit rows in the operand dtype, and its Jacobian.

Both kernels treat the two operands in one launch: the grid holds the programs of the
embeddings' row blocks, then those of the prototypes'.

``_unit_rows_kernel``: for raw rows ``v [R, k]`` (any float dtype) it writes ``norm_i =
max(|v_i|, eps)`` (fp32, ``[R]``) and the unit rows ``v_i / norm_i`` rounded to the compute
dtype and stored in the operand dtype of the kernels (``[R, k_out]``, zero past ``k``: the
padding of ``ops/triton_op.py``). Norms and quotients are fp32, as ``F.normalize`` on an
fp32 copy.

``_unit_rows_grad_kernel``: ``dL/dv_i = (g_i - u_i <u_i, g_i>) / norm_i`` from the fp32
gradient ``g = dL/du``, recomputing ``u_i = v_i / norm_i`` from the raw rows; where ``|v_i| <=
eps`` the norm is the constant ``eps`` and there is no projection. Written in the dtype of
``v`` (in place over the fp32 sums when that is fp32 and ``k`` needs no padding). ``g`` is
the GEMMs' sum times the device scalar ``A`` (the loss's gradient scale) plus the target
terms of the loss, in fp32: for the embeddings one gathered row, ``t_i W_{t_i}``; for the
prototypes the rows of each class, ``sum_{i : t_i = j} t_i X_i``, which many rows of the
batch may share. A prototype program owns its rows and reads their sources in the order of
the forward's grouping (:func:`.target_logit.group_rows`), so the sum is deterministic
without atomics and done once per class.

Each replaces the handful of elementwise torch launches and fp32 temporaries of the same
formulas (norm, clamp, divide, cast, pad; dot, multiply-add, scale, cast) by one pass that
reads a row block twice (the second time from L2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops import EPS

BLOCK_R = 16
BLOCK_Q = 8  # scattered source rows per step: [BLOCK_R, BLOCK_Q, BLOCK_K] in registers
BLOCK_S = 256  # sorted keys counted per step to find a program's sources


@triton.jit
def _row_norms(v_ptr, rows, row_ok, K, stride_v, eps, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """``max(|v_i|, eps)`` of rows ``rows`` in fp32 (NaN kept)."""
    offs_k = tl.arange(0, BLOCK_K)
    squares = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & (offs_k[None, :] < K - k0)
        v = tl.load(v_ptr + rows[:, None] * stride_v + (k0 + offs_k)[None, :], mask=mask, other=0.0).to(tl.float32)
        squares += tl.sum(v * v, axis=1)
    return tl.maximum(tl.sqrt(squares), eps, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _round_to_bf16(u):
    """fp32 ``u`` rounded to the nearest bf16 (ties to even), as fp32; NaN kept.

    Integer arithmetic on the bits rather than a cast, because the interpreter's bf16 cast
    truncates; on a GPU both give the same value.
    """
    bits = u.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return tl.where(u == u, bits.to(tl.float32, bitcast=True), u)


@triton.jit
def _normalise(
    v_ptr,
    out_ptr,
    norm_ptr,
    first,
    R,
    K,
    K_OUT,
    stride_v,
    stride_out,
    eps,
    ROUND_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Norms and unit rows of rows ``first .. first + BLOCK_R`` of ``v``."""
    rows = first + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    norm = _row_norms(v_ptr, rows, row_ok, K, stride_v, eps, BLOCK_R, BLOCK_K)
    tl.store(norm_ptr + rows, norm, mask=row_ok)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K_OUT, BLOCK_K):
        cols = k0 + offs_k
        v = tl.load(
            v_ptr + rows[:, None] * stride_v + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < K), other=0.0
        ).to(tl.float32)
        u = v / norm[:, None]
        if ROUND_BF16 or out_ptr.dtype.element_ty == tl.bfloat16:
            u = _round_to_bf16(u)
        u = u.to(out_ptr.dtype.element_ty)
        tl.store(
            out_ptr + rows[:, None] * stride_out + cols[None, :], u, mask=row_ok[:, None] & (cols[None, :] < K_OUT)
        )


@triton.jit
def _unit_rows_kernel(
    x_ptr,  # [N, K] raw embeddings, any float dtype
    w_ptr,  # [n, K] raw prototypes, any float dtype
    xu_ptr,  # [N, K_OUT] out, operand dtype
    wu_ptr,  # [n, K_OUT] out, operand dtype
    x_norm_ptr,  # [N] fp32 out: max(|x|, eps)
    w_norm_ptr,  # [n] fp32 out
    N,
    n,
    K,
    K_OUT,
    stride_x,
    stride_w,
    stride_xu,
    stride_wu,
    x_programs,  # cdiv(N, BLOCK_R): the embeddings' programs, first in the grid
    eps,
    ROUND_BF16: tl.constexpr,  # round to bf16 first (bf16 compute dtype), then store in the out dtype
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < x_programs:
        _normalise(
            x_ptr, xu_ptr, x_norm_ptr, pid * BLOCK_R, N, K, K_OUT, stride_x, stride_xu, eps, ROUND_BF16, BLOCK_R,
            BLOCK_K,
        )  # fmt: skip
    else:
        _normalise(
            w_ptr, wu_ptr, w_norm_ptr, (pid - x_programs) * BLOCK_R, n, K, K_OUT, stride_w, stride_wu, eps,
            ROUND_BF16, BLOCK_R, BLOCK_K,
        )  # fmt: skip


@triton.jit
def _scattered(
    order_ptr,
    dest_ptr,
    coef_ptr,
    src_ptr,
    stride_src,
    first,
    q_begin,
    q_end,
    cols,
    K,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """``[BLOCK_R, BLOCK_K]`` fp32 tile of ``sum_{q : dest_q = r} coef_{order_q} src_{order_q}`` for rows
    ``first + r`` and columns ``cols``: the sorted sources ``q_begin..q_end`` of these rows,
    ``BLOCK_Q`` at a time (independent loads), each block reduced in a fixed order."""
    local = tl.arange(0, BLOCK_R)
    offs_q = tl.arange(0, BLOCK_Q)
    total = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for q0 in range(q_begin, q_end, BLOCK_Q):
        q = q0 + offs_q
        q_ok = q < q_end
        i = tl.load(order_ptr + q, mask=q_ok, other=0)
        j = tl.load(dest_ptr + q, mask=q_ok, other=-1) - first
        coef = tl.load(coef_ptr + i, mask=q_ok, other=0.0)
        src = tl.load(
            src_ptr + i[:, None] * stride_src + cols[None, :], mask=q_ok[:, None] & (cols[None, :] < K), other=0.0
        )
        terms = coef[:, None] * src.to(tl.float32)
        total += tl.sum(tl.where(local[:, None, None] == j[None, :, None], terms[None, :, :], 0.0), axis=1)
    return total


@triton.jit
def _positions_between(key_ptr, Q, low, high, BLOCK_S: tl.constexpr):
    """``(begin, end)``: how many entries of the ascending ``key [Q]`` lie below ``low`` and below
    ``high``, from one pass over the keys."""
    offs = tl.arange(0, BLOCK_S)
    below_low = tl.zeros((BLOCK_S,), dtype=tl.int32)
    below_high = tl.zeros((BLOCK_S,), dtype=tl.int32)
    for s0 in range(0, Q, BLOCK_S):
        q = s0 + offs
        key = tl.load(key_ptr + q, mask=q < Q, other=high)  # past Q: counted by neither
        below_low += (key < low).to(tl.int32)
        below_high += (key < high).to(tl.int32)
    return tl.sum(below_low, axis=0), tl.sum(below_high, axis=0)


@triton.jit
def _grad_tile(
    grad_ptr,
    A,
    tscale,
    index_ptr,
    order_ptr,
    key_ptr,
    coef_ptr,
    src_ptr,
    rows,
    row_ok,
    first,
    q_begin,
    q_end,
    cols,
    K,
    stride_g,
    stride_src,
    GATHER: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """``[BLOCK_R, BLOCK_K]`` fp32 tile of ``dL/du = A * grad + target term``: with ``GATHER``,
    ``tscale * coef_i src_{index_i}`` (nothing where ``index_i < 0``); else the scattered sum."""
    mask = row_ok[:, None] & (cols[None, :] < K)
    g = tl.load(grad_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0) * A
    if GATHER:
        index = tl.load(index_ptr + rows, mask=row_ok, other=-1)
        coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0) * tscale
        src = tl.load(
            src_ptr + tl.maximum(index, 0)[:, None] * stride_src + cols[None, :],
            mask=mask & (index >= 0)[:, None],
            other=0.0,
        )
        g += coef[:, None] * src.to(tl.float32)
    else:
        g += tscale * _scattered(
            order_ptr, key_ptr, coef_ptr, src_ptr, stride_src, first, q_begin, q_end, cols, K, BLOCK_R, BLOCK_K,
            BLOCK_Q,
        )  # fmt: skip
    return g


@triton.jit
def _row_block_grad(
    grad_ptr,
    v_ptr,
    norm_ptr,
    out_ptr,
    first,
    R,
    K,
    stride_g,
    stride_v,
    stride_out,
    eps,
    A,
    tscale,
    index_ptr,
    order_ptr,
    key_ptr,
    Q,
    coef_ptr,
    src_ptr,
    stride_src,
    GATHER: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """``dL/dv`` of rows ``first .. first + BLOCK_R``: two passes over the columns (the row dots
    ``<u_i, g_i>``, then the projection), the second reading from L2."""
    rows = first + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    norm = tl.load(norm_ptr + rows, mask=row_ok, other=1.0)
    q_begin = 0
    q_end = 0
    if not GATHER:  # this block's sources: the sorted positions whose key is one of its rows
        q_begin, q_end = _positions_between(key_ptr, Q, first, tl.minimum(first + BLOCK_R, R), BLOCK_S)
    offs_k = tl.arange(0, BLOCK_K)
    dots = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        mask = row_ok[:, None] & (cols[None, :] < K)
        g = _grad_tile(
            grad_ptr, A, tscale, index_ptr, order_ptr, key_ptr, coef_ptr, src_ptr, rows, row_ok, first, q_begin,
            q_end, cols, K, stride_g, stride_src, GATHER, BLOCK_R, BLOCK_K, BLOCK_Q,
        )  # fmt: skip
        u = (
            tl.load(v_ptr + rows[:, None] * stride_v + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            / norm[:, None]
        )
        dots += tl.sum(u * g, axis=1)
    dots = tl.where(norm > eps, dots, 0.0)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        mask = row_ok[:, None] & (cols[None, :] < K)
        g = _grad_tile(
            grad_ptr, A, tscale, index_ptr, order_ptr, key_ptr, coef_ptr, src_ptr, rows, row_ok, first, q_begin,
            q_end, cols, K, stride_g, stride_src, GATHER, BLOCK_R, BLOCK_K, BLOCK_Q,
        )  # fmt: skip
        u = (
            tl.load(v_ptr + rows[:, None] * stride_v + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            / norm[:, None]
        )
        out = (g - u * dots[:, None]) / norm[:, None]
        if out_ptr.dtype.element_ty == tl.bfloat16:
            out = _round_to_bf16(out)
        # In place (out = grad) is safe: each element is stored by the program and thread
        # that loaded it, after that load.
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _unit_rows_grad_kernel(
    gx_ptr,  # [N, >= K] fp32: sum_j Gs_ij W_j
    x_ptr,  # [N, K] raw embeddings
    x_norm_ptr,  # [N] fp32
    x_out_ptr,  # [N, K] dtype of x: dL/dx (may be gx)
    target_ptr,  # [N] int64: each row's target, -1 for none
    wu_ptr,  # [n, >= K] operand dtype: the unit prototypes (gathered for the target term)
    gw_ptr,  # [n, >= K] fp32: sum_i Gs_ij X_i
    w_ptr,  # [n, K] raw prototypes
    w_norm_ptr,  # [n] fp32
    w_out_ptr,  # [n, K] dtype of w: dL/dw (may be gw)
    order_ptr,  # [N] int64: rows sorted stably by target
    key_ptr,  # [N] int64: their targets, ascending (n for none)
    xu_ptr,  # [N, >= K] operand dtype: the unit embeddings (scattered for the target term)
    tcoef_ptr,  # [N] fp32: t_i (times A when MEAN)
    gscale_ptr,  # [] fp32: A, or dL/dloss when MEAN
    count_ptr,  # [] fp32 (MEAN): the rows with a target; A = dL/dloss / count
    N,
    n,
    K,
    stride_gx,
    stride_x,
    stride_xout,
    stride_wu,
    stride_gw,
    stride_w,
    stride_wout,
    stride_xu,
    x_programs,  # cdiv(N, BLOCK_R): the embeddings' programs, first in the grid
    eps,
    MEAN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    X_BLOCK_K: tl.constexpr,
    W_BLOCK_K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    A = tl.load(gscale_ptr)
    tscale = 1.0
    if MEAN:  # the mean loss: dL/dLSE_i = dL/dloss / count on each row with a target
        A = tl.math.div_rn(A, tl.load(count_ptr))
        tscale = A
    pid = tl.program_id(0)
    if pid < x_programs:
        _row_block_grad(
            gx_ptr, x_ptr, x_norm_ptr, x_out_ptr, pid * BLOCK_R, N, K, stride_gx, stride_x, stride_xout, eps, A,
            tscale, target_ptr, order_ptr, key_ptr, N, tcoef_ptr, wu_ptr, stride_wu, True, BLOCK_R, X_BLOCK_K,
            BLOCK_Q, BLOCK_S,
        )  # fmt: skip
    else:
        _row_block_grad(
            gw_ptr, w_ptr, w_norm_ptr, w_out_ptr, (pid - x_programs) * BLOCK_R, n, K, stride_gw, stride_w,
            stride_wout, eps, A, tscale, target_ptr, order_ptr, key_ptr, N, tcoef_ptr, xu_ptr, stride_xu, False,
            BLOCK_R, W_BLOCK_K, BLOCK_Q, BLOCK_S,
        )  # fmt: skip


def _block_k(K: int) -> int:
    return min(256, triton.next_power_of_2(max(K, 16)))


def unit_rows(
    x: Tensor, w: Tensor, compute_dtype: torch.dtype, storage_dtype: torch.dtype, k_out: int
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((xu, x_norm), (wu, w_norm))``, one launch: unit rows ``[R, k_out]`` in ``storage_dtype`` of
    the raw ``x [N, k]`` and ``w [n, k]``, rounded to ``compute_dtype`` (fp32, fp16 or bf16; bf16
    values are exact in an fp16 ``storage_dtype`` but for subnormals), zero in columns
    ``k..k_out``, and ``norm = max(|v|, EPS)`` (``[R]`` fp32; the norm floor of :mod:`unicom_kernels.ops`)."""
    (N, K), n = x.shape, w.shape[0]
    x, w = x.contiguous(), w.contiguous()
    xu = torch.empty((N, k_out), dtype=storage_dtype, device=x.device)
    wu = torch.empty((n, k_out), dtype=storage_dtype, device=x.device)
    x_norm = torch.empty((N,), dtype=torch.float32, device=x.device)
    w_norm = torch.empty((n,), dtype=torch.float32, device=x.device)
    x_programs = triton.cdiv(N, BLOCK_R)
    _unit_rows_kernel[(x_programs + triton.cdiv(n, BLOCK_R),)](
        x,
        w,
        xu,
        wu,
        x_norm,
        w_norm,
        N,
        n,
        K,
        k_out,
        x.stride(0),
        w.stride(0),
        xu.stride(0),
        wu.stride(0),
        x_programs,
        EPS,
        ROUND_BF16=compute_dtype == torch.bfloat16,
        BLOCK_R=BLOCK_R,
        BLOCK_K=_block_k(k_out),
        num_warps=4,
    )
    return (xu, x_norm), (wu, w_norm)


def _output(grad: Tensor, v: Tensor) -> Tensor:
    """Where ``dL/dv`` goes: over the fp32 sums ``grad`` when they have its dtype and shape."""
    return grad if grad.dtype == v.dtype and grad.shape == v.shape else torch.empty_like(v)


def unit_rows_grad(
    grad_x: Tensor,
    grad_w: Tensor,
    x: Tensor,
    w: Tensor,
    operands: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]],
    target: Tensor,
    groups: tuple[Tensor, Tensor],
    tcoef: Tensor,
    gscale: Tensor,
    count: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``(dL/dx [N, k], dL/dw [n, k])`` in the dtypes of ``x``, ``w``, one launch.

    Args:
        grad_x, grad_w: ``[N, >= k]``, ``[n, >= k]`` fp32 GEMM sums (overwritten when reused as the output).
        x, w: the raw rows; operands: ``((xu, x_norm), (wu, w_norm))`` of :func:`unit_rows`.
        target: ``[N]`` int64; groups: ``(order, sorted_key)`` of :func:`.target_logit.group_rows`.
        tcoef: ``[N]`` fp32 target coefficients ``t_i`` (times ``A`` when ``count`` is given).
        gscale: 0-dim fp32 ``A``, or ``dL/dloss`` with ``count`` (0-dim fp32): ``A = dL/dloss / count``.
    """
    (N, K), n = x.shape, w.shape[0]
    (xu, x_norm), (wu, w_norm) = operands
    order, sorted_key = groups
    x, w = x.contiguous(), w.contiguous()
    x_out, w_out = _output(grad_x, x), _output(grad_w, w)
    x_programs = triton.cdiv(N, BLOCK_R)
    _unit_rows_grad_kernel[(x_programs + triton.cdiv(n, BLOCK_R),)](
        grad_x,
        x,
        x_norm,
        x_out,
        target,
        wu,
        grad_w,
        w,
        w_norm,
        w_out,
        order,
        sorted_key,
        xu,
        tcoef,
        gscale,
        count if count is not None else gscale,  # unread without MEAN
        N,
        n,
        K,
        grad_x.stride(0),
        x.stride(0),
        x_out.stride(0),
        wu.stride(0),
        grad_w.stride(0),
        w.stride(0),
        w_out.stride(0),
        xu.stride(0),
        x_programs,
        EPS,
        MEAN=count is not None,
        BLOCK_R=BLOCK_R,
        X_BLOCK_K=_block_k(K),
        W_BLOCK_K=min(64, _block_k(K)),
        BLOCK_Q=BLOCK_Q,
        BLOCK_S=BLOCK_S,
        num_warps=4,
    )
    return x_out, w_out
