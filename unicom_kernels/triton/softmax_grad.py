"""Backward, step 1: recompute the logits of a class chunk and write ``dL/dcos`` (off-target part).

The loss reaches the logits through each row's log-sum-exp (coefficient ``a_i = dL/dLSE_i``)
and its target logit. Off the target, ``dL/dc_ij = a_i * s * p_ij * [-1 < c_ij < 1]`` with
``p_ij = exp(z_ij - LSE_i)``. The host passes ``r_i = a_i / A`` with ``A = max_i |a_i|`` (a
device scalar), so that the stored values stay in ``[-s, s]``; for the mean loss ``r_i`` is
``[t_i >= 0]``, read from the targets.

``_softmax_grad_kernel``, grid ``(cdiv(N, BLOCK_M), cdiv(chunk, BLOCK_N))``: each program
recomputes one ``[BLOCK_M, BLOCK_N]`` cosine tile (same GEMM as the forward, fp32 in
registers), turns it into

    Gs_ij = r_i * s * exp(s * clamp(c_ij, -1, 1) - LSE_i) * [-1 < c_ij < 1]     for j != t_i,
    Gs_ij = 0                                                                   for j == t_i,

and stores it in the compute dtype into the workspace ``G[:, j - col0]``. Bounded by ``s``,
it fits fp16 as well as bf16 for every ``s <= 128``. The target entry, whose exact-arcface
derivative is unbounded near ``|c| = 1``, and the factor ``A`` are applied later in fp32
(see :mod:`.grad_gemm`). Storing softmax probabilities rather than logits keeps the
rule "never store ``s*cos`` in bf16" (docs/design.md, sections 2.9 and 3.3).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .common import UPCAST, clamp_cosine, cosine_tile, dot_precision
from .configs import TileConfig


@triton.jit
def _softmax_grad_kernel(
    x_ptr,  # [N, K] compute dtype
    w_ptr,  # [n, K] compute dtype
    target_ptr,  # [N] int64
    lse_ptr,  # [N] fp32
    rowscale_ptr,  # [N] fp32: r_i = (dL/dLSE_i) / max |dL/dLSE| (unread when MEAN)
    g_ptr,  # [N, >= chunk] workspace, compute dtype
    N,
    n,
    K,
    col0,
    chunk_pad,
    stride_x,
    stride_w,
    stride_g,
    scale,
    MEAN: tl.constexpr,  # the mean loss: r_i = [t_i >= 0]
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # column in the chunk
    offs_n = col0 + local_n  # class index
    row_ok = offs_m < N
    col_ok = local_n < chunk_pad

    cos = cosine_tile(
        x_ptr,
        w_ptr,
        offs_m,
        offs_n,
        N,
        n,
        K,
        stride_x,
        stride_w,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        UPCAST,
        DOT_PRECISION,
    )
    target = tl.load(target_ptr + offs_m, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
    if MEAN:
        rowscale = tl.where(target >= 0, 1.0, 0.0)
    else:
        rowscale = tl.load(rowscale_ptr + offs_m, mask=row_ok, other=0.0)
    # torch.clamp passes the gradient where min <= c <= max (inclusive).
    inside = (cos > -1.0) & (cos < 1.0)  # torch.clamp's gradient mask
    z = scale * clamp_cosine(cos)
    # p = exp(z - LSE) <= 1 (LSE includes z). The min() only matters for the padding of
    # ragged tiles (cos = 0 there, LSE may be ~ -s), which would overflow to inf unstored.
    prob = tl.exp(tl.minimum(z - lse[:, None], 0.0))
    keep = inside & (offs_n[None, :] != target[:, None]) & (offs_n[None, :] < n)
    grad = tl.where(keep, (scale * prob) * rowscale[:, None], 0.0)
    g_ptrs = g_ptr + offs_m[:, None] * stride_g + local_n[None, :]
    tl.store(g_ptrs, grad.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def softmax_grad_chunk(
    xc: Tensor,
    wc: Tensor,
    target: Tensor,
    lse: Tensor,
    rowscale: Tensor | None,
    g: Tensor,
    col0: int,
    chunk_pad: int,
    scale: float,
    tile: TileConfig,
) -> None:
    """Fill ``g[:, :chunk_pad]`` with ``Gs`` for classes ``[col0, col0 + chunk_pad)`` (0 past ``n``).

    Args:
        xc, wc: ``[N, k]`` / ``[n, k]`` operands in the compute dtype.
        target: ``[N]`` int64; lse: ``[N]`` fp32 from the forward; rowscale: ``[N]`` fp32 ``r_i``,
            or None for the mean loss (``r_i = [t_i >= 0]``).
        g: ``[N, >= chunk_pad]`` workspace in the compute dtype (unit column stride).
        chunk_pad: the chunk's class count rounded up to 16 (see :mod:`.backward`).
    """
    N, K = xc.shape
    grid = (triton.cdiv(N, tile.block_m), triton.cdiv(chunk_pad, tile.block_n))
    _softmax_grad_kernel[grid](
        xc,
        wc,
        target,
        lse,
        rowscale if rowscale is not None else lse,  # unread for the mean loss
        g,
        N,
        wc.shape[0],
        K,
        col0,
        chunk_pad,
        xc.stride(0),
        wc.stride(0),
        g.stride(0),
        float(scale),
        MEAN=rowscale is None,
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k,
        UPCAST=UPCAST,
        DOT_PRECISION=dot_precision(xc.dtype),
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
