"""Image sources (folder, CSV/list file, webdataset tar shards) and the datasets the steps load them with.

Every source is indexed once, in a fixed order, so that sample ``i`` is the same image on every
run and every rank: features are resumable by shard, training resumes bitwise, and the ids
and positions written by :mod:`unicom.features` join pseudo-labels back to images in
:mod:`unicom.train`. A source that is too large to index streams instead (:mod:`unicom.stream`).

Sources and their sample ids:

- **folder** ``root/``: every image below ``root`` (sorted walk); id = path relative to ``root``;
  label = index of the first-level sub-folder in sorted order (``None`` for images in ``root``);
  caption = the sidecar ``<stem>.txt`` when present.
- **list** file: ``.csv`` / ``.tsv`` with a header holding ``path`` (required) and optionally
  ``id``, ``label``, ``caption``; or a plain ``.txt`` / ``.lst`` with ``path [label]`` per line.
  Relative paths are resolved against ``root`` (default: the list file's folder); id = ``id``
  column or the path. Non-integer labels are mapped to the sorted list of distinct names.
- **wds** (webdataset) shards: a folder of ``.tar`` files, a glob, or a brace pattern
  ``shard-{000..009}.tar``; a sample is the group of members sharing a key
  (``<key>.jpg|png|...``, ``<key>.txt`` caption, ``<key>.cls`` integer label); id = ``<key>``.
  :func:`wds_source` indexes the tar headers once, so samples are read by offset (random access,
  exact resume); :mod:`unicom.features` and training's stream mode walk the tars with
  :func:`iter_tar` instead, holding no per-sample record.
  A truncated shard (or a ``.cls`` that is not an integer) is an error naming the shard; with
  ``skip_bad`` its intact samples are kept and the damaged one is skipped and counted. A shard
  damaged before its end (a member header that cannot be read, with data after it) is an error
  naming the shard even with ``skip_bad``: the samples after the damage can be neither read nor
  counted.

A path that exists is taken literally (a file or folder whose name holds ``[ { * ? ,``); only a
path that does not exist is read as a glob, brace pattern or comma-separated list.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import UserError
from .model import ImageTransform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
FORMATS = ("auto", "folder", "list", "wds")


class DataError(UserError, RuntimeError):
    """A data source or one of its samples cannot be read; the message names the file / sample."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker's error is re-raised in the main process as this class built from
        # "Caught DataError in DataLoader worker process N.\nOriginal Traceback ...": keep only the
        # worker's own one-line message (the last line of that traceback).
        if message.startswith(f"Caught {type(self).__name__} in DataLoader worker"):
            prefix = f"{type(self).__module__}.{type(self).__qualname__}: "
            lines = [line for line in message.splitlines() if line.startswith(prefix)]
            message = lines[-1][len(prefix) :] if lines else message
        super().__init__(message)


class DamagedFileError(DataError):
    """A file the pipeline wrote (``.npy``, ``.json``) cannot be read back; the message names it."""


def load_json(path: str | os.PathLike, fix: str = "") -> Any:
    """The JSON in ``path``; :class:`DamagedFileError` naming the file when it cannot be parsed (``fix``
    says what to do about it), :class:`DataError` when it is missing."""
    try:
        with open(path, "rb") as handle:
            return json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise damaged(path, f"not valid JSON: {exc}", fix) from None


def load_npy(path: str | os.PathLike, mmap: bool = True, fix: str = "") -> np.ndarray:
    """The ``.npy`` array in ``path`` (memory-mapped unless ``mmap`` is false); :class:`DamagedFileError`
    naming the file when it is truncated or not an ``.npy`` file, :class:`DataError` when it is missing."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except (ValueError, EOFError, OSError) as exc:  # truncated data or header, garbage, a pickle
        raise damaged(path, f"not a readable .npy array: {exc}", fix) from None


def damaged(path: str | os.PathLike, why: str, fix: str = "") -> DamagedFileError:
    """The :class:`DamagedFileError` saying that ``path`` is damaged (``why``), and ``fix`` when given."""
    return DamagedFileError(f"{path} is damaged or unreadable ({why})" + (f"; {fix}" if fix else ""))


def id_problem(sample_id: str) -> str | None:
    """Why ``sample_id`` cannot be a line of an ids file (one UTF-8 id per ``\\n``-ended line), or ``None``."""
    if "\n" in sample_id:
        return "its id holds a line break ('\\n'), and ids files hold one id per line"
    try:
        sample_id.encode("utf-8")
    except UnicodeEncodeError:
        return "its id cannot be written as UTF-8 (a file name that is not valid UTF-8)"
    return None


@dataclass(frozen=True, slots=True)
class Record:
    """One sample of a source: its id, integer label (or ``None``), caption (or ``None``) and where it lives."""

    id: str
    label: int | None
    caption: str | None
    location: str
    offset: int = -1
    size: int = -1
    error: str | None = None  # why the sample cannot be read, found while indexing (a skip_bad source)


class Source:
    """An indexed, ordered list of image records with a way to decode each one."""

    kind = "source"

    def __init__(
        self,
        records: list[Record],
        description: str,
        class_names: list[str] | None = None,
        units: list[tuple[str, int]] | None = None,
    ) -> None:
        if not records:
            raise DataError(f"no images found in {description}")
        self.records = records
        self.description = description
        self.class_names = class_names
        # (name, samples) of the parts positions count in: each tar shard, or the whole source.
        self.units = units or [(description, len(records))]
        # Tar shards are files matched by name wherever the data lives; a folder or list file is
        # one unit, whatever its path is called there.
        self.named_units = units is not None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> list[str]:
        """Sample ids, in source order."""
        return [r.id for r in self.records]

    def labels(self) -> np.ndarray:
        """``[N]`` int64 labels in source order; ``-1`` where a sample has none."""
        return np.array([-1 if r.label is None else r.label for r in self.records], dtype=np.int64)

    def read_bytes(self, index: int) -> bytes:
        """The encoded image of sample ``index``; raises :class:`DataError` for a missing file or damaged sample."""
        rec = self.records[index]
        if rec.error:
            raise DataError(rec.error)
        try:
            with open(rec.location, "rb") as handle:
                if rec.offset >= 0:
                    handle.seek(rec.offset)
                    data = handle.read(rec.size)
                    if len(data) != rec.size:
                        raise DataError(f"sample {rec.id!r}: {rec.location} is truncated")
                    return data
                return handle.read()
        except FileNotFoundError as exc:
            raise DataError(f"sample {rec.id!r}: image file not found: {rec.location}") from exc
        except IsADirectoryError as exc:
            raise DataError(f"sample {rec.id!r}: {rec.location} is a directory, not an image") from exc

    def load_image(self, index: int) -> Image.Image:
        """Decode sample ``index`` to an RGB PIL image; raises :class:`DataError` naming the sample."""
        rec = self.records[index]
        return decode_image(self.read_bytes(index), rec.id, rec.location)


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": how Pillow opens 16-bit PGM (and some PNG)


def _eight_bit(image: Image.Image) -> Image.Image:
    """``image`` with 16-bit grayscale content scaled to 8 bits (``L``); other images as they are.

    ``convert("RGB")`` would clip each 16-bit value to 0..255, leaving a nearly binary picture. Values are
    taken as 16-bit (those of an ``I`` image clipped to 0..65535) and mapped linearly: ``round(v * 255 / 65535)``.
    """
    if image.mode not in _SIXTEEN_BIT_MODES:
        return image
    values = np.asarray(image)
    if values.dtype.kind == "i":
        values = values.clip(0, 65535)
    scaled = (values.astype(np.uint32) * 255 + 32767) // 65535  # rounded; at most 16.7M, fits uint32
    return Image.fromarray(scaled.astype(np.uint8))


def decode_image(data: bytes, sample: str, location: str) -> Image.Image:
    """Decode the encoded image ``data`` of sample ``sample`` (stored in ``location``) to RGB; raises
    :class:`DataError` naming both.

    A 16-bit grayscale image (Pillow mode ``I;16`` and its byte orders, or ``I`` as Pillow opens 16-bit PGM
    files and some PNGs) is scaled to 8 bits first, ``v -> round(v * 255 / 65535)`` (``I`` values clipped
    to 0..65535), so that it looks as its 8-bit version does; any other mode is converted as Pillow does.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return _eight_bit(image).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"sample {sample!r}: cannot decode image {location}: {exc}") from exc


def _label_map(raw: Sequence[str | None]) -> tuple[list[int | None], list[str] | None]:
    present = [r for r in raw if r not in (None, "")]
    if not present:
        return [None] * len(raw), None
    try:
        return [None if r in (None, "") else int(r) for r in raw], None
    except ValueError:
        names = sorted(set(present))
        index = {n: i for i, n in enumerate(names)}
        return [None if r in (None, "") else index[r] for r in raw], names


def _read_caption(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return handle.read().strip()
    except FileNotFoundError:
        return None


def folder_source(root: str | os.PathLike) -> Source:
    """Index every image under ``root`` (see module docstring for ids, labels, captions)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    rel = [Path(f).relative_to(root).as_posix() for f in files]
    class_names = sorted({r.split("/")[0] for r in rel if "/" in r})
    index = {n: i for i, n in enumerate(class_names)}
    records = [
        Record(
            id=r,
            label=index[r.split("/")[0]] if "/" in r else None,
            caption=_read_caption(os.path.splitext(f)[0] + ".txt"),
            location=f,
        )
        for f, r in zip(files, rel, strict=True)
    ]
    return Source(records, f"image folder {root}", class_names or None)


def list_source(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Source:
    """Index a CSV/TSV (header with ``path`` [, ``id``, ``label``, ``caption``]) or ``path [label]`` list file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"list file not found: {path}")
    base = Path(root) if root else path.parent
    rows: list[dict[str, str | None]] = []
    if path.suffix.lower() in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: drop a byte-order mark
            reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            fields = reader.fieldnames or []
            column = "path" if "path" in fields else "image" if "image" in fields else None
            if column is None:
                raise DataError(f"list file {path} needs a 'path' (or 'image') column; found columns {fields}")
            for row in reader:
                rows.append(
                    {"path": row[column], "id": row.get("id"), "label": row.get("label"), "caption": row.get("caption")}
                )
    else:
        with open(path, encoding="utf-8-sig") as handle:
            for n, line in enumerate(handle, 1):
                parts = line.strip().split()
                if not parts:
                    continue
                if len(parts) > 2:
                    raise DataError(f"list file {path}, line {n}: expected 'path [label]', got {line.strip()!r}")
                rows.append(
                    {"path": parts[0], "id": None, "label": parts[1] if len(parts) > 1 else None, "caption": None}
                )
    labels, names = _label_map([r["label"] for r in rows])
    records = []
    for row, label in zip(rows, labels, strict=True):
        rel = row["path"] or ""
        if not rel:
            raise DataError(f"list file {path}: a row has an empty path")
        location = rel if os.path.isabs(rel) else str(base / rel)
        records.append(Record(id=row["id"] or rel, label=label, caption=row["caption"] or None, location=location))
    return Source(records, f"list file {path}", names)


def expand_shards(spec: str) -> list[str]:
    """Shard paths for a folder of ``.tar`` files, a glob, a brace pattern, or a comma-separated list.

    A path that exists is taken literally, as a whole or as one part of the list, whatever characters
    its name holds."""
    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
    elif os.path.isfile(spec):
        paths = [spec]
    else:
        paths = []
        for part in spec.split(","):
            if os.path.isfile(part):
                paths.append(part)
                continue
            if "{" in part:
                import braceexpand

                candidates = list(braceexpand.braceexpand(part))
            else:
                candidates = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
            paths.extend(candidates)
    if not paths:
        raise DataError(f"no .tar shards match {spec!r}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"webdataset shard not found: {missing[0]}" + (f" (+{len(missing) - 1} more)" if missing[1:] else "")
        )
    return paths


def split_key(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a tar member name: ``a/b.seg.png`` -> ``("a/b", "seg.png")``."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _member_bytes(handle: io.BufferedReader, member: tarfile.TarInfo) -> bytes:
    handle.seek(member.offset_data)
    return handle.read(member.size)


def _is_image(ext: str) -> bool:
    return "." + ext.split(".")[-1] in IMAGE_EXTENSIONS


@dataclass(frozen=True, slots=True)
class TarSample:
    """One image sample of a tar shard: its position among the shard's image samples, key, where its
    image lies (``offset``, ``size``), the image bytes when asked, caption, label and why it is unusable."""

    position: int
    key: str
    offset: int
    size: int
    data: bytes | None
    caption: str | None
    label: int | None
    error: str | None


def _tar_sample(
    shard: str, handle: io.BufferedReader, file_size: int, position: int, key: str,
    members: dict[str, tarfile.TarInfo], skip_bad: bool, read: bool,
) -> TarSample:  # fmt: skip
    image_ext = next(e for e in members if _is_image(e))
    image = members[image_ext]
    broken = [m.name for m in members.values() if m.offset_data + m.size > file_size]
    if broken:
        where = f"webdataset shard {shard} is truncated inside member {broken[0]!r}"
        if not skip_bad:
            raise DataError(f"{where} (--skip-bad keeps its intact samples)")
        error = f"sample {key!r}: {where}"
        return TarSample(position, key, image.offset_data, image.size, None, None, None, error)
    texts = {
        ext: _member_bytes(handle, members[ext]).decode("utf-8-sig", errors="replace").strip()
        for ext in ("txt", "cls")
        if ext in members
    }
    label, error = None, None
    try:
        label = int(texts["cls"]) if texts.get("cls") else None
    except ValueError:
        error = f"webdataset shard {shard}, sample {key!r}: .cls must be an integer, got {texts['cls']!r}"
        if not skip_bad:
            raise DataError(f"{error} (--skip-bad skips such samples)") from None
    data = _member_bytes(handle, image) if read else None
    caption = None if error else texts.get("txt")
    return TarSample(position, key, image.offset_data, image.size, data, caption, label, error)


def _check_end(shard: str, handle: io.BufferedReader, offset: int, file_size: int) -> None:
    """Raise :class:`DataError` unless the bytes of ``shard`` from ``offset`` (where ``tarfile`` found no
    further member) to its end are zero: the end-of-archive blocks and padding of a whole tar."""
    handle.seek(offset)
    while chunk := handle.read(1 << 20):
        if chunk.strip(b"\0"):
            raise DataError(
                f"webdataset shard {shard} is damaged: the member header at byte {offset} cannot be read and data "
                f"follows it (up to byte {file_size}), so the samples after it can be neither read nor counted "
                "(--skip-bad cannot skip this; repair or remove the shard)"
            )


def iter_tar(shard: str, skip_bad: bool = False, read: bool = False, start: int = 0) -> Iterator[TarSample]:
    """The image samples of one tar shard in tar order, from position ``start`` on (earlier ones are passed
    over by their headers); image bytes too with ``read``. Members of a sample share a key and follow
    each other (the webdataset layout). Holds one sample's headers at a time.

    A truncated shard (or a ``.cls`` that is not an integer) raises :class:`DataError` naming the
    shard; with ``skip_bad`` the damaged sample comes with its ``error`` and the walk ends there.
    A shard whose walk stops before its end (an unreadable member header with data after it: the
    ``tarfile`` module reads such a header as the end of the archive) raises :class:`DataError`
    naming the shard and the byte, with ``skip_bad`` too: what follows can be neither read nor counted.
    """
    file_size = os.path.getsize(shard)
    key, members, position = None, {}, 0
    try:
        with tarfile.open(shard, "r:") as tar, open(shard, "rb") as handle:
            while True:
                try:
                    member = tar.next()
                except tarfile.ReadError:  # the previous member's data runs past the end (or a header is damaged)
                    member, cut_off = None, True
                else:
                    # A whole archive ends with zero blocks; less than one block left = a header cut off.
                    cut_off = member is None and file_size - tar.offset < tarfile.BLOCKSIZE
                if member is None and tar.offset + tarfile.BLOCKSIZE <= file_size:
                    _check_end(shard, handle, tar.offset, file_size)
                tar.members = []  # tarfile keeps every header it has read; a walk needs none of them
                name = split_key(member.name) if member is not None and member.isfile() else None
                if member is None or (name and name[0] != key):
                    if any(_is_image(e) for e in members):
                        if position >= start:
                            yield _tar_sample(shard, handle, file_size, position, key, members, skip_bad, read)
                        position += 1
                    if member is None:
                        break
                    key, members = name[0], {}
                if name:
                    members[name[1]] = member
    except tarfile.TarError as exc:
        raise DataError(f"cannot read webdataset shard {shard}: {exc}") from exc
    if cut_off and not skip_bad:
        raise DataError(f"webdataset shard {shard} is truncated (--skip-bad keeps its intact samples)")


def _index_shard(shard: str, skip_bad: bool) -> list[Record]:
    """The records of one tar shard (see :func:`wds_source`)."""
    return [
        Record(id=t.key, label=t.label, caption=t.caption, location=shard, offset=t.offset, size=t.size, error=t.error)
        for t in iter_tar(shard, skip_bad)
    ]


def wds_source(spec: str, skip_bad: bool = False) -> Source:
    """Index webdataset tar shards (see module docstring); labels from ``.cls``, captions from ``.txt``.

    A truncated shard or a non-integer ``.cls`` raises :class:`DataError` naming the shard. With
    ``skip_bad`` the intact samples are kept and a damaged one is indexed with its ``error``, so
    that loading it fails and :class:`ImageDataset` skips and counts it like any bad image.
    """
    shards = [(shard, _index_shard(shard, skip_bad)) for shard in expand_shards(spec)]
    records = [record for _, part in shards for record in part]
    return Source(records, f"webdataset shards {spec}", units=[(os.path.basename(s), len(p)) for s, p in shards])


def resolve_format(path: str, data_format: str = "auto") -> str:
    """``folder`` | ``list`` | ``wds``: ``data_format``, or for ``auto`` what ``path`` looks like."""
    if data_format not in FORMATS:
        raise DataError(f"data_format must be one of {FORMATS}, got {data_format!r}")
    if not path:
        raise DataError("no data path given")
    if data_format != "auto":
        return data_format
    if os.path.isdir(path):  # an existing path is taken literally, whatever its name holds
        return "wds" if glob.glob(os.path.join(glob.escape(path), "*.tar")) else "folder"
    if os.path.isfile(path):
        return "wds" if path.endswith(".tar") else "list"
    if path.endswith(".tar") or any(c in path for c in "{*?["):
        return "wds"
    raise DataError(f"data path not found: {path}")


def open_source(path: str, data_format: str = "auto", root: str | None = None, skip_bad: bool = False) -> Source:
    """Open ``path`` as a folder, list file or webdataset shards (``data_format='auto'`` guesses from the path).

    ``skip_bad`` keeps the intact samples of damaged webdataset shards (see :func:`wds_source`).
    """
    data_format = resolve_format(path, data_format)
    if data_format == "folder":
        return folder_source(path)
    if data_format == "list":
        return list_source(path, root)
    return wds_source(path, skip_bad)


def seeded_transform(
    transform: Callable[[Image.Image], torch.Tensor], image: Image.Image, seed: int | None, epoch: int, index: int
) -> torch.Tensor:
    """``transform(image)``, its randomness seeded from ``(seed, epoch, index)`` (unseeded when ``seed`` is None)."""
    if seed is None:
        return transform(image)
    sample_seed = (seed * 1_000_003 + epoch) * 1_000_000_007 + index
    if isinstance(transform, ImageTransform):
        return transform(image, random.Random(sample_seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed % 2**63)
        return transform(image)


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset over a :class:`Source`: item ``i`` -> ``(image [3, H, W] float32, label int64, i, ok)``.

    ``labels`` overrides the source's labels (``[N]`` int64, ``-1`` = none/ignored). With
    ``skip_bad=True`` a missing or corrupt image gives a black image, label ``-1`` and
    ``ok=False`` (callers count and drop / ignore it); otherwise it raises :class:`DataError`.
    With ``seed`` set, each item's random augmentation is seeded from ``(seed, epoch, i)``, so
    the data stream is reproducible and resumable whatever the worker count; set ``epoch``
    before each epoch.
    """

    def __init__(
        self,
        source: Source,
        transform: Callable[[Image.Image], torch.Tensor],
        labels: np.ndarray | None = None,
        skip_bad: bool = False,
        seed: int | None = None,
    ) -> None:
        self.source = source
        self.transform = transform
        self.labels = source.labels() if labels is None else np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(source):
            raise DataError(f"{len(self.labels)} labels for {len(source)} samples of {source.description}")
        self.skip_bad = skip_bad
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, bool]:
        try:
            image = self.source.load_image(index)
            ok = True
        except DataError:
            if not self.skip_bad:
                raise
            image, ok = Image.new("RGB", (32, 32)), False
        label = int(self.labels[index]) if ok else -1
        return seeded_transform(self.transform, image, self.seed, self.epoch, index), label, index, ok


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of indices for one epoch and one rank, reproducible from ``(seed, epoch)``.

    The epoch's permutation is truncated to a multiple of ``batch_size * world_size`` (every
    rank gets the same number of full batches); rank ``r`` takes every ``world_size``-th index.
    Iteration starts at batch ``start`` (for resuming mid-epoch).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> None:
        if num_samples < batch_size * world_size:
            raise DataError(
                f"batch_size {batch_size} x {world_size} rank(s) exceeds the {num_samples} training samples"
            )
        self.num_samples, self.batch_size, self.seed, self.epoch = num_samples, batch_size, seed, epoch
        self.rank, self.world_size, self.start = rank, world_size, start

    @staticmethod
    def batches_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
        """Full batches per rank per epoch."""
        return num_samples // (batch_size * world_size)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch(self.num_samples, self.batch_size, self.world_size) - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.num_samples, generator=gen)
        per_rank = self.batches_per_epoch(self.num_samples, self.batch_size, self.world_size) * self.batch_size
        mine = perm[: per_rank * self.world_size][self.rank :: self.world_size]
        for b in range(self.start, math.ceil(per_rank / self.batch_size)):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size].tolist()
