"""Step 4: embed a labelled set and score retrieval (Recall@K, mAP@R, mAP@100; see :mod:`unicom.metrics`).

``method`` picks the embedding:

- ``checkpoint``: a trained model (``unicom-train`` output folder, ``final.pt`` or a checkpoint);
- ``untrained``: the same architecture with its initial weights (needs ``checkpoint`` for the
  architecture, or ``arch`` / ``embedding_dim`` / ``model_config``) - the "before training" baseline;
- ``pixels``: raw pixels resized to ``pixel_size`` - the "no learning" baseline;
- ``clip``: open_clip image features (``clip_model``, ``pretrained``, ``model_config``);
- ``features``: a ``unicom-features`` folder, joined to the data by sample id.

Leave-one-out over ``data`` by default; with ``gallery`` set, ``data`` is the query set.
With ``output`` set, the metrics go there as JSON and, as a markdown table, beside it (``.md``).
"""

from __future__ import annotations

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
from .data import DataError, ImageDataset, Source, open_source
from .features import FeatureStore
from .metrics import retrieval_metrics
from .model import build_model, eval_transform, load_clip, pixel_transform

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
        config.choice("method", self.method, METHODS)
        if self.method == "checkpoint":
            config.required("checkpoint", self.checkpoint)
        if self.method == "untrained" and not (self.checkpoint or self.arch):
            raise config.ConfigError("method=untrained needs 'checkpoint' (for its architecture) or 'arch'")
        if self.method == "features":
            config.required("features_dir", self.features_dir)
        if not self.ks or min(self.ks) < 1:
            raise config.ConfigError(f"'ks' must be positive integers, got {self.ks}")
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


def _embed_source(cfg: EvaluateConfig, source: Source, device: torch.device, progress: bool) -> tuple:
    if cfg.method == "features":
        store = FeatureStore(cfg.features_dir)
        position = {i: n for n, i in enumerate(store.ids)}
        rows = [position.get(i, -1) for i in source.ids]
        keep = np.array([r >= 0 for r in rows])
        if not keep.any():
            raise DataError(f"no sample id of {source.description} is in the features {cfg.features_dir}")
        feats = store.take(np.array([r for r in rows if r >= 0], dtype=np.int64))
        return feats, source.labels()[keep], int((~keep).sum())
    if cfg.method == "pixels":
        transform = pixel_transform(cfg.pixel_size)
        return embed(None, source, transform, cfg.batch_size, cfg.num_workers, device, cfg.skip_bad, progress)
    if cfg.method == "clip":
        clip, _, size = load_clip(cfg.clip_model, cfg.pretrained, cfg.model_config, device)
        encoder = _ClipImage(clip)
        return embed(
            encoder, source, eval_transform(size), cfg.batch_size, cfg.num_workers, device, cfg.skip_bad, progress
        )
    from .train import load_trained

    if cfg.checkpoint:
        model = load_trained(cfg.checkpoint, device, weights=cfg.method == "checkpoint")
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.arch or "", cfg.embedding_dim, cfg.pretrained, cfg.model_config).to(device).eval()
    transform = eval_transform(model.image_size, model.mean, model.std)
    return embed(model, source, transform, cfg.batch_size, cfg.num_workers, device, cfg.skip_bad, progress)


class _ClipImage(torch.nn.Module):
    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images)


def evaluate(cfg: EvaluateConfig, progress: bool = True) -> dict:
    """Run the evaluation; returns the metrics dict (also written to ``output`` when set)."""
    device = dist.resolve_device(cfg.device)
    query_source = open_source(cfg.data, cfg.data_format, cfg.data_root, skip_bad=cfg.skip_bad)
    q, ql, skipped = _embed_source(cfg, query_source, device, progress)
    if (ql < 0).any():
        raise DataError(f"{query_source.description} has unlabelled samples; evaluation needs class sub-folders/labels")
    g = gl = None
    if cfg.gallery:
        gallery_source = open_source(cfg.gallery, cfg.gallery_format, skip_bad=cfg.skip_bad)
        g, gl, g_skipped = _embed_source(cfg, gallery_source, device, progress)
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
