"""The compact gradient of the prototype rows a step gathered, for row-sparse optimizers.

Autograd's ``weight.index_select(0, index)`` gives ``weight`` a dense ``[C, D]`` gradient that is
zero outside the ``n`` gathered rows: ``C x D`` zeros written, then read again by the optimizer.
:meth:`RowGrad.gather` gathers the same rows, but its backward keeps the ``[n, D]`` gradient and
the index here instead and gives ``weight`` no gradient at all. A
:mod:`unicom_kernels.optim` optimizer attaches one to the loss module (``criterion.row_grad``).
"""

from __future__ import annotations

import torch
from torch import Tensor


class _GatherRows(torch.autograd.Function):
    """``weight[index]`` whose backward hands the row gradient to a :class:`RowGrad`."""

    @staticmethod
    def forward(ctx, weight: Tensor, index: Tensor, sink: RowGrad) -> Tensor:
        ctx.index, ctx.sink = index, sink
        return weight.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, None]:
        ctx.sink.add(ctx.index, grad)
        return None, None, None


class RowGrad:
    """Holds ``index [n]`` (int64, sorted, distinct rows of the prototypes) and ``grad [n, D]``
    (the prototypes' dtype): the gradient of every backward since :meth:`clear`, summed.

    Backwards of one forward add up; backwards of several forwards (gradient accumulation)
    merge their indices (sorted union), so the result equals the dense gradient restricted
    to its nonzero rows.
    """

    def __init__(self) -> None:
        self.index: Tensor | None = None
        self.grad: Tensor | None = None

    def gather(self, weight: Tensor, index: Tensor) -> Tensor:
        """``weight[index]`` (``[n, D]``); its gradient lands here, not in ``weight.grad``."""
        return _GatherRows.apply(weight, index, self)

    def add(self, index: Tensor, grad: Tensor) -> None:
        """Add the gradient ``grad [n, D]`` of rows ``index [n]`` (sorted, distinct)."""
        if self.index is None:
            self.index, self.grad = index, grad
        elif index is self.index:  # another backward of the same forward
            self.grad = self.grad + grad
        else:
            union = torch.cat([self.index, index]).unique(sorted=True)
            merged = grad.new_zeros(union.numel(), grad.shape[1])
            # Each side's rows are distinct: every destination receives at most one add per side.
            merged.index_copy_(0, torch.searchsorted(union, self.index), self.grad)
            merged.index_add_(0, torch.searchsorted(union, index), grad)
            self.index, self.grad = union, merged

    def clear(self) -> None:
        self.index = self.grad = None
