"""Backward, step 2: the two gradient GEMMs over one class chunk, in one launch.

With ``Gs`` the off-target workspace of :mod:`.softmax_grad` (scaled by ``1 / A``), ``A``
a device scalar (no host sync) and ``t_i = dL/dc_{i,t_i}`` the full fp32 target coefficient
of row ``i`` (0 for rows without a target), the gradients w.r.t. the compute-dtype operands are

    grad_x_i = A * sum_j Gs_ij W_j + t_i W_{t_i}
    grad_w_j = A * sum_i Gs_ij X_i + sum_{i : t_i = j} t_i X_i

This kernel computes the two sums; the factor ``A`` and the target terms (a gathered row
per embedding, a scatter of rows onto classes) are applied in fp32 by the normalisation's
backward (:mod:`.unit_rows`), once per row: here they would be repeated by every
feature-column program, and the scatter, walking rows one at a time, would chain
dependent loads. The GEMM epilogues only store.

``_grad_gemm_kernel`` has a flat grid of two kinds of programs, both reading the chunk's
workspace: first ``cdiv(chunk, BLOCK_M) * cdiv(k, BLOCK_N)`` programs of ``grad_w`` (the
longer reductions, over all ``N`` rows, start first), then ``cdiv(N, BLOCK_M) * cdiv(k,
BLOCK_N)`` of ``grad_x``. One launch instead of two halves the launches per chunk and puts
both grids into the same waves: at shape A, K = 512, 100 + 128 programs rather than two
grids of under one wave each.

- A ``grad_w`` program computes ``Gs[:, tile]^T @ X`` for its own prototype rows, so
  nothing is shared.
- A ``grad_x`` program computes ``Gs[:, chunk] @ W[chunk]`` for one output tile, starting
  from the partial sum the previous chunk stored (chunks run one after another, so each
  tile is summed in chunk order). Starting the accumulator from the stored partial, rather
  than adding it after the loop, keeps one accumulator tile live.

Deterministic: every output element is reduced in a fixed order by one program.

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
def _grad_x_tile(
    pid_m,
    pid_d,
    g_ptr,
    w_ptr,
    out_ptr,
    N,
    K,
    col0,
    chunk,
    chunk_pad,
    stride_g,
    stride_w,
    stride_out,
    FIRST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``out[tile] (+)= Gs[:, :chunk] @ W[col0:col0+chunk]``."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_K)
    row_ok = offs_m < N
    dim_ok = offs_d < K
    out_ptrs = out_ptr + offs_m[:, None] * stride_out + offs_d[None, :]
    out_mask = row_ok[:, None] & dim_ok[None, :]
    if FIRST:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.load(out_ptrs, mask=out_mask, other=0.0)

    g_ptrs = g_ptr + offs_m[:, None] * stride_g + offs_c[None, :]
    w_ptrs = w_ptr + (col0 + offs_c[:, None]) * stride_w + offs_d[None, :]
    for c0 in range(0, chunk, BLOCK_K):
        g = tl.load(g_ptrs, mask=row_ok[:, None] & (offs_c[None, :] < chunk_pad - c0), other=0.0)
        w = tl.load(w_ptrs, mask=(offs_c[:, None] < chunk - c0) & dim_ok[None, :], other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)
        g_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_w
    tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit
def _grad_w_tile(
    pid_c,
    pid_d,
    g_ptr,
    x_ptr,
    out_ptr,
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
    """``out[col0 + tile] = Gs[:, tile]^T @ X``."""
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

    out_ptrs = out_ptr + (col0 + local_c)[:, None] * stride_out + offs_d[None, :]
    tl.store(out_ptrs, acc, mask=cls_ok[:, None] & dim_ok[None, :])


@triton.jit
def _grad_gemm_kernel(
    g_ptr,  # [N, >= chunk] workspace, compute dtype
    x_ptr,  # [N, K] compute dtype
    w_ptr,  # [n, K] compute dtype
    grad_x_ptr,  # [N, K] fp32, accumulated over chunks
    grad_w_ptr,  # [n, K] fp32
    N,
    K,
    col0,
    chunk,
    chunk_pad,
    w_programs,  # grad_w programs, first in the grid
    dim_blocks,  # cdiv(K, BLOCK_N)
    stride_g,
    stride_x,
    stride_w,
    stride_gx,
    stride_gw,
    FIRST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < w_programs:
        _grad_w_tile(
            pid // dim_blocks,
            pid % dim_blocks,
            g_ptr,
            x_ptr,
            grad_w_ptr,
            N,
            K,
            col0,
            chunk,
            chunk_pad,
            stride_g,
            stride_x,
            stride_gw,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            UPCAST,
            DOT_PRECISION,
        )
    else:
        pid -= w_programs
        _grad_x_tile(
            pid // dim_blocks,
            pid % dim_blocks,
            g_ptr,
            w_ptr,
            grad_x_ptr,
            N,
            K,
            col0,
            chunk,
            chunk_pad,
            stride_g,
            stride_w,
            stride_gx,
            FIRST,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            UPCAST,
            DOT_PRECISION,
        )


def grad_gemm_chunk(
    g: Tensor,
    xc: Tensor,
    wc: Tensor,
    grad_x: Tensor,
    grad_w: Tensor,
    col0: int,
    chunk: int,
    first: bool,
    tile: TileConfig,
) -> None:
    """Both gradient GEMMs of the chunk ``[col0, col0 + chunk)``, one launch:
    ``grad_w[col0:col0+chunk] = Gs[:, :chunk]^T @ xc`` and ``grad_x (+)= Gs[:, :chunk] @ wc[col0:col0+chunk]``.

    Args:
        g: ``[N, >= chunk]`` workspace; xc: ``[N, k]``, wc: ``[n, k]`` compute dtype.
        grad_x: ``[N, k]`` fp32 (partial sums between chunks; written, not read, when ``first``);
        grad_w: ``[n, k]`` fp32.
    """
    N, K = grad_x.shape
    dim_blocks = triton.cdiv(K, tile.block_n)
    w_programs = triton.cdiv(chunk, tile.block_m) * dim_blocks
    grid = (w_programs + triton.cdiv(N, tile.block_m) * dim_blocks,)
    _grad_gemm_kernel[grid](
        g,
        xc,
        wc,
        grad_x,
        grad_w,
        N,
        K,
        col0,
        chunk,
        triton.cdiv(chunk, 16) * 16,
        w_programs,
        dim_blocks,
        g.stride(0),
        xc.stride(0),
        wc.stride(0),
        grad_x.stride(0),
        grad_w.stride(0),
        FIRST=first,
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k,
        UPCAST=UPCAST,
        DOT_PRECISION=dot_precision(xc.dtype),
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
