"""Step 2: faiss spherical k-means on (a sample of) the features, then exact assignment of every point.

Output folder::

    labels.npy       [N] int64 pseudo-label per feature row, contiguous 0..K'-1; -1 = dropped (tiny cluster)
    ids.txt          the N sample ids (row order of the features), to join labels back to images
    centroids.npy    [K', D] float32 unit centroids of the kept clusters, in label order
    sizes.csv        label, size (kept clusters)
    summary.json     K, K', points kept / dropped, size statistics and a log-scale size histogram

faiss uses the GPUs it sees (``faiss.get_num_gpus() > 0``; all of them for training, the local
one per rank for assignment), the CPU otherwise. Under ``torchrun`` rank 0 trains, then every
rank assigns a contiguous block of rows and rank 0 joins the blocks.

Refused before k-means: ``0 < train_size < num_clusters``, fewer feature rows than
``num_clusters`` or than ``min_cluster_size``, and NaN/inf in the rows k-means trains on (the
message names the shard and row; other rows are checked when the assignment reads them). After
assignment, a ``min_cluster_size`` that drops every cluster is an error too, naming what to lower.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import atomic, config, dist
from .features import FeatureStore


@dataclass
class ClusterConfig:
    """Options of ``unicom-cluster``."""

    features_dir: str = field(default="", metadata={"help": "output folder of unicom-features"})
    output_dir: str = field(default="", metadata={"help": "folder for labels, centroids and the summary"})
    num_clusters: int = field(default=1000, metadata={"help": "K, the number of k-means clusters"})
    train_size: int = field(default=0, metadata={"help": "rows sampled to train k-means (0 = all)"})
    niter: int = field(default=20, metadata={"help": "k-means iterations"})
    nredo: int = field(default=1, metadata={"help": "k-means restarts (the best objective is kept)"})
    seed: int = field(default=0, metadata={"help": "seed of the sample and of k-means"})
    min_cluster_size: int = field(default=1, metadata={"help": "clusters with fewer points are dropped (label -1)"})
    assign_batch: int = field(default=65536, metadata={"help": "rows per assignment search"})
    use_gpu: bool = field(default=True, metadata={"help": "use faiss GPUs when faiss sees any"})
    device: str = field(default="auto", metadata={"help": "torch.distributed device: auto | cpu | cuda"})

    def validate(self) -> None:
        config.required("features_dir", self.features_dir)
        config.required("output_dir", self.output_dir)
        config.writable_location("output_dir", self.output_dir)
        for name in ("num_clusters", "niter", "nredo", "min_cluster_size", "assign_batch"):
            config.positive(name, getattr(self, name))
        config.positive("train_size", self.train_size, allow_zero=True)
        if 0 < self.train_size < self.num_clusters:
            raise config.ConfigError(
                f"'train_size' {self.train_size} is below num_clusters={self.num_clusters}: k-means needs at least "
                "one training point per cluster (set train_size >= num_clusters, or 0 for every row)"
            )


def _gpus(use_gpu: bool) -> int:
    import faiss

    return faiss.get_num_gpus() if use_gpu and hasattr(faiss, "get_num_gpus") else 0


def train_kmeans(
    x: np.ndarray, num_clusters: int, niter: int = 20, nredo: int = 1, seed: int = 0, use_gpu: bool = True
) -> np.ndarray:
    """Spherical k-means: ``x [n, d]`` float32 (rows L2-normalised) -> ``[K, d]`` float32 unit centroids."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) < num_clusters:
        raise ValueError(f"num_clusters={num_clusters} exceeds the {len(x)} training points")
    kmeans = faiss.Kmeans(
        x.shape[1],
        num_clusters,
        niter=niter,
        nredo=nredo,
        spherical=True,
        seed=seed,
        max_points_per_centroid=max(256, -(-len(x) // num_clusters)),
        gpu=_gpus(use_gpu) or False,
        verbose=False,
    )
    kmeans.train(x)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


class Assigner:
    """Exact nearest-centroid search by inner product (faiss ``IndexFlatIP``; on a GPU when present)."""

    def __init__(self, centroids: np.ndarray, use_gpu: bool = True, gpu_id: int = 0) -> None:
        import faiss

        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        index = faiss.IndexFlatIP(centroids.shape[1])
        index.add(centroids)
        if _gpus(use_gpu):
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, gpu_id % faiss.get_num_gpus(), index)
        self.index = index

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x [n, d]`` -> (labels ``[n]`` int64, cosine to the centroid ``[n]`` float32)."""
        scores, labels = self.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
        return labels[:, 0].astype(np.int64), scores[:, 0]


def assign_rows(store: FeatureStore, assigner: Assigner, start: int, end: int, batch: int) -> np.ndarray:
    """Labels ``[end - start]`` int64 of feature rows ``[start, end)``, searched ``batch`` rows at a time."""
    parts = [assigner(store.rows(a, min(a + batch, end)))[0] for a in range(start, end, batch)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def rank_block(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[start, end)`` rows of ``n`` that ``rank`` assigns (sizes differ by at most one)."""
    base, extra = divmod(n, world_size)
    start = base * rank + min(rank, extra)
    return start, start + base + (rank < extra)


def drop_small(labels: np.ndarray, num_clusters: int, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Relabel to contiguous ids, dropping clusters with fewer than ``min_size`` points (label -1).

    Returns (new labels ``[N]`` int64, kept old cluster ids ``[K']`` int64 in new-label order).
    """
    sizes = np.bincount(labels, minlength=num_clusters)
    kept = np.flatnonzero(sizes >= min_size)
    remap = np.full(num_clusters, -1, np.int64)
    remap[kept] = np.arange(len(kept))
    return remap[labels], kept


def size_summary(sizes: np.ndarray) -> dict:
    """Statistics and a power-of-two histogram of cluster sizes ``[K']``."""
    if len(sizes) == 0:
        return {"clusters": 0}
    edges = [1 << e for e in range(int(np.log2(max(1, sizes.max()))) + 2)]
    hist = np.histogram(sizes, bins=edges)[0]
    return {
        "clusters": len(sizes),
        "min": int(sizes.min()),
        "median": float(np.median(sizes)),
        "mean": float(sizes.mean()),
        "max": int(sizes.max()),
        "histogram": {f"[{edges[i]},{edges[i + 1]})": int(h) for i, h in enumerate(hist)},
    }


def run(cfg: ClusterConfig, quiet: bool = False) -> dict:
    """Run the clustering step; returns the summary dict (also written to ``summary.json``)."""
    info = dist.setup(cfg.device, timeout_hours=24)
    store = FeatureStore(cfg.features_dir)
    out = Path(cfg.output_dir)
    n = len(store)
    raw_path = out / "centroids_all.npy"
    start_time = time.perf_counter()
    if info.is_main:
        if n < cfg.num_clusters:
            raise config.ConfigError(f"num_clusters={cfg.num_clusters} exceeds the {n} feature rows")
        if cfg.min_cluster_size > n:
            raise config.ConfigError(
                f"min_cluster_size={cfg.min_cluster_size} exceeds the {n} feature rows: every cluster would be dropped"
            )
        rng = np.random.default_rng(cfg.seed)
        if cfg.train_size and cfg.train_size < n:
            sample = store.take(np.sort(rng.choice(n, cfg.train_size, replace=False)))
        else:
            sample = store.rows()
        if not quiet:
            where = f"{_gpus(cfg.use_gpu)} GPU(s)" if _gpus(cfg.use_gpu) else "CPU"
            print(f"cluster: k-means K={cfg.num_clusters} on {len(sample)} of {n} points ({where})", file=sys.stderr)
        centroids = train_kmeans(sample, cfg.num_clusters, cfg.niter, cfg.nredo, cfg.seed, cfg.use_gpu)
        atomic.save_npy(raw_path, centroids)
    dist.barrier()
    centroids = np.load(raw_path)
    assigner = Assigner(centroids, cfg.use_gpu, info.local_rank)
    start, end = rank_block(n, info.rank, info.world_size)
    part = out / f"labels.rank{info.rank:05d}.npy"
    atomic.save_npy(part, assign_rows(store, assigner, start, end, cfg.assign_batch))
    dist.barrier()
    summary: dict = {}
    if info.is_main:
        parts = [out / f"labels.rank{r:05d}.npy" for r in range(info.world_size)]
        labels = np.concatenate([np.load(p) for p in parts])
        for p in parts:
            p.unlink()
        new_labels, kept = drop_small(labels, cfg.num_clusters, cfg.min_cluster_size)
        if len(kept) == 0:
            raise config.ConfigError(
                f"all {cfg.num_clusters} clusters have fewer than min_cluster_size={cfg.min_cluster_size} points "
                f"(the largest has {np.bincount(labels).max()}); lower min_cluster_size or num_clusters"
            )
        sizes = np.bincount(new_labels[new_labels >= 0], minlength=len(kept))
        atomic.save_npy(out / "labels.npy", new_labels)
        atomic.save_npy(out / "centroids.npy", centroids[kept])
        atomic.write_text(out / "ids.txt", "".join(i + "\n" for i in store.ids))
        atomic.write_text(out / "sizes.csv", "label,size\n" + "".join(f"{i},{s}\n" for i, s in enumerate(sizes)))
        summary = {
            "num_clusters": cfg.num_clusters,
            "kept_clusters": len(kept),
            "points": n,
            "dropped_points": int((new_labels < 0).sum()),
            "min_cluster_size": cfg.min_cluster_size,
            "sizes": size_summary(sizes),
            "seconds": round(time.perf_counter() - start_time, 2),
        }
        atomic.write_json(out / "summary.json", summary)
        if not quiet:
            print(
                f"cluster: {len(kept)} of {cfg.num_clusters} clusters kept, "
                f"{summary['dropped_points']} points dropped; sizes min {summary['sizes'].get('min')} "
                f"median {summary['sizes'].get('median')} "
                f"max {summary['sizes'].get('max')} -> {out}",
                file=sys.stderr,
            )
    dist.barrier()
    return summary


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``unicom-cluster``."""
    with config.exit_on_user_error("unicom-cluster"):
        cfg = config.parse(ClusterConfig, "cluster", argv, __doc__.splitlines()[0])
        try:
            run(cfg)
        finally:
            dist.cleanup()


if __name__ == "__main__":
    main()
