"""Forward: cosine GEMM + log-sum-exp, fused, then the target logit and the combine.

Three kernels:

1. ``_lse_partial_kernel``, grid ``(cdiv(N, BLOCK_M), S)``. Program ``(i, s)`` owns a block
   of rows and the ``s``-th contiguous run of class tiles. For each ``[BLOCK_M, BLOCK_N]``
   tile it computes the raw cosines with ``tl.dot`` (fp32 accumulation), clamps them to
   ``[-1, 1]``, scales by ``s``, leaves out each row's target entry and folds the rest into
   a running ``(max, sum of exp(z - max))`` per row: an online log-sum-exp with a running
   maximum, so a row whose logits are all very negative (``s = 128``, ``c = -1``) stays
   exact; a fixed shift of ``s`` would underflow it. It writes one partial per row and split.
   The target needs nothing but its column here, so the margin waits for step 2.
2. ``_lse_combine_kernel``, one program per ``BLOCK`` rows: each row's margined target logit
   ``z_t`` and ``dz/dc`` (:func:`.target_logit.target_logit_rows`), then ``z_t`` and the
   ``S`` partials merged in split order (fixed order: deterministic, no atomics) into
   ``LSE_i``, the per-row loss ``LSE_i - z_t`` (0 for ignored rows) and the target
   coefficient of the backward ``t_i = (exp(z_t - LSE_i) - 1) * dz_dc_i`` (0 for ignored
   rows); and the rows grouped by class for the backward (:func:`.target_logit.group_rows`;
   above ``Configs.group_compare_rows`` rows ``torch.sort`` does that after the kernel).
3. ``_loss_finalize_kernel`` (one program) averages the row losses in a fixed order.

With the normalisation of both operands (:mod:`.unit_rows`), the mean loss takes four
launches, the per-row statistics three.

Workspace: the partials, ``2 * S * N`` fp32 (``8 * S * N`` bytes; ``S <= cdiv(n, BLOCK_N)``).
No ``[N, n]`` tensor exists: the logits live in registers only.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import UPCAST, clamp_cosine, cosine_tile, dot_precision
from .configs import get_configs
from .target_logit import group_rows, margin_arguments, target_logit_rows

# tl.range(..., flatten=True) exists in recent Triton only (3.2 lacks it).
SUPPORTS_FLATTEN = "flatten" in inspect.signature(tl.range.__init__).parameters


@triton.jit
def _fold_tile(
    x_ptr,
    w_ptr,
    offs_m,
    tile,
    target,
    run_max,
    run_sum,
    N,
    n,
    K,
    stride_x,
    stride_w,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold the off-target logits of class tile ``tile`` into the running ``(max, sum)`` of each row."""
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cos = cosine_tile(
        x_ptr, w_ptr, offs_m, offs_n, N, n, K, stride_x, stride_w, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION
    )
    z = scale * clamp_cosine(cos)
    z = tl.where((offs_n[None, :] < n) & (offs_n[None, :] != target[:, None]), z, float("-inf"))
    return _fold(run_max, run_sum, tl.max(z, axis=1), z, 1)


@triton.jit
def _fold(run_max, run_sum, new, values, AXIS: tl.constexpr):
    """Online log-sum-exp step: ``(max, sum)`` after adding ``values`` (whose maximum along ``AXIS``
    is ``new``), or after adding one ``(max, sum)`` pair ``(new, values)`` when ``AXIS`` is 0.

    A row may have seen nothing but its excluded target so far (max ``-inf``); the shift then
    is 0, so ``exp(-inf - 0) = 0`` keeps the empty sum empty instead of ``exp(-inf + inf)``.
    """
    new_max = tl.maximum(run_max, new)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    if AXIS == 1:
        added = tl.sum(tl.exp(values - shift[:, None]), axis=1)
    else:
        added = values * tl.exp(new - shift)
    return new_max, run_sum * tl.exp(run_max - shift) + added


@triton.jit
def _lse_partial_kernel(
    x_ptr,  # [N, K] compute dtype
    w_ptr,  # [n, K] compute dtype
    target_ptr,  # [N] int64, -1 = ignored
    max_ptr,  # [S, N] fp32 out
    sum_ptr,  # [S, N] fp32 out
    N,
    n,
    K,
    stride_x,
    stride_w,
    tiles_per_split,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    target = tl.load(target_ptr + offs_m, mask=row_ok, other=-1)

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(n, BLOCK_N))
    # FLATTEN merges the tile loop with the K loop inside cosine_tile, so that the software
    # pipeline runs across tile boundaries instead of draining every 8 K steps (k = 512).
    # The flatten= keyword is only reached when FLATTEN is set (constexpr branch), so
    # Triton versions without it still compile the plain loop.
    if FLATTEN:
        for tile in tl.range(first_tile, last_tile, flatten=True):
            run_max, run_sum = _fold_tile(
                x_ptr, w_ptr, offs_m, tile, target, run_max, run_sum, N, n, K, stride_x, stride_w, scale,
                BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION,
            )  # fmt: skip
    else:
        for tile in range(first_tile, last_tile):
            run_max, run_sum = _fold_tile(
                x_ptr, w_ptr, offs_m, tile, target, run_max, run_sum, N, n, K, stride_x, stride_w, scale,
                BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION,
            )  # fmt: skip

    tl.store(max_ptr + split * N + offs_m, run_max, mask=row_ok)
    tl.store(sum_ptr + split * N + offs_m, run_sum, mask=row_ok)


@triton.jit
def _lse_combine_kernel(
    max_ptr,  # [S, N] fp32
    sum_ptr,  # [S, N] fp32
    x_ptr,  # [N, K] compute dtype
    w_ptr,  # [n, K] compute dtype
    target_ptr,  # [N] int64
    lse_ptr,  # [N] fp32 out
    row_loss_ptr,  # [N] fp32 out
    tcoef_ptr,  # [N] fp32 out
    zt_ptr,  # [N] fp32 out: margined target logit (0 without a target)
    dzdc_ptr,  # [N] fp32 out: dz_t/dc_t, times torch.clamp's gradient mask
    order_ptr,  # [N] int64 out: rows sorted stably by target
    key_ptr,  # [N] int64 out: their targets (n for none), ascending
    N,
    n,
    K,
    S,
    stride_x,
    stride_w,
    scale,
    margin,
    cos_m,
    sin_m,
    sin_floor,
    MARGIN: tl.constexpr,
    EXACT: tl.constexpr,
    GROUP: tl.constexpr,  # group the rows by class here (else the host sorts them)
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    target = tl.load(target_ptr + offs, mask=ok, other=-1)
    valid = target >= 0
    z_t, dz_dc = target_logit_rows(
        x_ptr, w_ptr, offs, ok, target, K, stride_x, stride_w, scale, margin, cos_m, sin_m, sin_floor,
        MARGIN, EXACT, BLOCK, BLOCK_K,
    )  # fmt: skip
    # The target logit first, then the off-target partials in split order (fixed: deterministic).
    run_max = tl.where(valid, z_t, float("-inf"))
    run_sum = tl.where(valid, 1.0, 0.0)
    for s in range(0, S):
        m = tl.load(max_ptr + s * N + offs, mask=ok, other=float("-inf"))
        total = tl.load(sum_ptr + s * N + offs, mask=ok, other=0.0)
        run_max, run_sum = _fold(run_max, run_sum, m, total, 0)
    lse = run_max + tl.log(tl.where(ok, run_sum, 1.0))  # rows past N have nothing to sum

    p_t = tl.exp(z_t - lse)
    tl.store(lse_ptr + offs, lse, mask=ok)
    tl.store(row_loss_ptr + offs, tl.where(valid, lse - z_t, 0.0), mask=ok)
    tl.store(tcoef_ptr + offs, tl.where(valid, (p_t - 1.0) * dz_dc, 0.0), mask=ok)
    tl.store(zt_ptr + offs, tl.where(valid, z_t, 0.0), mask=ok)
    tl.store(dzdc_ptr + offs, dz_dc, mask=ok)
    if GROUP:
        group_rows(target_ptr, offs, ok, target, N, n, order_ptr, key_ptr, BLOCK, BLOCK_G)


@triton.jit
def _loss_finalize_kernel(
    row_loss_ptr,  # [N] fp32
    target_ptr,  # [N] int64
    loss_ptr,  # [] fp32 out: mean of row_loss over rows with a target (0 if none)
    count_ptr,  # [] fp32 out: max(number of rows with a target, 1)
    N,
    BLOCK: tl.constexpr,
):
    # One program, rows in a fixed order: a deterministic mean without atomics. N is a few
    # thousand rows, so this is a few microseconds; it saves four torch launches.
    offs = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    count = tl.zeros((BLOCK,), dtype=tl.float32)
    for r0 in range(0, N, BLOCK):
        ok = offs < N - r0
        total += tl.load(row_loss_ptr + r0 + offs, mask=ok, other=0.0)
        count += tl.where(ok & (tl.load(target_ptr + r0 + offs, mask=ok, other=-1) >= 0), 1.0, 0.0)
    rows = tl.maximum(tl.sum(count, axis=0), 1.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) / rows)
    tl.store(count_ptr, rows)


def mean_loss(row_loss: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``(loss, count)``: 0-dim fp32 mean of ``row_loss`` over rows with a target, and that count (>= 1)."""
    loss = torch.empty((), dtype=torch.float32, device=row_loss.device)
    count = torch.empty_like(loss)
    _loss_finalize_kernel[(1,)](row_loss, target, loss, count, row_loss.shape[0], BLOCK=1024, num_warps=4)
    return loss, count


class ForwardStats(NamedTuple):
    """What the forward computes per row (each ``[N]``): ``lse``, ``row_loss`` (``LSE - z_t``, 0
    if ignored), ``tcoef`` (the target coefficient of the mean loss's backward), ``z_t`` (0
    if ignored) and ``dz_dc`` (fp32); ``order`` and ``sorted_key`` (int64): the rows grouped
    by class for the backward (see :func:`.target_logit.group_rows`)."""

    lse: Tensor
    row_loss: Tensor
    tcoef: Tensor
    z_t: Tensor
    dz_dc: Tensor
    order: Tensor
    sorted_key: Tensor


def lse_forward(
    xc: Tensor, wc: Tensor, target: Tensor, *, scale: float, margin: float, margin_type: str, margin_grad: str
) -> ForwardStats:
    """Run the fused forward: two launches (and a sort above ``Configs.group_compare_rows`` rows).

    Args:
        xc: ``[N, k]`` embeddings in the compute dtype, unit stride along ``k``.
        wc: ``[n, k]`` prototypes in the compute dtype, unit stride along ``k``.
        target: ``[N]`` int64 column of each row's target, ``-1`` for ignored rows.
        scale, margin, margin_type, margin_grad: see :func:`unicom_kernels.margin.target_logit`.

    Raises:
        ValueError: unknown ``margin_type`` or ``margin_grad``.
    """
    margin_args = margin_arguments(scale, margin, margin_type, margin_grad)
    cfg = get_configs()
    precision = dot_precision(xc.dtype)
    tile = cfg.tile("lse", precision, xc.dtype == torch.float32)
    N, K = xc.shape
    n = wc.shape[0]
    row_blocks = triton.cdiv(N, tile.block_m)
    class_tiles = triton.cdiv(n, tile.block_n)
    # Enough splits to fill the GPU; every split gets at least one class tile. Programs
    # are numbered row block first, so those running together share their W tiles in L2.
    splits = max(1, min(class_tiles, triton.cdiv(cfg.target_programs, row_blocks)))
    tiles_per_split = triton.cdiv(class_tiles, splits)
    splits = triton.cdiv(class_tiles, tiles_per_split)

    part_max = torch.empty((splits, N), dtype=torch.float32, device=xc.device)
    part_sum = torch.empty((splits, N), dtype=torch.float32, device=xc.device)
    _lse_partial_kernel[(row_blocks, splits)](
        xc,
        wc,
        target,
        part_max,
        part_sum,
        N,
        n,
        K,
        xc.stride(0),
        wc.stride(0),
        tiles_per_split,
        float(scale),
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k,
        UPCAST=UPCAST,
        DOT_PRECISION=precision,
        FLATTEN=cfg.flatten_forward and SUPPORTS_FLATTEN,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
    stats = ForwardStats(
        *(torch.empty(N, dtype=torch.float32, device=xc.device) for _ in range(5)),
        *(torch.empty(N, dtype=torch.int64, device=xc.device) for _ in range(2)),
    )
    group = N <= cfg.group_compare_rows
    _lse_combine_kernel[(triton.cdiv(N, cfg.combine_block),)](
        part_max,
        part_sum,
        xc,
        wc,
        target,
        *stats,
        N,
        n,
        K,
        splits,
        xc.stride(0),
        wc.stride(0),
        **margin_args,
        GROUP=group,
        BLOCK=cfg.combine_block,
        BLOCK_K=min(128, triton.next_power_of_2(max(K, 16))),
        BLOCK_G=cfg.group_block,
        num_warps=4,
    )
    if not group:  # the same stable order, by a sort: O(N) where N^2 comparisons would cost more
        sorted_key, order = torch.sort(torch.where(target >= 0, target, n), stable=True)
        stats = stats._replace(order=order, sorted_key=sorted_key)
    return stats
