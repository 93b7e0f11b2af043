"""Step 2: faiss spherical k-means on a sample of the features, then assignment of every point.

Output folder::

    labels.npy       [N] int32 pseudo-label per feature row, contiguous 0..K'-1; -1 = dropped (a tiny
                     cluster, or an all-zero feature row, which has no nearest centroid)
    ids.txt          the N sample ids (row order of the features), to join labels back to images
    centroids.npy    [K', D] float32 unit centroids of the kept clusters, in label order
    centroids_all.npy  [K, D] float32 all k-means centroids (before dropping tiny clusters)
    sizes.csv        label, size (kept clusters)
    summary.json     num_classes (= K', what training uses), K, points kept / dropped (zero rows among them),
                     size statistics and a
                     log-scale size histogram, k-means and assignment timings, approximate-assignment agreement

Memory: the k-means sample is drawn shard by shard from the memory-mapped feature shards
(stratified: each shard gives its share of ``train_size`` rows, picked uniformly with the seed),
and the assignment streams row blocks that never cross a shard, so a run holds the sample, one
block of rows and the labels (4 bytes a row), never the whole feature matrix.

faiss uses the GPUs it sees (``faiss.get_num_gpus() > 0``): all of them for training; for the
assignment, a single process splits the centroids across all GPUs (``IndexShards``), a rank of
``torchrun`` searches all centroids on its local GPU. Under ``torchrun`` rank 0 trains, then every
rank assigns a contiguous block of rows and rank 0 joins the blocks. ``assign_index: ivf | hnsw``
searches the centroids approximately on the CPU instead, and measures how often it agrees with the
exact search on an independent sample of ``agreement_rows`` rows (logged and in ``summary.json``).

Refused before k-means: ``0 < train_size < num_clusters``, fewer feature rows than
``num_clusters`` or than ``min_cluster_size``, and NaN/inf in the rows k-means trains on (the
message names the shard and row; other rows are checked when the assignment reads them). An
all-zero row (the pixel features of a blank image) has no direction: k-means leaves it out of its
sample and the assignment labels it -1, where an inner-product search would tie it to centroid 0.
After assignment, a ``min_cluster_size`` that drops every cluster is an error too, naming what to
lower. A rerun into the same folder removes the old ``labels.npy``, ``centroids.npy`` and
``summary.json`` before writing the new ones, so an interrupted rerun never leaves the files of two runs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from . import atomic, config, dist
from .features import FeatureStore

ASSIGN_INDEXES = ("exact", "ivf", "hnsw")
HNSW_M = 32  # graph degree of the HNSW index over the centroids (faiss' usual default)
INT32_MAX = np.iinfo(np.int32).max
SEED_MAX = INT32_MAX  # faiss keeps the k-means seed in a C int; numpy's generators take no negative seed


def check_seed(seed: int) -> None:
    """Raise :class:`ConfigError` unless ``seed`` is one faiss's k-means takes (its seed is a C int)."""
    if not 0 <= seed <= SEED_MAX:
        raise config.ConfigError(f"'seed' must be in [0, {SEED_MAX}] (faiss' k-means seed is a C int), got {seed}")


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
    assign_index: str = field(
        default="exact", metadata={"help": "centroid search: exact | ivf | hnsw (approximate, CPU, agreement measured)"}
    )
    nprobe: int = field(default=16, metadata={"help": "assign_index=ivf: inverted lists searched per row"})
    ef_search: int = field(default=32, metadata={"help": "assign_index=hnsw: search breadth (efSearch)"})
    agreement_rows: int = field(
        default=10000, metadata={"help": "rows sampled to measure approximate-vs-exact agreement (0 = skip)"}
    )
    use_gpu: bool = field(default=True, metadata={"help": "use faiss GPUs when faiss sees any"})
    device: str = field(default="auto", metadata={"help": "torch.distributed device: auto | cpu | cuda"})

    def validate(self) -> None:
        config.required("features_dir", self.features_dir)
        config.required("output_dir", self.output_dir)
        config.writable_location("output_dir", self.output_dir)
        config.choice("assign_index", self.assign_index, ASSIGN_INDEXES)
        for name in ("num_clusters", "niter", "nredo", "min_cluster_size", "assign_batch", "nprobe", "ef_search"):
            config.positive(name, getattr(self, name))
        config.positive("train_size", self.train_size, allow_zero=True)
        config.positive("agreement_rows", self.agreement_rows, allow_zero=True)
        check_seed(self.seed)
        if self.num_clusters > INT32_MAX:
            raise config.ConfigError(f"'num_clusters' {self.num_clusters} exceeds {INT32_MAX}: labels are int32")
        if 0 < self.train_size < self.num_clusters:
            raise config.ConfigError(
                f"'train_size' {self.train_size} is below num_clusters={self.num_clusters}: k-means needs at least "
                "one training point per cluster (set train_size >= num_clusters, or 0 for every row)"
            )


def _gpus(use_gpu: bool) -> int:
    import faiss

    return faiss.get_num_gpus() if use_gpu and hasattr(faiss, "get_num_gpus") else 0


# ----------------------------------------------------------------------------- the k-means sample


def sample_indices(shard_rows: Sequence[int], size: int, seed: int | Sequence[int]) -> list[np.ndarray]:
    """Per shard, the sorted local row indices of a stratified sample of ``size`` of all the rows.

    Shard ``s`` gives ``floor(size * C[s+1] / n) - floor(size * C[s] / n)`` rows (``C`` = cumulative
    rows, ``n`` = all rows), picked uniformly without replacement: the draw needs one shard's worth
    of memory, and depends only on the seed and the shard sizes.
    """
    n = sum(int(r) for r in shard_rows)
    if not 0 <= size <= n:
        raise ValueError(f"'size' must be in [0, {n}] (the rows of the shards), got {size}")
    rng = np.random.default_rng(seed)
    picks, before = [], 0
    for rows in shard_rows:
        count = size * (before + int(rows)) // n - size * before // n  # Python ints: no overflow
        picks.append(np.sort(rng.choice(int(rows), count, replace=False)))
        before += int(rows)
    return picks


def draw_sample(store: FeatureStore, size: int, seed: int | Sequence[int], progress: bool = False) -> np.ndarray:
    """``size`` rows (every row when 0 or ``>= len(store)``) as float32 ``[size, dim]``, read shard by shard."""
    shard_rows = np.diff(store.offsets)
    whole = size == 0 or size >= len(store)
    picks = [None] * len(shard_rows) if whole else sample_indices(shard_rows, size, seed)
    out = np.empty((len(store) if whole else size, store.dim), np.float32)
    at = 0
    for s, local in enumerate(tqdm(picks, desc="cluster: sample", unit="shard", disable=not progress)):
        lo = int(store.offsets[s])
        part = store.rows(lo, int(store.offsets[s + 1])) if local is None else store.take(lo + local)
        out[at : at + len(part)] = part
        at += len(part)
    return out


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


# ----------------------------------------------------------------------------- centroid indexes


def sharded_index(centroids: np.ndarray, parts: int, make_part: Callable[[int, np.ndarray], Any]) -> Any:
    """A faiss ``IndexShards`` over ``parts`` contiguous slices of ``centroids``; ``make_part(i, slice)``
    builds sub-index ``i`` holding that slice (a GPU index on device ``i``, or any CPU index).

    Ids are successive (sub-index ``i``'s follow ``i - 1``'s), so labels are rows of ``centroids``.
    """
    import faiss

    index = faiss.IndexShards(centroids.shape[1], True, True)  # threaded, successive ids
    for i in range(parts):
        lo, hi = rank_block(len(centroids), i, parts)
        index.add_shard(make_part(i, centroids[lo:hi]))  # faiss keeps a reference to each sub-index
    return index


def ivf_index(centroids: np.ndarray, nprobe: int, seed: int = 0) -> Any:
    """Approximate inner-product search: the centroids in ``round(sqrt(K))`` inverted lists, ``nprobe`` searched."""
    import faiss

    nlist = max(1, round(len(centroids) ** 0.5))
    index = faiss.IndexIVFFlat(
        faiss.IndexFlatIP(centroids.shape[1]), centroids.shape[1], nlist, faiss.METRIC_INNER_PRODUCT
    )
    index.cp.seed = seed
    index.cp.min_points_per_centroid = 1  # the lists are trained on the K centroids themselves: few per list is fine
    index.train(centroids)
    index.add(centroids)
    index.nprobe = min(nprobe, nlist)
    return index


def hnsw_index(centroids: np.ndarray, ef_search: int) -> Any:
    """Approximate inner-product search: an HNSW graph over the unit centroids."""
    import faiss

    index = faiss.IndexHNSWFlat(centroids.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.add(centroids)
    index.hnsw.efSearch = ef_search
    return index


class Assigner:
    """Nearest centroid by inner product, ``assigner(x [n, d]) -> (labels [n] int64, inner products [n])``.

    ``kind='exact'`` is faiss ``IndexFlatIP``: on the CPU, on GPU ``gpu_id`` when faiss sees GPUs, or
    with ``gpu_id=None`` split across all GPUs (:func:`sharded_index`). ``ivf`` / ``hnsw`` are
    approximate CPU indexes (:func:`ivf_index`, :func:`hnsw_index`).
    """

    def __init__(
        self,
        centroids: np.ndarray,
        use_gpu: bool = True,
        gpu_id: int | None = 0,
        kind: str = "exact",
        nprobe: int = 16,
        ef_search: int = 32,
        seed: int = 0,
    ) -> None:
        import faiss

        config.choice("kind", kind, ASSIGN_INDEXES)
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self._resources: list[Any] = []  # GPU resources live as long as the index
        gpus = _gpus(use_gpu)
        if kind == "ivf":
            self.index = ivf_index(centroids, nprobe, seed)
        elif kind == "hnsw":
            self.index = hnsw_index(centroids, ef_search)
        elif gpus and gpu_id is None:
            self.index = sharded_index(centroids, gpus, self._gpu_flat)
        elif gpus:
            self.index = self._gpu_flat(gpu_id % gpus, centroids)
        else:
            self.index = faiss.IndexFlatIP(centroids.shape[1])
            self.index.add(centroids)

    def _gpu_flat(self, device: int, centroids: np.ndarray) -> Any:
        import faiss

        res = faiss.StandardGpuResources()
        self._resources.append(res)
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = device
        index = faiss.GpuIndexFlatIP(res, centroids.shape[1], cfg)
        index.add(centroids)
        return index

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, labels = self.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
        return labels[:, 0].astype(np.int64), scores[:, 0]


# ----------------------------------------------------------------------------- assignment


def shard_blocks(offsets: np.ndarray, start: int, end: int, batch: int) -> Iterator[tuple[int, int]]:
    """Row ranges ``[a, b)`` covering ``[start, end)`` in order, at most ``batch`` rows, never across a shard."""
    for s in range(len(offsets) - 1):
        lo, hi = max(start, int(offsets[s])), min(end, int(offsets[s + 1]))
        for a in range(lo, hi, batch):
            yield a, min(a + batch, hi)


def _zero_rows(x: np.ndarray) -> np.ndarray:
    """``[n]`` bool: the rows of ``x [n, d]`` whose float32 squared norm is 0 (all zero, or entries below about
    1e-23 that carry no direction either); einsum makes no ``[n, d]`` temporary."""
    return np.einsum("ij,ij->i", x, x) == 0


def _nearest(assigner: Assigner, x: np.ndarray) -> np.ndarray:
    """``[n]`` int64 nearest centroid of each row of ``x``; -1 for an all-zero row, which ties with every
    centroid (an inner-product search would pick centroid 0)."""
    labels = assigner(x)[0]
    labels[_zero_rows(x)] = -1
    return labels


def assign_rows(
    store: FeatureStore, assigner: Assigner, start: int, end: int, batch: int, progress: bool = False
) -> np.ndarray:
    """Labels ``[end - start]`` int32 of feature rows ``[start, end)``, streamed shard by shard."""
    labels = np.empty(end - start, np.int32)
    with tqdm(total=end - start, desc="cluster: assign", unit="row", unit_scale=True, disable=not progress) as bar:
        for a, b in shard_blocks(store.offsets, start, end, batch):
            labels[a - start : b - start] = _nearest(assigner, store.rows(a, b))
            bar.update(b - a)
    return labels


def agreement(x: np.ndarray, exact: Assigner, approx: Assigner, batch: int) -> float:
    """Fraction of the rows ``x`` that ``approx`` gives the same centroid as ``exact``."""
    same = sum(int((exact(x[a : a + batch])[0] == approx(x[a : a + batch])[0]).sum()) for a in range(0, len(x), batch))
    return same / max(1, len(x))


def rank_block(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[start, end)`` rows of ``n`` that ``rank`` assigns (sizes differ by at most one)."""
    base, extra = divmod(n, world_size)
    start = base * rank + min(rank, extra)
    return start, start + base + (rank < extra)


def drop_small(labels: np.ndarray, num_clusters: int, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Relabel to contiguous ids, dropping clusters with fewer than ``min_size`` points (label -1);
    rows labelled -1 already (no centroid) stay -1.

    Returns (new labels ``[N]`` int32, kept old cluster ids ``[K']`` int64 in new-label order).
    """
    sizes = np.bincount(labels[labels >= 0], minlength=num_clusters)
    kept = np.flatnonzero(sizes >= min_size)
    remap = np.full(num_clusters + 1, -1, np.int32)  # the last entry maps -1 to -1
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


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"cluster: {message}", file=sys.stderr)


def run(cfg: ClusterConfig, quiet: bool = False) -> dict:
    """Run the clustering step; returns the summary dict (also written to ``summary.json``)."""
    info = dist.setup(cfg.device, timeout_hours=24)
    quiet = quiet or not info.is_main
    store = FeatureStore(cfg.features_dir)  # names a damaged index.json or shard itself
    out = Path(cfg.output_dir)
    n = len(store)
    raw_path = out / "centroids_all.npy"
    start_time = time.perf_counter()
    gpus = _gpus(cfg.use_gpu)
    kmeans: dict = {}
    if info.is_main:
        if n < cfg.num_clusters:
            raise config.ConfigError(f"num_clusters={cfg.num_clusters} exceeds the {n} feature rows")
        if cfg.min_cluster_size > n:
            raise config.ConfigError(
                f"min_cluster_size={cfg.min_cluster_size} exceeds the {n} feature rows: every cluster would be dropped"
            )
        sample = draw_sample(store, cfg.train_size, cfg.seed, progress=not quiet)
        sample = sample[~_zero_rows(sample)]  # an all-zero row has no direction to cluster
        if len(sample) < cfg.num_clusters:
            raise config.ConfigError(
                f"num_clusters={cfg.num_clusters} exceeds the {len(sample)} non-zero feature rows of the k-means "
                "sample (all-zero rows are left out)"
            )
        _log(
            quiet,
            f"k-means K={cfg.num_clusters} on {len(sample)} of {n} points, {cfg.niter} iterations "
            f"({f'{gpus} GPU(s)' if gpus else 'CPU'})",
        )
        t = time.perf_counter()
        centroids = train_kmeans(sample, cfg.num_clusters, cfg.niter, cfg.nredo, cfg.seed, cfg.use_gpu)
        kmeans = {"train_points": len(sample), "seconds": round(time.perf_counter() - t, 2)}
        del sample
        atomic.save_npy(raw_path, centroids)
    dist.barrier()
    centroids = np.load(raw_path)
    # One process with several GPUs splits the centroids across them; a torchrun rank uses its own GPU.
    gpu_id = None if info.world_size == 1 else info.local_rank
    assigner = Assigner(centroids, cfg.use_gpu, gpu_id, cfg.assign_index, cfg.nprobe, cfg.ef_search, cfg.seed)
    start, end = rank_block(n, info.rank, info.world_size)
    part = out / f"labels.rank{info.rank:05d}.npy"
    t = time.perf_counter()
    atomic.save_npy(part, assign_rows(store, assigner, start, end, cfg.assign_batch, progress=not quiet))
    assign = {"index": cfg.assign_index, "rows_per_second_rank0": round((end - start) / (time.perf_counter() - t), 1)}
    dist.barrier()
    summary: dict = {}
    if info.is_main:
        if cfg.assign_index != "exact" and cfg.agreement_rows:
            held = draw_sample(store, min(cfg.agreement_rows, n), (cfg.seed, 1))  # independent of the k-means sample
            held = held[~_zero_rows(held)]
            exact = Assigner(centroids, cfg.use_gpu, gpu_id)
            assign.update(
                agreement=round(agreement(held, exact, assigner, cfg.assign_batch), 5), agreement_rows=len(held)
            )
            _log(
                quiet,
                f"{cfg.assign_index} assignment agrees with exact on {assign['agreement']:.2%} "
                f"of {len(held)} sampled rows",
            )
        parts = [out / f"labels.rank{r:05d}.npy" for r in range(info.world_size)]
        labels = np.concatenate([np.load(p) for p in parts])
        for p in parts:
            p.unlink()
        new_labels, kept = drop_small(labels, cfg.num_clusters, cfg.min_cluster_size)
        if len(kept) == 0:
            largest = np.bincount(labels[labels >= 0], minlength=1).max()
            raise config.ConfigError(
                f"all {cfg.num_clusters} clusters have fewer than min_cluster_size={cfg.min_cluster_size} points "
                f"(the largest has {largest}); lower min_cluster_size or num_clusters"
            )
        sizes = np.bincount(new_labels[new_labels >= 0], minlength=len(kept))
        for stale in ("summary.json", "centroids.npy", "labels.npy"):  # never the files of two runs side by side
            (out / stale).unlink(missing_ok=True)
        atomic.save_npy(out / "labels.npy", new_labels)
        atomic.save_npy(out / "centroids.npy", centroids[kept])
        atomic.copy_file(store.path / "ids.txt", out / "ids.txt")
        atomic.write_text(out / "sizes.csv", "label,size\n" + "".join(f"{i},{s}\n" for i, s in enumerate(sizes)))
        summary = {
            "num_classes": len(kept),
            "num_clusters": cfg.num_clusters,
            "kept_clusters": len(kept),
            "points": n,
            "dropped_points": int((new_labels < 0).sum()),
            "zero_rows": int((labels < 0).sum()),
            "min_cluster_size": cfg.min_cluster_size,
            "sizes": size_summary(sizes),
            "kmeans": kmeans,
            "assignment": assign,
            "seconds": round(time.perf_counter() - start_time, 2),
        }
        atomic.write_json(out / "summary.json", summary)
        _log(
            quiet,
            f"{len(kept)} of {cfg.num_clusters} clusters kept, {summary['dropped_points']} points dropped "
            f"({summary['zero_rows']} all-zero rows); "
            f"sizes min {summary['sizes'].get('min')} median {summary['sizes'].get('median')} "
            f"max {summary['sizes'].get('max')} -> {out}",
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
