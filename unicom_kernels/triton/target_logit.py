"""Per-row work on the targets, as device helpers of the forward's combine kernel.

:func:`target_logit_rows`: for a block of rows, the raw target cosine ``c_i = <x_i, w_{t_i}>``
(a row-wise dot with a gathered prototype row: CCE's ``indexed_dot`` idea; fp32 products of
the compute-dtype values, fp32 sums), then the margin of
:func:`unicom_kernels.margin.target_logit` on ``clamp(c_i, -1, 1)``:

    arcface: z = s * (c cos m - sqrt(1 - c^2) sin m)        (exact for theta + m > pi too)
    cosface: z = s * (c - m)
    none:    z = s * c

and ``dz/dc`` (``s`` for ``straight_through``; the exact derivative otherwise, with
``sqrt(1 - c^2)`` floored at ``margin._SIN_FLOOR``), times ``[-1 < c_i < 1]`` (torch.clamp's
gradient mask). Rows without a target read prototype 0 (their values are unused). The
formulas mirror ``margin.py`` term by term; ``tests/test_triton_backend.py`` checks them
against it.

:func:`group_rows`: the rows sorted stably by target class (rows without a target last), for
the prototype gradient's target term, which sums the rows of each class in a fixed order
(:mod:`.unit_rows`). The position of row ``i`` is the number of rows with a smaller key plus
the earlier rows with the same key: ``N`` comparisons per row, which for a batch of a few
thousand rows is cheaper than a sort's several launches, and a permutation written without
conflicts (no atomics).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from ..margin import _SIN_FLOOR
from .common import clamp_cosine

MARGIN_CODES = {"arcface": 0, "cosface": 1, "none": 2}


def margin_arguments(scale: float, margin: float, margin_type: str, margin_grad: str) -> dict[str, object]:
    """The scalar arguments and constexprs of :func:`target_logit_rows`.

    Raises:
        ValueError: unknown ``margin_type`` or ``margin_grad``.
    """
    if margin_type not in MARGIN_CODES:
        raise ValueError(f"margin_type must be one of {tuple(MARGIN_CODES)}, got {margin_type!r}")
    if margin_grad not in ("straight_through", "exact"):
        raise ValueError(f"margin_grad must be 'straight_through' or 'exact', got {margin_grad!r}")
    return dict(
        scale=float(scale),
        margin=float(margin),
        cos_m=math.cos(margin),
        sin_m=math.sin(margin),
        sin_floor=_SIN_FLOOR,
        MARGIN=MARGIN_CODES[margin_type],
        EXACT=margin_grad == "exact",
    )


@triton.jit
def target_logit_rows(
    x_ptr,
    w_ptr,
    offs_m,
    row_ok,
    target,
    K,
    stride_x,
    stride_w,
    scale,
    margin,
    cos_m,
    sin_m,
    sin_floor,
    MARGIN: tl.constexpr,  # 0 arcface, 1 cosface, 2 none
    EXACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``(z_t, dz_dc)``, ``[BLOCK_M]`` fp32 each, of rows ``offs_m`` with targets ``target``."""
    offs_k = tl.arange(0, BLOCK_K)
    col = tl.maximum(target, 0)
    x_ptrs = x_ptr + offs_m[:, None] * stride_x + offs_k[None, :]
    w_ptrs = w_ptr + col[:, None] * stride_w + offs_k[None, :]
    raw = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & (offs_k[None, :] < K - k0)
        # fp32 at once: exact products of the compute-dtype values (and right under the
        # interpreter, whose half-precision arithmetic is not).
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        raw += tl.sum(x * w, axis=1)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    c = clamp_cosine(raw)
    if MARGIN == 0:
        sin_t = tl.sqrt(tl.maximum(1.0 - c * c, 0.0))
        z = scale * (c * cos_m - sin_t * sin_m)
        exact = scale * (cos_m + sin_m * c / tl.maximum(sin_t, sin_floor))
    elif MARGIN == 1:
        z = scale * (c - margin)
        exact = tl.full((BLOCK_M,), scale, dtype=tl.float32)
    else:
        z = scale * c
        exact = tl.full((BLOCK_M,), scale, dtype=tl.float32)
    if EXACT:
        dz_dc = exact
    else:
        dz_dc = tl.full((BLOCK_M,), scale, dtype=tl.float32)
    dz_dc = tl.where((raw > -1.0) & (raw < 1.0), dz_dc, 0.0)
    return z, dz_dc


@triton.jit
def group_rows(
    target_ptr,
    offs_m,
    row_ok,
    target,
    N,
    n,
    order_ptr,
    key_ptr,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Write rows ``offs_m`` into ``order [N]`` (rows sorted stably by key) and their keys into
    ``key [N]`` (ascending), the key of a row being its target, or ``n`` for none."""
    key = tl.where(target >= 0, target, n)
    # Stable order = order of the distinct composite keys (key, row): one int64 comparison per
    # pair of rows instead of three (smaller key, or the same key and an earlier row).
    mine = key * N + offs_m
    offs_g = tl.arange(0, BLOCK_G)
    rank = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for g0 in range(0, N, BLOCK_G):
        rows = g0 + offs_g
        other = tl.load(target_ptr + rows, mask=rows < N, other=-1)
        # Past N: above every real composite key, so it never counts.
        other = tl.where(rows < N, tl.where(other >= 0, other, n) * N + rows, (n + 1) * N)
        rank += tl.sum((other[None, :] < mine[:, None]).to(tl.int32), axis=1)
    tl.store(order_ptr + rank, offs_m.to(tl.int64), mask=row_ok)
    tl.store(key_ptr + rank, key, mask=row_ok)
