"""Model parallelism across ranks (docs/design.md, sections 2.1-2.8).

Classes are block-sharded: rank ``r`` owns ``[start_r, stop_r)`` (:func:`class_range`).
Per step the loss makes these collectives:

1. ``agree``: one all-gather of a small int64 vector per rank (batch size, shapes,
   options, dimension subset, label range, local errors), so that bad input or
   mismatched configuration raises the same error on every rank instead of hanging;
2. the labels, all-gathered (int64);
3. the embeddings, all-gathered in their own dtype (autograd-aware: the backward
   reduce-scatters the gradient to the owning rank);
4. the per-row statistics ``(exp(lse_r - bound), z_t)``, one all-reduce of ``[2, N]`` fp64
   (its size does not grow with the world size), from which every rank computes the
   identical global log-sum-exp and loss.

Each rank's prototype block must stay out of data parallelism: when the loss is part of a
module wrapped in ``DistributedDataParallel``, :func:`exclude_shards_from_ddp` tells DDP so.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ._checks import NonFiniteError
from .ops import mean_over_rows, once_differentiable

# Fields of the agreement vector.
_ERROR, _BATCH, _DIM, _ROWS, _OPTIONS, _DIMS, _LABEL_MIN, _LABEL_MAX, _NONFINITE, _STEP = range(10)
_FIELDS = 10
_UNKNOWN = -1
_INT64_MAX = torch.iinfo(torch.int64).max

# torch >= 2.12 renamed the single-tensor collectives; older releases (the GPU image) have the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of the classes rank ``rank`` owns: contiguous blocks, the first
    ``num_classes % world_size`` ranks holding one more."""
    base, extra = divmod(num_classes, world_size)
    start = base * rank + min(rank, extra)
    return start, start + base + (rank < extra)


def exclude_shards_from_ddp(model: nn.Module) -> list[str]:
    """Mark the prototype shards of every sharded loss inside ``model`` as ignored by DDP.

    Call it on the module about to be wrapped, before ``DistributedDataParallel(model)``,
    when that module contains a :class:`~unicom_kernels.DualPartialMarginLoss` with a
    ``process_group``. Each rank holds a different block of classes whose gradient is
    already complete on that rank, so DDP must neither broadcast rank 0's block to the others
    at construction nor average the blocks' gradients (nor compare their shapes, which differ
    when the class count is not divisible by the world size). The other parameters stay
    data-parallel. Not needed when the loss lives outside the wrapped module.

    DDP reads the fully qualified names from ``model._ddp_params_and_buffers_to_ignore``
    (set through ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``);
    names already there are kept, and calling this twice changes nothing.

    Returns:
        The names of the excluded parameters and buffers as ``model.named_parameters()``
        spells them (e.g. ``["criterion.weight"]``), in module order; ``[]`` if ``model``
        holds no sharded loss.

    Raises:
        TypeError: ``model`` is already wrapped (DDP has taken its parameters by then).
    """
    from .loss import DualPartialMarginLoss  # loss imports this module

    if isinstance(model, DistributedDataParallel):
        raise TypeError(
            "exclude_shards_from_ddp(model) must be called before DistributedDataParallel(model), "
            "on the module to be wrapped, not on the wrapper"
        )
    names: list[str] = []
    for prefix, module in model.named_modules():
        if isinstance(module, DualPartialMarginLoss) and module.process_group is not None:
            names += [name for name, _ in module.named_parameters(prefix=prefix)]
            names += [name for name, _ in module.named_buffers(prefix=prefix)]
    if names:
        ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
        ignored += [name for name in names if name not in ignored]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return names


def comm_device(group: dist.ProcessGroup) -> torch.device:
    """Where tensors for ``group``'s collectives must live (the current GPU for NCCL)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def fingerprint(*values: object) -> int:
    """A stable 32-bit digest of ``repr(values)``, to compare configurations across ranks."""
    return zlib.crc32(repr(values).encode())


def agree(group: dist.ProcessGroup, info: Tensor | None, error: Exception | None) -> list[list[int]]:
    """All-gather every rank's ``info`` (:func:`local_info`; ``None`` where the local work failed);
    raise on every rank if any rank reported ``error``. Returns the ``[world][fields]`` table as
    Python ints: the agreement's one read back from the device."""
    world = dist.get_world_size(group)
    device = comm_device(group)
    if info is None:  # filled on the device: a tensor made from a list would be a copy from the host
        info = torch.full((_FIELDS,), _UNKNOWN, dtype=torch.int64, device=device)
    local = info.to(device)
    local[_ERROR] = int(error is not None)
    table = torch.empty(world * _FIELDS, dtype=torch.int64, device=device)
    _all_gather(table, local, group=group)
    table = table.view(world, _FIELDS).cpu().tolist()
    if any(row[_ERROR] for row in table):
        # Every rank takes this branch, so the extra collective is matched everywhere.
        messages = [None] * world
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        raise ValueError("input rejected on another rank: " + "; ".join(f"rank {r}: {m}" for r, m in failed))
    return table


def _differences(group: dist.ProcessGroup, settings: dict) -> str:
    """The entries of ``settings`` that differ across ranks, with each rank's value (one collective)."""
    world = dist.get_world_size(group)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, settings, group=group)
    names = sorted({k for s in gathered for k in s if len({repr(t.get(k)) for t in gathered}) > 1})
    return "; ".join(f"{k}: " + ", ".join(f"{s.get(k)!r} on rank {r}" for r, s in enumerate(gathered)) for k in names)


def check_agreement(table: list[list[int]], num_classes: int | None, settings: dict, group: dist.ProcessGroup) -> int:
    """Check the gathered ``table``: equal batch sizes, dims and ``settings`` (compared by
    digest; when they differ, every rank gathers them to name what differs), block-sharded
    prototypes, labels in range, finite embeddings. Returns the total class count.

    Raises the same ``ValueError`` on every rank (all ranks hold the same table).
    """
    world = len(table)

    def column(field: int) -> list[int]:
        return [row[field] for row in table]

    def same(field: int, what: str) -> None:
        values = column(field)
        if len(set(values)) > 1:
            raise ValueError(f"{what} must be equal on every rank, got {values} (ranks 0..{world - 1})")

    same(_BATCH, "the local batch size (embeddings.shape[0])")
    same(_DIM, "the embedding dim (embeddings.shape[1])")
    if len(set(column(_OPTIONS))) > 1:
        raise ValueError(
            f"the loss settings must be equal on every rank; they differ in {_differences(group, settings)}"
        )
    same(_STEP, "the loss module's step (resume every rank from the same checkpoint)")
    same(_DIMS, "the dimension subset (dim_index or the dimension sampler's generator state)")
    rows = column(_ROWS)
    total = sum(rows) if num_classes is None else num_classes
    expected = [b - a for a, b in (class_range(total, r, world) for r in range(world))]
    if rows != expected:
        raise ValueError(
            f"prototypes must be the block shards of {total} classes, {expected} rows on ranks 0..{world - 1}; "
            f"got {rows}"
        )
    for r, (lo, hi) in enumerate(zip(column(_LABEL_MIN), column(_LABEL_MAX), strict=True)):
        if hi >= lo and (lo < 0 or hi >= total):
            # A uint64 label beyond int64 arrives as 2^63 - 1 (or - 2): it stands for "this or more".
            found = lo if lo < 0 else (f"{hi} or more" if hi >= _INT64_MAX - 1 else hi)
            raise ValueError(f"labels must be in [0, {total}) or equal ignore_index; rank {r} has {found}")
    bad = [r for r, nonfinite in enumerate(column(_NONFINITE)) if nonfinite]
    if bad:
        raise NonFiniteError(f"embeddings contain NaN or inf on rank(s) {bad} (check_values=False skips this check)")
    return total


def local_info(
    embeddings: Tensor,
    prototype_rows: int,
    labels: Tensor,
    ignore_index: int,
    settings: int,
    dim_index: Tensor | None,
    step: Tensor | None,
    check_values: bool,
) -> Tensor:
    """This rank's agreement vector, ``[fields]`` int64 on the embeddings' device.

    Built from device values and constants filled on the device, so that making it reads
    nothing back: :func:`agree`'s read of the gathered table is the only one. ``settings`` is
    the digest of the host-side settings; ``step`` the module's step (``None``: 0).
    """

    def const(value: int) -> Tensor:
        return torch.full((), value, dtype=torch.int64, device=embeddings.device)

    valid = labels != ignore_index
    # Without a valid label, min > max: the range check skips the rank.
    low = torch.where(valid, labels, _INT64_MAX).amin()
    high = torch.where(valid, labels, -1).amax()
    nonfinite = (~torch.isfinite(embeddings).all()).to(torch.int64) if check_values else const(0)
    # A digest of the dims on the device: distinct subsets of one size differ in it almost surely.
    dims = const(-1) if dim_index is None else ((dim_index.to(torch.int64) + 1) * 0x9E3779B1 % (1 << 31)).sum()
    fields = {
        _ERROR: const(0),
        _BATCH: const(embeddings.shape[0]),
        _DIM: const(embeddings.shape[1]),
        _ROWS: const(prototype_rows),
        _OPTIONS: const(settings),
        _DIMS: dims,
        _LABEL_MIN: low,
        _LABEL_MAX: high,
        _NONFINITE: nonfinite,
        _STEP: const(0) if step is None else step.to(device=embeddings.device, dtype=torch.int64),
    }
    return torch.stack([fields[f] for f in range(_FIELDS)])


def all_gather_labels(labels: Tensor, group: dist.ProcessGroup) -> Tensor:
    """``[W * B]`` int64 labels of all ranks, in rank order (no gradient)."""
    local = labels.to(device=comm_device(group), dtype=torch.int64).contiguous()
    out = torch.empty(dist.get_world_size(group) * local.numel(), dtype=torch.int64, device=local.device)
    _all_gather(out, local, group=group)
    return out.to(labels.device)


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0; the backward reduce-scatters (sums) the gradient back,
    times ``grad_scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup, grad_scale: float) -> Tensor:
        ctx.group, ctx.grad_scale = group, grad_scale
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        _reduce_scatter(out, grad.contiguous(), group=ctx.group)
        (out,) = once_differentiable("the cross-rank gather of embeddings (process_group)", out * ctx.grad_scale)
        return out, None, None


def all_gather_rows(x: Tensor, group: dist.ProcessGroup, grad_scale: float = 1.0) -> Tensor:
    """``[W * B, ...]`` rows of all ranks in rank order, differentiable (see :class:`_GatherRows`)."""
    return _GatherRows.apply(x, group, grad_scale)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) of statistics that every rank then reduces identically.

    Every rank computes the same function of the sum, so the gradient with respect to
    this rank's addend is the gradient of the sum itself: no communication backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


# exp(-2 * 300) is far above fp64's smallest normal (1e-308); beyond it, agree on a row max.
_FIXED_SHIFT_LIMIT = 300.0


def global_loss(lse: Tensor, z_t: Tensor, valid: Tensor, logit_bound: float, group: dist.ProcessGroup) -> Tensor:
    """Combine the per-rank ``lse [N]`` and ``z_t [N]`` (0 off the target's rank) into the
    mean loss over ``valid`` rows, identical on every rank.

    Every logit lies in ``[-logit_bound, logit_bound]``, so ``exp(lse_r - logit_bound)``
    summed over ranks in fp64 is exact without a max pass: one all-reduce of ``[2, N]``
    fp64, whatever the world size. Only for ``logit_bound > 300`` (where fp64 could
    underflow) does a max all-reduce come first.
    """
    # A Python number, not a tensor made from one: that would be a copy from the host to the device.
    shift: float | Tensor = float(logit_bound)
    if logit_bound > _FIXED_SHIFT_LIMIT:
        shift = lse.detach().to(torch.float64, copy=True)  # all_reduce works in place
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    local = torch.stack([(lse.to(torch.float64) - shift).exp(), z_t.to(torch.float64)])
    total = _SumOverRanks.apply(local, group)
    return mean_over_rows((total[0].log() + shift - total[1]).to(lse.dtype), valid)
