"""Step 3: train a backbone + embedding head with ``DualPartialMarginLoss`` on (pseudo-)labels.

Launch with ``python -m unicom.train`` (one process) or ``torchrun --nproc_per_node=G -m unicom.train``
(DDP backbone; the loss is model-parallel when ``unicom_kernels`` supports ``process_group=``,
otherwise every rank keeps all prototypes and DDP averages their gradients, see ``loss_parallel``).

Output folder::

    config.yaml                  the resolved configuration (reusable with --config)
    metrics.csv                  step, epoch, loss, lr, prototype_lr, grad_norm, images_per_s, skipped
    loss.png                     loss and lr against step, drawn at the end of each run
    tensorboard/                 the same scalars, when tensorboard is installed
    checkpoints/step_XXXXXXX/    rankRRRRR.pt per rank (model, loss, optimizer, schedule, RNG); atomic
    checkpoints/latest           name of the newest complete checkpoint
    final.pt                     model weights + config, what ``unicom-evaluate`` loads

Checkpoints and ``final.pt`` hold a custom architecture's JSON itself, so they load anywhere.
A folder holding a run is not trained into again unless ``--resume`` continues it or
``--overwrite`` deletes it first. Without a progress bar (``--no-progress``: log files, batch jobs)
a line per metrics row goes to stderr: step/total, loss, lr, images/s and the time left.

Data modes (``data_mode``): ``indexed`` reads every sample by its index (folders, list files,
webdataset shards whose tar headers are indexed at start-up); ``stream`` reads webdataset shards
as a stream (:class:`unicom.stream.ShardStream`: O(shards) state per rank, shards dealt to
ranks and data-loader workers, a shuffle buffer); ``auto`` streams webdataset sources of at least
``STREAM_MIN_SHARDS`` shards. Pseudo-labels join by position: with ``features_dir`` through the
shard table of those features (any mode), without it one label per sample in source order
(indexed only). The number of classes is the clusters k-means kept (rows of ``centroids.npy``).

``--resume`` continues from ``checkpoints/latest`` (same world size; a stream also the same
``num_workers``), or from the newest older checkpoint that is intact when that one is unreadable
(saying so); on the CPU the result, and ``metrics.csv``, are bitwise identical to an uninterrupted
run's: the sample order and every augmentation are derived from ``(seed, epoch, index)`` and the
sampler state (a stream: its shard cursor and buffer, replayed from ``(epoch, batch)``), schedule,
optimizer, RNG and the losses not yet logged are restored.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import inspect
import io
import math
import os
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as td
from torch import nn
from tqdm import tqdm

from unicom_kernels import DualPartialMarginLoss, _checks
from unicom_kernels.ops import BACKENDS
from unicom_kernels.optim import ChainedOptimizer, SparseRowAdamW

from . import atomic, config, dist
from .data import (
    DataError,
    EpochBatchSampler,
    ImageDataset,
    Source,
    damaged,
    expand_shards,
    load_npy,
    open_source,
    resolve_format,
)
from .model import (
    EmbeddingModel,
    ModelError,
    build_model,
    load_file,
    load_weights,
    model_config_name,
    read_model_config,
    train_transform,
)
from .stream import PositionLabels, ShardStream

METRIC_FIELDS = ("step", "epoch", "loss", "lr", "prototype_lr", "grad_norm", "images_per_s", "skipped")
RESUME_MAY_CHANGE = {
    "resume",
    "retune",
    "overwrite",
    "stop_after",
    "progress",
    "num_workers",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "device",
    "output_dir",
    "data",
    "data_root",
    "pseudo_labels",
    "features_dir",
}
# What --retune lets a resumed run change: the optimiser's rates and decays and the schedule's shape.
RETUNABLE = ("lr", "prototype_lr_mult", "weight_decay", "prototype_weight_decay", "warmup_steps", "min_lr_ratio",
             "clip_grad_norm")  # fmt: skip
DATA_MODES = ("auto", "indexed", "stream")
# auto streams from this many shards on: below it, indexing the headers takes seconds and the
# epoch permutation mixes every sample, which a handful of shards per worker could not.
STREAM_MIN_SHARDS = 16
NO_DECAY_KEYS = ("pos_embed", "positional_embedding", "cls_token", "class_embedding", "dist_token")
# Argument of DualPartialMarginLoss -> the TrainConfig option that sets it.
LOSS_OPTIONS = {
    "scale": "scale",
    "margin": "margin",
    "margin_type": "margin_type",
    "margin_grad": "margin_grad",
    "class_sample_rate": "class_sample_rate",
    "dim_sample_rate": "dim_sample_rate",
    "num_dims": "num_dims",
    "backend": "loss_backend",
}
IGNORE_INDEX = -1
ADAMW_BETAS = (0.9, 0.999)
RUN_OUTPUTS = ("final.pt", "checkpoints", "metrics.csv", "loss.png", "tensorboard")  # what a run leaves in output_dir
FINAL_KEYS = ("model", "config", "step", "num_classes")
RESUME_KEYS = (*FINAL_KEYS, "criterion", "optimizer", "scheduler", "rng", "world_size")


@dataclass
class TrainConfig:
    """Options of ``unicom-train``."""

    # data
    data: str = field(default="", metadata={"help": "image folder, CSV/list file, or webdataset shards"})
    data_format: str = field(default="auto", metadata={"help": "auto | folder | list | wds"})
    data_root: str | None = field(default=None, metadata={"help": "base folder for relative paths of a list file"})
    pseudo_labels: str | None = field(
        default=None, metadata={"help": "unicom-cluster output folder; None = the data's own labels"}
    )
    features_dir: str | None = field(
        default=None, metadata={"help": "unicom-features folder of the pseudo-labels (its shard table joins them)"}
    )
    data_mode: str = field(
        default="auto", metadata={"help": f"auto (stream wds of >= {STREAM_MIN_SHARDS} shards) | indexed | stream"}
    )
    shuffle_buffer: int = field(default=10_000, metadata={"help": "samples in the shuffle buffer of a stream"})
    num_classes: int | None = field(
        default=None, metadata={"help": "classes of the data's own labels; None = largest label + 1 (indexed)"}
    )
    output_dir: str = field(default="", metadata={"help": "folder for checkpoints, logs and final.pt"})
    skip_bad: bool = field(default=False, metadata={"help": "missing/corrupt images are ignored rows, counted"})
    num_workers: int = field(
        default_factory=config.default_num_workers, metadata={"help": "DataLoader worker processes per rank"}
    )
    crop_scale: float = field(default=0.6, metadata={"help": "smallest RandomResizedCrop area fraction"})
    hflip: bool = field(default=False, metadata={"help": "random horizontal flips"})
    # model
    arch: str = field(default="open_clip:ViT-B-32", metadata={"help": "open_clip:<name> | timm:<name>"})
    pretrained: str | None = field(default=None, metadata={"help": "open_clip tag or local weights file"})
    model_config: str | None = field(default=None, metadata={"help": "JSON of a custom open_clip architecture"})
    image_size: int | None = field(default=None, metadata={"help": "input side; None = the model's default"})
    embedding_dim: int = field(default=512, metadata={"help": "output dim of the embedding head"})
    # loss
    scale: float = field(default=32.0, metadata={"help": "logit scale s"})
    margin: float = field(default=0.3, metadata={"help": "margin m"})
    margin_type: str = field(default="arcface", metadata={"help": "arcface | cosface | none"})
    margin_grad: str = field(default="straight_through", metadata={"help": "straight_through | exact"})
    class_sample_rate: float = field(default=0.1, metadata={"help": "share of classes sampled per step"})
    dim_sample_rate: float = field(default=0.5, metadata={"help": "share of embedding dims kept per step"})
    num_dims: int | None = field(default=None, metadata={"help": "dims kept per step (overrides dim_sample_rate)"})
    loss_backend: str = field(default="auto", metadata={"help": "auto | torch | triton | reference"})
    loss_parallel: str = field(
        default="auto", metadata={"help": "auto | model (prototypes sharded) | replicated (DDP-averaged)"}
    )
    # optimisation
    batch_size: int = field(default=128, metadata={"help": "images per step per rank"})
    epochs: int = field(default=1, metadata={"help": "epochs (ignored when max_steps is set)"})
    max_steps: int | None = field(default=None, metadata={"help": "total optimisation steps"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate of the backbone and head"})
    prototype_lr_mult: float = field(default=10.0, metadata={"help": "prototype lr = lr x this"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (matrices only)"})
    prototype_weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the prototypes"})
    prototype_optimizer: str = field(
        default="dense",
        metadata={"help": "dense (AdamW on every prototype) | sparse (lazy AdamW on the sampled prototypes only)"},
    )
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "final lr / peak lr of the cosine decay"})
    clip_grad_norm: float | None = field(default=5.0, metadata={"help": "max grad norm of the backbone + head"})
    amp: str = field(default="auto", metadata={"help": "auto (bf16 on GPU) | bf16 | none"})
    seed: int = field(default=0, metadata={"help": "seed of init, data order, augmentation and sampling"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    # bookkeeping
    log_every: int = field(default=10, metadata={"help": "steps per metrics row"})
    checkpoint_every: int = field(default=1000, metadata={"help": "steps between checkpoints"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept"})
    resume: bool = field(default=False, metadata={"help": "continue from output_dir/checkpoints/latest"})
    retune: bool = field(
        default=False,
        metadata={
            "help": f"with resume: take {', '.join(RETUNABLE)} from this config instead of refusing a change "
            "(e.g. a lower lr after a divergence); the run then differs from an uninterrupted one"
        },
    )
    overwrite: bool = field(
        default=False, metadata={"help": "delete the run already in output_dir (checkpoints, metrics, final.pt)"}
    )
    stop_after: int | None = field(
        default=None, metadata={"help": "stop this run after this step (schedule unchanged)"}
    )
    progress: bool = field(
        default=True, metadata={"help": "show a progress bar (else a line per metrics row, on stderr)"}
    )

    def validate(self) -> None:
        config.finite(self)
        config.required("data", self.data)
        config.required("output_dir", self.output_dir)
        config.writable_location("output_dir", self.output_dir)
        config.device("device", self.device)
        config.choice("loss_parallel", self.loss_parallel, ("auto", "model", "replicated"))
        config.choice("amp", self.amp, ("auto", "bf16", "none"))
        config.choice("prototype_optimizer", self.prototype_optimizer, ("dense", "sparse"))
        config.choice("data_mode", self.data_mode, DATA_MODES)
        config.positive("shuffle_buffer", self.shuffle_buffer)
        config.positive("num_classes", self.num_classes)
        if self.features_dir and not self.pseudo_labels:
            raise config.ConfigError("'features_dir' joins pseudo-labels to the data: set pseudo_labels too")
        for name in (
            "embedding_dim",
            "batch_size",
            "epochs",
            "lr",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            config.positive(name, getattr(self, name))
        for name in ("max_steps", "stop_after", "clip_grad_norm", "image_size", "num_dims"):
            config.positive(name, getattr(self, name))
        for name in ("num_workers", "warmup_steps", "weight_decay", "prototype_weight_decay", "min_lr_ratio"):
            config.positive(name, getattr(self, name), allow_zero=True)
        config.positive("prototype_lr_mult", self.prototype_lr_mult)
        if not 0 < self.crop_scale <= 1:
            raise config.ConfigError(f"'crop_scale' must be in (0, 1], got {self.crop_scale}")
        if self.resume and self.overwrite:
            raise config.ConfigError("'resume' continues the run in output_dir, 'overwrite' deletes it: set only one")
        if self.retune and not self.resume:
            raise config.ConfigError("'retune' changes the settings of a resumed run: set resume too")
        try:
            _checks.check_options(**loss_options(self), ignore_index=IGNORE_INDEX, backends=BACKENDS)
            _checks.num_selected_dims(self.embedding_dim, self.dim_sample_rate, self.num_dims)
            _checks.check_seed(self.seed)
        except (TypeError, ValueError) as exc:  # their messages start with the argument's name
            argument = re.match(r"\w*", str(exc)).group()
            raise config.ConfigError(f"'{LOSS_OPTIONS.get(argument, argument)}': {exc}") from None


# ----------------------------------------------------------------------------------------------------------------
# pieces


def loss_supports_process_group() -> bool:
    """True once ``DualPartialMarginLoss`` accepts ``process_group=`` (model-parallel prototypes)."""
    return "process_group" in inspect.signature(DualPartialMarginLoss.__init__).parameters


def loss_options(cfg: TrainConfig) -> dict[str, Any]:
    """The scalar options of ``DualPartialMarginLoss`` that ``cfg`` sets, by argument name."""
    return {argument: getattr(cfg, option) for argument, option in LOSS_OPTIONS.items()}


def make_criterion(cfg: TrainConfig, num_classes: int, world_size: int, device: torch.device) -> tuple[nn.Module, str]:
    """The loss module and its parallel mode (``single`` | ``model`` | ``replicated``)."""
    kwargs: dict[str, Any] = dict(loss_options(cfg), ignore_index=IGNORE_INDEX, seed=cfg.seed)
    mode = "single"
    if world_size > 1:
        supported = loss_supports_process_group()
        if cfg.loss_parallel == "model" and not supported:
            raise config.ConfigError(
                "loss_parallel=model needs DualPartialMarginLoss(process_group=...), which this unicom_kernels "
                "lacks; use loss_parallel=replicated"
            )
        mode = "model" if supported and cfg.loss_parallel != "replicated" else "replicated"
        if mode == "model":
            kwargs["process_group"] = td.group.WORLD
    criterion = DualPartialMarginLoss(num_classes, cfg.embedding_dim, **kwargs).to(device)
    return criterion, mode


def param_groups(model: nn.Module, criterion: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: decayed matrices, undecayed vectors/embeddings, prototypes (lr x prototype_lr_mult)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or any(k in name for k in NO_DECAY_KEYS) else decay).append(p)
    return [
        {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "backbone"},
        {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0, "name": "backbone_no_decay"},
        {
            "params": list(criterion.parameters()),
            "lr": cfg.lr * cfg.prototype_lr_mult,
            "weight_decay": cfg.prototype_weight_decay,
            "name": "prototypes",
        },
    ]


def make_optimizer(model: nn.Module, criterion: nn.Module, cfg: TrainConfig, parallel: str) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`; with ``prototype_optimizer=sparse`` the prototypes get
    ``SparseRowAdamW`` (same lr, betas and decay) in a chain. A replicated loss keeps dense AdamW:
    DDP averages dense prototype gradients, and each rank samples other rows."""
    groups = param_groups(model, criterion, cfg)
    if cfg.prototype_optimizer == "dense" or parallel == "replicated":
        return torch.optim.AdamW(groups, betas=ADAMW_BETAS)
    *backbone, prototypes = groups
    sparse = SparseRowAdamW(criterion, lr=prototypes["lr"], betas=ADAMW_BETAS, weight_decay=prototypes["weight_decay"])
    return ChainedOptimizer(torch.optim.AdamW(backbone, betas=ADAMW_BETAS), sparse)


def _retune(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, groups: list[dict]) -> None:
    """Give a resumed optimizer the peak rates and decays of ``groups`` (:func:`param_groups` of the
    new config), keeping its moments; the scheduler goes on from its step with the new peaks and
    its lambda, which already reads the new warmup and final ratio."""
    for group, fresh in zip(optimizer.param_groups, groups, strict=True):
        group["initial_lr"], group["weight_decay"] = fresh["lr"], fresh["weight_decay"]
    scheduler.base_lrs = [fresh["lr"] for fresh in groups]
    for group, lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = lr * factor(scheduler.last_epoch)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _open_npy(path: Path, ndim: int, kinds: str) -> np.ndarray:
    """``path`` memory-mapped, checked to be an ``ndim``-d array of a dtype kind in ``kinds``; a truncated,
    corrupt or foreign file raises :class:`DamagedFileError` naming it."""
    fix = "rerun unicom-cluster"
    array = load_npy(path, fix=fix)
    if array.ndim != ndim or array.dtype.kind not in kinds:
        expected = "integer" if kinds == "iu" else "float"
        raise damaged(path, f"a {array.ndim}-d {array.dtype} array, expected {ndim}-d {expected}", fix)
    return array


def _label_range(labels: np.ndarray, chunk: int = 1 << 24) -> tuple[int, int]:
    """Smallest and largest value of ``labels`` (memory-mapped: read in chunks); ``(0, -1)`` when empty."""
    low, high = 0, -1
    for a in range(0, len(labels), chunk):
        part = np.asarray(labels[a : a + chunk])
        low = int(part.min()) if a == 0 else min(low, int(part.min()))
        high = max(high, int(part.max()))
    return low, high


def cluster_files(cluster_dir: str) -> tuple[Path, int]:
    """``(labels.npy path, number of classes)`` of a ``unicom-cluster`` output folder; the classes are the
    rows of ``centroids.npy`` (the kept clusters), read from its header.

    Both files are checked before training: a damaged file raises :class:`DataError` naming it, a
    label outside ``[-1, classes)`` (the files of two runs) :class:`ConfigError` naming ``num_classes``.
    """
    labels_path, centroids_path = paths = [Path(cluster_dir) / name for name in ("labels.npy", "centroids.npy")]
    for p in paths:
        if not p.is_file():
            raise DataError(f"pseudo-label file not found: {p} (run unicom-cluster first)")
    num_classes = int(_open_npy(centroids_path, 2, "f").shape[0])
    low, high = _label_range(_open_npy(labels_path, 1, "iu"))
    if high >= num_classes or low < IGNORE_INDEX:
        bad = high if high >= num_classes else low
        raise config.ConfigError(
            f"'num_classes' is {num_classes} (the rows of {centroids_path}), but {labels_path} holds label {bad} "
            f"(labels must be in [-1, {num_classes})): the two files come from different unicom-cluster runs "
            "or are damaged; rerun unicom-cluster"
        )
    return labels_path, num_classes


def uses_stream(cfg: TrainConfig) -> bool:
    """Whether ``cfg`` trains on a :class:`ShardStream` (see ``data_mode``)."""
    if cfg.data_mode == "indexed":
        return False
    wds = resolve_format(cfg.data, cfg.data_format) == "wds"
    if cfg.data_mode == "stream" and not wds:
        raise config.ConfigError(f"data_mode=stream reads webdataset shards; {cfg.data} is not (use indexed)")
    return wds and (cfg.data_mode == "stream" or len(expand_shards(cfg.data)) >= STREAM_MIN_SHARDS)


def indexed_labels(cfg: TrainConfig, source: Source) -> tuple[np.ndarray, int]:
    """``[N]`` int64 labels of the source's samples in source order (``-1`` = none), and the classes:
    pseudo-labels joined by position, or the data's own."""
    if not cfg.pseudo_labels:
        own = source.labels()
        largest = int(own.max()) if len(own) else -1
        if cfg.num_classes is not None and largest >= cfg.num_classes:
            raise config.ConfigError(
                f"'num_classes' is {cfg.num_classes}, but {source.description} holds label {largest} (labels must "
                f"be in [0, num_classes)): set num_classes to at least {largest + 1}, or leave it unset"
            )
        return own, cfg.num_classes or largest + 1
    labels_path, num_classes = cluster_files(cfg.pseudo_labels)
    if not cfg.features_dir:
        labels = _open_npy(labels_path, 1, "iu")
        if len(labels) != len(source):
            raise config.ConfigError(
                f"{labels_path} holds {len(labels)} labels for the {len(source)} samples of {source.description}: "
                "features skipped samples or came from other data; set features_dir to join them by position"
            )
        return np.asarray(labels, dtype=np.int64), num_classes
    join = PositionLabels.open(cfg.features_dir, labels_path)
    names = [name for name, _ in source.units]
    whole = not source.named_units and len(join.table.names) == 1  # a folder or list file: one unit
    units = [0] if whole else join.units_of(names)
    parts = [join.unit_labels(u) for u in units]
    for (name, n), part in zip(source.units, parts, strict=True):
        if len(part) != n:
            raise DataError(f"{name} holds {n} samples but the shard table of {cfg.features_dir} lists {len(part)}")
    return np.concatenate(parts).astype(np.int64), num_classes


def stream_labels(cfg: TrainConfig) -> tuple[PositionLabels | None, int]:
    """Pseudo-labels of a stream by position, and the classes (``num_classes`` for the data's own labels)."""
    if not cfg.pseudo_labels:
        if not cfg.num_classes:
            raise config.ConfigError(
                "a stream of the data's own labels needs num_classes (it reads no label before training)"
            )
        return None, cfg.num_classes
    if not cfg.features_dir:
        raise config.ConfigError("data_mode=stream joins pseudo-labels through the shard table: set features_dir")
    labels_path, num_classes = cluster_files(cfg.pseudo_labels)
    return PositionLabels.open(cfg.features_dir, labels_path), num_classes


def check_stream_labels(labels: torch.Tensor, num_classes: int, data: str) -> None:
    """Raise :class:`ConfigError` naming ``num_classes`` when a batch of a stream's own ``.cls`` labels
    (a CPU tensor, ``-1`` = none) holds a label of no class, instead of the loss failing on it."""
    largest = int(labels.max()) if len(labels) else -1
    if largest >= num_classes:
        raise config.ConfigError(
            f"'num_classes' is {num_classes}, but the shards {data} hold label {largest} (labels must be in "
            f"[0, num_classes)): set num_classes to at least {largest + 1}"
        )


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def checkpoint_dir(output_dir: str | Path) -> Path:
    """Folder holding ``step_*`` checkpoints and the ``latest`` pointer."""
    return Path(output_dir) / "checkpoints"


def _latest_name(output_dir: str | Path) -> str | None:
    """The checkpoint folder ``checkpoints/latest`` names (the newest complete one), or None."""
    pointer = checkpoint_dir(output_dir) / "latest"
    return pointer.read_text(errors="replace").strip() if pointer.is_file() else None


def latest_checkpoint(output_dir: str | Path, rank: int = 0) -> Path | None:
    """This rank's file of the newest complete checkpoint, or None."""
    name = _latest_name(output_dir)
    if name is None:
        return None
    pointer = checkpoint_dir(output_dir) / "latest"
    path = checkpoint_dir(output_dir) / name / f"rank{rank:05d}.pt"
    if not path.is_file():
        raise DataError(f"checkpoint {path} named by {pointer} is missing")
    return path


def checkpoint_names(output_dir: str | Path) -> list[str]:
    """Checkpoint folders to resume from, newest first: the one ``latest`` names and those before it.

    Newer folders were never completed; without a usable ``latest`` every ``step_*`` folder counts.
    """
    root = checkpoint_dir(output_dir)
    names = sorted((p.name for p in root.glob("step_*") if p.is_dir()), key=lambda n: (len(n), n), reverse=True)
    newest = _latest_name(output_dir)
    return names[names.index(newest) :] if newest in names else names


def read_checkpoint(path: str | Path, keys: tuple[str, ...] = FINAL_KEYS) -> dict:
    """The content of a checkpoint file, checked to hold ``keys``; else :class:`ModelError` naming the file."""
    state = load_file(path)
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise ModelError(
            f"{path} is not a unicom-train checkpoint (final.pt or checkpoints/step_*/rank*.pt): it has no {missing}"
        )
    return state


def _on_every_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on every rank."""
    if not (td.is_initialized() and td.get_world_size() > 1):
        return flag
    value = torch.tensor([int(flag)], device=device)
    td.all_reduce(value, op=td.ReduceOp.MIN)
    return bool(value.item())


class DivergedError(config.UserError, FloatingPointError):
    """The loss or the weights became NaN or infinite; training stops before a checkpoint keeps them."""


def _check_finite(losses: list[torch.Tensor], weights: list[torch.Tensor], device: torch.device) -> bool:
    """True when ``losses`` and ``weights`` are finite on every rank (agreed, so every rank stops together)."""
    flags = [t.isfinite().all() for t in ([torch.stack(losses)] if losses else []) + weights]
    return _on_every_rank(bool(torch.stack(flags).all()) if flags else True, device)


def _diverged_advice(output_dir: Path, rank: int) -> str:
    newest = latest_checkpoint(output_dir, rank)
    return (
        f"no checkpoint keeps that state (the newest is {newest or 'none'}), and resuming with the same settings "
        "replays the same steps: resume with retune and a lower lr, more warmup_steps or a clip_grad_norm, or "
        "train again"
    )


def data_fingerprint(units: list[tuple[str, int]], labels: np.ndarray | None) -> str:
    """A digest of what an epoch draws from: the ``(name, samples)`` units (tar file names, which
    stay the same wherever the data lives; ``""`` for a folder or list file) and the ``[N]``
    labels when they are known before training. A checkpoint keeps it, so that a resume on other
    data (a tar added, labels re-clustered) is refused instead of silently replaying another run."""
    digest = hashlib.sha256(repr([(os.path.basename(name), int(n)) for name, n in units]).encode())
    if labels is not None:
        digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def _input_of(model: EmbeddingModel) -> dict:
    """The input the model was trained on, kept in its checkpoints so that it loads with the same."""
    return {"image_size": model.image_size, "mean": list(model.mean), "std": list(model.std)}


def _weights(model: nn.Module, criterion: nn.Module) -> list[torch.Tensor]:
    """The tensors a checkpoint keeps that training changes: parameters and floating-point buffers."""
    tensors = [*model.parameters(), *criterion.parameters(), *model.buffers()]
    return [t for t in tensors if t.is_floating_point()]


def resume_checkpoint(output_dir: str | Path, rank: int, device: torch.device) -> tuple[Path, dict] | None:
    """This rank's file and state of the newest checkpoint that every rank can read; None without checkpoints.

    An unreadable file (truncated, corrupt, missing) is reported and the checkpoint before it
    tried; when none is intact, :class:`ModelError` names them all.
    """
    names = checkpoint_names(output_dir)
    problems = []
    for name in names:
        path = checkpoint_dir(output_dir) / name / f"rank{rank:05d}.pt"
        try:
            state = read_checkpoint(path, RESUME_KEYS)
        except ModelError as exc:
            state = None
            problems.append(str(exc))
            print(f"train: {exc}; trying the checkpoint before it", file=sys.stderr)
        if _on_every_rank(state is not None, device):
            if name != names[0]:
                print(f"train: resuming from {path}, the newest intact checkpoint", file=sys.stderr)
            return path, state
    if names:
        raise ModelError(f"no intact checkpoint in {checkpoint_dir(output_dir)} to resume from: {'; '.join(problems)}")
    return None


def save_checkpoint(output_dir: str | Path, step: int, rank: int, state: dict, keep: int) -> None:
    """Write this rank's state atomically; rank 0 then moves ``latest`` and prunes old checkpoints."""
    root = checkpoint_dir(output_dir)
    name = f"step_{step:07d}"
    atomic.torch_save(root / name / f"rank{rank:05d}.pt", state)
    dist.barrier()
    if rank == 0:
        atomic.write_text(root / "latest", name + "\n")
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != name)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()


class MetricsLog:
    """``metrics.csv`` + TensorBoard when installed; rows from ``first_step`` on are dropped (a resumed run
    writes them again). Rows are appended as they come (one write each); a row cut short by a killed
    process or a full disk is dropped when a resumed run rewrites the file."""

    def __init__(self, output_dir: Path, first_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = output_dir / "metrics.csv"
        self.writer = None
        if not enabled:
            return
        rows = []
        if first_step > 1 and self.path.is_file():
            with open(self.path, newline="") as handle:
                whole = (r for r in csv.DictReader(handle) if all(r.get(f) for f in METRIC_FIELDS))
                rows = [r for r in whole if int(r["step"]) < first_step]
        text = ",".join(METRIC_FIELDS) + "\n" + "".join(",".join(r[f] for f in METRIC_FIELDS) + "\n" for r in rows)
        atomic.write_text(self.path, text)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=first_step)
        except ImportError:
            self.writer = None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as handle:
            handle.write(",".join(str(row[f]) for f in METRIC_FIELDS) + "\n")
        if self.writer is not None:
            for key in ("loss", "lr", "prototype_lr", "grad_norm", "images_per_s"):
                self.writer.add_scalar(f"train/{key}", row[key], row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(output_dir: str | Path) -> dict[str, np.ndarray]:
    """Columns of ``metrics.csv`` as float arrays."""
    with open(Path(output_dir) / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {f: np.array([float(r[f]) for r in rows]) for f in METRIC_FIELDS}


def plot_loss(output_dir: str | Path, path: str | Path, title: str = "training loss") -> None:
    """Save the loss and the learning rate against step of ``output_dir/metrics.csv`` as a PNG (atomically)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend to set or figure to close

    metrics = read_metrics(output_dir)
    fig = Figure(figsize=(6, 4.5))
    loss, lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (2, 1)})
    loss.plot(metrics["step"], metrics["loss"])
    loss.set(ylabel="loss", title=title)
    lr.plot(metrics["step"], metrics["lr"])
    lr.set(xlabel="step", ylabel="lr")
    for ax in (loss, lr):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic.write_bytes(path, buffer.getvalue())


def _duration(seconds: float) -> str:
    """``h:mm:ss``."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


# ----------------------------------------------------------------------------------------------------------------
# the run


def train(cfg: TrainConfig) -> dict:
    """Run training; returns ``{"step", "final_loss", "output_dir", "num_classes", "seconds"}``."""
    info = dist.setup(cfg.device)
    device = info.device
    out = Path(cfg.output_dir)
    previous = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if previous and not (cfg.resume or cfg.overwrite):
        raise config.ConfigError(
            f"output_dir {out} already holds a training run ({', '.join(previous)}); pass --resume to continue it "
            "or --overwrite to delete it and start over"
        )
    dist.barrier()  # every rank has looked before rank 0 writes there
    custom_arch = read_model_config(cfg.model_config) if cfg.model_config else None
    torch.manual_seed(cfg.seed)

    stream = uses_stream(cfg)
    if stream:
        join, num_classes = stream_labels(cfg)
    else:
        source = open_source(cfg.data, cfg.data_format, cfg.data_root, skip_bad=cfg.skip_bad)
        labels, num_classes = indexed_labels(cfg, source)
        # A sample found damaged while indexing (skip_bad) stays in, so that loading it fails and
        # it is counted with the other bad images, as in a stream.
        damaged = np.array([r.error is not None for r in source.records])
        usable = np.flatnonzero((labels >= 0) | damaged)
        if len(usable) == 0:
            raise DataError(f"no labelled samples in {source.description}")

    model = build_model(cfg.arch, cfg.embedding_dim, cfg.pretrained, custom_arch, cfg.image_size).to(device)
    criterion, parallel = make_criterion(cfg, num_classes, info.world_size, device)
    transform = train_transform(model.image_size, model.mean, model.std, cfg.crop_scale, cfg.hflip)
    if stream:
        shards = expand_shards(cfg.data)
        dataset = ShardStream(
            shards, transform, cfg.batch_size, cfg.seed, info.rank, info.world_size,
            cfg.num_workers, join, cfg.shuffle_buffer, cfg.skip_bad,
        )  # fmt: skip
        per_epoch, num_samples = dataset.batches_per_epoch(), int(dataset.kept.sum())
        fingerprint = data_fingerprint(list(zip(shards, dataset.kept, strict=True)), None)
    else:
        dataset = ImageDataset(source, transform, labels=labels, skip_bad=cfg.skip_bad, seed=cfg.seed)
        subset = torch.utils.data.Subset(dataset, usable.tolist())
        fingerprint = data_fingerprint(source.units if source.named_units else [("", len(source))], labels)
        per_epoch, num_samples = (
            EpochBatchSampler.batches_per_epoch(len(usable), cfg.batch_size, info.world_size),
            len(usable),
        )
        if per_epoch == 0:
            raise config.ConfigError(
                f"batch_size {cfg.batch_size} x {info.world_size} rank(s) exceeds the {len(usable)} labelled samples"
            )
    total = cfg.max_steps or cfg.epochs * per_epoch

    net: nn.Module = model
    loss_fn: nn.Module = criterion
    if info.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if parallel == "replicated":
            loss_fn = nn.parallel.DistributedDataParallel(criterion, device_ids=ids)
    optimizer = make_optimizer(model, criterion, cfg, parallel)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, cfg.warmup_steps, cfg.min_lr_ratio)
    )

    step = 0
    # Losses since the last metrics row and the running count of skipped images: a checkpoint
    # carries them, so that the rows of a resumed run equal an uninterrupted run's.
    losses: list[torch.Tensor] = []
    skipped = 0
    if cfg.resume:
        found = resume_checkpoint(out, info.rank, device)
        if found is None:
            if info.is_main:
                print(f"train: --resume but no checkpoint in {checkpoint_dir(out)}; starting fresh", file=sys.stderr)
        else:
            path, state = found
            changed = sorted(
                k
                for k, v in dataclasses.asdict(cfg).items()
                if k not in RESUME_MAY_CHANGE and state["config"].get(k) != v
            )
            retuned = [k for k in changed if k in RETUNABLE] if cfg.retune else []
            if changed != retuned:
                hint = f"; {', '.join(RETUNABLE)} may change with retune" if set(changed) <= set(RETUNABLE) else ""
                raise config.ConfigError(
                    f"checkpoint {path} was made with different {changed}; resume with the same settings "
                    f"(or start a new output_dir){hint}"
                )
            if state["world_size"] != info.world_size:
                raise config.ConfigError(
                    f"checkpoint {path} was written by {state['world_size']} rank(s); resume with the same number"
                )
            saved = state.get("data")  # absent in checkpoints of older versions
            if saved is not None and saved != fingerprint:
                raise config.ConfigError(
                    f"checkpoint {path} was trained on other data: its samples or labels differ from those of "
                    f"{cfg.data} (with pseudo_labels {cfg.pseudo_labels}); 'data' and 'pseudo_labels' may move "
                    "on resume, not change"
                )
            workers = state.get("stream_workers")  # the order of a stream depends on its workers per rank
            if stream and workers is not None and workers != dataset.workers:
                raise config.ConfigError(
                    f"checkpoint {path} streams through {workers} data-loader worker(s) per rank; resume with "
                    f"num_workers={workers if workers > 1 else 0}"
                )
            load_weights(model, state["model"], path)
            load_weights(criterion, state["criterion"], path)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"], device)
            step = int(state["step"])
            if retuned:
                _retune(optimizer, scheduler, param_groups(model, criterion, cfg))
            if info.is_main:
                print(f"train: resumed at step {step} from {path}", file=sys.stderr)
                if retuned:
                    was = ", ".join(f"{k} {state['config'].get(k)} -> {getattr(cfg, k)}" for k in retuned)
                    print(f"train: retuned {was}; the run now differs from an uninterrupted one", file=sys.stderr)
                if stream:
                    dataset.epoch, dataset.start_batch = divmod(step, per_epoch)
                    print(
                        f"train: the stream resumes epoch {dataset.epoch} at batch {dataset.start_batch}; "
                        f"(piece cursor, sample) per worker of rank 0: {dataset.cursors()}",
                        file=sys.stderr,
                    )
            if "log" in state:  # absent in checkpoints of older versions
                losses = list(state["log"]["losses"].to(device).unbind())
                skipped = int(state["log"]["skipped"])
    if info.is_main:
        if cfg.overwrite:
            for name in previous:
                if (out / name).is_dir():
                    shutil.rmtree(out / name)
                else:
                    (out / name).unlink()
        out.mkdir(parents=True, exist_ok=True)
        config.save(cfg, out / "config.yaml", "train")
    dist.barrier()  # the old run is gone before any rank writes a checkpoint
    # A row at the resume step that did not close its window is written again, covering more steps.
    log = MetricsLog(out, step if losses else step + 1, info.is_main)

    use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    if info.is_main:
        weights = cfg.pretrained or "random init"
        print(
            f"train: {num_samples} samples ({'stream' if stream else 'indexed'}; "
            f"{per_epoch * cfg.batch_size * info.world_size} an epoch, in full batches), {num_classes} classes "
            f"({'pseudo-labels' if cfg.pseudo_labels else 'labels'}"
            f"), {cfg.arch} ({weights}) -> {cfg.embedding_dim}-d, {info.world_size} rank(s) on {device}, "
            f"loss {parallel}, {total} steps of {cfg.batch_size}/rank, amp={'bf16' if use_amp else 'off'}",
            file=sys.stderr,
        )
    bar = tqdm(total=total, initial=step, desc="train", disable=not (cfg.progress and info.is_main))
    stop = min(total, cfg.stop_after or total)
    seen, window_start = 0, time.perf_counter()
    started, first_step = time.perf_counter(), step
    checked = step  # the losses and weights up to this step were finite
    last_loss = float("nan")
    net.train()
    loss_fn.train()
    while step < stop:
        epoch, first = divmod(step, per_epoch)
        dataset.epoch = epoch
        if stream:
            dataset.start_batch = first
            batching = {"dataset": dataset, "batch_size": cfg.batch_size}
        else:
            sampler = EpochBatchSampler(len(usable), cfg.batch_size, cfg.seed, epoch, info.rank, info.world_size, first)
            batching = {"dataset": subset, "batch_sampler": sampler}
        loader = torch.utils.data.DataLoader(**batching, num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
        for images, batch_labels, _, ok in loader:
            if stream and join is None:  # the data's own .cls labels: not read before training
                check_stream_labels(batch_labels, num_classes, cfg.data)
            images = images.to(device, non_blocking=True)
            batch_labels = batch_labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16) if use_amp else nullcontext():
                embeddings = net(images)
            try:
                loss = loss_fn(embeddings, batch_labels)
            except FloatingPointError as exc:  # the loss refuses NaN or inf embeddings (on any rank)
                raise DivergedError(
                    f"training diverged: the embeddings of step {step + 1} contain NaN or inf, so the weights after "
                    f"step {step} are no longer finite; {_diverged_advice(out, info.rank)}"
                ) from exc
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
                if cfg.clip_grad_norm
                else torch.zeros(())
            )
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(loss.detach())
            skipped += int((~ok).sum())
            seen += len(ok)
            bar.update(1)
            closes_window = step % cfg.log_every == 0 or step == total
            saves = step % cfg.checkpoint_every == 0 or step == stop
            if closes_window or step == stop:
                last_loss = float(torch.stack(losses).float().mean())
                elapsed = time.perf_counter() - window_start
                lrs = scheduler.get_last_lr()
                images_per_s = seen * info.world_size / max(elapsed, 1e-9)
                log.log(
                    {
                        "step": step,
                        "epoch": epoch,
                        "loss": f"{last_loss:.6f}",
                        "lr": f"{lrs[0]:.6g}",
                        "prototype_lr": f"{lrs[2]:.6g}",
                        "grad_norm": f"{float(grad_norm):.4f}",
                        "images_per_s": f"{images_per_s:.1f}",
                        "skipped": skipped,
                    }
                )
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lrs[0]:.2e}")
                if info.is_main and not cfg.progress:
                    left = (stop - step) * (time.perf_counter() - started) / (step - first_step)
                    print(
                        f"train: step {step}/{total}  loss {last_loss:.4f}  lr {lrs[0]:.3g}  "
                        f"{images_per_s:.1f} images/s  ETA {_duration(left)}",
                        file=sys.stderr,
                    )
            # A diverged run stops before a checkpoint replaces the last finite ones with its NaNs
            # (a resumed run would only repeat the same steps). Every loss is checked at its window's
            # end or at the next checkpoint, the weights before each checkpoint.
            if closes_window or saves:
                if not _check_finite(losses, _weights(model, criterion) if saves else [], device):
                    raise DivergedError(
                        f"training diverged: the loss of a step in {checked + 1}..{step}"
                        f"{' or the weights after step ' + str(step) if saves else ''} became NaN or infinite; "
                        f"{_diverged_advice(out, info.rank)}"
                    )
                checked = step
            if closes_window:  # else this run stops here and its checkpoint carries the window on
                losses, seen, window_start = [], 0, time.perf_counter()
            if saves:
                state = {
                    "step": step,
                    "model": model.state_dict(),
                    "criterion": criterion.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(device),
                    "world_size": info.world_size,
                    "stream_workers": dataset.workers if stream else None,
                    "data": fingerprint,
                    "num_classes": num_classes,
                    "config": dataclasses.asdict(cfg),
                    "custom_arch": custom_arch,
                    "input": _input_of(model),
                    "log": {"losses": torch.stack(losses) if losses else torch.zeros(0), "skipped": skipped},
                }
                save_checkpoint(out, step, info.rank, state, cfg.keep_checkpoints)
            if step >= stop:
                break
    bar.close()
    log.close()
    if info.is_main and step >= total:
        atomic.torch_save(
            out / "final.pt",
            {
                "model": model.state_dict(),
                "config": dataclasses.asdict(cfg),
                "custom_arch": custom_arch,
                "input": _input_of(model),
                "step": step,
                "num_classes": num_classes,
            },
        )
        print(f"train: wrote {out / 'final.pt'}", file=sys.stderr)
    if info.is_main and step > first_step:
        plot_loss(out, out / "loss.png")
    dist.barrier()
    if info.is_main and skipped:
        print(f"train: {skipped} missing/corrupt images were ignored since the start of training", file=sys.stderr)
    return {
        "step": step,
        "final_loss": last_loss,
        "output_dir": str(out),
        "num_classes": num_classes,
        "seconds": time.perf_counter() - started,
    }


def load_trained(path: str | os.PathLike, device: str | torch.device = "cpu", weights: bool = True) -> EmbeddingModel:
    """The model of a ``unicom-train`` run: ``path`` is its output folder, ``final.pt`` or a checkpoint file.

    The checkpoint holds every weight, so its ``pretrained`` file or tag is not needed (nor a download):
    only its input normalisation is kept. ``weights=False`` builds the same architecture with the run's
    initial (seeded, untrained) weights, which does load ``pretrained`` again.
    """
    path = Path(path)
    if path.is_dir():
        final = path / "final.pt"
        path = final if final.is_file() else (latest_checkpoint(path) or final)
    if not path.is_file():
        raise DataError(f"trained model not found: {path}")
    state = read_checkpoint(path)
    cfg = saved_config(path, state)
    torch.manual_seed(cfg.seed)
    # Older checkpoints name the architecture file only, which may not be found from here.
    custom_arch = state.get("custom_arch") or cfg.model_config
    if custom_arch and cfg.arch != f"open_clip:{model_config_name(custom_arch)}":
        custom_arch = None  # older runs built arch and left an architecture of another name unused
    try:
        model = build_model(
            cfg.arch, cfg.embedding_dim, cfg.pretrained, custom_arch, cfg.image_size, load_pretrained=not weights
        )
    except ModelError as exc:
        raise ModelError(f"checkpoint {path}: {exc}") from exc
    if weights:
        load_weights(model, state["model"], path)
    if "input" in state:  # the normalisation the run trained with (absent in checkpoints of older versions)
        model.mean, model.std = tuple(state["input"]["mean"]), tuple(state["input"]["std"])
    return model.to(device).eval()


def saved_config(path: Path, state: dict) -> TrainConfig:
    """The options checkpoint ``path`` was made with, type-checked but not validated (its device or
    output_dir need not exist where it is loaded)."""
    if not isinstance(state["config"], dict):
        raise ModelError(f"checkpoint {path}: 'config' is a {type(state['config']).__name__}, not a mapping")
    return TrainConfig(**config.coerce(TrainConfig, state["config"], f"checkpoint {path}"))


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``unicom-train``."""
    with config.exit_on_user_error("unicom-train"):
        cfg = config.parse(TrainConfig, "train", argv, __doc__.splitlines()[0])
        try:
            train(cfg)
        finally:
            dist.cleanup()


if __name__ == "__main__":
    main()
