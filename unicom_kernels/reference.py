"""The readable oracle backend: materialises the full ``[N, n]`` logit matrix.

This is how insightface's Partial FC computes the loss (dense logits, margin on the
target column, cross-entropy), kept as the semantic reference and the baseline the
fused backends are measured against. Like Partial FC under autocast it rounds the
cosines to the compute dtype (the GEMM's bf16/fp16 output, then upcast): the one
departure from the fp32-logit rule of docs/design.md, section 2.9, so that it is the
eager same-dtype baseline. Memory is ``O(N * n)``. Every step is a
differentiable torch op (the margin's backward too), so it is also the backend for
higher-order gradients (a gradient penalty).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .margin import target_logit
from .ops import normalize_rows


class _MarginedTarget(torch.autograd.Function):
    """``z_t`` (given) as a function of ``cos_t`` with slope ``dz_dc`` (given): the gradient mode.

    Values come in precomputed, so the traced forward holds no scalar arithmetic (which
    ``torch.compile(dynamic=True)`` cannot lift into a Function). For a second backward (grad
    mode on inside ``backward``: ``create_graph=True``) the slope is recomputed from the saved
    cosine in torch ops, so that it is differentiated too.
    """

    @staticmethod
    def forward(ctx, cos_t: Tensor, z_t: Tensor, dz_dc: Tensor, margin_args: dict) -> Tensor:
        ctx.save_for_backward(cos_t, dz_dc)
        ctx.margin_args = margin_args
        return z_t.view_as(z_t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos_t, dz_dc = ctx.saved_tensors
        if torch.is_grad_enabled():
            dz_dc = target_logit(cos_t, **ctx.margin_args)[1]
        return grad * dz_dc, None, None, None


def lse_and_target(
    x: Tensor,
    w: Tensor,
    target: Tensor,
    *,
    scale: float,
    margin: float,
    margin_type: str,
    margin_grad: str,
    compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Per-row log-sum-exp over the columns of ``wn`` and the margined target logit.

    Args:
        x: ``[N, k]`` embeddings (selected dims, not normalised).
        w: ``[n, k]`` sampled prototypes (selected dims, not normalised).
        target: ``[N]`` int64 column of each row's class in ``w``; ``-1`` when the row is
            ignored or its class is not among these columns (held by another rank).
        compute_dtype: dtype of the GEMM operands (the result is upcast to fp32, or fp64).

    Returns:
        ``(lse [N], z_t [N])`` in fp32 (fp64 for fp64 problems); ``z_t`` is 0 where
        ``target`` is ``-1``.
    """
    xn, wn = normalize_rows(x, compute_dtype), normalize_rows(w, compute_dtype)
    cos = (xn.to(compute_dtype) @ wn.to(compute_dtype).T).to(xn.dtype).clamp(-1.0, 1.0)
    has_target = target >= 0
    col = target.clamp_min(0).unsqueeze(1)
    cos_t = cos.gather(1, col).squeeze(1)
    margin_args = {"scale": scale, "margin": margin, "margin_type": margin_type, "margin_grad": margin_grad}
    z_t = _MarginedTarget.apply(cos_t, *target_logit(cos_t.detach(), **margin_args), margin_args)
    # Rows without a target here write their own logit back: no change.
    z_t = torch.where(has_target, z_t, scale * cos_t)
    logits = (scale * cos).scatter(1, col, z_t.unsqueeze(1))
    return torch.logsumexp(logits, dim=1), torch.where(has_target, z_t, 0.0)
