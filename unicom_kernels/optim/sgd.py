"""Momentum SGD over the sampled prototype rows: :class:`SparseRowSGD` and its torch update."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..loss import DualPartialMarginLoss
from ._base import RowSparseOptimizer, check_hyperparameters, row_chunks, uses_triton


def sgd_rows_(
    param: Tensor,
    momentum_buffer: Tensor | None,
    index: Tensor,
    grad: Tensor,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """SGD with momentum on rows ``index [n]`` (int64, distinct) of ``param [C, D]``, in place.

    ``grad [n, D]`` is the rows' gradient, ``momentum_buffer [C, D]`` their velocity (``None``
    when ``momentum == 0``). Each row takes torch.optim.SGD's step (no dampening, no Nesterov):
    ``d = g + weight_decay * p``, ``b = momentum * b + d``, ``p -= lr * b``; a zero buffer makes
    a row's first update ``b = d``, as torch's first step. The other rows are not touched.
    """
    for rows, g in row_chunks(index, grad):
        p = param.index_select(0, rows)
        d = g.add(p, alpha=weight_decay) if weight_decay else g
        if momentum_buffer is not None:
            d = momentum_buffer.index_select(0, rows).mul_(momentum).add_(d)
            momentum_buffer.index_copy_(0, rows, d)
        param.index_copy_(0, rows, p.add_(d, alpha=-lr))


class SparseRowSGD(RowSparseOptimizer):
    """Momentum SGD over the prototypes of ``criterion`` that updates only the rows each step
    sampled (the momentum of Partial FC v1).

    Lazy semantics: a row's velocity and its weight decay (L2 added to the gradient, as
    ``torch.optim.SGD``) advance only in the steps whose backward gave it a gradient, i.e. the
    rows of ``criterion.last_class_index`` (this rank's, with a process group). Dense SGD with
    momentum would also move every unsampled row by its decaying velocity, and decay it.

    State (created at the first step): ``momentum_buffer`` ``[C, D]`` when ``momentum > 0``.
    On CUDA one fused Triton kernel updates the rows in place; elsewhere :func:`sgd_rows_`.
    """

    def __init__(
        self, criterion: DualPartialMarginLoss, lr: float, momentum: float = 0.9, weight_decay: float = 0.0
    ) -> None:
        check_hyperparameters(lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(criterion, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def _update(self, weight: Tensor, index: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        momentum = group["momentum"]
        buffer = self._state("momentum_buffer", counter=False)["momentum_buffer"] if momentum else None
        if uses_triton(weight):
            from ..triton.row_update import sgd_rows_ as update
        else:
            update = sgd_rows_
        update(weight, buffer, index, grad, lr=group["lr"], momentum=momentum, weight_decay=group["weight_decay"])
