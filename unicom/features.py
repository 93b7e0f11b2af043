"""Step 1: CLIP features of every sample, as ``.npy`` shards plus an id index (resumable by shard).

``joint`` = L2-normalised mean of the L2-normalised image and text embeddings; ``image`` / ``text``
use one tower; ``auto`` (the default) is ``joint`` when every sample has a caption, else ``image``
(for webdataset shards: every sample of the first shard that holds any, see below).
``model: pixels`` gives raw-pixel features instead (an honest baseline, no network; mode ``image``).

Input is read in one of two ways:

- **Webdataset shards are streamed**: start-up lists the ``.tar`` files (and stats them for
  ``meta.json``) without reading a header; each tar is one unit and one output shard.
  Data-loader workers take whole tars, walk them in tar order (:func:`unicom.data.iter_tar`)
  and decode the images; the main process encodes the batches and writes a tar's shard when
  its last batch is in. Nothing is held per sample beyond the tars in progress. ``shard_size``
  does not apply. ``auto`` decides from the first shard that holds samples; a sample found
  later without a caption in mode ``joint`` / ``text`` is an error naming it (finished shards
  stay), or, with ``skip_bad``, skipped and counted.
- **Folders and list files are indexed** (:func:`unicom.data.open_source`): one unit, output
  shards of ``shard_size`` samples each, decoded by the workers of a map-style data loader.

Output folder::

    meta.json                what produced the features (checked on resume; mismatch -> error)
    shard_00000.npy          [n_i, D] float16/float32, rows L2-normalised
    shard_00000.ids.txt      the n_i sample ids of those rows (missing/corrupt samples skipped with skip_bad)
    shard_00000.pos.npy      [n_i] int32 position of those rows inside their unit
    shard_00000.unit.json    the unit the shard belongs to, and how many of its samples it covered
    ...
    shards.json              the shard table: per input unit (tar shard; a folder or list is one), its
                             samples and the feature rows it starts at and fills (see unicom.stream)
    positions.npy            [N] int32 position of every row inside its unit
    ids.txt, index.json      written last: all ids in row order; shard list, dim, counts

Ids files hold one id per ``\\n``-ended line; a sample whose id holds a ``\\n`` is an error naming it (for
a folder or list file before anything is encoded, for a tar when it is read, before its shard is
written), or with ``skip_bad`` skipped and counted. A damaged file of the folder (truncated ``.npy``,
unreadable JSON) is a :class:`unicom.data.DamagedFileError` naming it and what to do.

Rows follow the source order, so they come unit by unit: the labels k-means writes in row order
join back to samples by (unit, position), ids stay for looking images up. Positions count the
samples that have an image, in tar order (as :mod:`unicom.stream` does). ``ids.txt`` and
``positions.npy`` are assembled by copying the shards' files in order, never held whole.

A shard is done when its ``.npy`` exists (written atomically after its other files), so a rerun
skips it. Under ``torchrun`` rank r computes shards r, r + W, ...; rank 0 writes the index.

A rerun with other settings (see ``meta.json``; for webdataset shards it records the tars' names,
sizes and modification times, not their sample counts; for a folder or list file, the sample count,
``data_root`` and a digest of the samples' ids and absolute paths, and of their captions in a mode
that reads them; for the model, a digest of the ``model_config`` architecture and the size and
modification time of a local ``pretrained`` file, so a file replaced at the same path is another
model; and the precision the rows are computed in, ``bf16`` autocast on CUDA or ``fp32``, so a run
begun on the CPU does not resume on a GPU) is refused unless ``--overwrite``, which first deletes the
old ``index.json``, ``ids.txt`` and shards, then writes the new ``meta.json``: a run killed part-way
leaves no index (readers refuse the folder) and a rerun with the new settings resumes it. Finished
shards without a ``meta.json`` (or with a damaged one) are refused the same way: nothing says which
settings made them. A folder without any finished shard (a run that failed before its first one)
holds nothing to protect: a rerun with other settings takes it over.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import atomic, config, dist
from .data import (
    DataError,
    ImageDataset,
    Source,
    damaged,
    decode_image,
    expand_shards,
    id_problem,
    iter_tar,
    load_json,
    load_npy,
    open_source,
    resolve_format,
)
from .model import (
    eval_transform,
    load_clip,
    open_clip_input,
    pixel_transform,
    pretrained_preprocess,
    read_model_config,
)
from .stream import POSITIONS_FILE, TABLE_FILE, ShardTable

MODES = ("auto", "joint", "image", "text")
CAPTION_MODES = ("joint", "text")  # modes that read captions
IMAGE_MODES = ("joint", "image")  # modes that decode images
LAYOUT = 3  # per-shard positions and unit files; folders of an older layout are recomputed


@dataclass
class FeaturesConfig:
    """Options of ``unicom-features``."""

    data: str = field(default="", metadata={"help": "image folder, CSV/list file, or webdataset shards"})
    data_format: str = field(default="auto", metadata={"help": "auto | folder | list | wds"})
    data_root: str | None = field(default=None, metadata={"help": "base folder for relative paths of a list file"})
    output_dir: str = field(default="", metadata={"help": "folder for the feature shards and index"})
    model: str = field(default="ViT-B-32", metadata={"help": "open_clip model name, or 'pixels' for raw pixels"})
    pretrained: str | None = field(default=None, metadata={"help": "open_clip tag or local weights file"})
    model_config: str | None = field(default=None, metadata={"help": "JSON of a custom open_clip architecture"})
    mode: str = field(
        default="auto", metadata={"help": "auto (joint with captions, else image) | joint | image | text"}
    )
    batch_size: int = field(default=256, metadata={"help": "images per forward pass"})
    shard_size: int = field(
        default=100_000, metadata={"help": "samples per output shard (folder/list; webdataset: one per tar)"}
    )
    dtype: str = field(default="float16", metadata={"help": "storage dtype: float16 | float32"})
    num_workers: int = field(
        default_factory=config.default_num_workers, metadata={"help": "DataLoader worker processes"}
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    pixel_size: int = field(default=16, metadata={"help": "side of the resized image for model=pixels"})
    seed: int = field(default=0, metadata={"help": "torch seed before building the model (random-init towers)"})
    skip_bad: bool = field(default=False, metadata={"help": "skip (and count) missing/corrupt images"})
    overwrite: bool = field(default=False, metadata={"help": "discard features of a different config"})

    def validate(self) -> None:
        config.required("data", self.data)
        config.required("output_dir", self.output_dir)
        config.writable_location("output_dir", self.output_dir)
        config.choice("mode", self.mode, MODES)
        config.choice("dtype", self.dtype, ("float16", "float32"))
        for name in ("batch_size", "shard_size", "pixel_size"):
            config.positive(name, getattr(self, name))
        config.positive("num_workers", self.num_workers, allow_zero=True)
        if self.model == "pixels" and self.mode in CAPTION_MODES:
            raise config.ConfigError("model=pixels has no text tower: set mode=image")


class TarShards:
    """Webdataset input read as a stream: the tar paths only (no header is read); tar ``s`` is unit ``s``
    and output shard ``s``."""

    def __init__(self, spec: str, skip_bad: bool = False) -> None:
        self.paths = expand_shards(spec)
        self.description = f"webdataset shards {spec}"
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """A digest of the tars' names, sizes and modification times (one ``stat`` each)."""
        digest = hashlib.sha256()
        for path in self.paths:
            st = os.stat(path)
            digest.update(f"{os.path.basename(path)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return digest.hexdigest()


def open_input(cfg: FeaturesConfig) -> Source | TarShards:
    """The input of ``cfg``: webdataset shards as a :class:`TarShards` stream, anything else indexed."""
    if resolve_format(cfg.data, cfg.data_format) == "wds":
        return TarShards(cfg.data, cfg.skip_bad)
    return open_source(cfg.data, cfg.data_format, cfg.data_root, skip_bad=cfg.skip_bad)


@dataclass
class _Captions:
    """Which of the samples ``resolve_mode`` looks at lack a caption; ``scope`` says which samples those are."""

    samples: int
    missing: int
    example: str | None
    scope: str


def _caption_census(source: Source | TarShards) -> _Captions:
    """Which samples lack a caption, among those a run would use: a damaged sample (or one whose id cannot
    be written), which ``skip_bad`` skips in every mode, has no say in the mode."""
    if isinstance(source, Source):
        usable = [r for r in source.records if not r.error]
        missing = [r.id for r in usable if not r.caption]
        return _Captions(len(usable), len(missing), missing[0] if missing else None, f"the {len(usable)} samples")
    for s, path in enumerate(source.paths):  # the first tar that holds samples; its headers and captions only
        samples, missing, example = 0, 0, None
        for sample in iter_tar(path, source.skip_bad):
            if sample.error or id_problem(sample.key):
                continue
            samples += 1
            if not sample.caption:
                missing += 1
                example = example or sample.key
        if samples:
            first = "the first shard" if s == 0 else "the first non-empty shard"
            return _Captions(samples, missing, example, f"the {samples} samples of {first} {path}")
    raise DataError(f"no images found in {source.description}")


def resolve_mode(cfg: FeaturesConfig, source: Source | TarShards, quiet: bool = False) -> str:
    """The mode to run: ``auto`` resolved from the captions; a caption mode the source cannot feed is an
    error now, before any model is loaded (a sample without caption would otherwise stop the run later).

    An indexed source is judged on all its samples, webdataset shards on the first shard that holds any;
    damaged samples, which ``skip_bad`` skips in every mode, do not count.
    """
    if cfg.model == "pixels":
        return "image"
    seen = _caption_census(source)
    streamed = isinstance(source, TarShards)
    if cfg.mode == "auto":
        if not seen.missing:
            if streamed and not quiet:
                later = "skipped and counted" if cfg.skip_bad else "an error (--skip-bad skips them)"
                print(
                    f"features: mode=joint: {seen.scope} all have a caption; later samples without one are {later}",
                    file=sys.stderr,
                )
            return "joint"
        if not quiet:
            print(
                f"features: mode=image: no captions for {seen.missing} of {seen.scope} "
                "(mode=joint needs a caption for every sample)",
                file=sys.stderr,
            )
        return "image"
    if cfg.mode in CAPTION_MODES and seen.missing and seen.missing == seen.samples:
        raise config.ConfigError(
            f"mode={cfg.mode} needs captions, but {source.description} has none"
            + (f" in {seen.scope}" if streamed else "")
            + "; use --mode image (or auto)"
        )
    if cfg.mode in CAPTION_MODES and seen.missing and not cfg.skip_bad:
        raise config.ConfigError(
            f"mode={cfg.mode} needs captions, but {seen.missing} of {seen.scope} of {source.description} "
            f"have none (e.g. {seen.example!r}); --skip-bad skips them, --mode image ignores captions"
        )
    return cfg.mode


def _source_digest(source: Source, captions: bool) -> str:
    """A digest of which images an indexed source reads, in order: each sample's id and absolute file path
    (and caption, in a mode that reads them). Another ``data_root``, an edited list file, renamed or
    moved images, or the same relative paths given from another folder change it."""
    digest = hashlib.sha256()
    for r in source.records:
        caption = (r.caption or "") if captions else ""
        line = f"{r.id}\0{os.path.abspath(r.location)}\0{caption}\n"
        digest.update(line.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _check_ids(source: Source, skip_bad: bool) -> None:
    """Refuse, before anything is encoded, a sample whose id cannot be a line of the ids files (a
    ``\\n`` in a file name); with ``skip_bad`` mark it unusable instead, so that it is skipped and counted."""
    for i, r in enumerate(source.records):
        problem = id_problem(r.id)
        if problem is None:
            continue
        message = f"sample {r.id!r} of {source.description}: {problem}"
        if not skip_bad:
            raise DataError(f"{message} (rename the file, or --skip-bad skips such samples)")
        source.records[i] = replace(r, error=message)


def encode_precision(cfg: FeaturesConfig, device: torch.device) -> str:
    """The precision the features are computed in: ``bf16`` (autocast) for an open_clip model on CUDA, else
    ``fp32``. It changes the rows, so it is a setting: one folder never mixes the two."""
    return "bf16" if cfg.model != "pixels" and device.type == "cuda" else "fp32"


def _model_identity(cfg: FeaturesConfig) -> dict:
    """What the files ``model_config`` and a local ``pretrained`` hold, so that a file replaced at the same
    path counts as another model: a digest of the architecture, and the weights file's size and modification
    time (as the tars are fingerprinted; hashing gigabytes of weights would be slow), and the mean/std the
    images are normalised with. An open_clip tag names fixed weights: its name is enough."""
    if cfg.model == "pixels":
        return {"model_config_digest": None, "pretrained_file": None, "normalisation": None}
    digest = None
    if cfg.model_config:
        arch = read_model_config(cfg.model_config)["config"]  # parsed: reformatting the file changes nothing
        digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()
    weights = None
    if cfg.pretrained and os.path.isfile(cfg.pretrained):
        st = os.stat(cfg.pretrained)
        weights = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    # The weights' mean/std (lists: as meta.json reads back), so that a rule change is another setting.
    normalisation = {k: list(v) for k, v in pretrained_preprocess(cfg.model, cfg.pretrained).items()}
    return {"model_config_digest": digest, "pretrained_file": weights, "normalisation": normalisation}


def _fingerprint(cfg: FeaturesConfig, source: Source | TarShards, precision: str) -> dict:
    """The settings recorded in ``meta.json``: what a rerun must share to resume the folder's shards."""
    keep = (
        "data",
        "data_format",
        "data_root",
        "model",
        "pretrained",
        "model_config",
        "mode",
        "shard_size",
        "dtype",
        "pixel_size",
        "seed",
    )
    meta = {k: v for k, v in asdict(cfg).items() if k in keep}
    meta["data_format"] = resolve_format(cfg.data, cfg.data_format)  # what was read, however it was named
    if meta["data_format"] != "list":
        meta["data_root"] = None  # it places the relative paths of a list file only
    if isinstance(source, TarShards):
        meta["shard_size"] = None  # one output shard per tar
        meta["num_tars"] = len(source)
        meta["input"] = source.fingerprint()
    else:
        meta["num_samples"] = len(source)
        meta["input"] = _source_digest(source, cfg.mode in CAPTION_MODES)
    meta.update(_model_identity(cfg))
    meta["precision"] = precision
    meta["random_init"] = cfg.model != "pixels" and not cfg.pretrained
    meta["layout"] = LAYOUT
    return meta


class _Encoder:
    """Turns a batch of images and/or captions into ``[B, D]`` L2-normalised float32 features."""

    def __init__(self, cfg: FeaturesConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        if cfg.model == "pixels":
            self.model, self.tokenizer = None, None
            self.transform = pixel_transform(cfg.pixel_size)
        else:
            torch.manual_seed(cfg.seed)  # random-init towers must be identical when a run resumes
            self.model, self.tokenizer, _ = load_clip(cfg.model, cfg.pretrained, cfg.model_config, device)
            self.transform = eval_transform(*open_clip_input(self.model))  # the weights' mean/std, not always CLIP's
        self.precision = encode_precision(cfg, device)  # the one meta.json records

    @torch.no_grad()
    def __call__(self, images: torch.Tensor | None, captions: list[str] | None) -> torch.Tensor:
        if self.model is None:
            assert images is not None
            return F.normalize(images.flatten(1).float(), dim=1)
        use_amp = self.precision == "bf16"
        parts = []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            if images is not None:
                parts.append(F.normalize(self.model.encode_image(images.to(self.device)).float(), dim=1))
            if captions is not None:
                tokens = self.tokenizer(captions).to(self.device)
                parts.append(F.normalize(self.model.encode_text(tokens).float(), dim=1))
        return F.normalize(torch.stack(parts).mean(0), dim=1).cpu()


class ShardFiles(NamedTuple):
    """The files of one output shard; ``features`` is written last (the shard is done once it exists)."""

    features: Path
    ids: Path
    positions: Path
    unit: Path


def shard_paths(output_dir: str | Path, shard: int) -> ShardFiles:
    """The :class:`ShardFiles` of shard number ``shard``: ``(features .npy, ids .txt, positions .npy, unit .json)``."""
    base = Path(output_dir) / f"shard_{shard:05d}"
    return ShardFiles(
        base.with_suffix(".npy"), Path(f"{base}.ids.txt"), Path(f"{base}.pos.npy"), Path(f"{base}.unit.json")
    )


class _Rows:
    """The feature rows of one output shard while its batches are encoded: features, ids, positions.

    Both inputs fill one: the batches of an indexed range, or those of one streamed tar."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.features: list[np.ndarray] = []
        self.ids: list[str] = []
        self.positions: list[int] = []
        self.no_caption = 0  # samples skipped for want of a caption (joint / text with skip_bad)

    def add(
        self, encoder: _Encoder, images: torch.Tensor | None, captions: list[str] | None,
        ids: list[str], positions: list[int],
    ) -> None:  # fmt: skip
        if ids:
            self.features.append(encoder(images, captions).numpy().astype(self.dtype))
            self.ids.extend(ids)
            self.positions.extend(positions)

    def write(self, output_dir: Path, shard: int, unit: int, name: str, samples: int) -> None:
        """Write the shard's files; ``samples`` = samples of unit ``unit`` (file ``name``) the shard covered."""
        files = shard_paths(output_dir, shard)
        array = np.concatenate(self.features) if self.features else np.zeros((0, 0), self.dtype)
        atomic.write_text(files.ids, "".join(i + "\n" for i in self.ids))
        atomic.save_npy(files.positions, np.array(self.positions, np.int32))
        atomic.write_json(
            files.unit, {"unit": unit, "name": name, "samples": int(samples), "no_caption": self.no_caption}
        )
        atomic.save_npy(files.features, array)


def _captions(source: Source, indices: list[int]) -> tuple[list[int], list[str]]:
    """The ``indices`` of samples with a caption, and their captions; :func:`resolve_mode` has made sure
    that any others are to be skipped."""
    keep = [i for i in indices if source.records[i].caption and not source.records[i].error]
    return keep, [source.records[i].caption for i in keep]


def _extract_shard(cfg: FeaturesConfig, source: Source, encoder: _Encoder, start: int, end: int, bar: tqdm) -> _Rows:
    """The rows of the samples ``[start, end)`` of an indexed source that could be read."""
    needs_image, needs_text = cfg.mode in IMAGE_MODES, cfg.mode in CAPTION_MODES
    rows = _Rows(cfg.dtype)
    ids = [r.id for r in source.records[start:end]]
    indices = list(range(start, end))
    if needs_image:
        dataset = ImageDataset(source, encoder.transform, skip_bad=cfg.skip_bad)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, indices), batch_size=cfg.batch_size, num_workers=cfg.num_workers
        )
        for images, _, idx, ok in loader:
            idx_ok = idx[ok].tolist()
            images = images[ok]
            texts = None
            if needs_text:
                idx_text, texts = _captions(source, idx_ok)
                if len(idx_text) != len(idx_ok):
                    with_text = set(idx_text)
                    mask = torch.tensor([i in with_text for i in idx_ok], dtype=torch.bool)
                    rows.no_caption += len(idx_ok) - len(idx_text)
                    images, idx_ok = images[mask], idx_text
            rows.add(encoder, images, texts, [ids[i - start] for i in idx_ok], idx_ok)
            bar.update(len(idx))
    else:
        for b in range(start, end, cfg.batch_size):
            batch = list(range(b, min(b + cfg.batch_size, end)))
            usable = [i for i in batch if not source.records[i].error]  # others are skipped, not caption-less
            idx_ok, texts = _captions(source, usable)
            rows.no_caption += len(usable) - len(idx_ok)
            rows.add(encoder, None, texts, [ids[i - start] for i in idx_ok], idx_ok)
            bar.update(len(batch))
    return rows


@dataclass
class _TarBatch:
    """Up to ``batch_size`` readable samples of tar ``shard`` (``read`` samples walked to gather them);
    the last batch of a tar has ``samples`` set to the tar's sample count."""

    shard: int
    images: list | torch.Tensor | None
    captions: list[str] | None
    ids: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    read: int = 0
    no_caption: int = 0
    samples: int | None = None


class _TarBatches(torch.utils.data.IterableDataset):
    """The batches of the tars ``paths[s]``, ``s`` in ``todo``: data-loader worker ``w`` of ``n`` takes the
    whole tars ``todo[w], todo[w + n], ...`` and yields a tar's batches in tar order."""

    def __init__(
        self, paths: list[str], todo: list[int], transform: Callable[..., torch.Tensor], mode: str,
        batch_size: int, skip_bad: bool,
    ) -> None:  # fmt: skip
        self.paths, self.todo, self.transform = paths, todo, transform
        self.mode, self.batch_size, self.skip_bad = mode, batch_size, skip_bad

    def __iter__(self) -> Iterator[_TarBatch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for s in self.todo[worker::workers]:
            yield from self._tar(s)

    def _new(self, s: int) -> _TarBatch:
        needs_image, needs_text = self.mode in IMAGE_MODES, self.mode in CAPTION_MODES
        return _TarBatch(s, [] if needs_image else None, [] if needs_text else None)

    def _done(self, batch: _TarBatch) -> _TarBatch:
        if batch.images is not None:
            batch.images = torch.stack(batch.images) if batch.images else None
        return batch

    def _tar(self, s: int) -> Iterator[_TarBatch]:
        path, batch, samples = self.paths[s], self._new(s), 0
        for sample in iter_tar(path, self.skip_bad, read=batch.images is not None):
            samples += 1
            batch.read += 1
            if sample.error:  # a damaged sample of a skip_bad walk
                continue
            problem = id_problem(sample.key)
            if problem:
                if not self.skip_bad:
                    raise DataError(
                        f"sample {sample.key!r} of webdataset shard {path}: {problem} (rename the member, or "
                        "--skip-bad skips such samples)"
                    )
                continue
            if batch.captions is not None and not sample.caption:
                if not self.skip_bad:
                    raise DataError(
                        f"sample {sample.key!r} of webdataset shard {path} has no caption: mode={self.mode} needs "
                        "one for every sample (--skip-bad skips such samples, --mode image ignores captions)"
                    )
                batch.no_caption += 1
                continue
            if batch.images is not None:
                try:
                    image = decode_image(sample.data, sample.key, path)
                except DataError:
                    if not self.skip_bad:
                        raise
                    continue
                batch.images.append(self.transform(image))
            if batch.captions is not None:
                batch.captions.append(sample.caption)
            batch.ids.append(sample.key)
            batch.positions.append(sample.position)
            if len(batch.ids) == self.batch_size:
                yield self._done(batch)
                batch = self._new(s)
        batch.samples = samples
        yield self._done(batch)


def _extract_tars(
    cfg: FeaturesConfig, source: TarShards, encoder: _Encoder, todo: list[int], out: Path, bar: tqdm
) -> None:
    """Stream the tars ``todo`` through the data-loader workers; write each tar's shard when it is complete."""
    dataset = _TarBatches(source.paths, todo, encoder.transform, cfg.mode, cfg.batch_size, cfg.skip_bad)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=min(cfg.num_workers, len(todo)))
    pending: dict[int, _Rows] = {}  # the tars in progress (about one per worker)
    done = 0
    for batch in loader:
        rows = pending.setdefault(batch.shard, _Rows(cfg.dtype))
        rows.no_caption += batch.no_caption
        rows.add(encoder, batch.images, batch.captions, batch.ids, batch.positions)
        bar.update(batch.read)
        if batch.samples is not None:
            path = source.paths[batch.shard]
            pending.pop(batch.shard).write(out, batch.shard, batch.shard, os.path.basename(path), batch.samples)
            done += 1
            bar.set_postfix_str(f"{done}/{len(todo)} tars")


def _copy_ids(handle: IO[bytes], shards: list[dict], out: Path) -> None:
    """Stream the shards' id files into ``handle``, checking each lists as many ids as its shard has rows."""
    for shard in shards:
        path, lines = out / shard["ids"], 0
        with open(path, "rb") as source:
            while chunk := source.read(1 << 20):
                lines += chunk.count(b"\n")
                handle.write(chunk)
        if lines != shard["rows"]:
            raise DataError(f"{out / shard['file']} has {shard['rows']} rows but {path} lists {lines} ids")


def _copy_positions(handle: IO[bytes], shards: list[ShardFiles], total: int) -> None:
    """Write ``positions.npy`` to ``handle``: an ``.npy`` header for ``[total]`` int32, then each shard's
    positions in turn."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)), "fortran_order": False, "shape": (total,)}
    np.lib.format.write_array_header_1_0(handle, header)
    for files in shards:
        positions = load_npy(files.positions, mmap=False, fix=f"delete {files.features} and rerun to recompute it")
        handle.write(np.ascontiguousarray(positions, dtype=np.int32).tobytes())


def _write_index(out: Path, meta: dict, num_shards: int, description: str, quiet: bool) -> dict:
    """Join the finished shards: ``ids.txt``, ``positions.npy``, ``shards.json``, then ``index.json``; every
    file is streamed shard by shard (what is held is per shard)."""
    shards, files, dim, no_caption = [], [], 0, 0
    names: list[str] = []
    samples: list[int] = []
    rows: list[int] = []
    units: list[int] = []
    for s in range(num_shards):
        f = shard_paths(out, s)
        fix = f"delete {f.features} and rerun to recompute the shard"
        unit = load_json(f.unit, fix)
        if not isinstance(unit, dict) or not {"unit", "name", "samples"} <= set(unit):
            raise damaged(f.unit, "not a unit record", fix)
        shape = load_npy(f.features, fix=fix).shape
        n = int(shape[0])
        dim = dim or (int(shape[1]) if n else 0)
        if int(load_npy(f.positions, fix=fix).shape[0]) != n:
            raise DataError(f"{f.features} has {n} rows but {f.positions} does not hold {n} positions")
        if units and units[-1] == unit["unit"]:  # the next range of the same unit (an indexed source)
            samples[-1] += unit["samples"]
            rows[-1] += n
        else:
            units.append(unit["unit"])
            names.append(unit["name"])
            samples.append(unit["samples"])
            rows.append(n)
        no_caption += int(unit.get("no_caption", 0))
        shards.append({"file": f.features.name, "ids": f.ids.name, "rows": n})
        files.append(f)
    total_samples, total_rows = sum(samples), sum(rows)
    if not total_samples:
        raise DataError(f"no images found in {description}")
    counts = np.array(rows, np.int64)
    table = ShardTable(names, np.array(samples, np.int64), np.cumsum(counts) - counts, counts)
    atomic.write_stream(out / "ids.txt", lambda handle: _copy_ids(handle, shards, out))
    atomic.write_stream(out / POSITIONS_FILE, lambda handle: _copy_positions(handle, files, total_rows))
    table.save(out)
    index = {
        **meta,
        "num_samples": total_samples,
        "dim": dim,
        "rows": total_rows,
        "skipped": total_samples - total_rows,
        "shards": shards,
    }
    atomic.write_json(out / "index.json", index)
    if not quiet:
        captions = f", {no_caption} of them without a caption" if no_caption else ""
        print(
            f"features: wrote {total_rows} x {dim} {meta['dtype']} to {out} ({index['skipped']} skipped{captions})",
            file=sys.stderr,
        )
    return index


def _has_finished_shards(out: Path) -> bool:
    """Whether ``out`` holds a finished shard: a features file ``shard_<n>.npy`` (``shard_<n>.pos.npy`` is
    written before it, so it alone is a shard left unfinished)."""
    return any(re.fullmatch(r"shard_\d+\.npy", p.name) for p in out.glob("shard_*.npy"))


def _claim(out: Path, meta: dict, overwrite: bool) -> None:
    """Make ``out`` a folder of the settings ``meta``: finished shards of other (or unknown) settings are an
    error, or with ``overwrite`` deleted; a folder without finished shards is taken over."""
    meta_path = out / "meta.json"
    fix = "it records the settings of the shards there: use another output_dir or --overwrite"
    guarded = not overwrite and _has_finished_shards(out)  # rows a mismatch would mix with other rows
    old = None  # no meta.json, a damaged one, or one to be replaced anyway
    if meta_path.is_file():
        try:
            old = load_json(meta_path, fix)
        except DataError:
            if guarded:
                raise
    elif guarded:
        raise config.ConfigError(
            f"{out} holds feature shards but no meta.json saying which settings made them; "
            "use another output_dir or --overwrite"
        )
    if old != meta:
        if guarded:
            if not isinstance(old, dict):
                raise damaged(meta_path, "not a JSON object", fix)
            diff = sorted(k for k in set(old) | set(meta) if k not in old or k not in meta or old[k] != meta[k])
            raise config.ConfigError(
                f"{out} holds features made with different settings ({diff}); use another output_dir or --overwrite"
            )
        # The index goes first: until the new one is written, no reader takes the folder as complete.
        for p in [out / "index.json", out / "ids.txt", out / TABLE_FILE, out / POSITIONS_FILE,
                  *out.glob("shard_*")]:  # fmt: skip
            p.unlink(missing_ok=True)
    atomic.write_json(meta_path, meta)


def extract(cfg: FeaturesConfig, quiet: bool = False) -> dict:
    """Run the features step; returns the index dict (also written to ``index.json``)."""
    info = dist.setup(cfg.device, timeout_hours=24)
    source = open_input(cfg)
    streamed = isinstance(source, TarShards)
    if not streamed:
        _check_ids(source, cfg.skip_bad)
    cfg = replace(cfg, mode=resolve_mode(cfg, source, quiet or not info.is_main))
    out = Path(cfg.output_dir)
    meta = _fingerprint(cfg, source, encode_precision(cfg, info.device))
    if info.is_main:
        _claim(out, meta, cfg.overwrite)
    dist.barrier()
    num_shards = len(source) if streamed else -(-len(source) // cfg.shard_size)
    mine = [s for s in range(num_shards) if s % info.world_size == info.rank]
    todo = [s for s in mine if not shard_paths(out, s).features.is_file()]
    if info.is_main and not quiet:
        origin = "raw pixels" if cfg.model == "pixels" else f"open_clip {cfg.model}"
        weights = (
            "" if cfg.model == "pixels" else f", weights: {cfg.pretrained or 'RANDOM INIT (no pretrained weights)'}"
        )
        if streamed:
            what = f"{source.description} ({len(source)} tars, streamed)"
        else:
            what = f"{len(source)} samples from {source.description}"
        print(
            f"features: {what}; {origin}{weights}; mode={cfg.mode}; {num_shards} shard(s), "
            f"{sum(shard_paths(out, s).features.is_file() for s in range(num_shards))} already done",
            file=sys.stderr,
        )
    if todo:
        encoder = _Encoder(cfg, info.device)
        bar_off = quiet or not info.is_main
        if streamed:
            with tqdm(desc="features", unit="img", disable=bar_off) as bar:
                _extract_tars(cfg, source, encoder, todo, out, bar)
        else:
            unit = source.units[0][0]  # a folder or list file is one unit: positions are source indices
            total = sum(min(cfg.shard_size, len(source) - s * cfg.shard_size) for s in todo)
            with tqdm(total=total, desc="features", unit="img", disable=bar_off) as bar:
                for s in todo:
                    start, end = s * cfg.shard_size, min((s + 1) * cfg.shard_size, len(source))
                    _extract_shard(cfg, source, encoder, start, end, bar).write(out, s, 0, unit, end - start)
    dist.barrier()
    index: dict = {}
    if info.is_main:
        index = _write_index(out, meta, num_shards, source.description, quiet)
    dist.barrier()
    return index


class FeatureStore:
    """Read-only view of a features folder: ``len``, ``dim``, ``ids`` and float32 row ranges ``rows(a, b)``.

    Rows holding NaN/inf raise :class:`DataError` naming the shard file and row when they are read.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index_path = self.path / "index.json"
        if not index_path.is_file():
            raise DataError(f"feature index not found: {index_path} (run unicom-features to completion first)")
        fix = "recompute the features (unicom-features --overwrite)"
        self.index = load_json(index_path, fix)
        try:
            files, self.dim = [str(s["file"]) for s in self.index["shards"]], int(self.index["dim"])
        except (TypeError, KeyError, ValueError):
            raise damaged(index_path, "not a feature index", fix) from None
        self.shards = [load_npy(self.path / f, fix=fix) for f in files]
        for f, shard in zip(files, self.shards, strict=True):
            if shard.ndim != 2 or (len(shard) and shard.shape[1] != self.dim):
                raise damaged(self.path / f, f"shape {shard.shape}, not [rows, {self.dim}]", fix)
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def ids(self) -> list[str]:
        """Sample ids in row order: the ``\\n``-ended lines of ``ids.txt`` (no other character ends a line)."""
        path = self.path / "ids.txt"
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise DataError(f"file not found: {path} (run unicom-features to completion first)") from None
        except UnicodeDecodeError as exc:
            raise damaged(path, f"not UTF-8: {exc}", "recompute the features") from None
        ids = text.split("\n")
        if ids.pop() != "" or len(ids) != len(self):
            raise damaged(
                path, f"it does not list the {len(self)} ids of the rows, one a line", "recompute the features"
            )
        return ids

    def rows(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """Rows ``[start, end)`` as a float32 ``[end - start, dim]`` array."""
        end = len(self) if end is None else end
        parts = []
        for s, arr in enumerate(self.shards):
            lo, hi = max(start, self.offsets[s]), min(end, self.offsets[s + 1])
            if lo < hi:
                local = np.arange(lo - self.offsets[s], hi - self.offsets[s])
                parts.append(self._finite(np.asarray(arr[local[0] : local[-1] + 1], dtype=np.float32), s, local))
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def _finite(self, values: np.ndarray, shard: int, rows: np.ndarray) -> np.ndarray:
        """``values``, rows ``rows`` of shard ``shard``, checked as they are read: NaN/inf would break
        k-means and the nearest-centroid search with an obscure error, and costs no extra pass here."""
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            raise DataError(
                f"{self.path / self.index['shards'][shard]['file']}: row {int(rows[bad][0])} holds NaN/inf values "
                f"({int(bad.sum())} of the {len(values)} rows read); recompute the features"
            )
        return values

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows at sorted ``indices`` as float32 ``[len(indices), dim]``."""
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        out = np.empty((len(indices), self.dim), np.float32)
        for s in np.unique(shard_of):
            sel = shard_of == s
            local = indices[sel] - self.offsets[s]
            out[sel] = self._finite(np.asarray(self.shards[s][local], dtype=np.float32), s, local)
        return out


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``unicom-features``."""
    with config.exit_on_user_error("unicom-features"):
        cfg = config.parse(FeaturesConfig, "features", argv, __doc__.splitlines()[0])
        try:
            extract(cfg)
        finally:
            dist.cleanup()


if __name__ == "__main__":
    main()
