"""The public loss: functional :func:`dual_partial_margin_loss` and module :class:`DualPartialMarginLoss`.

Both do the same three things (DESIGN.md section 2): validate, pick the classes and
dimensions of this step, then gather + normalise and hand the compact problem to a
backend from :mod:`unicom_kernels.ops`. Autograd scatters the gradients of the
gathered rows and columns back into the full prototype matrix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks
from .ops import BACKENDS, get_backend
from .sampling import sample_classes, sample_dims, step_generator

_EPS = 1e-12  # norm floor of DESIGN.md section 2.5


@dataclass(frozen=True)
class _Options:
    """The scalar options of the loss, validated on construction."""

    scale: float
    margin: float
    margin_type: str
    margin_grad: str
    class_sample_rate: float
    dim_sample_rate: float
    num_dims: int | None
    ignore_index: int
    backend: str

    def __post_init__(self) -> None:
        _checks.check_options(**asdict(self), backends=BACKENDS)


def _compute_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The lower precision of the two (ties go to ``a``): the GEMM operand dtype."""
    return b if torch.finfo(b).bits < torch.finfo(a).bits else a


def _positives(labels: Tensor, ignore_index: int) -> Tensor:
    return labels[labels != ignore_index].unique()


def _selected_loss(
    embeddings: Tensor,
    prototypes: Tensor,
    labels: Tensor,
    class_index: Tensor,
    dim_index: Tensor | None,
    opts: _Options,
) -> Tensor:
    """Gather the selection, normalise it and run the backend. Indices are sorted int64."""
    x = embeddings if dim_index is None else embeddings.index_select(1, dim_index)
    w = prototypes.index_select(0, class_index)
    if dim_index is not None:
        w = w.index_select(1, dim_index)
    compute = _compute_dtype(embeddings.dtype, prototypes.dtype)
    acc = torch.float64 if compute == torch.float64 else torch.float32
    xn = F.normalize(x.to(acc), dim=1, eps=_EPS)
    wn = F.normalize(w.to(acc), dim=1, eps=_EPS)
    ignored = labels == opts.ignore_index
    column = torch.searchsorted(class_index, labels.masked_fill(ignored, 0).to(torch.int64))
    target = column.masked_fill(ignored, -1)
    loss_fn = get_backend(opts.backend, embeddings.device)
    return loss_fn(
        xn,
        wn,
        target,
        scale=opts.scale,
        margin=opts.margin,
        margin_type=opts.margin_type,
        margin_grad=opts.margin_grad,
        compute_dtype=compute,
    )


def dual_partial_margin_loss(
    embeddings: Tensor,
    prototypes: Tensor,
    labels: Tensor,
    *,
    scale: float = 32.0,
    margin: float = 0.3,
    margin_type: str = "arcface",
    margin_grad: str = "straight_through",
    class_sample_rate: float = 1.0,
    dim_sample_rate: float = 1.0,
    num_dims: int | None = None,
    class_index: Tensor | None = None,
    dim_index: Tensor | None = None,
    ignore_index: int = -1,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    check_finite: bool = True,
) -> Tensor:
    """Margin softmax loss over a random subset of classes and feature dimensions.

    Args:
        embeddings: ``[B, D]`` fp32/fp16/bf16/fp64, not necessarily normalised.
        prototypes: ``[C, D]`` class centres (fp32 master weights), not necessarily normalised.
        labels: ``[B]`` integer class ids in ``[0, C)`` or ``ignore_index``.
        scale, margin: ``s`` and ``m``.
        margin_type: ``"arcface"`` ``s*cos(acos(c)+m)``, ``"cosface"`` ``s*(c-m)`` or ``"none"``.
        margin_grad: ``"straight_through"`` (target gradient ``s*(p-1)`` as if no margin,
            insightface/UNICOM parity) or ``"exact"`` (true derivative).
        class_sample_rate: keep every class of the batch plus random negatives up to
            ``int(rate * C)`` classes; ``1.0`` keeps all.
        dim_sample_rate, num_dims: keep ``num_dims`` (or ``round(rate * D)``) random dims
            of both embeddings and prototypes before normalising; ``1.0`` keeps all.
        class_index, dim_index: explicit selections (1-D int, distinct) that override the
            samplers; ``class_index`` must contain every label of the batch.
        ignore_index: label of rows that add nothing to loss or gradient.
        generator: randomness for the samplers (classes are drawn first, then dims).
        backend: ``"auto"`` (``"torch"`` here), ``"reference"`` or ``"torch"``.
        check_finite: reject non-finite embeddings (one host sync; turn off for speed).

    Returns:
        0-dim loss, the mean over non-ignored rows (fp32; fp64 for fp64 inputs); ``0``
        with zero gradients when every row is ignored.
    """
    opts = _Options(
        scale, margin, margin_type, margin_grad, class_sample_rate, dim_sample_rate, num_dims, ignore_index, backend
    )
    _checks.check_inputs(embeddings, prototypes, labels, ignore_index=ignore_index, check_finite=check_finite)
    num_classes, dim = prototypes.shape
    positives = _positives(labels, ignore_index)
    if class_index is None:
        class_index = sample_classes(positives, num_classes, class_sample_rate, generator)
    else:
        class_index = _checks.check_class_index(class_index, num_classes, positives)
    if dim_index is not None:
        dim_index = _checks.check_dim_index(dim_index, dim, embeddings.device)
    else:
        k = _checks.num_selected_dims(dim, dim_sample_rate, num_dims)
        dim_index = sample_dims(dim, k, generator, embeddings.device) if k < dim else None
    return _selected_loss(embeddings, prototypes, labels, class_index, dim_index, opts)


class DualPartialMarginLoss(nn.Module):
    """UNICOM's loss as a module that owns the class prototypes and the sampling stream.

    ``criterion(embeddings [B, D], labels [B]) -> 0-dim loss``. ``weight`` is the
    ``[num_classes, embedding_dim]`` fp32 prototype parameter, initialised N(0, 0.01).
    Each call in training mode draws this step's classes and dims from
    ``(seed, step)`` and advances ``step``; ``step`` and ``seed`` are saved in the
    ``state_dict``, so a resumed run samples exactly like an uninterrupted one. In
    eval mode the step does not advance. ``last_class_index`` (sorted class ids) and
    ``last_dim_index`` (sorted dims, ``None`` when all dims are kept) show the last
    selection; ``options`` holds the validated scalar options. See
    :func:`dual_partial_margin_loss` for their meaning.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        scale: float = 32.0,
        margin: float = 0.3,
        margin_type: str = "arcface",
        margin_grad: str = "straight_through",
        class_sample_rate: float = 0.1,
        dim_sample_rate: float = 0.5,
        num_dims: int | None = None,
        ignore_index: int = -1,
        backend: str = "auto",
        seed: int = 0,
        check_finite: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.options = _Options(
            scale, margin, margin_type, margin_grad, class_sample_rate, dim_sample_rate, num_dims, ignore_index, backend
        )
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.num_dims = _checks.num_selected_dims(embedding_dim, dim_sample_rate, num_dims)
        self.check_finite = check_finite
        self.seed = seed
        self.step = 0
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim, device=device).normal_(0.0, 0.01))
        self.last_class_index: Tensor | None = None
        self.last_dim_index: Tensor | None = None

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        opts = self.options
        _checks.check_inputs(
            embeddings, self.weight, labels, ignore_index=opts.ignore_index, check_finite=self.check_finite
        )
        device = embeddings.device
        positives = _positives(labels, opts.ignore_index)
        class_generator = step_generator(self.seed, self.step, 0, device)
        class_index = sample_classes(positives, self.num_classes, opts.class_sample_rate, class_generator)
        dim_index = None
        if self.num_dims < self.embedding_dim:
            # Drawn on the CPU so every device (and every rank) derives the same subset.
            dim_generator = step_generator(self.seed, self.step, 1)
            dim_index = sample_dims(self.embedding_dim, self.num_dims, dim_generator, device)
        self.last_class_index, self.last_dim_index = class_index, dim_index
        if self.training:
            self.step += 1
        return _selected_loss(embeddings, self.weight, labels, class_index, dim_index, opts)

    def get_extra_state(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def set_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self.seed = int(state["seed"])

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in asdict(self.options).items())
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, {opts}, step={self.step}"
