"""Step 1: CLIP features of every sample, as ``.npy`` shards plus an id index (resumable by shard).

``joint`` = L2-normalised mean of the L2-normalised image and text embeddings; ``image`` / ``text``
use one tower; ``auto`` (the default) is ``joint`` when every sample has a caption, else ``image``.
``model: pixels`` gives raw-pixel features instead (an honest baseline, no network; mode ``image``).

Output folder::

    meta.json            what produced the features (checked on resume; mismatch -> error)
    shard_00000.npy      [n_i, D] float16/float32, rows L2-normalised
    shard_00000.ids.txt  the n_i sample ids of those rows (missing/corrupt samples skipped with skip_bad)
    shard_00000.src.npy  [n_i] int64 source index of those rows
    ...
    shards.json          the shard table: per input unit (tar shard; a folder or list is one), its
                         samples and the feature rows it starts at and fills (see unicom.stream)
    positions.npy        [N] int32 position of every row inside its unit
    ids.txt, index.json  written last: all ids in row order; shard list, dim, counts

Rows follow the source order, so they come unit by unit: the labels k-means writes in row order
join back to samples by (unit, position), ids stay for looking images up.

A shard is done when its ``.npy`` exists (written atomically after its ids), so a rerun skips it.
Under ``torchrun`` rank r computes shards r, r + W, ...; rank 0 writes the index.

A rerun with other settings (see ``meta.json``) is refused unless ``--overwrite``, which first
deletes the old ``index.json``, ``ids.txt`` and shards, then writes the new ``meta.json``: a run
killed part-way leaves no index (readers refuse the folder) and a rerun with the new settings
resumes it. A folder without any shard (a run that failed before its first one) holds nothing
to protect: a rerun with other settings takes it over.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import atomic, config, dist
from .data import DataError, ImageDataset, Source, open_source
from .model import eval_transform, load_clip, pixel_transform
from .stream import POSITIONS_FILE, TABLE_FILE, ShardTable

MODES = ("auto", "joint", "image", "text")
CAPTION_MODES = ("joint", "text")


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
    shard_size: int = field(default=100_000, metadata={"help": "samples per output shard"})
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


def resolve_mode(cfg: FeaturesConfig, source: Source, quiet: bool = False) -> str:
    """The mode to run: ``auto`` resolved from the captions; a caption mode the source cannot feed is an
    error now, before any model is loaded (a sample without caption would otherwise stop the run later)."""
    if cfg.model == "pixels":
        return "image"
    missing = [r.id for r in source.records if not r.caption]
    if cfg.mode == "auto":
        if not missing:
            return "joint"
        if not quiet:
            print(
                f"features: mode=image: no captions for {len(missing)} of the {len(source)} samples "
                "(mode=joint needs a caption for every sample)",
                file=sys.stderr,
            )
        return "image"
    if cfg.mode in CAPTION_MODES and len(missing) == len(source):
        raise config.ConfigError(
            f"mode={cfg.mode} needs captions, but {source.description} has none; use --mode image (or auto)"
        )
    if cfg.mode in CAPTION_MODES and missing and not cfg.skip_bad:
        raise config.ConfigError(
            f"mode={cfg.mode} needs captions, but {len(missing)} of the {len(source)} samples of {source.description} "
            f"have none (e.g. {missing[0]!r}); --skip-bad skips them, --mode image ignores captions"
        )
    return cfg.mode


def _fingerprint(cfg: FeaturesConfig, source: Source) -> dict:
    keep = (
        "data",
        "data_format",
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
    meta["num_samples"] = len(source)
    meta["random_init"] = cfg.model != "pixels" and not cfg.pretrained
    meta["layout"] = 2  # shard table + source rows; folders of the id-only layout are recomputed
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
            self.model, self.tokenizer, size = load_clip(cfg.model, cfg.pretrained, cfg.model_config, device)
            self.transform = eval_transform(size)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor | None, captions: list[str] | None) -> torch.Tensor:
        if self.model is None:
            assert images is not None
            return F.normalize(images.flatten(1).float(), dim=1)
        use_amp = self.device.type == "cuda"
        parts = []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            if images is not None:
                parts.append(F.normalize(self.model.encode_image(images.to(self.device)).float(), dim=1))
            if captions is not None:
                tokens = self.tokenizer(captions).to(self.device)
                parts.append(F.normalize(self.model.encode_text(tokens).float(), dim=1))
        return F.normalize(torch.stack(parts).mean(0), dim=1).cpu()


def shard_paths(output_dir: str | Path, shard: int) -> tuple[Path, Path, Path]:
    """``(features .npy, ids .txt, source indices .npy)`` paths of shard number ``shard``."""
    base = Path(output_dir) / f"shard_{shard:05d}"
    return base.with_suffix(".npy"), Path(f"{base}.ids.txt"), Path(f"{base}.src.npy")


def shard_table(source: Source, rows: np.ndarray) -> tuple[ShardTable, np.ndarray]:
    """The table of ``source``'s units for feature rows holding the sorted source indices ``rows`` [N] int64,
    and ``[N]`` int32 positions of the rows inside their units."""
    names = [name for name, _ in source.units]
    samples = np.array([n for _, n in source.units], np.int64)
    bounds = np.concatenate([[0], np.cumsum(samples)])
    unit = np.searchsorted(bounds, rows, side="right") - 1
    start = np.searchsorted(unit, np.arange(len(names)))
    counts = np.bincount(unit, minlength=len(names)).astype(np.int64)
    return ShardTable(names, samples, start.astype(np.int64), counts), (rows - bounds[unit]).astype(np.int32)


def _captions(source: Source, indices: list[int]) -> tuple[list[int], list[str]]:
    """The ``indices`` of samples with a caption, and their captions; :func:`resolve_mode` has made sure
    that any others are to be skipped."""
    keep = [i for i in indices if source.records[i].caption]
    return keep, [source.records[i].caption for i in keep]


def _extract_shard(
    cfg: FeaturesConfig, source: Source, encoder: _Encoder, start: int, end: int, bar: tqdm
) -> tuple[np.ndarray, list[int]]:
    """Features ``[n, D]`` of the samples ``[start, end)`` that could be read, and their source indices."""
    needs_image = cfg.mode in ("joint", "image")
    needs_text = cfg.mode in ("joint", "text")
    feats, kept = [], []
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
                    images, idx_ok = images[mask], idx_text
            if idx_ok:
                feats.append(encoder(images, texts))
                kept.extend(idx_ok)
            bar.update(len(idx))
    else:
        for b in range(start, end, cfg.batch_size):
            batch = list(range(b, min(b + cfg.batch_size, end)))
            idx_ok, texts = _captions(source, batch)
            if idx_ok:
                feats.append(encoder(None, texts))
                kept.extend(idx_ok)
            bar.update(len(batch))
    dim = feats[0].shape[1] if feats else 0
    array = torch.cat(feats).numpy() if feats else np.zeros((0, dim), np.float32)
    return array.astype(cfg.dtype), kept


def extract(cfg: FeaturesConfig, quiet: bool = False) -> dict:
    """Run the features step; returns the index dict (also written to ``index.json``)."""
    info = dist.setup(cfg.device, timeout_hours=24)
    source = open_source(cfg.data, cfg.data_format, cfg.data_root, skip_bad=cfg.skip_bad)
    cfg = replace(cfg, mode=resolve_mode(cfg, source, quiet or not info.is_main))
    out = Path(cfg.output_dir)
    meta = _fingerprint(cfg, source)
    meta_path = out / "meta.json"
    if info.is_main:
        if meta_path.is_file():
            old = json.loads(meta_path.read_text())
            if old != meta:
                if not cfg.overwrite and any(out.glob("shard_*.npy")):
                    diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                    raise config.ConfigError(
                        f"{out} holds features made with different settings ({diff}); "
                        "use another output_dir or --overwrite"
                    )
                # The index goes first: until the new one is written, no reader takes the folder as complete.
                for p in [out / "index.json", out / "ids.txt", out / TABLE_FILE, out / POSITIONS_FILE,
                          *out.glob("shard_*")]:  # fmt: skip
                    p.unlink(missing_ok=True)
        atomic.write_json(meta_path, meta)
    dist.barrier()
    num_shards = -(-len(source) // cfg.shard_size)
    mine = [s for s in range(num_shards) if s % info.world_size == info.rank]
    todo = [s for s in mine if not shard_paths(out, s)[0].is_file()]
    if info.is_main and not quiet:
        origin = "raw pixels" if cfg.model == "pixels" else f"open_clip {cfg.model}"
        weights = (
            "" if cfg.model == "pixels" else f", weights: {cfg.pretrained or 'RANDOM INIT (no pretrained weights)'}"
        )
        print(
            f"features: {len(source)} samples from {source.description}; {origin}{weights}; mode={cfg.mode}; "
            f"{num_shards} shard(s), {sum(shard_paths(out, s)[0].is_file() for s in range(num_shards))} already done",
            file=sys.stderr,
        )
    if todo:
        encoder = _Encoder(cfg, info.device)
        total = sum(min(cfg.shard_size, len(source) - s * cfg.shard_size) for s in todo)
        with tqdm(total=total, desc="features", unit="img", disable=quiet or not info.is_main) as bar:
            for s in todo:
                start, end = s * cfg.shard_size, min((s + 1) * cfg.shard_size, len(source))
                array, kept = _extract_shard(cfg, source, encoder, start, end, bar)
                npy, ids_path, src_path = shard_paths(out, s)
                atomic.write_text(ids_path, "".join(source.records[i].id + "\n" for i in kept))
                atomic.save_npy(src_path, np.array(kept, np.int64))
                atomic.save_npy(npy, array)
    dist.barrier()
    index: dict = {}
    if info.is_main:
        shards, all_ids, sources, dim = [], [], [], 0
        for s in range(num_shards):
            npy, ids_path, src_path = shard_paths(out, s)
            sources.append(np.load(src_path))
            ids = ids_path.read_text(encoding="utf-8").splitlines()
            arr = np.load(npy, mmap_mode="r")
            if arr.shape[0] != len(ids):
                raise DataError(f"{npy} has {arr.shape[0]} rows but {ids_path} lists {len(ids)} ids")
            dim = dim or (arr.shape[1] if arr.shape[0] else 0)
            shards.append({"file": npy.name, "ids": ids_path.name, "rows": len(ids)})
            all_ids.extend(ids)
        table, positions = shard_table(source, np.concatenate(sources))
        atomic.save_npy(out / POSITIONS_FILE, positions)
        table.save(out)
        index = {**meta, "dim": int(dim), "rows": len(all_ids), "skipped": len(source) - len(all_ids), "shards": shards}
        atomic.write_text(out / "ids.txt", "".join(i + "\n" for i in all_ids))
        atomic.write_json(out / "index.json", index)
        if not quiet:
            print(
                f"features: wrote {len(all_ids)} x {dim} {cfg.dtype} to {out} ({index['skipped']} skipped)",
                file=sys.stderr,
            )
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
        self.index = json.loads(index_path.read_text())
        self.shards = [np.load(self.path / s["file"], mmap_mode="r") for s in self.index["shards"]]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.dim = int(self.index["dim"])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def ids(self) -> list[str]:
        """Sample ids in row order."""
        return (self.path / "ids.txt").read_text(encoding="utf-8").splitlines()

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
