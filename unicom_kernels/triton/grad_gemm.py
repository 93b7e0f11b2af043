"""Backward, step 2: the two gradient GEMMs over one class chunk, with the target term in fp32.

With ``Gs`` the off-target workspace of :mod:`.softmax_grad` (scaled by ``1 / A``), ``A``
a device scalar (no host sync) and ``t_i = dL/dc_{i,t_i}`` the full fp32 target coefficient
of row ``i`` (0 for rows without a target), the gradients w.r.t. the compute-dtype operands are

    grad_x_i = A * sum_j Gs_ij W_j + t_i W_{t_i}
    grad_w_j = A * sum_i Gs_ij X_i + sum_{i : t_i = j} t_i X_i

``_grad_x_kernel``, grid ``(cdiv(N, BLOCK_M), cdiv(k, BLOCK_N))``: a plain GEMM
``Gs[:, chunk] @ W[chunk]`` per output tile. Chunks run one after another (separate
launches) and each adds its product to the fp32 output in chunk order; the last one
multiplies by ``A`` and adds the target term ``t_i W_{t_i}`` (a gathered row, fp32).

``_grad_w_kernel``, grid ``(cdiv(chunk, BLOCK_M), cdiv(k, BLOCK_N))``: a GEMM
``Gs[:, chunk]^T @ X`` times ``A``; the program owns its prototype rows, so nothing is
shared. The target term of ``grad_w``, a scatter of rows onto classes, is added once per
class by the normalisation's backward (:mod:`.unit_rows`), not here: in this kernel it
would be repeated by every feature-column program of every chunk and, walking rows one at
a time, would chain dependent loads (a class of 256 rows in the batch cost ~100 us).

Both are deterministic: every output element is reduced in a fixed order by one program.

``chunk`` is the chunk's class count, ``chunk_pad`` that rounded up to 16: the workspace
holds zeros up to ``chunk_pad``, so loads along its contiguous dimension can use a mask
that is constant over 16-element groups. Triton then vectorises them and software-
pipelines the K loop (``cp.async``); with a ragged mask it does neither. For the same
reason the host pads ``k`` to a multiple of 16 (:mod:`unicom_kernels.ops.triton_op`).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .common import UPCAST, dot_precision
from .configs import TileConfig


@triton.jit
def _grad_x_kernel(
    g_ptr,  # [N, >= chunk] workspace, compute dtype
    w_ptr,  # [n, K] compute dtype
    out_ptr,  # [N, K] fp32, accumulated over chunks
    target_ptr,  # [N] int64
    tcoef_ptr,  # [N] fp32 t_i
    gscale_ptr,  # [] fp32 A
    N,
    K,
    col0,
    chunk,
    chunk_pad,
    stride_g,
    stride_w,
    stride_out,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_K)
    row_ok = offs_m < N
    dim_ok = offs_d < K

    g_ptrs = g_ptr + offs_m[:, None] * stride_g + offs_c[None, :]
    w_ptrs = w_ptr + (col0 + offs_c[:, None]) * stride_w + offs_d[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, chunk, BLOCK_K):
        g = tl.load(g_ptrs, mask=row_ok[:, None] & (offs_c[None, :] < chunk_pad - c0), other=0.0)
        w = tl.load(w_ptrs, mask=(offs_c[:, None] < chunk - c0) & dim_ok[None, :], other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)
        g_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_w

    out_ptrs = out_ptr + offs_m[:, None] * stride_out + offs_d[None, :]
    out_mask = row_ok[:, None] & dim_ok[None, :]
    if not FIRST:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0)
    if LAST:
        target = tl.load(target_ptr + offs_m, mask=row_ok, other=-1)
        tcoef = tl.load(tcoef_ptr + offs_m, mask=row_ok, other=0.0)
        w_t = tl.load(w_ptr + tl.maximum(target, 0)[:, None] * stride_w + offs_d[None, :], mask=out_mask, other=0.0).to(
            tl.float32
        )
        acc = acc * tl.load(gscale_ptr) + tcoef[:, None] * w_t
    tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit
def _grad_w_kernel(
    g_ptr,  # [N, >= chunk] workspace, compute dtype
    x_ptr,  # [N, K] compute dtype
    out_ptr,  # [n, K] fp32
    gscale_ptr,  # [] fp32 A
    N,
    K,
    col0,
    chunk,
    chunk_pad,
    stride_g,
    stride_x,
    stride_out,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    local_c = pid_c * BLOCK_M + tl.arange(0, BLOCK_M)  # column of the chunk = output row
    offs_d = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_K)
    cls_ok = local_c < chunk  # output rows of this chunk
    cls_load_ok = local_c < chunk_pad  # workspace columns (zeros past the chunk)
    dim_ok = offs_d < K

    # Gs^T is read as [BLOCK_K rows, BLOCK_M classes] (coalesced along the classes) and
    # transposed in the dot.
    g_ptrs = g_ptr + offs_r[:, None] * stride_g + local_c[None, :]
    x_ptrs = x_ptr + offs_r[:, None] * stride_x + offs_d[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, N, BLOCK_K):
        r_ok = offs_r[:, None] < N - r0
        g = tl.load(g_ptrs, mask=r_ok & cls_load_ok[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=r_ok & dim_ok[None, :], other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=DOT_PRECISION)
        g_ptrs += BLOCK_K * stride_g
        x_ptrs += BLOCK_K * stride_x

    acc = acc * tl.load(gscale_ptr)
    out_ptrs = out_ptr + (col0 + local_c)[:, None] * stride_out + offs_d[None, :]
    tl.store(out_ptrs, acc, mask=cls_ok[:, None] & dim_ok[None, :])


def grad_x_chunk(
    g: Tensor,
    wc: Tensor,
    out: Tensor,
    target: Tensor,
    tcoef: Tensor,
    gscale: Tensor,
    col0: int,
    chunk: int,
    first: bool,
    last: bool,
    tile: TileConfig,
) -> None:
    """``out (+)= Gs[:, :chunk] @ wc[col0:col0+chunk]``; on the last chunk scale by ``A``, add the target term.

    Args:
        g: ``[N, >= chunk]`` workspace; wc: ``[n, k]`` compute dtype; out: ``[N, k]`` fp32.
        target, tcoef: ``[N]``; gscale: 0-dim fp32 ``A``.
    """
    N, K = out.shape
    grid = (triton.cdiv(N, tile.block_m), triton.cdiv(K, tile.block_n))
    _grad_x_kernel[grid](
        g,
        wc,
        out,
        target,
        tcoef,
        gscale,
        N,
        K,
        col0,
        chunk,
        triton.cdiv(chunk, 16) * 16,
        g.stride(0),
        wc.stride(0),
        out.stride(0),
        FIRST=first,
        LAST=last,
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k,
        UPCAST=UPCAST,
        DOT_PRECISION=dot_precision(wc.dtype),
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )


def grad_w_chunk(
    g: Tensor,
    xc: Tensor,
    out: Tensor,
    gscale: Tensor,
    col0: int,
    chunk: int,
    tile: TileConfig,
) -> None:
    """``out[col0:col0+chunk] = gscale * Gs[:, :chunk]^T @ xc`` (the target term comes later).

    Args:
        g: ``[N, >= chunk]`` workspace; xc: ``[N, k]`` compute dtype; out: ``[n, k]`` fp32.
    """
    N, K = xc.shape
    grid = (triton.cdiv(chunk, tile.block_m), triton.cdiv(K, tile.block_n))
    _grad_w_kernel[grid](
        g,
        xc,
        out,
        gscale,
        N,
        K,
        col0,
        chunk,
        triton.cdiv(chunk, 16) * 16,
        g.stride(0),
        xc.stride(0),
        out.stride(0),
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k,
        UPCAST=UPCAST,
        DOT_PRECISION=dot_precision(xc.dtype),
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
