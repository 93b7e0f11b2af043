"""Row normalisation around the GEMM kernels: unit rows in the operand dtype, and its Jacobian.

``_unit_rows_kernel``, grid ``(cdiv(R, BLOCK_R),)``: for raw rows ``v [R, k]`` (any float
dtype) it writes ``norm_i = max(|v_i|, eps)`` (fp32, ``[R]``) and the unit rows
``v_i / norm_i`` rounded to the compute dtype and stored in the operand dtype of the
kernels (``[R, k_out]``, zero past ``k``: the padding of ``ops/triton_op.py``). Norms and
quotients are fp32, as ``F.normalize`` on an fp32 copy.

``_unit_rows_grad_kernel``, same grid: ``dL/dv_i = (g_i - u_i <u_i, g_i>) / norm_i`` from the
fp32 gradient ``g = dL/du`` (``[R, >= k]``, the padded columns ignored), recomputing
``u_i = v_i / norm_i`` from the raw rows; where ``|v_i| <= eps`` the norm is the constant
``eps`` and there is no projection. Written in the dtype of ``v``. Optionally (:class:`Scatter`)
it first adds to ``g`` a sum of other rows scattered onto these: the target term of the
prototype gradient, ``sum_{i : t_i = j} t_i X_i``, which many rows of the batch may share.
Each program owns its destination rows and reads their sources in sorted order, so the
sum is deterministic without atomics and done once per class.

Each replaces the handful of elementwise torch launches and fp32 temporaries of the same
formulas (norm, clamp, divide, cast, pad; dot, multiply-add, scale, cast) by one pass that
reads a row block twice (the second time from L2).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops import EPS

BLOCK_R = 16
BLOCK_Q = 8  # scattered source rows per step: [BLOCK_R, BLOCK_Q, BLOCK_K] in registers


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
def _unit_rows_kernel(
    v_ptr,  # [R, K] raw rows, any float dtype
    out_ptr,  # [R, K_OUT] operand dtype
    norm_ptr,  # [R] fp32 out: max(|v|, eps)
    R,
    K,
    K_OUT,
    stride_v,
    stride_out,
    eps,
    ROUND_BF16: tl.constexpr,  # round to bf16 first (bf16 compute dtype), then store in out's dtype
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
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
def _unit_rows_grad_kernel(
    grad_ptr,  # [R, >= K] fp32 dL/du
    v_ptr,  # [R, K] raw rows
    norm_ptr,  # [R] fp32 max(|v|, eps)
    out_ptr,  # [R, K] dtype of v: dL/dv
    order_ptr,  # [Q] int64 (SCATTER): source rows sorted by destination row
    dest_ptr,  # [Q] int64 (SCATTER): their destination rows, ascending
    dest_start_ptr,  # [R + 1] int64 (SCATTER): first position in `order` of each destination
    coef_ptr,  # [Q] fp32 (SCATTER): coefficient of each source row
    src_ptr,  # [Q, >= K] (SCATTER): the source rows
    R,
    K,
    stride_g,
    stride_v,
    stride_out,
    stride_src,
    eps,
    SCATTER: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    first = tl.program_id(0) * BLOCK_R
    rows = first + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    norm = tl.load(norm_ptr + rows, mask=row_ok, other=1.0)
    if SCATTER:
        q_begin = tl.load(dest_start_ptr + first)
        q_end = tl.load(dest_start_ptr + tl.minimum(first + BLOCK_R, R))
    offs_k = tl.arange(0, BLOCK_K)
    dots = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        mask = row_ok[:, None] & (cols[None, :] < K)
        g = tl.load(grad_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
        if SCATTER:
            g += _scattered(
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
                BLOCK_R,
                BLOCK_K,
                BLOCK_Q,
            )
        u = (
            tl.load(v_ptr + rows[:, None] * stride_v + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            / norm[:, None]
        )
        dots += tl.sum(u * g, axis=1)
    dots = tl.where(norm > eps, dots, 0.0)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        mask = row_ok[:, None] & (cols[None, :] < K)
        g = tl.load(grad_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
        if SCATTER:
            g += _scattered(
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
                BLOCK_R,
                BLOCK_K,
                BLOCK_Q,
            )
        u = (
            tl.load(v_ptr + rows[:, None] * stride_v + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            / norm[:, None]
        )
        out = (g - u * dots[:, None]) / norm[:, None]
        if out_ptr.dtype.element_ty == tl.bfloat16:
            out = _round_to_bf16(out)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _block_k(K: int) -> int:
    return min(256, triton.next_power_of_2(max(K, 16)))


def unit_rows(v: Tensor, compute_dtype: torch.dtype, storage_dtype: torch.dtype, k_out: int) -> tuple[Tensor, Tensor]:
    """``(u [R, k_out] storage_dtype, norm [R] fp32)``: unit rows of the raw ``v [R, k]``, rounded to
    ``compute_dtype`` (fp32, fp16 or bf16; bf16 values are exact in an fp16 ``storage_dtype``
    but for subnormals), zero in columns ``k..k_out``; ``norm = max(|v|, EPS)`` (the norm floor
    of :mod:`unicom_kernels.ops`)."""
    R, K = v.shape
    v = v.contiguous()
    out = torch.empty((R, k_out), dtype=storage_dtype, device=v.device)
    norm = torch.empty((R,), dtype=torch.float32, device=v.device)
    _unit_rows_kernel[(triton.cdiv(R, BLOCK_R),)](
        v,
        out,
        norm,
        R,
        K,
        k_out,
        v.stride(0),
        out.stride(0),
        EPS,
        ROUND_BF16=compute_dtype == torch.bfloat16,
        BLOCK_R=BLOCK_R,
        BLOCK_K=_block_k(k_out),
        num_warps=4,
    )
    return out, norm


class Scatter(NamedTuple):
    """Rows added to the gradient before the normalisation's backward:
    ``grad_j += sum_{i : dest_i = j} coef_i src_i``, summed in a fixed order without atomics.

    ``order [Q]`` int64: source rows sorted (stably) by destination; ``dest [Q]`` int64: the
    destination of each, ascending (sources without one sort last, past ``R``);
    ``dest_start [R + 1]`` int64: first position in ``order`` of each destination; ``coef
    [Q]`` fp32; ``src [Q, >= k]`` any float dtype.
    """

    order: Tensor
    dest: Tensor
    dest_start: Tensor
    coef: Tensor
    src: Tensor


def unit_rows_grad(grad: Tensor, v: Tensor, norm: Tensor, scatter: Scatter | None = None) -> Tensor:
    """``dL/dv [R, k]`` in ``v``'s dtype from ``grad = dL/du [R, >= k]`` fp32 (see the module docstring),
    with the rows of ``scatter`` added to ``grad`` first."""
    R, K = v.shape
    v = v.contiguous()
    out = torch.empty_like(v)
    order, dest, dest_start, coef, src = scatter if scatter is not None else (norm,) * 5  # unread placeholders
    _unit_rows_grad_kernel[(triton.cdiv(R, BLOCK_R),)](
        grad,
        v,
        norm,
        out,
        order,
        dest,
        dest_start,
        coef,
        src,
        R,
        K,
        grad.stride(0),
        v.stride(0),
        out.stride(0),
        src.stride(0),
        EPS,
        SCATTER=scatter is not None,
        BLOCK_R=BLOCK_R,
        BLOCK_K=min(64, _block_k(K)) if scatter is not None else _block_k(K),
        BLOCK_Q=BLOCK_Q,
        num_warps=4,
    )
    return out
