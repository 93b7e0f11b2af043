"""Device helpers shared by the kernel families, and host-side launch constants.

Layout conventions of every kernel: row-major operands with unit stride along the feature
dimension ``k``; only the row stride is passed. Masks cover every ragged edge (rows past
``N``, classes past ``n``, dims past ``k``), so no shape needs padding for correctness; for
speed the host pads ``k`` to a multiple of 16 (see ``ops/triton_op.py``). Plain pointer
arithmetic and masks only (no ``tl.make_block_ptr``): Triton 3.6 to 3.9 and the
interpreter all run it. Offsets are int32: fine while every operand and the workspace
stay under 2^31 elements (``N * k``, ``n * k``, ``N * chunk``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import INTERPRETING

# Constexpr flag: under TRITON_INTERPRET=1 half-precision arithmetic is emulated wrongly,
# so loaded bf16/fp16 tiles are upcast to fp32 at once (exact: both fit in fp32). On a GPU
# the operands stay in their dtype and tl.dot runs on the tensor cores.
UPCAST = INTERPRETING


def dot_precision(compute_dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` (matters for fp32 operands only).

    fp32 x fp32 follows torch's matmul precision setting (docs/design.md, section 2.9):
    ``torch.set_float32_matmul_precision("highest")`` (torch's default) gives exact
    ``"ieee"`` products; ``"high"``/``"medium"`` allow ``"tf32"``, like cuBLAS would.
    """
    if compute_dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


@triton.jit
def clamp_cosine(c):
    """``clamp(c, -1, 1)`` that keeps NaN: a NaN or inf operand must reach the loss as NaN.

    Plain ``tl.minimum``/``tl.maximum`` return the non-NaN operand on a GPU, which would turn a
    poisoned cosine into a finite +-1 and hide a diverging run behind a finite loss.
    """
    c = tl.maximum(c, -1.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(c, 1.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def cosine_tile(
    x_ptr,
    w_ptr,
    offs_m,
    offs_n,
    N,
    n,
    K,
    stride_x,
    stride_w,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Raw cosines ``X[offs_m] @ W[offs_n]^T`` as a ``[BLOCK_M, BLOCK_N]`` fp32 tile.

    Rows/classes out of range read zeros (their cosines are 0 and masked by the caller).
    """
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_x + offs_k[None, :]
    # W is read as its transpose [BLOCK_K, BLOCK_N] straight from memory, so the dot
    # needs no register transpose.
    w_ptrs = w_ptr + offs_n[None, :] * stride_w + offs_k[:, None]
    row_ok = offs_m[:, None] < N
    col_ok = offs_n[None, :] < n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=row_ok & (offs_k[None, :] < K - k0), other=0.0)
        w = tl.load(w_ptrs, mask=col_ok & (offs_k[:, None] < K - k0), other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc
