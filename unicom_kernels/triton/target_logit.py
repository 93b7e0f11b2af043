"""Each row's target cosine and margined target logit, in one small kernel.

``_target_logit_kernel``, grid ``(cdiv(N, BLOCK_M),)``: for its rows, the raw target cosine
``c_i = <x_i, w_{t_i}>`` (a row-wise dot with a gathered prototype row: CCE's ``indexed_dot``
idea; fp32 products of the compute-dtype values, fp32 sums), then the margin of
:func:`unicom_kernels.margin.target_logit` on ``clamp(c_i, -1, 1)``:

    arcface: z = s * (c cos m - sqrt(1 - c^2) sin m)        (exact for theta + m > pi too)
    cosface: z = s * (c - m)
    none:    z = s * c

and ``dz/dc`` (``s`` for ``straight_through``; the exact derivative otherwise, with
``sqrt(1 - c^2)`` floored at ``margin._SIN_FLOOR``), times ``[-1 < c_i < 1]`` (torch.clamp's
gradient mask). Rows without a target read prototype 0 (their values are unused).

One launch instead of the ~20 elementwise torch ops of the same formulas, which matters
for a forward pass whose target is under 100 us on an H100. The formulas mirror
``margin.py`` term by term; ``tests/test_triton_backend.py`` checks them against it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..margin import _SIN_FLOOR
from .common import clamp_cosine

MARGIN_CODES = {"arcface": 0, "cosface": 1, "none": 2}


@triton.jit
def _target_logit_kernel(
    x_ptr,  # [N, K] compute dtype
    w_ptr,  # [n, K] compute dtype
    target_ptr,  # [N] int64, -1 = no target
    zt_ptr,  # [N] fp32 out: margined target logit
    dzdc_ptr,  # [N] fp32 out: dz_t / d(raw cosine), clamp mask included
    N,
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
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < N
    col = tl.maximum(tl.load(target_ptr + offs_m, mask=row_ok, other=0), 0)
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
    tl.store(zt_ptr + offs_m, z, mask=row_ok)
    tl.store(dzdc_ptr + offs_m, dz_dc, mask=row_ok)


def target_logit(
    xc: Tensor, wc: Tensor, target: Tensor, *, scale: float, margin: float, margin_type: str, margin_grad: str
) -> tuple[Tensor, Tensor]:
    """``(z_t, dz_dc)``, each ``[N]`` fp32, for compute-dtype operands ``xc [N, k]``, ``wc [n, k]``.

    Raises:
        ValueError: unknown ``margin_type`` or ``margin_grad``.
    """
    if margin_type not in MARGIN_CODES:
        raise ValueError(f"margin_type must be one of {tuple(MARGIN_CODES)}, got {margin_type!r}")
    if margin_grad not in ("straight_through", "exact"):
        raise ValueError(f"margin_grad must be 'straight_through' or 'exact', got {margin_grad!r}")
    N, K = xc.shape
    z_t = torch.empty(N, dtype=torch.float32, device=xc.device)
    dz_dc = torch.empty_like(z_t)
    block_m = 32
    block_k = min(128, triton.next_power_of_2(max(K, 16)))
    _target_logit_kernel[(triton.cdiv(N, block_m),)](
        xc,
        wc,
        target,
        z_t,
        dz_dc,
        N,
        K,
        xc.stride(0),
        wc.stride(0),
        float(scale),
        float(margin),
        math.cos(margin),
        math.sin(margin),
        _SIN_FLOOR,
        MARGIN=MARGIN_CODES[margin_type],
        EXACT=margin_grad == "exact",
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return z_t, dz_dc
