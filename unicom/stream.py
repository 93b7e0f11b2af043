"""Webdataset shards read as a stream: state that grows with the shards, not with the samples.

A **shard table** lists, per input unit (a ``.tar`` shard; a folder or list file is one unit),
its name, how many image samples it holds (``samples``), and where its feature rows start and
how many there are (``start``, ``rows``). :mod:`unicom.features` writes it as ``shards.json``
beside ``positions.npy`` (``[rows]`` int32: the position inside its unit of every feature row;
rows fewer than samples where samples were skipped). Feature rows, and so the k-means label
array, are in unit order, so the pseudo-label of sample ``(unit, position)`` is the label of row
``start + position`` (or of the row whose position matches, where samples were skipped); no ids
are read. Anything held for the run is O(shards); a shard's labels are read when it is opened.

:class:`ShardStream` is the training stream (an ``IterableDataset``):

- **Split**: once per run, the shards, in a permutation seeded by ``seed``, are laid end to end
  by their labelled samples and cut into ``W x max(1, num_workers)`` runs whose totals differ by
  at most one, one per slot (rank ``r``, data-loader worker ``w``); a run is a list of
  **pieces** (a shard, or the contiguous part of one that a cut falls inside: at most ``slots -
  1`` shards are split between slots). Each epoch a slot reads its pieces in an order
  seeded by ``(seed, epoch, slot)``.
- **Order**: samples without a label (``-1``) are left out; the rest pass a shuffle buffer of
  ``buffer`` samples seeded by ``(seed, epoch, slot)``. Every slot yields the same number of full
  batches per epoch, so ranks step together; what a slot holds past that count (at most
  ``batch_size`` samples) is not seen that epoch.
- **Checks**: a tar that ends before, or holds more samples than, the shard table lists for it
  raises :class:`DataError` when the stream reads there (no extra pass over the data).
- **Resume** from ``(epoch, batch)``: the buffer's choices depend only on the seed and the
  sample counts, so each worker replays them on integers (no data read; ~1 s per million
  samples) to find its piece cursor, the position in that piece, and the samples then in the
  buffer. It then reads only from the oldest of those on: pieces before it are not opened again.
  The batches that follow equal an uninterrupted run's; the world size and worker count must
  be the ones the epoch started with.

Members of a sample share a key and follow each other in the tar (the webdataset layout);
positions count the samples that have an image, in tar order, as :func:`unicom.data.wds_source`
indexes them.
"""

from __future__ import annotations

import bisect
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from . import atomic
from .data import DataError, TarSample, damaged, decode_image, iter_tar, load_json, load_npy, seeded_transform

TABLE_FILE, POSITIONS_FILE = "shards.json", "positions.npy"


@dataclass
class ShardTable:
    """Per unit: ``names`` (file names), ``samples``, ``start``, ``rows`` (``[S]`` int64 each)."""

    names: list[str]
    samples: np.ndarray
    start: np.ndarray
    rows: np.ndarray

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``folder/shards.json`` atomically."""
        atomic.write_json(
            Path(folder) / TABLE_FILE,
            {"names": self.names, **{k: getattr(self, k).tolist() for k in ("samples", "start", "rows")}},
        )

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ShardTable:
        """Read ``folder/shards.json``; :class:`DataError` when it is missing (features of an older version)."""
        path = Path(folder) / TABLE_FILE
        if not path.is_file():
            raise DataError(f"shard table not found: {path} (recompute the features with this version)")
        fix = "recompute the features (unicom-features --overwrite)"
        raw = load_json(path, fix)
        try:
            arrays = {k: np.asarray(raw[k], dtype=np.int64) for k in ("samples", "start", "rows")}
            names = [str(n) for n in raw["names"]]
        except (TypeError, KeyError, ValueError, OverflowError):
            raise damaged(path, "not a shard table", fix) from None
        if any(a.shape != (len(names),) for a in arrays.values()):
            raise damaged(path, "its lists have different lengths", fix)
        return cls(names, **arrays)

    @classmethod
    def scan(cls, shards: list[str]) -> ShardTable:
        """A table of ``shards`` (no feature rows) from one pass over their tar headers; data is not read."""
        samples = np.array([sum(1 for _ in iter_tar(path, skip_bad=True)) for path in shards], np.int64)
        return cls([os.path.basename(p) for p in shards], samples, np.zeros_like(samples), np.zeros_like(samples))


class PositionLabels:
    """Pseudo-labels by ``(unit, position)``: ``labels`` ``[rows]`` (memory-mapped) joined through a table."""

    def __init__(self, table: ShardTable, labels: np.ndarray, positions: np.ndarray | None) -> None:
        total = int(table.rows.sum())
        if len(labels) != total:
            raise DataError(f"{len(labels)} pseudo-labels for the {total} feature rows of the shard table")
        self.table, self.labels, self.positions = table, labels, positions

    @classmethod
    def open(cls, features_dir: str | os.PathLike, labels_path: str | os.PathLike) -> PositionLabels:
        """The table and positions of a features folder joined to a k-means ``labels.npy``."""
        table = ShardTable.load(features_dir)
        positions_path = Path(features_dir) / POSITIONS_FILE
        positions, fix = None, "recompute the features (unicom-features --overwrite)"
        if positions_path.is_file():
            positions = load_npy(positions_path, fix=fix)
            if positions.shape != (int(table.rows.sum()),):
                raise damaged(positions_path, f"shape {positions.shape}, not one position per row of {TABLE_FILE}", fix)
        labels = load_npy(labels_path, fix="rerun unicom-cluster")
        if labels.ndim != 1:
            raise damaged(labels_path, f"shape {labels.shape}, not a [rows] label array", "rerun unicom-cluster")
        return cls(table, labels, positions)

    def __getstate__(self) -> dict:
        # A data-loader worker started by pickling must map the files again, not receive their contents.
        state = dict(self.__dict__)
        for name in ("labels", "positions"):
            if isinstance(state[name], np.memmap):
                state[name] = Path(state[name].filename)
        return state

    def __setstate__(self, state: dict) -> None:
        for name in ("labels", "positions"):
            if isinstance(state[name], Path):
                state[name] = np.load(state[name], mmap_mode="r")
        self.__dict__.update(state)

    def units_of(self, shards: list[str]) -> list[int]:
        """The table unit of each shard path, matched by file name; :class:`DataError` for an unknown one."""
        index = {name: u for u, name in enumerate(self.table.names)}
        missing = [p for p in shards if os.path.basename(p) not in index]
        if missing or len(index) != len(self.table.names):
            raise DataError(
                f"shard {missing[0]} is not in the shard table of the features the pseudo-labels come from"
                if missing
                else "the shard table names a file twice; shards are matched by file name"
            )
        return [index[os.path.basename(p)] for p in shards]

    def unit_labels(self, unit: int) -> np.ndarray:
        """``[samples]`` int32 labels of one unit by position; ``-1`` for samples without a row or label."""
        t = self.table
        lo, n, rows = int(t.start[unit]), int(t.samples[unit]), int(t.rows[unit])
        values = np.asarray(self.labels[lo : lo + rows], dtype=np.int32)
        if rows == n:
            return values
        if self.positions is None:
            raise DataError(f"unit {t.names[unit]} has {rows} feature rows for {n} samples but no {POSITIONS_FILE}")
        out = np.full(n, -1, np.int32)
        out[np.asarray(self.positions[lo : lo + rows])] = values
        return out

    def kept_counts(self) -> np.ndarray:
        """``[S]`` int64: samples with a label per unit (one chunked pass over the labels)."""
        counts = np.zeros(len(self.table.names), np.int64)
        for u in range(len(counts)):
            lo, rows = int(self.table.start[u]), int(self.table.rows[u])
            counts[u] = int((np.asarray(self.labels[lo : lo + rows]) >= 0).sum())
        return counts


class _Order:
    """Shuffle-buffer order of stream indices ``0..total-1``; depends on ``(total, buffer, rng)`` only."""

    def __init__(self, total: int, buffer: int, rng: random.Random) -> None:
        self.total, self.buffer, self.rng = total, buffer, rng
        self.pending: list[int] = []
        self.next_read = 0

    def step(self) -> int:
        """The next index to yield; ``self.next_read`` is then the number of indices read so far."""
        while len(self.pending) < self.buffer and self.next_read < self.total:
            self.pending.append(self.next_read)
            self.next_read += 1
        i = self.rng.randrange(len(self.pending))
        n = self.pending[i]
        self.pending[i] = self.pending[-1]
        self.pending.pop()
        return n


class Piece(NamedTuple):
    """Labelled samples ``lo .. hi - 1`` (counted among the shard's labelled ones) of shard ``shard``."""

    shard: int
    lo: int
    hi: int


def deal(kept: np.ndarray, slots: int, seed: int) -> list[list[Piece]]:
    """Per slot, its pieces: the shards in an order seeded by ``seed``, laid end to end by their
    ``kept`` (``[S]``) labelled samples and cut into ``slots`` runs of ``T // slots`` or one more
    samples (``T = kept.sum()``). Depends on its arguments only, so every rank deals alike."""
    order = list(range(len(kept)))
    random.Random(seed).shuffle(order)
    total = int(kept.sum())
    cuts = [k * total // slots for k in range(slots + 1)]
    pieces: list[list[Piece]] = [[] for _ in range(slots)]
    begin = 0  # where the shard begins on the line of all labelled samples
    for s in order:
        lo, count = 0, int(kept[s])
        while lo < count:  # a shard without labelled samples is no piece
            k = bisect.bisect_right(cuts, begin + lo) - 1  # the slot whose run holds sample lo
            hi = min(count, cuts[k + 1] - begin)
            pieces[k].append(Piece(s, lo, hi))
            lo = hi
        begin += count
    return pieces


class ShardStream(torch.utils.data.IterableDataset):
    """Items ``(image [3, H, W] float32, label int64, key int64, ok bool)`` of one rank (see module docstring).

    ``key = s * 2**32 + position`` names the sample (``s`` = its shard's index in ``shards``).
    ``labels`` gives pseudo-labels by position; without it the ``.cls`` labels are used (``-1``
    when absent, an ignored row) and every sample is kept. Set ``epoch`` and ``start_batch``
    (batches of this epoch already taken) before iterating.
    """

    def __init__(
        self,
        shards: list[str],
        transform: Callable[[Image.Image], torch.Tensor],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        labels: PositionLabels | None = None,
        buffer: int = 1000,
        skip_bad: bool = False,
    ) -> None:
        self.shards, self.transform, self.batch_size, self.seed = shards, transform, batch_size, seed
        self.rank, self.world_size, self.workers = rank, world_size, max(1, num_workers)
        self.buffer, self.skip_bad, self.labels = buffer, skip_bad, labels
        self.epoch, self.start_batch = 0, 0
        slots = world_size * self.workers
        if len(shards) < slots:
            raise DataError(
                f"{len(shards)} webdataset shard(s) for {world_size} rank(s) x {self.workers} data-loader worker(s): "
                "each worker needs a shard (lower num_workers, or use data_mode=indexed)"
            )
        if labels is None:
            self.units = list(range(len(shards)))
            kept = ShardTable.scan(shards).samples
        else:
            self.units = labels.units_of(shards)
            kept = labels.kept_counts()[self.units]
        self.kept = kept  # [S] int64, samples per shard that the stream yields
        # Dealt by samples, not shards: slot totals then differ by at most one, so the cut to the
        # smallest slot (ranks step together) drops at most a batch per slot however sizes differ.
        self.slot_pieces = deal(kept, slots, seed)
        fewest = int(kept.sum()) // slots
        self.worker_batches = fewest // batch_size
        if self.worker_batches == 0:
            raise DataError(
                f"batch_size {batch_size}: the smallest share of a worker holds {fewest} labelled samples "
                f"({len(shards)} shards over {slots} workers); lower batch_size or num_workers"
            )

    def batches_per_epoch(self) -> int:
        """Batches of one rank per epoch (every rank and epoch alike)."""
        return self.worker_batches * self.workers

    def _order(self, slot: int) -> tuple[list[Piece], random.Random]:
        """The slot's pieces in this epoch's order, and the buffer's generator."""
        order = list(self.slot_pieces[slot])
        rng = random.Random(f"{self.seed}/{self.epoch}/{slot}")
        rng.shuffle(order)
        return order, rng

    def _replay(self, role: int, yielded: int) -> tuple[list[Piece], _Order]:
        """Worker ``role``'s pieces in this epoch's order, and its buffer after ``yielded`` samples."""
        order, rng = self._order(self.rank * self.workers + role)
        state = _Order(sum(p.hi - p.lo for p in order), self.buffer, rng)
        for _ in range(yielded):
            state.step()
        return order, state

    def _yielded(self, role: int) -> int:
        """Samples worker ``role`` gave in this epoch's first ``start_batch`` batches (they come in turn)."""
        return max(0, -(-(self.start_batch - role) // self.workers)) * self.batch_size

    def cursors(self) -> list[tuple[int, int]]:
        """Per worker, where it reads from at ``start_batch`` of ``epoch``: (piece cursor in this epoch's
        order of its pieces, labelled sample in that piece's shard), the oldest sample still in its buffer."""
        return [self._cursor(role) for role in range(self.workers)]

    def _cursor(self, role: int) -> tuple[int, int]:
        order, state = self._replay(role, self._yielded(role))
        bounds = np.cumsum([0] + [p.hi - p.lo for p in order])
        first = min(state.pending, default=state.next_read)
        cursor = int(np.searchsorted(bounds, first, side="right") - 1)
        return cursor, int(order[cursor].lo + first - bounds[cursor]) if cursor < len(order) else 0

    def _items(self, order: list[Piece], first: int) -> Iterator[tuple[int, TarSample | None, int, int]]:
        """``(stream index, sample or None when the shard lost it, shard, label)`` from stream index ``first``."""
        n = 0
        for piece in order:
            size = piece.hi - piece.lo
            if first - n < size:
                for k, sample, s, label in self._piece_items(piece, max(0, first - n)):
                    yield n + k, sample, s, label
            n += size

    def _piece_items(self, piece: Piece, skip: int) -> Iterator[tuple[int, TarSample | None, int, int]]:
        """``(index in the piece, sample or None, shard, label)`` of ``piece`` from its ``skip``-th sample on."""
        s, path, count = piece.shard, self.shards[piece.shard], int(self.kept[piece.shard])
        unit_labels = None if self.labels is None else self.labels.unit_labels(self.units[s])
        wanted = np.arange(count) if unit_labels is None else np.flatnonzero(unit_labels >= 0)
        listed = count if unit_labels is None else len(unit_labels)  # samples the tar should hold
        k = piece.lo + skip
        samples = iter_tar(path, self.skip_bad, read=True, start=int(wanted[k]))
        for sample in samples:
            if sample.position != wanted[k]:
                continue
            if k + 1 == count:  # checked before the shard's last sample: an epoch may end on it
                self._check_no_more(path, samples, listed)
            own = -1 if sample.label is None else sample.label
            yield k - piece.lo, sample, s, own if unit_labels is None else int(unit_labels[sample.position])
            k += 1
            if k == piece.hi:
                break
        if k < piece.hi and not self.skip_bad:
            raise DataError(
                f"webdataset shard {path} ends at sample {int(wanted[k])}, before the "
                f"{int(wanted[-1]) + 1} the shard table lists: the features were made from other shards"
            )
        for lost in range(k, piece.hi):  # samples a damaged shard lost (skip_bad): ignored rows
            yield lost - piece.lo, None, s, -1

    def _check_no_more(self, path: str, samples: Iterator[TarSample], listed: int) -> None:
        """Raise :class:`DataError` when ``samples`` (the rest of ``path``'s walk) hold a position past
        ``listed``: the tar grew since its table was written. Reads only the samples left in the tar."""
        if any(sample.position >= listed for sample in samples):
            held = int(ShardTable.scan([path]).samples[0])  # headers only, and only on the way to the error
            raise DataError(
                f"webdataset shard {path} holds {held} samples but the shard table lists {listed}: "
                "the features were made from other shards"
            )

    def _decode(self, sample: TarSample | None, s: int, label: int) -> tuple[torch.Tensor, int, int, bool]:
        key = s * 2**32 + (sample.position if sample else 0)
        try:
            if sample is None or sample.error:
                raise DataError(sample.error if sample else f"a sample of {self.shards[s]} is missing")
            image, ok = decode_image(sample.data, sample.key, self.shards[s]), True
        except DataError:
            if not self.skip_bad:
                raise
            image, ok = Image.new("RGB", (32, 32)), False
        tensor = seeded_transform(self.transform, image, self.seed, self.epoch, key)
        return tensor, label if ok else -1, key, ok

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int, bool]]:
        info = torch.utils.data.get_worker_info()
        # The loader takes batches from its workers in turn, starting with worker 0: after
        # start_batch batches, worker 0 plays the role whose turn comes next.
        role = ((0 if info is None else info.id) + self.start_batch) % self.workers
        yielded = self._yielded(role)
        order, state = self._replay(role, yielded)
        first = min(state.pending, default=state.next_read)
        frontier, buffered = state.next_read, set(state.pending)
        held: dict[int, tuple[TarSample | None, int, int]] = {}
        items = self._items(order, first)
        for _ in range(self.worker_batches * self.batch_size - yielded):
            n = state.step()
            while n not in held:
                index, sample, s, label = next(items)
                if index >= frontier or index in buffered:  # the rest was yielded before the resume
                    held[index] = (sample, s, label)
            yield self._decode(*held.pop(n))
