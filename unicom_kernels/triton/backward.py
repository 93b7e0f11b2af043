"""Backward launcher: class chunks of (recompute + softmax gradient, ``G @ W``, ``G^T @ X``), then
the normalisation's backward.

Per chunk of classes ``[col0, col0 + chunk)``, two launches in a fixed order:
:func:`.softmax_grad.softmax_grad_chunk` (recompute the logits, write ``Gs``) and
:func:`.grad_gemm.grad_gemm_chunk` (accumulate ``Gs @ W`` into ``grad_x`` and write
``Gs^T @ X`` into the chunk's own rows of ``grad_w``).
Then one :func:`.unit_rows.unit_rows_grad` for both operands scales the sums by ``A``, adds
the target terms (a gathered prototype row per embedding; the rows of each class onto its
prototype, in the order the forward grouped them) and maps the gradients w.r.t. the unit
rows to the raw rows. Launches: ``2 * chunks + 1``, nothing else (no sort, no elementwise
torch op for the mean loss).
The total is one GEMM pass to recompute plus the two gradient GEMMs, as counted in
docs/design.md, section 4.2 (four passes with the forward).

Workspace (the only buffer that grows with ``n``): ``G`` of ``N x chunk`` elements in the
operand dtype of the backward (fp16 for bf16/fp16 problems, fp32 for fp32), with ``chunk``
a multiple of ``grad_logits.block_n`` such that

    N * chunk * itemsize <= max(Configs.workspace_bytes, N * k * 4)
                              (40 MiB by default, or the size of grad_x; at least one tile),

balanced over ``cdiv(n, chunk)`` chunks. For shape A (N = 4096, n = 12,500, 2 bytes) that
is 3 chunks of 4224 classes: 34.6 MB (and 260 programs per gradient-GEMM launch at k = 512,
two full waves of 132 SMs). Besides it: the fp32 GEMM sums (``[N, k]`` and ``[n, k]``, which
become the gradients when those are fp32 and ``k`` needs no padding) and a scalar.
No ``[N, n]`` tensor is allocated.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
from torch import Tensor

from .common import dot_precision
from .configs import Configs, get_configs
from .grad_gemm import grad_gemm_chunk
from .softmax_grad import softmax_grad_chunk
from .unit_rows import unit_rows_grad


def workspace_budget(N: int, K: int, cfg: Configs) -> int:
    """Bytes the backward's workspace may take: ``cfg.workspace_bytes``, or the size of the fp32
    ``grad_x [N, K]`` when larger and ``cfg.workspace_follows_grad_x``."""
    return max(cfg.workspace_bytes, N * K * 4) if cfg.workspace_follows_grad_x else cfg.workspace_bytes


def chunk_columns(N: int, n: int, itemsize: int, block_n: int, workspace_bytes: int) -> int:
    """Classes per backward chunk: fits ``workspace_bytes``, a multiple of ``block_n``, balanced."""
    fit = max(block_n, workspace_bytes // max(1, N * itemsize) // block_n * block_n)
    chunks = triton.cdiv(n, fit)
    return triton.cdiv(triton.cdiv(n, chunks), block_n) * block_n


class RowCoefficients(NamedTuple):
    """How a loss of the per-row statistics weighs each row: ``a_i = dL/dLSE_i = A r_i`` and the
    target coefficient ``t_i = dL/dc_{i,t_i}``.

    ``count`` given (the mean loss): ``A = gscale / count`` with ``gscale = dL/dloss``,
    ``r_i = [target_i >= 0]``, ``t_i = tcoef_i * A``, all formed inside the kernels (no
    launch of their own); ``rowscale`` is None. Otherwise ``A = gscale``, ``r_i =
    rowscale_i`` (in ``[-1, 1]``), ``t_i = tcoef_i``.

    ``gscale``, ``count``: 0-dim fp32; ``rowscale``, ``tcoef``: ``[N]`` fp32.
    """

    gscale: Tensor
    count: Tensor | None
    rowscale: Tensor | None
    tcoef: Tensor


def margin_softmax_backward(
    x: Tensor,
    w: Tensor,
    operands: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]],
    groups: tuple[Tensor, Tensor],
    target: Tensor,
    lse: Tensor,
    coefs: RowCoefficients,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. the raw rows ``x``, ``w``, in their dtypes, for any loss of ``(LSE_i, z_t_i)``.

    Off-target ``dL/dc_ij = a_i s p_ij`` (times the clamp mask), on target ``dL/dc_it = t_i``
    (see :class:`RowCoefficients`); then through the normalisation.

    Args:
        x: ``[N, k]`` raw embeddings; w: ``[n, k]`` raw prototypes.
        operands: ``((xc, x_norm), (wc, w_norm))`` of :func:`.unit_rows.unit_rows`: the unit rows in
            the backward's operand dtype (``[N, k_pad]``, ``[n, k_pad]``, ``k_pad`` a multiple of 16)
            and the fp32 row norms.
        groups: ``(order, sorted_key)`` ``[N]`` int64 of the forward: the rows sorted by target.
        target: ``[N]`` int64 column of each row's target, ``-1`` for none.
        lse: ``[N]`` fp32 log-sum-exp from the forward.
        coefs: the loss's row coefficients.
        scale: the logit scale ``s``.

    Returns:
        ``(grad_x [N, k], grad_w [n, k])`` in the dtypes of ``x`` and ``w``.
    """
    cfg = get_configs()
    (xc, _), (wc, _) = operands
    N, K = xc.shape
    n = wc.shape[0]
    device = xc.device

    precision = dot_precision(xc.dtype)
    fp32 = xc.dtype == torch.float32
    grad_logits_tile = cfg.tile("grad_logits", precision, fp32)
    grad_gemm_tile = cfg.tile("grad_gemm", precision, fp32)
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
        softmax_grad_chunk(xc, wc, target, lse, coefs.rowscale, g, col0, chunk_pad, scale, grad_logits_tile)
        grad_gemm_chunk(g, xc, wc, grad_x, grad_w, col0, chunk, first=index == 0, tile=grad_gemm_tile)
    # The factor A and the target terms, t_i W_{t_i} and sum_{i : t_i = j} t_i X_i, join in
    # the normalisation's backward, in fp32, once per row.
    return unit_rows_grad(grad_x, grad_w, x, w, operands, target, groups, coefs.tcoef, coefs.gscale, coefs.count)
