"""What the row-sparse optimizers share: ownership of the loss module's prototypes, the
compact gradient, the checks, the state and the choice between the Triton and torch updates."""

from __future__ import annotations

import importlib.util
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..loss import DualPartialMarginLoss
from ..row_grad import RowGrad


class RowSparseOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` over one parameter, ``criterion.weight``, that updates only the
    rows of the compact gradient the loss module's backward delivered.

    Constructing it attaches a :class:`~unicom_kernels.row_grad.RowGrad` to ``criterion``
    (``criterion.row_grad``): from then on backward leaves ``criterion.weight.grad`` unset. It is
    detached again when the optimizer is garbage-collected (then the gradient is dense again).
    :meth:`step` consumes the compact gradient: the next step needs a new backward, however the
    gradients were zeroed (``optimizer.zero_grad()`` or ``model.zero_grad()``, which cannot see
    it). Subclasses define :meth:`_update` on one group's hyperparameters.
    """

    def __init__(self, criterion: DualPartialMarginLoss, defaults: dict[str, Any]) -> None:
        if not isinstance(criterion, DualPartialMarginLoss):
            raise TypeError(
                f"criterion must be the DualPartialMarginLoss module that owns the prototypes, got "
                f"{type(criterion).__name__}"
            )
        if criterion.row_grad is not None:
            raise ValueError("criterion already has a row-sparse optimizer: one optimizer owns its prototypes")
        self.criterion = criterion
        super().__init__([{"params": [criterion.weight], "name": "prototypes"}], defaults)
        criterion.row_grad = RowGrad()
        weakref.finalize(self, _detach, weakref.ref(criterion), criterion.row_grad)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if self.param_groups or len(params) != 1 or params[0] is not self.criterion.weight:
            raise ValueError(
                f"params: {type(self).__name__} updates exactly one parameter, criterion.weight (the prototypes); "
                "optimise other parameters with another optimizer"
            )
        super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.criterion.row_grad.clear()

    def check_ready(self) -> None:
        """Raise unless :meth:`step` can run: a compact gradient is there and no dense one beside it
        (reads nothing from the device, so a chain checks every member before stepping any)."""
        sink = self.criterion.row_grad
        if sink is None or sink.index is None:
            raise RuntimeError(
                f"{type(self).__name__}.step(): criterion has no gradient of sampled rows; run the loss forward "
                "and backward (in training mode, after this optimizer was created) before each step"
            )
        if self.criterion.weight.grad is not None:
            raise RuntimeError(
                f"{type(self).__name__}.step(): criterion.weight also has a dense gradient (from criterion.logits() "
                "or other code), which a row-sparse optimizer would drop; keep such terms out of the prototypes' "
                "gradient, or use a dense optimizer"
            )

    def compact_grad(self) -> tuple[Tensor, Tensor]:
        """``(index [n] int64, grad [n, D])`` of the backward(s) since the last step or :meth:`zero_grad`.

        With ``criterion.check_values`` the index is checked to be sorted, distinct and in
        range (one read back from the device); the updates rely on it.
        """
        self.check_ready()
        sink = self.criterion.row_grad
        index, grad = sink.index, sink.grad
        weight = self.criterion.weight
        if self.criterion.check_values and index.numel() > 1:
            ok = bool(((index[1:] > index[:-1]).all() & (index[0] >= 0) & (index[-1] < weight.shape[0])).item())
            if not ok:
                raise ValueError("index of the sampled rows must be sorted, distinct and within the prototypes' rows")
        return index, grad

    def _state(self, *names: str, counter: bool) -> dict[str, Tensor]:
        """The prototypes' state: zero ``[C, D]`` buffers ``names`` and, with ``counter``, an int64
        ``[C]`` count of each row's updates (``"step"``), created at the first step (as torch.optim)."""
        weight = self.criterion.weight
        state = self.state[weight]
        if not state:
            for name in names:
                state[name] = torch.zeros_like(weight, memory_format=torch.contiguous_format)
            if counter:
                state["step"] = torch.zeros(weight.shape[0], dtype=torch.int64, device=weight.device)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        weight = self.criterion.weight
        # Checked before anything is replaced, so that a refused state dict leaves this one intact.
        saved = state_dict.get("state", {}) if isinstance(state_dict, dict) else {}
        for per_param in saved.values():
            for name, value in per_param.items():
                rows = (weight.shape[0],) if name == "step" else tuple(weight.shape)
                if not isinstance(value, Tensor) or tuple(value.shape) != rows:
                    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"state_dict: state {name!r} has shape {shape}, but the prototypes need {rows}")
        super().load_state_dict(state_dict)
        if "step" in self.state[weight]:  # torch.optim leaves "step" where it was saved
            self.state[weight]["step"] = self.state[weight]["step"].to(weight.device, torch.int64)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update the rows of the compact gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index, grad = self.compact_grad()
        self._update(self.criterion.weight, index, grad, self.param_groups[0])
        self.criterion.row_grad.clear()  # consumed (see the class docstring)
        return loss

    def _update(self, weight: Tensor, index: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError


def _detach(criterion_ref: weakref.ref, sink: RowGrad) -> None:
    """Give the prototypes their dense gradient back once the optimizer that attached ``sink`` is gone."""
    criterion = criterion_ref()
    if criterion is not None and criterion.row_grad is sink:
        criterion.row_grad = None


# Elements per chunk of the torch updates: 2^18 fp32 = 1 MiB per operand (512 rows at D = 512),
# so that a chunk's gathered rows and temporaries stay in cache, whatever the sampled rows.
CHUNK_ELEMENTS = 1 << 18


def row_chunks(index: Tensor, grad: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """``(rows, grad of rows)`` pieces of ``index`` and ``grad [n, D]``, about :data:`CHUNK_ELEMENTS` each."""
    rows = max(1, CHUNK_ELEMENTS // max(1, grad.shape[1]))
    for first in range(0, index.numel(), rows):
        yield index[first : first + rows], grad[first : first + rows]


def uses_triton(weight: Tensor) -> bool:
    """The fused Triton update runs for fp32 CUDA prototypes when triton is installed."""
    return weight.is_cuda and weight.dtype == torch.float32 and importlib.util.find_spec("triton") is not None


def check_hyperparameters(**values: float) -> None:
    """Each value must be a finite real number >= 0 (``beta*`` also < 1); the message names it."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0 or value == float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if name.startswith("beta") and not value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
