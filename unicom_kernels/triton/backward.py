"""Backward launcher: class chunks of (recompute + softmax gradient, ``G @ W``, ``G^T @ X``), then
the normalisation's backward.

Per chunk of classes ``[col0, col0 + chunk)``, three launches in a fixed order:
:func:`.softmax_grad.softmax_grad_chunk` (recompute the logits, write ``Gs``),
:func:`.grad_gemm.grad_x_chunk` (accumulate ``Gs @ W`` into ``grad_x``) and
:func:`.grad_gemm.grad_w_chunk` (``Gs^T @ X`` into the chunk's own rows of ``grad_w``).
Then one :func:`.unit_rows.unit_rows_grad` per operand maps the gradients w.r.t. the unit
rows to the raw rows; the one of ``w`` first adds the target term of each class.
The total is one GEMM pass to recompute plus the two gradient GEMMs, as counted in
docs/design.md, section 4.2 (four passes with the forward).

Workspace (the only buffer that grows with ``n``): ``G`` of ``N x chunk`` elements in the
operand dtype of the backward (fp16 for bf16/fp16 problems, fp32 for fp32), with ``chunk``
a multiple of ``grad_logits.block_n`` such that

    N * chunk * itemsize <= max(Configs.workspace_bytes, N * k * 4)
                              (32 MiB by default, or the size of grad_x; at least one tile),

balanced over ``cdiv(n, chunk)`` chunks. For shape A (N = 4096, n = 12,500, 2 bytes) that
is 4 chunks of 3200 classes: 26.2 MB. Besides it: the fp32 gradients themselves
(``[N, k]`` and ``[n, k]``), ``order``/``class_start`` (``N + n + 1`` int64) and a scalar.
No ``[N, n]`` tensor is allocated.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from .common import dot_precision
from .configs import Configs, get_configs
from .grad_gemm import grad_w_chunk, grad_x_chunk
from .softmax_grad import softmax_grad_chunk
from .unit_rows import Scatter, unit_rows_grad


def workspace_budget(N: int, K: int, cfg: Configs) -> int:
    """Bytes the backward's workspace may take: ``cfg.workspace_bytes``, or the size of the fp32
    ``grad_x [N, K]`` when larger and ``cfg.workspace_follows_grad_x``."""
    return max(cfg.workspace_bytes, N * K * 4) if cfg.workspace_follows_grad_x else cfg.workspace_bytes


def chunk_columns(N: int, n: int, itemsize: int, block_n: int, workspace_bytes: int) -> int:
    """Classes per backward chunk: fits ``workspace_bytes``, a multiple of ``block_n``, balanced."""
    fit = max(block_n, workspace_bytes // max(1, N * itemsize) // block_n * block_n)
    chunks = triton.cdiv(n, fit)
    return triton.cdiv(triton.cdiv(n, chunks), block_n) * block_n


def margin_softmax_backward(
    x: Tensor,
    w: Tensor,
    operands: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]],
    target: Tensor,
    lse: Tensor,
    rowscale: Tensor,
    tcoef: Tensor,
    gscale: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. the raw rows ``x``, ``w``, in their dtypes, for any loss of ``(LSE_i, z_t_i)``.

    With ``a_i = dL/dLSE_i`` and ``A = max_i |a_i|``: off-target ``dL/dc_ij = a_i s p_ij`` (times
    the clamp mask), on target ``dL/dc_it = tcoef_i``; then through the normalisation.

    Args:
        x: ``[N, k]`` raw embeddings; w: ``[n, k]`` raw prototypes.
        operands: ``((xc, x_norm), (wc, w_norm))`` of :func:`.unit_rows.unit_rows`: the unit rows in
            the backward's operand dtype (``[N, k_pad]``, ``[n, k_pad]``, ``k_pad`` a multiple of 16)
            and the fp32 row norms.
        target: ``[N]`` int64 column of each row's target, ``-1`` for none.
        lse: ``[N]`` fp32 log-sum-exp from the forward.
        rowscale: ``[N]`` fp32 ``a_i / A`` (in ``[-1, 1]``).
        tcoef: ``[N]`` fp32 ``dL/dc_{i,t_i}`` (0 for rows without a target).
        gscale: 0-dim fp32 ``A``.
        scale: the logit scale ``s``.

    Returns:
        ``(grad_x [N, k], grad_w [n, k])`` in the dtypes of ``x`` and ``w``.
    """
    cfg = get_configs()
    (xc, x_norm), (wc, w_norm) = operands
    N, K = xc.shape
    n = wc.shape[0]
    device = xc.device

    # Rows grouped by target class, in a stable (hence reproducible) order; rows without a
    # target get key n and sort last. class_start[j] = first position of class j in it.
    key = torch.where(target >= 0, target, n)
    sorted_key, order = torch.sort(key, stable=True)
    class_start = torch.searchsorted(sorted_key, torch.arange(n + 1, device=device, dtype=sorted_key.dtype))

    precision = dot_precision(xc.dtype)
    fp32 = xc.dtype == torch.float32
    grad_logits_tile = cfg.tile("grad_logits", precision, fp32)
    grad_x_tile = cfg.tile("grad_x", precision, fp32)
    grad_w_tile = cfg.tile("grad_w", precision, fp32)
    block_n = grad_logits_tile.block_n
    chunk_max = chunk_columns(N, n, xc.element_size(), block_n, workspace_budget(N, K, cfg))
    chunk_max = min(chunk_max, triton.cdiv(n, block_n) * block_n)
    g = torch.empty((N, chunk_max), dtype=xc.dtype, device=device)
    grad_x = torch.empty((N, K), dtype=torch.float32, device=device)
    grad_w = torch.empty((n, K), dtype=torch.float32, device=device)
    starts = list(range(0, n, chunk_max))
    for index, col0 in enumerate(starts):
        chunk = min(chunk_max, n - col0)
        chunk_pad = triton.cdiv(chunk, 16) * 16
        softmax_grad_chunk(xc, wc, target, lse, rowscale, g, col0, chunk_pad, scale, grad_logits_tile)
        grad_x_chunk(
            g,
            wc,
            grad_x,
            target,
            tcoef,
            gscale,
            col0,
            chunk,
            first=index == 0,
            last=index == len(starts) - 1,
            tile=grad_x_tile,
        )
        grad_w_chunk(g, xc, grad_w, gscale, col0, chunk, grad_w_tile)
    # The target term of grad_w, sum_{i : t_i = j} t_i X_i, joins in the normalisation's backward.
    targets = Scatter(order, sorted_key, class_start, tcoef, xc)
    return unit_rows_grad(grad_x, x, x_norm), unit_rows_grad(grad_w, w, w_norm, targets)
