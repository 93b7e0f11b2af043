"""The public loss: functional :func:`dual_partial_margin_loss` and module :class:`DualPartialMarginLoss`.

Both do the same three things (docs/design.md, section 2): validate, pick the classes and
dimensions of this step, then gather + normalise and hand the compact problem to a
backend from :mod:`unicom_kernels.ops`. Autograd scatters the gradients of the
gathered rows and columns back into the full prototype matrix. With a process group
the classes are sharded across ranks (:mod:`unicom_kernels.distributed`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import _checks, ops
from . import distributed as _dist
from .ops import BACKENDS, accumulation_dtype, check_backend, get_backend, mean_loss, normalize_rows
from .row_grad import RowGrad
from .sampling import generator_keys, sample_classes, sample_dims, step_keys

# The backends every machine has, imported now: torch.compile cannot trace an import in the
# first call (the triton backend is imported by the module's constructor or the first eager call).
for _name in ("torch", "reference"):
    get_backend(_name, torch.device("cpu"))

# (local labels, -1 outside the block, block start, block size) -> sorted local class indices of the step.
ClassChooser = Callable[[Tensor, int, int], Tensor]


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
        # Plain Python values (numpy scalars accepted): the options' digest, compared across
        # ranks, must not depend on how a rank spelled them.
        for name in ("scale", "margin", "class_sample_rate", "dim_sample_rate"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "ignore_index", int(self.ignore_index))
        if self.num_dims is not None:
            object.__setattr__(self, "num_dims", int(self.num_dims))

    def margin_kwargs(self) -> dict:
        return {
            "scale": self.scale,
            "margin": self.margin,
            "margin_type": self.margin_type,
            "margin_grad": self.margin_grad,
        }


def _compute_dtype(embeddings: Tensor, prototypes: Tensor) -> torch.dtype:
    """The GEMM operand dtype: the lower precision of the two inputs (ties go to the embeddings),
    lowered further to autocast's dtype inside an enabled ``torch.autocast``, as a matmul would be."""
    candidates = [embeddings.dtype, prototypes.dtype]
    device_type = embeddings.device.type
    if torch.is_autocast_enabled(device_type):
        candidates.append(torch.get_autocast_dtype(device_type))
    return min(candidates, key=lambda dtype: torch.finfo(dtype).bits)


def _without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The backends cast to the compute dtype themselves; autocast would re-cast their fp32 logit math."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _check_tensors(
    embeddings: Tensor,
    prototypes: Tensor,
    labels: Tensor,
    opts: _Options,
    check_values: bool,
    sharded: bool = False,
    generator: object = None,
) -> Tensor:
    """Input checks, then whether the backend can run them; returns the labels as int64.
    Sharded: the label range and finiteness are agreed across ranks instead (see
    :mod:`unicom_kernels.distributed`)."""
    _checks.check_generator(generator)
    labels = _checks.check_inputs(
        embeddings,
        prototypes,
        labels,
        ignore_index=opts.ignore_index,
        check_values=check_values and not sharded,
    )
    check_backend(opts.backend, embeddings.device, _compute_dtype(embeddings, prototypes))
    return labels


def _settings(opts: _Options, embeddings: object, prototypes: object, **state: object) -> dict:
    """What must be equal on every rank: the options, the input dtypes and the caller's ``state``."""

    def dtype(t: object) -> str | None:
        return str(t.dtype) if isinstance(t, Tensor) else None

    return {**asdict(opts), "embeddings.dtype": dtype(embeddings), "prototypes.dtype": dtype(prototypes), **state}


def _local_labels(labels: Tensor, ignore_index: int, start: int, stop: int) -> Tensor:
    """``[N]`` labels shifted to ``[0, stop - start)``, ``-1`` where ignored or outside the block.

    Same shape as ``labels`` (no mask, no ``unique``): nothing is read back from the device.
    """
    inside = (labels != ignore_index) & (labels >= start) & (labels < stop)
    return torch.where(inside, labels - start, -1)


def _gathered(
    embeddings: Tensor,
    prototypes: Tensor,
    class_index: Tensor,
    dim_index: Tensor | None,
    row_grad: RowGrad | None = None,
    ignored: Tensor | None = None,
) -> tuple[Tensor, Tensor, torch.dtype]:
    """The selected ``x [N, k]`` and ``w [n, k]`` (not normalised) and the GEMM dtype; with
    ``row_grad``, the gradient of the gathered rows goes there instead of ``prototypes.grad``.

    ``ignored`` (``[N]`` bool): rows replaced by zeros. Without the value checks an ignored row
    may hold NaN or inf (padding), which its zero weight would not keep out of the prototypes'
    gradient (``0 * NaN``); zeros keep it out, and its own gradient is then 0.
    """
    x = embeddings if dim_index is None else embeddings.index_select(1, dim_index)
    if ignored is not None:
        x = torch.where(ignored.unsqueeze(1), 0.0, x)
    if row_grad is not None and torch.is_grad_enabled() and prototypes.requires_grad:
        w = row_grad.gather(prototypes, class_index)
    elif statically_known_true(class_index.numel() == prototypes.shape[0]):
        # Sorted distinct indices as many as the rows are all of them: no copy, no scatter back.
        # (Under torch.compile a count of distinct positives is only known on the device: no guard.)
        w = prototypes
    else:
        w = prototypes.index_select(0, class_index)
    if dim_index is not None:
        w = w.index_select(1, dim_index)
    return x, w, _compute_dtype(embeddings, prototypes)


def _targets(labels: Tensor, class_index: Tensor, ignore_index: int, start: int, stop: int) -> Tensor:
    """Column of each row's class in the sorted local ``class_index``; -1 when the row is
    ignored or its class lies outside ``[start, stop)``."""
    local = _local_labels(labels, ignore_index, start, stop)
    return torch.searchsorted(class_index, local.clamp_min(0)).masked_fill(local < 0, -1)


def _single_process_loss(
    embeddings: Tensor,
    prototypes: Tensor,
    labels: Tensor,
    class_index: Tensor,
    dim_index: Tensor | None,
    opts: _Options,
    check_values: bool,
    row_grad: RowGrad | None = None,
) -> Tensor:
    target = _targets(labels, class_index, opts.ignore_index, 0, prototypes.shape[0])
    # Unchecked, an out-of-range label drops its row like an ignored one: its target is -1 too.
    ignored = None if check_values else target < 0  # checked rows are finite
    x, w, compute = _gathered(embeddings, prototypes, class_index, dim_index, row_grad, ignored)
    backend = get_backend(opts.backend, embeddings.device, compute)
    with _without_autocast(embeddings.device):
        return mean_loss(backend, x, w, target, **opts.margin_kwargs(), compute_dtype=compute)


def _sharded_loss(
    embeddings: Tensor,
    shard: Tensor,
    labels: Tensor,
    opts: _Options,
    group: dist.ProcessGroup,
    *,
    num_classes: int | None,
    choose_dims: Callable[[], Tensor | None],
    choose_classes: ClassChooser,
    settings: Callable[[], dict],
    check_values: bool,
    generator: object = None,
    step: Tensor | None = None,
    row_grad: RowGrad | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The loss with classes sharded across ``group``; ``shard`` is this rank's ``[C_r, D]`` block.

    With ``check_values``, everything that could fail on one rank only runs before two
    agreements, and any exception there (not only the checks' own) is agreed on, so all ranks
    raise together instead of the others waiting in the next collective; ``settings()``
    (options, dtypes, the module's state) must be equal on every rank. The agreements read
    from the device. Without ``check_values`` (possible when ``num_classes`` is known) they
    are skipped: the caller guarantees equal settings and valid inputs on every rank. Returns
    ``(loss, class_index, dim_index)``, the classes as global ids.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    # A compiled graph cannot raise from what the ranks report (nor hash the settings in C):
    # compiled, the module runs as without check_values; the functional form needs the
    # agreement for the class count.
    agreeing = (check_values and not torch.compiler.is_compiling()) or num_classes is None
    error, info, dim_index, agreed = None, None, None, {}
    try:
        labels = _check_tensors(embeddings, shard, labels, opts, check_values, sharded=True, generator=generator)
        dim_index = choose_dims()
        if agreeing:
            agreed = settings()
            info = _dist.local_info(
                embeddings,
                shard.shape[0],
                labels,
                opts.ignore_index,
                _dist.fingerprint(agreed),
                dim_index,
                step,
                check_values,
            )
    except Exception as exc:
        if not agreeing:
            raise
        error = exc
    total = num_classes
    if agreeing:
        total = _dist.check_agreement(_dist.agree(group, info, error), num_classes, agreed, group)
    start, stop = _dist.class_range(total, rank, world)

    all_labels = _dist.all_gather_labels(labels, group)
    # The second agreement guards what can fail on one rank after the first: the validation of
    # an explicit class_index and a sampler given by the caller. The module's own sampler has
    # no input to reject, so it goes without (one read back per step with check_values).
    agree_on_classes = num_classes is None
    error, class_index = None, None
    try:
        local_labels = _local_labels(all_labels, opts.ignore_index, start, stop)
        class_index = choose_classes(local_labels, start, stop - start)
    except Exception as exc:
        if not agree_on_classes:
            raise
        error = exc
    if agree_on_classes:
        _dist.agree(group, None, error)

    # DDP averages parameter gradients over ranks; the reduce-scattered embedding gradient
    # is dL/dx of the global mean loss, so scale it by W to make that average the true step.
    gathered = _dist.all_gather_rows(embeddings, group, grad_scale=float(world))
    # The rows of the mean: every one when checked; unchecked, an out-of-range label drops its row,
    # as in a single process (its class is in no block, so it would enter with a target logit of 0).
    counted = _local_labels(all_labels, opts.ignore_index, 0, total) >= 0
    ignored = None if check_values else ~counted  # checked rows are finite
    x, w, compute = _gathered(gathered, shard, class_index, dim_index, row_grad, ignored)
    target = _targets(all_labels, class_index, opts.ignore_index, start, stop)
    backend = get_backend(opts.backend, embeddings.device, compute)
    with _without_autocast(embeddings.device):
        lse, z_t = backend.lse_and_target(x, w, target, **opts.margin_kwargs(), compute_dtype=compute)
    # |z| <= s for every margin type with m >= 0; s * (1 + |m|) also covers negative margins.
    logit_bound = opts.scale * (1.0 + abs(opts.margin))
    loss = _dist.global_loss(lse, z_t, counted, logit_bound, group)
    return loss, class_index + start, dim_index


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
    check_values: bool = True,
    process_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Margin softmax loss over a random subset of classes and feature dimensions.

    Args:
        embeddings: ``[B, D]`` fp32/fp16/bf16/fp64, not necessarily normalised.
        prototypes: ``[C, D]`` class centres (fp32 master weights), not necessarily
            normalised; with ``process_group``, this rank's ``[C_r, D]`` block of
            :func:`~unicom_kernels.class_range` (``C`` is the sum over ranks).
        labels: ``[B]`` integer global class ids in ``[0, C)`` or ``ignore_index``.
        scale, margin: ``s`` and ``m``.
        margin_type: ``"arcface"`` ``s*cos(acos(c)+m)``, ``"cosface"`` ``s*(c-m)`` or ``"none"``.
        margin_grad: ``"straight_through"`` (target gradient ``s*(p-1)`` as if no margin,
            insightface/UNICOM parity) or ``"exact"`` (true derivative).
        class_sample_rate: keep every class of the batch plus random negatives up to
            ``int(rate * C)`` classes (per rank: of its block); ``1.0`` keeps all.
        dim_sample_rate, num_dims: keep ``num_dims`` (or ``round(rate * D)``) random dims
            of both embeddings and prototypes before normalising; ``1.0`` keeps all.
        class_index, dim_index: explicit selections (1-D int, distinct global ids) that
            override the samplers; ``class_index`` must contain every label of the batch
            (with ``process_group``: every label of the global batch inside this rank's block).
        ignore_index: label of rows that add nothing to loss or gradient.
        generator: randomness for the samplers (classes are drawn first, then dims; with
            ``process_group`` dims first, as the ranks agree on them before the classes of the
            gathered batch are drawn). With ``process_group`` the dims must come out equal on
            every rank: seed it alike.
        backend: ``"auto"`` (``"triton"`` for CUDA tensors, ``"torch"`` otherwise and for
            fp64), ``"triton"``, ``"torch"`` or ``"reference"``.
        check_values: check that the labels lie in ``[0, C)`` (or equal ``ignore_index``) and
            the embeddings are finite, which reads one value back from the device (a host
            synchronisation on a GPU). ``False`` skips these checks: with every class sampled, or
            ``int(class_sample_rate * C)`` at least the number of rows, the step then reads
            nothing back (CUDA-graph friendly); a label outside ``[0, C)`` then drops its row like
            ``ignore_index`` (this function with ``process_group`` still agrees on the class
            count across ranks, and that agreement refuses it).
        process_group: shard the classes across this group's ranks (model parallel). The
            embeddings are all-gathered; their gradient is reduce-scattered back and scaled
            by the world size, so that DDP's gradient averaging yields the single-process step.

    Returns:
        0-dim loss, the mean over non-ignored (global) rows (fp32; fp64 for fp64 inputs);
        ``0`` with zero gradients when every row is ignored. Identical on every rank.
    """
    _checks.check_process_group(process_group)  # before the agreement below, which needs a group
    try:
        opts = _Options(
            scale, margin, margin_type, margin_grad, class_sample_rate, dim_sample_rate, num_dims, ignore_index, backend
        )
        _checks.check_bool(check_values, "check_values")
    except (TypeError, ValueError) as exc:
        if process_group is not None:  # the other ranks are waiting in the first agreement
            _dist.agree(process_group, None, exc)
        raise

    def _check_generator_outside_backward() -> None:
        # Checkpointing restores the global RNG before it recomputes, not a generator passed in.
        if generator is not None:
            remedy = "pass generator=None (checkpointing restores the global RNG), or call the loss outside the region"
            _checks.check_outside_backward("the generator of dual_partial_margin_loss", remedy)

    def choose_dims() -> Tensor | None:
        dim = embeddings.shape[1]
        if dim_index is not None:
            return _checks.check_dim_index(dim_index, dim, embeddings.device)
        k = _checks.num_selected_dims(dim, dim_sample_rate, num_dims)
        if k == dim:
            return None
        _check_generator_outside_backward()
        return sample_dims(k, generator_keys(dim, generator, embeddings.device))

    def choose_classes(local_labels: Tensor, start: int, num_local: int) -> Tensor:
        if class_index is not None:
            return _checks.check_class_index(class_index, local_labels, start, start + num_local)
        if class_sample_rate >= 1.0:
            return torch.arange(num_local, device=local_labels.device)
        _check_generator_outside_backward()
        return sample_classes(
            local_labels, generator_keys(num_local, generator, local_labels.device), class_sample_rate
        )

    if process_group is not None:
        loss, _, _ = _sharded_loss(
            embeddings,
            prototypes,
            labels,
            opts,
            process_group,
            num_classes=None,
            choose_dims=choose_dims,
            choose_classes=choose_classes,
            settings=lambda: _settings(opts, embeddings, prototypes),
            check_values=check_values,
            generator=generator,
        )
        return loss
    labels = _check_tensors(embeddings, prototypes, labels, opts, check_values, generator=generator)
    num_classes = prototypes.shape[0]
    selected = choose_classes(_local_labels(labels, opts.ignore_index, 0, num_classes), 0, num_classes)
    return _single_process_loss(embeddings, prototypes, labels, selected, choose_dims(), opts, check_values)


class DualPartialMarginLoss(nn.Module):
    """UNICOM's loss as a module that owns the class prototypes and the sampling stream.

    ``criterion(embeddings [B, D], labels [B]) -> 0-dim loss``. ``weight`` is the fp32
    prototype parameter, initialised N(0, 0.01): ``[num_classes, embedding_dim]``, or with
    ``process_group`` this rank's ``[C_r, embedding_dim]`` block of classes
    ``class_range = (start, stop)``. Each call in training mode draws this step's classes
    and dims from ``(seed, step)`` and advances ``step``; the dims come out identical on
    every rank, the classes differ per rank. ``step`` and ``seed`` (and the shard's class
    range) are saved in the ``state_dict``, so a resumed run samples exactly like an
    uninterrupted one. In eval mode nothing is sampled and the step does not advance: the
    loss covers all classes and dims without the margin (the cross-entropy of the classifier
    :meth:`logits` defines), identical on every rank. ``last_class_index``
    (sorted global class ids of this rank) and ``last_dim_index`` (sorted dims, ``None``
    when all are kept) show the last selection; ``options`` holds the validated scalar
    options. See :func:`dual_partial_margin_loss` for their meaning. ``row_grad`` is ``None``
    unless a row-sparse optimizer of :mod:`unicom_kernels.optim` owns the prototypes: then
    backward leaves ``weight.grad`` unset and keeps the ``[n, D]`` gradient of the sampled rows
    in it (:class:`~unicom_kernels.row_grad.RowGrad`).
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
        check_values: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        num_classes = _checks.check_positive_int(num_classes, "num_classes")
        embedding_dim = _checks.check_positive_int(embedding_dim, "embedding_dim")
        seed = _checks.check_seed(seed)
        _checks.check_bool(check_values, "check_values")
        _checks.check_process_group(process_group)
        self.options = _Options(
            scale, margin, margin_type, margin_grad, class_sample_rate, dim_sample_rate, num_dims, ignore_index, backend
        )
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.num_dims = _checks.num_selected_dims(embedding_dim, dim_sample_rate, num_dims)
        self.check_values = check_values
        self.process_group = process_group
        self.rank = 0 if process_group is None else dist.get_rank(process_group)
        world = 1 if process_group is None else dist.get_world_size(process_group)
        if num_classes < world:
            raise ValueError(f"num_classes ({num_classes}) must be >= the world size ({world})")
        self.class_range = _dist.class_range(num_classes, self.rank, world)
        self.seed = seed
        # A device tensor advanced in place: the sampler reads it on the device, so a step needs
        # no host value, compiles once and replays in a CUDA graph. Saved via the extra state.
        self.register_buffer("_step", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        rows = self.class_range[1] - self.class_range[0]
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim, device=device).normal_(0.0, 0.01))
        # Import the backend now rather than in the first forward, which torch.compile may be tracing.
        with contextlib.suppress(ValueError):  # not runnable here: forward says why, on the inputs it gets
            ops.get_backend(backend, self.weight.device)
        self.last_class_index: Tensor | None = None
        self.last_dim_index: Tensor | None = None
        # Set by a row-sparse optimizer (unicom_kernels.optim): backward then keeps the compact
        # gradient of the sampled rows there and leaves weight.grad unset.
        self.row_grad: RowGrad | None = None

    @property
    def step(self) -> int:
        """Training-mode calls so far (reading it waits for the device)."""
        return int(self._step)

    @step.setter
    def step(self, value: int) -> None:
        self._step.fill_(value)

    def _choose_dims(self, device: torch.device) -> Tensor | None:
        if self.num_dims == self.embedding_dim or not self.training:
            return None
        # Keyed by (seed, step) alone: every rank and device gets the same subset.
        return sample_dims(self.num_dims, step_keys(self.seed, self._step.to(device), 1, self.embedding_dim))

    def _choose_classes(self, local_labels: Tensor, start: int, num_local: int) -> Tensor:
        if not self.training or self.options.class_sample_rate >= 1.0:
            return torch.arange(num_local, device=local_labels.device)
        # One stream per rank (stream 0 for rank 0, as in a single process).
        keys = step_keys(self.seed, self._step.to(local_labels.device), 2 * self.rank, num_local)
        return sample_classes(local_labels, keys, self.options.class_sample_rate)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        # Eval mode: the plain normalised softmax cross-entropy of the classifier that logits()
        # defines (all classes and dims, no margin): a validation loss that is not a random draw.
        opts = self.options if self.training else replace(self.options, margin_type="none", margin=0.0)
        if self.training and (opts.class_sample_rate < 1.0 or self.num_dims < self.embedding_dim):
            remedy = "call it outside the checkpointed region"
            _checks.check_outside_backward("the step of DualPartialMarginLoss", remedy)
        if self.process_group is None:
            labels = _check_tensors(embeddings, self.weight, labels, opts, self.check_values)
            local_labels = _local_labels(labels, opts.ignore_index, 0, self.num_classes)
            class_index = self._choose_classes(local_labels, 0, self.num_classes)
            dim_index = self._choose_dims(embeddings.device)
            loss = _single_process_loss(
                embeddings, self.weight, labels, class_index, dim_index, opts, self.check_values, self.row_grad
            )
        else:

            def settings() -> dict:
                state = dict(num_classes=self.num_classes, seed=self.seed, training=self.training)
                return _settings(opts, embeddings, self.weight, **state)

            loss, class_index, dim_index = _sharded_loss(
                embeddings,
                self.weight,
                labels,
                opts,
                self.process_group,
                num_classes=self.num_classes,
                choose_dims=lambda: self._choose_dims(embeddings.device),
                choose_classes=self._choose_classes,
                settings=settings,
                check_values=self.check_values,
                step=self._step,
                row_grad=self.row_grad,
            )
        self.last_class_index, self.last_dim_index = class_index, dim_index
        if self.training:
            self._step.add_(1)
        return loss

    def logits(self, embeddings: Tensor, chunk_rows: int = 4096) -> Tensor:
        """Margin-free scaled cosines ``s * cos(x_i, w_j)`` over all dims: ``[B, C_r]`` against this
        rank's classes (column ``j`` is class ``class_range[0] + j``; all ``C`` without a process group).

        For classification and validation (``logits(x).argmax(1)``); no sampling, no step advance,
        no collective. Operands are rounded to the GEMM dtype of the loss and multiplied in fp32
        (fp64 for fp64), ``chunk_rows`` rows at a time, so no temporary exceeds the result's size.
        Differentiable. With a process group, each rank scores its own block of classes.
        """
        x, w = _checks.check_embeddings(embeddings, self.weight)
        chunk_rows = _checks.check_positive_int(chunk_rows, "chunk_rows")
        compute = _compute_dtype(x, w)
        acc = accumulation_dtype(compute)

        def operand(v: Tensor) -> Tensor:
            return normalize_rows(v, compute).to(compute).to(acc)

        with _without_autocast(x.device):
            w_t = operand(w).T
            parts = [(operand(rows) @ w_t).clamp(-1.0, 1.0) * self.options.scale for rows in x.split(chunk_rows)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def get_extra_state(self) -> dict:
        return {"step": self.step, "seed": self.seed, "num_classes": self.num_classes, "class_range": self.class_range}

    def set_extra_state(self, state: dict) -> None:
        saved = (state.get("num_classes", self.num_classes), tuple(state.get("class_range", self.class_range)))
        if saved != (self.num_classes, tuple(self.class_range)):
            raise ValueError(
                f"checkpoint holds classes {saved[1]} of {saved[0]}, but this rank owns {self.class_range} of "
                f"{self.num_classes}: load each rank's own shard with the same world size"
            )
        self.step = int(state["step"])
        self.seed = int(state["seed"])

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in asdict(self.options).items())
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, {opts}, "
            f"class_range={self.class_range}, step={self.step}"
        )
