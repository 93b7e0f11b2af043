"""The margin applied to each row's target cosine, and its derivative.

Every backend computes the target cosine ``c_t`` of a row separately (a row-wise
dot product) and replaces the target entry of the logit row with ``z_t`` from
:func:`target_logit`. The backward multiplies ``p_t - 1`` by ``dz_dc`` instead of
``scale``, which is how both gradient modes share one code path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MARGIN_TYPES = ("arcface", "cosface", "none")
MARGIN_GRADS = ("straight_through", "exact")

# sin(theta) = sqrt(1 - c^2) is floored here in the exact arcface derivative, which
# is unbounded at |c| = 1. The floor only bites at |c| == 1 in fp32 (one ulp below
# 1 already gives sin(theta) ~ 3e-4) and within 5e-13 of +-1 in fp64.
_SIN_FLOOR = 1e-6


def target_logit(
    cos_t: Tensor, *, scale: float, margin: float, margin_type: str, margin_grad: str
) -> tuple[Tensor, Tensor]:
    """Margined target logit and its derivative with respect to the cosine.

    Args:
        cos_t: ``[N]`` target cosines, already clamped to ``[-1, 1]`` (fp32 or fp64).
        scale, margin: ``s`` and ``m``.
        margin_type: ``"arcface"`` (``s*cos(acos(c)+m)``), ``"cosface"`` (``s*(c-m)``)
            or ``"none"`` (``s*c``).
        margin_grad: ``"straight_through"`` (derivative ``s``, as if no margin: the
            insightface/UNICOM convention) or ``"exact"``.

    Returns:
        ``(z_t, dz_dc)``, both ``[N]`` in the dtype of ``cos_t``.
    """
    if margin_type == "arcface":
        # cos(theta + m) = c*cos(m) - sin(theta)*sin(m), with sin(theta) >= 0 on [0, pi];
        # this is exact for theta + m > pi too (no "easy margin" rewrite).
        sin_t = (1.0 - cos_t * cos_t).clamp_min(0.0).sqrt()
        z_t = scale * (cos_t * math.cos(margin) - sin_t * math.sin(margin))
        exact = scale * (math.cos(margin) + math.sin(margin) * cos_t / sin_t.clamp_min(_SIN_FLOOR))
    elif margin_type == "cosface":
        z_t = scale * (cos_t - margin)
        exact = torch.full_like(cos_t, scale)
    else:
        z_t = scale * cos_t
        exact = torch.full_like(cos_t, scale)
    if margin_grad == "straight_through":
        return z_t, torch.full_like(cos_t, scale)
    return z_t, exact
