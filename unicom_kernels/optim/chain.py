"""Several optimizers driven as one, so that one LR scheduler and one checkpoint cover them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._base import RowSparseOptimizer


class ChainedOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` whose ``param_groups`` are those of ``optimizers``, in order
    (the same dicts: an LR scheduler of the chain sets the members' learning rates).

    ``step``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` go to every member; the
    state dict is ``{"optimizers": [member state dicts]}``. Typical use: ``torch.optim.AdamW``
    for a backbone beside :class:`~unicom_kernels.optim.SparseRowAdamW` for the prototypes.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
            raise TypeError(f"optimizers must be torch.optim.Optimizer instances, got {optimizers!r}")
        self.optimizers = optimizers
        super().__init__(self._member_groups(), {})

    def _member_groups(self) -> list[dict[str, Any]]:
        return [group for o in self.optimizers for group in o.param_groups]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not any(param_group is g for g in self._member_groups()):
            raise ValueError("param_group: add parameter groups to a member optimizer, not to the chain")
        self.param_groups.append(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:  # a member that cannot step fails before any other steps
            if isinstance(optimizer, RowSparseOptimizer):
                optimizer.check_ready()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise ValueError(
                f"state_dict must hold the states of {len(self.optimizers)} optimizers under 'optimizers' "
                "(a ChainedOptimizer's state_dict() of the same members)"
            )
        for optimizer, state in zip(self.optimizers, saved, strict=True):
            optimizer.load_state_dict(state)
        # Loading replaces a member's group dicts: point the chain at the new ones.
        self.param_groups = self._member_groups()
