"""The whole pipeline on scikit-learn's handwritten digits, on one CPU, in a few minutes.

1. **Data**: the 1,797 8x8 digit scans that ship inside scikit-learn are written out as PNG files
   (``train/`` flat, *without* labels in the path; ``test/<digit>/`` with labels), split by sample
   (stratified) or by class (train on some digits, evaluate on the unseen ones).
2. **Features** of the training images (``unicom.features``). No pretrained CLIP weights can be
   downloaded here, so the default is raw pixels; ``feature_model: tiny-clip`` uses a randomly
   initialised tiny open_clip tower instead. The output says which.
3. **Pseudo-classes**: faiss spherical k-means (``unicom.cluster``).
4. **Training** (``unicom.train``): a tiny open_clip ViT (random init) + head with
   ``DualPartialMarginLoss`` on the pseudo-labels; the digit labels of the training set are never read.
5. **Evaluation** (``unicom.evaluate``) on the held-out images with their real labels: raw pixels,
   the untrained model and the trained model. The table goes to ``results.md`` / ``results.csv``,
   the loss curve to ``loss.png``.

A rerun in the same ``output_dir`` reuses the digits and features; one with another split or
feature model is refused unless ``--overwrite``, which replaces them (two splits never mix).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import atomic, config
from .cluster import ClusterConfig, check_seed
from .cluster import run as run_cluster
from .evaluate import EvaluateConfig, evaluate, format_metrics, markdown_table
from .features import FeaturesConfig, extract
from .train import TrainConfig, plot_loss, train

TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 64, "head_width": 32, "patch_size": 4},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_NAME = "unicom-tiny-vit"


@dataclass
class DemoConfig:
    """Options of ``unicom-demo``."""

    output_dir: str = field(default="runs/demo", metadata={"help": "folder for data, features, model, results"})
    split: str = field(default="sample", metadata={"help": "sample (stratified) | class (disjoint digits)"})
    test_fraction: float = field(default=0.3, metadata={"help": "held-out share (split=sample)"})
    test_classes: list[int] = field(default_factory=lambda: [5, 6, 7, 8, 9], metadata={"help": "held-out digits"})
    feature_model: str = field(default="pixels", metadata={"help": "pixels | tiny-clip (random init)"})
    num_clusters: int = field(default=40, metadata={"help": "k-means pseudo-classes"})
    embedding_dim: int = field(default=128, metadata={"help": "embedding dim"})
    steps: int = field(default=800, metadata={"help": "training steps"})
    batch_size: int = field(default=128, metadata={"help": "training batch"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    class_sample_rate: float = field(default=0.5, metadata={"help": "share of pseudo-classes sampled per step"})
    dim_sample_rate: float = field(default=0.5, metadata={"help": "share of dims kept per step"})
    prototype_optimizer: str = field(default="dense", metadata={"help": "dense AdamW | sparse (sampled rows only)"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers"})
    crop_scale: float = field(default=0.8, metadata={"help": "smallest random-crop area fraction"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (1 is fastest on a busy 2-core machine)"})
    seed: int = field(default=0, metadata={"help": "seed of split, k-means, init and training"})
    overwrite: bool = field(
        default=False, metadata={"help": "replace an earlier demo in output_dir of another split or feature model"}
    )

    def validate(self) -> None:
        config.required("output_dir", self.output_dir)
        config.writable_location("output_dir", self.output_dir)
        config.choice("split", self.split, ("sample", "class"))
        config.choice("feature_model", self.feature_model, ("pixels", "tiny-clip"))
        config.choice("prototype_optimizer", self.prototype_optimizer, ("sparse", "dense"))
        for name in ("num_clusters", "embedding_dim", "steps", "batch_size", "lr", "threads"):
            config.positive(name, getattr(self, name))
        check_seed(self.seed)  # the k-means step takes it as well
        if not 0 < self.test_fraction < 1:
            raise config.ConfigError(f"'test_fraction' must be in (0, 1), got {self.test_fraction}")
        if not all(0 <= c <= 9 for c in self.test_classes):
            raise config.ConfigError(f"'test_classes' must be digits 0..9, got {self.test_classes}")
        if self.split == "class" and not 0 < len(set(self.test_classes)) < 10:
            raise config.ConfigError(
                f"'test_classes' must hold 1 to 9 of the 10 digits with split=class (the others are trained on), "
                f"got {self.test_classes}"
            )


def write_digits(root: Path, cfg: DemoConfig) -> tuple[int, int, bool]:
    """Write the digits as PNGs: ``root/train/NNNN.png`` (unlabelled) and ``root/test/<digit>/NNNN.png``.

    Returns (training images, held-out images, whether they were (re)written). ``root/done.json``
    records the split; digits of another split are refused unless ``cfg.overwrite``, and replaced
    as a whole, so images of two splits never mix.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    labels = digits.target
    rng = np.random.default_rng(cfg.seed)
    if cfg.split == "class":
        is_test = np.isin(labels, cfg.test_classes)
    else:
        is_test = np.zeros(len(labels), bool)
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            is_test[members[: int(round(cfg.test_fraction * len(members)))]] = True
    counts = int((~is_test).sum()), int(is_test.sum())
    done = root / "done.json"
    if cfg.split == "class":
        expected = {"split": cfg.split, "test_classes": sorted(set(cfg.test_classes))}
    else:
        expected = {"split": cfg.split, "test_fraction": cfg.test_fraction, "seed": cfg.seed}
    if done.is_file():
        previous = json.loads(done.read_text())
        if previous == expected:
            return *counts, False
        if not cfg.overwrite:
            raise config.ConfigError(
                f"{root} holds the digits of another split ({previous}, not {expected}); "
                "use another output_dir or --overwrite"
            )
    # Another split, or a run killed while writing: start from an empty folder.
    shutil.rmtree(root, ignore_errors=True)
    for i, (image, label, test) in enumerate(zip(images, labels, is_test, strict=True)):
        path = root / ("test" if test else "train") / (str(label) if test else "") / f"{i:04d}.png"
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="PNG")
        atomic.write_bytes(path, buffer.getvalue())
    atomic.write_json(done, expected)
    return *counts, True


def run(cfg: DemoConfig, progress: bool = True) -> dict:
    """Run the demo; returns ``{"rows": [...], "times": {...}}`` and writes results.md/.csv, loss.png."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DemoConfig, progress: bool) -> dict:
    out = Path(cfg.output_dir)
    times: dict[str, float] = {}
    say = print if progress else (lambda *a, **k: None)

    t = time.perf_counter()
    n_train, n_test, fresh = write_digits(out / "data", cfg)
    if fresh:  # features of earlier images must not be resumed for the new ones
        shutil.rmtree(out / "features", ignore_errors=True)
    times["data"] = time.perf_counter() - t
    split = f"held-out digits {cfg.test_classes}" if cfg.split == "class" else f"{cfg.test_fraction:.0%} of each digit"
    say(f"[1/5] digits: {n_train} training images (labels unused), {n_test} held-out ({split})")

    model_config = out / f"{TINY_NAME}.json"
    atomic.write_json(model_config, TINY_CLIP)
    t = time.perf_counter()
    common = dict(
        data=str(out / "data/train"),
        output_dir=str(out / "features"),
        mode="image",
        shard_size=1000,
        num_workers=cfg.num_workers,
        overwrite=cfg.overwrite,
    )
    if cfg.feature_model == "pixels":
        feat_cfg = FeaturesConfig(model="pixels", dtype="float32", **common)
        what = "raw pixels (16x16), no pretrained CLIP weights available offline"
    else:
        feat_cfg = FeaturesConfig(model=TINY_NAME, model_config=str(model_config), dtype="float16", **common)
        what = "a RANDOMLY INITIALISED tiny open_clip tower (no pretrained weights available offline)"
    extract(feat_cfg, quiet=not progress)
    times["features"] = time.perf_counter() - t
    say(f"[2/5] features of the training images from {what}")

    t = time.perf_counter()
    summary = run_cluster(
        ClusterConfig(
            features_dir=feat_cfg.output_dir,
            output_dir=str(out / "clusters"),
            num_clusters=cfg.num_clusters,
            niter=25,
            seed=cfg.seed,
        ),
        quiet=not progress,
    )
    times["cluster"] = time.perf_counter() - t
    say(
        f"[3/5] k-means: {summary['kept_clusters']} pseudo-classes (sizes {summary['sizes']['min']}.."
        f"{summary['sizes']['max']})"
    )

    t = time.perf_counter()
    train_cfg = TrainConfig(
        data=feat_cfg.data,
        pseudo_labels=str(out / "clusters"),
        output_dir=str(out / "train"),
        overwrite=True,  # the demo retrains on every run
        arch=f"open_clip:{TINY_NAME}",
        model_config=str(model_config),
        embedding_dim=cfg.embedding_dim,
        class_sample_rate=cfg.class_sample_rate,
        dim_sample_rate=cfg.dim_sample_rate,
        prototype_optimizer=cfg.prototype_optimizer,
        batch_size=cfg.batch_size,
        max_steps=cfg.steps,
        lr=cfg.lr,
        warmup_steps=max(1, cfg.steps // 10),
        weight_decay=0.05,
        crop_scale=cfg.crop_scale,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
        log_every=max(1, cfg.steps // 60),
        checkpoint_every=max(cfg.steps // 2, 1),
        progress=progress,
    )
    config.save(train_cfg, out / "train.yaml", "train")
    result = train(train_cfg)
    times["train"] = time.perf_counter() - t
    say(f"[4/5] trained {result['step']} steps in {times['train']:.0f} s, final loss {result['final_loss']:.3f}")

    t = time.perf_counter()
    rows = []
    test = str(out / "data/test")
    for name, extra in (
        ("raw pixels (16x16)", {"method": "pixels"}),
        ("untrained tiny ViT", {"method": "untrained", "checkpoint": str(out / "train")}),
        ("trained tiny ViT", {"method": "checkpoint", "checkpoint": str(out / "train")}),
    ):
        metrics = evaluate(EvaluateConfig(data=test, num_workers=cfg.num_workers, **extra), progress=False)
        rows.append(
            {
                "model": name,
                **{k: metrics[k] for k in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "map@100")},
            }
        )
        say(f"      {name:20s} {format_metrics(metrics)}")
    times["evaluate"] = time.perf_counter() - t
    plot_loss(out / "train", out / "loss.png", "DualPartialMarginLoss on k-means pseudo-labels (digits)")

    table = markdown_table(rows)
    note = (
        f"Held-out: {n_test} images ({split}), leave-one-out retrieval with real labels. "
        f"Training: {n_train} images, {summary['kept_clusters']} k-means pseudo-classes from {what}; "
        f"{cfg.steps} steps; the training labels are never read."
    )
    atomic.write_text(out / "results.md", table + "\n\n" + note + "\n")
    atomic.write_text(
        out / "results.csv",
        ",".join(rows[0]) + "\n" + "".join(",".join(str(v) for v in r.values()) + "\n" for r in rows),
    )
    say(f"[5/5] retrieval on the held-out digits\n\n{table}\n\n{note}")
    say("\ntimes (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    say(f"table: {out / 'results.md'}  loss curve: {out / 'loss.png'}")
    return {"rows": rows, "times": times, "summary": summary}


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``unicom-demo``."""
    with config.exit_on_user_error("unicom-demo"):
        cfg = config.parse(DemoConfig, "demo", argv, __doc__.splitlines()[0])
        start = time.perf_counter()
        run(cfg)
    print(f"total {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
