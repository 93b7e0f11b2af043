"""Lazy AdamW over the sampled prototype rows: :class:`SparseRowAdamW` and its torch update."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..loss import DualPartialMarginLoss
from ._base import RowSparseOptimizer, check_hyperparameters, row_chunks, uses_triton


def adamw_rows_(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    index: Tensor,
    grad: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Lazy AdamW on rows ``index [n]`` (int64, distinct) of ``param [C, D]``, in place.

    ``grad [n, D]`` is the rows' gradient; ``exp_avg``, ``exp_avg_sq`` ``[C, D]`` their moments
    and ``step [C]`` (int64) each row's update count, advanced for these rows only. Each row
    takes exactly torch.optim.AdamW's step at its own count (the same operations in the same
    order); the other rows are not touched.
    """
    for rows, g in row_chunks(index, grad):
        t = step.index_select(0, rows) + 1
        step.index_copy_(0, rows, t)
        p, m, v = (x.index_select(0, rows) for x in (param, exp_avg, exp_avg_sq))
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        # Bias corrections in fp64, as torch.optim computes them in Python floats.
        t = t.to(torch.float64)
        step_size = (lr / (1 - beta1**t)).to(p.dtype).unsqueeze(1)
        bias_correction2_sqrt = (1 - beta2**t).sqrt().to(p.dtype).unsqueeze(1)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m * step_size, denom, value=-1)
        for full, rows_now in ((param, p), (exp_avg, m), (exp_avg_sq, v)):
            full.index_copy_(0, rows, rows_now)


class SparseRowAdamW(RowSparseOptimizer):
    """AdamW over the prototypes of ``criterion`` that updates only the rows each step sampled.

    Lazy semantics: a row's moments, its weight decay (decoupled, ``p *= 1 - lr * weight_decay``)
    and its bias correction (a per-row step count ``t``) advance only in the steps whose
    backward gave it a gradient, i.e. the rows of ``criterion.last_class_index`` (this rank's,
    with a process group). A row updated ``t`` times holds exactly what ``torch.optim.AdamW``
    would give it after ``t`` steps on those gradients alone. Where dense AdamW differs: it
    also moves unsampled rows every step (their stale moments keep pushing, weight decay
    shrinks them) and counts bias correction in global steps.

    State (per the prototypes, created at the first step): ``exp_avg``, ``exp_avg_sq``
    ``[C, D]`` and ``step`` ``[C]`` int64. On CUDA one fused Triton kernel updates the rows in
    place; elsewhere the torch update :func:`adamw_rows_`.
    """

    def __init__(
        self,
        criterion: DualPartialMarginLoss,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        check_hyperparameters(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay)
        super().__init__(criterion, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _update(self, weight: Tensor, index: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        state = self._state("exp_avg", "exp_avg_sq", counter=True)
        if uses_triton(weight):
            from ..triton.row_update import adamw_rows_ as update
        else:
            update = adamw_rows_
        beta1, beta2 = group["betas"]
        update(
            weight,
            state["exp_avg"],
            state["exp_avg_sq"],
            state["step"],
            index,
            grad,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )
