"""Step 4: embed a labelled set and score retrieval (Recall@K, mAP@R, mAP@100; see :mod:`unicom.metrics`).

``method`` picks the embedding:

- ``checkpoint``: a trained model (``unicom-train`` output folder, ``final.pt`` or a checkpoint);
- ``untrained``: the same architecture with its initial weights (needs ``checkpoint`` for the
  architecture, or ``arch`` / ``embedding_dim`` / ``model_config``) - the "before training" baseline;
- ``pixels``: raw pixels resized to ``pixel_size`` - the "no learning" baseline;
- ``clip``: open_clip image features (``clip_model``, ``pretrained``, ``model_config``);
- ``features``: a ``unicom-features`` folder, joined to the data by position (through its shard table,
  when that lists the data's shards or folder and the ids agree), else by sample id (an id that occurs
  twice in the features or the data is an error: the join would be ambiguous).

Leave-one-out over ``data`` by default; with ``gallery`` set, ``data`` is the query set. When both sets
name their classes (class sub-folders, list files with text labels), gallery labels are matched to the
query's by class name: a gallery class the query set lacks matches no query; with integer labels
(``.cls``, numeric list labels) the numbers are compared. When one set names its classes and the other
numbers them, each name is read as the number it spells (folder ``10`` is label 10, ``007`` is 7), and a
name that is not a number is an error (see :func:`label_maps`). Every source is opened and its labels
are checked before anything is embedded.
With ``output`` set, the metrics go there as JSON and, as a markdown table, beside it (``.md``).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from . import atomic, config, dist
from .data import FORMATS, DataError, ImageDataset, Source, load_npy, open_source
from .features import FeatureStore
from .metrics import retrieval_metrics
from .model import build_model, eval_transform, load_clip, open_clip_input, pixel_transform
from .stream import POSITIONS_FILE, TABLE_FILE, ShardTable

METHODS = ("checkpoint", "untrained", "pixels", "clip", "features")


@dataclass
class EvaluateConfig:
    """Options of ``unicom-evaluate``."""

    data: str = field(default="", metadata={"help": "labelled query set (folder with class sub-folders, list, wds)"})
    data_format: str = field(default="auto", metadata={"help": "auto | folder | list | wds"})
    data_root: str | None = field(default=None, metadata={"help": "base folder for relative paths of a list file"})
    gallery: str | None = field(default=None, metadata={"help": "labelled gallery set; None = leave-one-out"})
    gallery_format: str = field(default="auto", metadata={"help": "auto | folder | list | wds"})
    method: str = field(default="checkpoint", metadata={"help": " | ".join(METHODS)})
    checkpoint: str | None = field(default=None, metadata={"help": "unicom-train output folder or .pt file"})
    arch: str | None = field(default=None, metadata={"help": "architecture for method=untrained without checkpoint"})
    embedding_dim: int = field(default=512, metadata={"help": "head dim for method=untrained without checkpoint"})
    clip_model: str = field(default="ViT-B-32", metadata={"help": "open_clip model for method=clip"})
    pretrained: str | None = field(default=None, metadata={"help": "open_clip tag or local weights file"})
    model_config: str | None = field(default=None, metadata={"help": "JSON of a custom open_clip architecture"})
    features_dir: str | None = field(default=None, metadata={"help": "unicom-features folder for method=features"})
    pixel_size: int = field(default=16, metadata={"help": "side of the resized image for method=pixels"})
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8], metadata={"help": "K values of Recall@K"})
    knn_k: int = field(default=0, metadata={"help": "also report kNN@k classification accuracy (0 = off)"})
    batch_size: int = field(default=256, metadata={"help": "images per forward pass"})
    num_workers: int = field(
        default_factory=config.default_num_workers, metadata={"help": "DataLoader worker processes"}
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    use_gpu: bool = field(default=True, metadata={"help": "faiss search on a GPU when faiss sees one"})
    skip_bad: bool = field(default=False, metadata={"help": "skip (and count) missing/corrupt images"})
    seed: int = field(default=0, metadata={"help": "init seed for method=untrained without checkpoint"})
    output: str | None = field(
        default=None, metadata={"help": "write the metrics as JSON here, and as a markdown table beside it (.md)"}
    )

    def validate(self) -> None:
        config.required("data", self.data)
        config.choice("data_format", self.data_format, FORMATS)
        config.choice("gallery_format", self.gallery_format, FORMATS)
        config.choice("method", self.method, METHODS)
        if self.method == "checkpoint":
            config.required("checkpoint", self.checkpoint)
        if self.method == "untrained" and not (self.checkpoint or self.arch):
            raise config.ConfigError("method=untrained needs 'checkpoint' (for its architecture) or 'arch'")
        if self.method == "features":
            config.required("features_dir", self.features_dir)
        if not self.ks or min(self.ks) < 1:
            raise config.ConfigError(f"'ks' must be positive integers, got {self.ks}")
        config.positive("knn_k", self.knn_k, allow_zero=True)
        config.positive("batch_size", self.batch_size)
        config.positive("num_workers", self.num_workers, allow_zero=True)
        config.positive("pixel_size", self.pixel_size)
        config.positive("embedding_dim", self.embedding_dim)
        config.device("device", self.device)
        if self.output:
            if Path(self.output).is_dir():
                raise config.ConfigError(f"'output' must name a file, but {self.output} is a folder")
            if markdown_path(self.output) == Path(self.output):
                raise config.ConfigError(
                    f"'output' is the JSON file and its markdown table goes beside it as .md: {self.output} is both"
                )
            config.writable_location("output folder", Path(self.output).parent)


@torch.no_grad()
def embed(
    encode: torch.nn.Module | None,
    source: Source,
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    skip_bad: bool = False,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Embed every image: (``[N', D]`` float32 L2-normalised, labels ``[N']`` int64, number skipped).

    ``encode=None`` flattens the transformed pixels. Samples that fail to load are skipped
    (and counted) with ``skip_bad``, else raise :class:`DataError`.
    """
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(
        ImageDataset(source, transform, skip_bad=skip_bad), batch_size=batch_size, num_workers=num_workers
    )
    feats, labels, skipped = [], [], 0
    use_amp = device.type == "cuda"
    for images, batch_labels, _, ok in tqdm(loader, desc="embed", disable=not progress):
        images, batch_labels = images[ok], batch_labels[ok]
        skipped += int((~ok).sum())
        if encode is None:
            out = images.flatten(1)
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = encode(images.to(device))
        feats.append(F.normalize(out.float(), dim=1).cpu())
        labels.append(batch_labels)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy(), skipped


def _open_labelled(path: str, data_format: str, root: str | None, skip_bad: bool, query: bool) -> Source:
    """Open one evaluation set; a query sample without a label is an error (gallery ones match no query).

    Samples found damaged while indexing (``skip_bad``) are skipped when embedding, so need no label."""
    source = open_source(path, data_format, root, skip_bad=skip_bad)
    if query and any(r.label is None and r.error is None for r in source.records):
        raise DataError(f"{source.description} has unlabelled samples; evaluation needs class sub-folders/labels")
    return source


LabelMaps = tuple[np.ndarray | None, np.ndarray | None]

_NUMBER = re.compile(r"[0-9]+")


def label_maps(query: Source, gallery: Source) -> LabelMaps:
    """(query map, gallery map): what each set's labels go through (:func:`_relabel`) so that equal
    labels mean the same class; None leaves that set's labels as they are.

    - both sets name their classes: gallery classes are matched to the query's by name
      (:func:`gallery_label_map`);
    - neither does (integer labels): the numbers are compared as they are;
    - one names them and the other only numbers them: each name is read as the number it spells
      (:func:`names_as_numbers`), so class folder ``10`` matches label 10 and ``007`` matches 7.
      A name that is not a number is a :class:`DataError` naming both sets.

    A set with no label at all (a gallery of loose images) has nothing to match: its images match no query.
    """
    if query.class_names and gallery.class_names:
        return None, gallery_label_map(query, gallery)
    if query.class_names and _numbered(gallery):
        return names_as_numbers(query, ("query", "gallery", gallery)), None
    if gallery.class_names and _numbered(query):
        return None, names_as_numbers(gallery, ("gallery", "query", query))
    return None, None


def _numbered(source: Source) -> bool:
    """True for a source whose labels are plain numbers (no class names) and that labels something."""
    return not source.class_names and any(r.label is not None for r in source.records)


def gallery_label_map(query: Source, gallery: Source) -> np.ndarray:
    """``[gallery classes]`` int64: the query label of each gallery class, matched by class name.

    A gallery class the query set lacks gets a label no query has (a label of its own, so that
    unmatched classes do not pool their kNN votes).
    """
    index = {name: i for i, name in enumerate(query.class_names)}
    unmatched = len(query.class_names)
    return np.array([index.get(n, unmatched + j) for j, n in enumerate(gallery.class_names)], dtype=np.int64)


def names_as_numbers(named: Source, roles: tuple[str, str, Source]) -> np.ndarray:
    """``[classes of named]`` int64: the number each class name spells, to compare with the other set's labels.

    ``roles`` is (role of ``named``, role of the other set, the other set), for the error message.
    A name must be ASCII digits only; its value is ``int(name)``, so leading zeros do not count
    (``007`` is 7, as a list file's label ``007`` is). A name that is not a number, or two names
    of one value (``7`` and ``07``, two classes that would merge), is a :class:`DataError`.
    """
    role, other_role, other = roles
    where = f"{role} {named.description} names its classes and {other_role} {other.description} numbers them"
    bad = next((n for n in named.class_names if not _NUMBER.fullmatch(n)), None)
    if bad is not None:
        raise DataError(
            f"{where}, but class name {bad!r} is not a number, so the classes cannot be matched; "
            "label both sets by class name or both by number"
        )
    numbers = [int(n) for n in named.class_names]
    seen: dict[int, str] = {}
    for name, number in zip(named.class_names, numbers, strict=True):
        if number in seen:
            raise DataError(f"{where}, but class names {seen[number]!r} and {name!r} both read as the number {number}")
        seen[number] = name
    return np.array(numbers, dtype=np.int64)


def _relabel(labels: np.ndarray, mapping: np.ndarray | None) -> np.ndarray:
    """``labels`` through ``mapping`` (see :func:`label_maps`); ``-1`` (no label) stays."""
    if mapping is None:
        return labels
    return np.where(labels >= 0, mapping[np.maximum(labels, 0)], labels)


def _first_duplicate(ids: list[str]) -> str | None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return None


def _rows_by_position(store: FeatureStore, source: Source, ids: list[str]) -> np.ndarray | None:
    """The feature row of each sample joined by (unit, position) through the store's shard table, or None
    when the store has no table (an older layout), or the table does not cover the source's units with
    their sample counts, or an id disagrees. A damaged table or positions file is a :class:`DataError`."""
    positions_path = store.path / POSITIONS_FILE
    if not (store.path / TABLE_FILE).is_file() or not positions_path.is_file():
        return None
    table = ShardTable.load(store.path)
    fix = "recompute the features (unicom-features --overwrite)"
    positions = load_npy(positions_path, fix=fix)
    if positions.shape != (len(ids),) or int(table.rows.sum()) != len(ids):
        raise DataError(
            f"{positions_path} ({positions.shape[0] if positions.ndim else 0} positions) and {TABLE_FILE} "
            f"({int(table.rows.sum())} rows) do not match the {len(ids)} feature rows of {store.path}; {fix}"
        )
    index = {name: u for u, name in enumerate(table.names)}
    if len(index) != len(table.names):
        return None
    rows = np.full(len(source), -1, np.int64)
    offset = 0
    for name, n in source.units:
        u = index.get(name)
        if u is None or int(table.samples[u]) != n:
            return None
        lo, count = int(table.start[u]), int(table.rows[u])
        pos = np.asarray(positions[lo : lo + count], dtype=np.int64)
        if count and (pos.min() < 0 or pos.max() >= n):
            return None
        rows[offset + pos] = np.arange(lo, lo + count)
        offset += n
    source_ids = source.ids
    if any(ids[rows[i]] != source_ids[i] for i in np.flatnonzero(rows >= 0)):
        return None
    return rows


def feature_rows(store: FeatureStore, source: Source) -> np.ndarray:
    """``[len(source)]`` int64: the feature row of each sample, ``-1`` where it has none.

    Joined by position when the store's shard table covers the source (see :func:`_rows_by_position`),
    else by sample id; an id that occurs twice (tar shards reusing keys) is then a :class:`DataError`.
    """
    ids = store.ids
    rows = _rows_by_position(store, source, ids)
    if rows is not None:
        return rows
    for where, dup in (("the features", _first_duplicate(ids)), ("the data", _first_duplicate(source.ids))):
        if dup is not None:
            raise DataError(
                f"sample id {dup!r} occurs more than once in {where}: the features {store.path} cannot be joined to "
                f"{source.description} by id, nor by position (no shard table of theirs lists its shards)"
            )
    position = {i: n for n, i in enumerate(ids)}
    return np.array([position.get(i, -1) for i in source.ids], dtype=np.int64)


def _take_features(store: FeatureStore, source: Source, rows: np.ndarray) -> tuple:
    """(features, labels, samples without a row) of ``source`` joined through ``rows`` (:func:`feature_rows`)."""
    keep = rows >= 0
    wanted = rows[keep]
    order = np.argsort(wanted, kind="stable")
    feats = np.empty((len(wanted), store.dim), np.float32)
    feats[order] = store.take(wanted[order])
    return feats, source.labels()[keep], int((~keep).sum())


def _encoder(cfg: EvaluateConfig, device: torch.device) -> tuple[torch.nn.Module | None, Callable]:
    """The model (None = raw pixels) and transform of ``cfg.method`` (not ``features``)."""
    if cfg.method == "pixels":
        return None, pixel_transform(cfg.pixel_size)
    if cfg.method == "clip":
        clip, _, _ = load_clip(cfg.clip_model, cfg.pretrained, cfg.model_config, device)
        return _ClipImage(clip), eval_transform(*open_clip_input(clip))  # the weights' mean/std
    from .train import load_trained

    if cfg.checkpoint:
        model = load_trained(cfg.checkpoint, device, weights=cfg.method == "checkpoint")
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.arch or "", cfg.embedding_dim, cfg.pretrained, cfg.model_config).to(device).eval()
    return model, eval_transform(model.image_size, model.mean, model.std)


class _ClipImage(torch.nn.Module):
    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images)


def evaluate(cfg: EvaluateConfig, progress: bool = True) -> dict:
    """Run the evaluation; returns the metrics dict (also written to ``output`` when set)."""
    cfg.validate()
    device = dist.resolve_device(cfg.device)
    sources = [_open_labelled(cfg.data, cfg.data_format, cfg.data_root, cfg.skip_bad, query=True)]
    if cfg.gallery:
        sources.append(_open_labelled(cfg.gallery, cfg.gallery_format, None, cfg.skip_bad, query=False))
    # Before embedding: a gallery whose labels cannot be matched is an error, not a wrong score.
    maps = label_maps(*sources) if cfg.gallery else (None, None)
    if cfg.method == "features":
        store = FeatureStore(cfg.features_dir)
        joins = [feature_rows(store, source) for source in sources]
        for source, rows in zip(sources, joins, strict=True):
            if not (rows >= 0).any():
                raise DataError(f"no sample id of {source.description} is in the features {cfg.features_dir}")
        embedded = [_take_features(store, s, rows) for s, rows in zip(sources, joins, strict=True)]
    else:
        encoder, transform = _encoder(cfg, device)
        embedded = [
            embed(encoder, s, transform, cfg.batch_size, cfg.num_workers, device, cfg.skip_bad, progress)
            for s in sources
        ]
    q, ql, skipped = embedded[0]
    ql = _relabel(ql, maps[0])
    g = gl = None
    if cfg.gallery:
        g, gl, g_skipped = embedded[1]
        gl = _relabel(gl, maps[1])
        skipped += g_skipped
    result = retrieval_metrics(q, ql, g, gl, ks=cfg.ks, use_gpu=cfg.use_gpu, knn_k=cfg.knn_k)
    result.update(
        {
            "method": cfg.method,
            "protocol": "query-gallery" if cfg.gallery else "leave-one-out",
            "skipped": skipped,
            "dim": int(q.shape[1]),
        }
    )
    if cfg.output:
        atomic.write_json(cfg.output, result)
        row = {"method": cfg.method, "protocol": result["protocol"]}
        row.update({k: v for k, v in result.items() if k.startswith(("recall@", "map@", "knn@"))})
        row.update({"queries": result["queries"], "skipped": skipped})
        atomic.write_text(markdown_path(cfg.output), markdown_table([row]) + "\n")
    return result


def markdown_path(output: str | Path) -> Path:
    """The markdown table written beside the JSON file ``output``."""
    return Path(output).with_suffix(".md")


def markdown_table(rows: list[dict]) -> str:
    """Rows of equal keys as a markdown table: metric keys get their usual names, floats 3 decimals."""
    names = {"map@r": "mAP@R", "map@100": "mAP@100"}

    def title(key: str) -> str:
        kind, at, k = key.partition("@")
        return names.get(key) or ({"recall": "Recall", "knn": "kNN"}.get(kind, kind) + at + k)

    def cell(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(title(k) for k in rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell(v) for v in row.values()) + " |" for row in rows]
    return "\n".join(lines)


def format_metrics(result: dict) -> str:
    """One line: ``R@1 0.912  R@2 ...  mAP@R 0.501  mAP@100 0.634``."""
    recalls = "  ".join(f"R@{k.split('@')[1]} {v:.3f}" for k, v in result.items() if k.startswith("recall@"))
    knn = "".join(f"  kNN@{k.split('@')[1]} {v:.3f}" for k, v in result.items() if k.startswith("knn@"))
    return (
        f"{recalls}  mAP@R {result['map@r']:.3f}  mAP@100 {result['map@100']:.3f}{knn}  ({result['queries']} queries)"
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``unicom-evaluate``."""
    with config.exit_on_user_error("unicom-evaluate"):
        cfg = config.parse(EvaluateConfig, "evaluate", argv, __doc__.splitlines()[0])
        result = evaluate(cfg)
    print(f"{cfg.method}: {format_metrics(result)}")
    if result["queries_without_relevant"]:
        print(
            f"({result['queries_without_relevant']} queries without a relevant item were not scored)", file=sys.stderr
        )
    if cfg.output:
        print(f"metrics written to {Path(cfg.output)} and {markdown_path(cfg.output)}", file=sys.stderr)


if __name__ == "__main__":
    main()
