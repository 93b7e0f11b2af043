"""A float64 oracle of the backend contract for the Triton tests (CPU interpreter and GPU).

Written from docs/design.md, section 2 and sharing no code with the library. Like a backend, it
takes unnormalised rows: each is L2-normalised, normalised in fp32 and rounded to the
compute dtype exactly as the backend's operands are (so fp16/bf16 comparisons can be
tight), and carries the normalisation's exact float64 Jacobian back to its leaf. Then
everything is float64 with autograd; the margin's gradient mode is expressed as
``value + slope * (c - c.detach())`` and the clamp's gradient is passed on ``(-1, 1)``
(torch.clamp's rule, written out).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

F64 = torch.float64


def unit_operand(v: Tensor, compute_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(leaf, operand)``: a float64 leaf for ``v`` and its normalised rows, valued as the
    backend's GEMM operand (normalised in fp32, rounded to ``compute_dtype``) with the
    gradient of the exact float64 normalisation."""
    leaf = v.detach().to(F64).requires_grad_()
    unit = F.normalize(leaf, dim=1)
    value = F.normalize(v.detach().float(), dim=1).to(compute_dtype).to(F64)
    return leaf, unit + (value - unit).detach()


def _margined(c_t: Tensor, *, scale: float, margin: float, margin_type: str, margin_grad: str) -> Tensor:
    c = c_t.detach()
    if margin_type == "arcface":
        value = scale * torch.cos(torch.acos(c) + margin)
        sin_t = (1.0 - c * c).clamp_min(0.0).sqrt().clamp_min(1e-6)
        exact = scale * (math.cos(margin) + math.sin(margin) * c / sin_t)
    elif margin_type == "cosface":
        value, exact = scale * (c - margin), torch.full_like(c, scale)
    else:
        value, exact = scale * c, torch.full_like(c, scale)
    slope = exact if margin_grad == "exact" else torch.full_like(c, scale)
    return value + slope * (c_t - c)


def oracle_stats(
    x: Tensor, w: Tensor, target: Tensor, *, scale: float, margin: float, margin_type: str, margin_grad: str
) -> tuple[Tensor, Tensor]:
    """float64 ``(lse, z_t)`` of ``lse_and_target`` from float64 operands ``x``, ``w`` (unit rows)."""
    raw = x @ w.T
    cos = torch.where(raw.abs() < 1.0, raw, raw.detach().clamp(-1.0, 1.0))
    has_target = target >= 0
    col = target.clamp_min(0).unsqueeze(1)
    c_t = cos.gather(1, col).squeeze(1)
    z_t = _margined(c_t, scale=scale, margin=margin, margin_type=margin_type, margin_grad=margin_grad)
    z_t = torch.where(has_target, z_t, scale * c_t)
    logits = (scale * cos).scatter(1, col, z_t.unsqueeze(1))
    return torch.logsumexp(logits, dim=1), torch.where(has_target, z_t, 0.0)


def oracle(
    x: Tensor, w: Tensor, target: Tensor, *, compute_dtype: torch.dtype, **margin_kwargs: object
) -> tuple[Tensor, Tensor, Tensor]:
    """float64 mean loss over rows with a target, and its gradients w.r.t. ``x`` and ``w``."""
    x_leaf, xu = unit_operand(x, compute_dtype)
    w_leaf, wu = unit_operand(w, compute_dtype)
    lse, z_t = oracle_stats(xu, wu, target, **margin_kwargs)
    valid = target >= 0
    loss = torch.where(valid, lse - z_t, 0.0).sum() / valid.sum().clamp_min(1)
    gx, gw = torch.autograd.grad(loss, (x_leaf, w_leaf))
    return loss.detach(), gx, gw
