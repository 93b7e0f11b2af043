"""k-means at scale on synthetic features: throughput, peak memory, planted-cluster recovery.

:func:`run_kmeans_bench` writes unit features with planted clusters as feature shards (the
layout :class:`unicom.features.FeatureStore` reads), then runs the functions ``unicom-cluster``
runs: the sample drawn shard by shard, faiss spherical k-means, and the streamed assignment,
exact and approximate (IVF, HNSW). It measures rows/s, GFLOP/s, the peak memory of each phase
against the size of the whole feature matrix, how well the planted clusters are recovered
(NMI, purity), and the approximate-vs-exact agreement, both over every row and as
``unicom-cluster`` estimates it from a sample. :func:`scale_model` extrapolates to LAION scale.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from unicom import atomic
from unicom.cluster import Assigner, agreement, assign_rows, draw_sample, train_kmeans
from unicom.features import FeatureStore

from . import _report
from ._measure import _reset_hwm, _status_kib, release_freed_memory

MIB = 1 << 20
# Sizes: rows x dim features in shards, k-means into `clusters`; the sample is `per_centroid` rows a centroid.
FULL = {"rows": 2_000_000, "dim": 64, "clusters": 20_000, "shard_rows": 125_000, "per_centroid": 40, "niter": 8}
QUICK = {"rows": 20_000, "dim": 64, "clusters": 200, "shard_rows": 5_000, "per_centroid": 40, "niter": 8}
NOISE = 0.6  # norm of the Gaussian noise added to a planted centre before normalising (cosine ~0.86)
SEED = 0
BATCH = 65536
AGREEMENT_ROWS = 10_000
NPROBE, EF_SEARCH = 16, 32  # unicom-cluster's defaults

# The model's target (configs/laion-vit-b32.yaml) and the GPU throughput it assumes.
TARGET = {"rows": 400_000_000, "dim": 768, "clusters": 1_000_000, "train_size": 20_000_000, "niter": 20, "gpus": 8}
GPU_TFLOPS = 33.0  # per GPU: faiss brute force (cuBLAS SGEMM + k-selection) at ~50 % of an H100's 67 TFLOP/s FP32
DISK_GB_S = 2.0  # feature-shard read bandwidth of the node (fp16 shards)


def write_planted(path: Path, rows: int, dim: int, clusters: int, shard_rows: int, seed: int) -> np.ndarray:
    """Write float16 unit features around ``clusters`` random unit centres as feature shards; returns the
    ``[rows]`` int32 planted cluster of every row. One shard is generated at a time."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.integers(clusters, size=rows).astype(np.int32)
    shards = []
    for s, a in enumerate(range(0, rows, shard_rows)):
        b = min(a + shard_rows, rows)
        x = centres[truth[a:b]] + NOISE / math.sqrt(dim) * rng.standard_normal((b - a, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        name = f"shard_{s:05d}"
        atomic.write_text(path / f"{name}.ids.txt", "".join(f"r{i}\n" for i in range(a, b)))
        atomic.save_npy(path / f"{name}.npy", x.astype(np.float16))
        shards.append({"file": f"{name}.npy", "ids": f"{name}.ids.txt", "rows": b - a})
    atomic.write_text(path / "ids.txt", "".join(f"r{i}\n" for i in range(rows)))
    atomic.write_json(path / "index.json", {"dim": dim, "rows": rows, "shards": shards})
    return truth


@contextmanager
def peak_memory() -> Iterator[dict]:
    """Peak memory added inside the block, in MiB: ``rss`` from the kernel's high-water mark (it counts the
    pages of memory-mapped shards, which the kernel can drop) and ``anon`` (heap only), polled every 10 ms."""
    release_freed_memory()
    result: dict = {}
    hwm = _reset_hwm()
    base_rss, base_anon = _status_kib("VmRSS"), _status_kib("RssAnon")
    peak_anon = [base_anon]
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.01):
            peak_anon[0] = max(peak_anon[0], _status_kib("RssAnon"))

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        peak_anon[0] = max(peak_anon[0], _status_kib("RssAnon"))
        result["rss_mib"] = round((_status_kib("VmHWM") - base_rss) / 1024, 1) if hwm else math.nan
        result["anon_mib"] = round((peak_anon[0] - base_anon) / 1024, 1)


def purity(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of rows whose ``found`` cluster's most common ``truth`` label is their own."""
    pairs, counts = np.unique(found.astype(np.int64) * (int(truth.max()) + 1) + truth, return_counts=True)
    best = np.zeros(int(found.max()) + 1, np.int64)
    np.maximum.at(best, pairs // (int(truth.max()) + 1), counts)
    return float(best.sum() / len(found))


def recovery(found: np.ndarray, truth: np.ndarray) -> dict:
    """NMI and purity both ways (AMI is left out: its expected-MI term is far too slow at 20k x 20k clusters)."""
    from sklearn.metrics import normalized_mutual_info_score

    return {
        "nmi": round(float(normalized_mutual_info_score(truth, found)), 4),
        "purity": round(purity(found, truth), 4),
        "inverse_purity": round(purity(truth, found), 4),
    }


def _timed_assign(store: FeatureStore, assigner: Assigner) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    labels = assign_rows(store, assigner, 0, len(store), BATCH)
    return labels, time.perf_counter() - t


def scale_model(measured: dict) -> dict:
    """Time and memory of clustering :data:`TARGET` on its GPUs, as a model (nothing here ran at that size).

    FLOPs: training ``2 * train_size * K * D * niter``, assignment ``2 * N * K * D`` (inner products;
    k-selection and centroid updates are left out). GPU time = FLOPs / (gpus * :data:`GPU_TFLOPS`);
    the assignment adds reading the fp16 shards at :data:`DISK_GB_S` (not overlapped with the search).
    The same FLOPs at the GFLOP/s measured here on the CPU give the CPU time; their ratio to the GPU
    time is the stated throughput ratio ``gpus * GPU_TFLOPS / measured CPU rate``.
    """
    n, d, k, m, it, g = (TARGET[x] for x in ("rows", "dim", "clusters", "train_size", "niter", "gpus"))
    train_flops, assign_flops = 2.0 * m * k * d * it, 2.0 * n * k * d
    gpu = g * GPU_TFLOPS * 1e12
    read_s = n * d * 2 / (DISK_GB_S * 1e9)
    return {
        "target": TARGET,
        "assumed": {"gpu_tflops_each": GPU_TFLOPS, "disk_gb_s": DISK_GB_S},
        "train_pflop": round(train_flops / 1e15, 1),
        "assign_pflop": round(assign_flops / 1e15, 1),
        "train_gpu_min": round(train_flops / gpu / 60, 1),
        "assign_gpu_min": round((assign_flops / gpu + read_s) / 60, 1),
        "gpus_vs_this_cpu_kmeans": round(gpu / (measured["kmeans_gflops"] * 1e9)),
        "gpus_vs_this_cpu_assign": round(gpu / (measured["exact_gflops"] * 1e9)),
        "train_cpu_days_here": round(train_flops / (measured["kmeans_gflops"] * 1e9) / 86400, 1),
        "assign_cpu_days_here": round(assign_flops / (measured["exact_gflops"] * 1e9) / 86400, 1),
        "centroids_gib": round(k * d * 4 / 2**30, 2),
        "centroids_per_gpu_sharded_gib": round(k * d * 4 / g / 2**30, 2),
        "sample_host_gib": round(m * d * 4 / 2**30, 1),
        "labels_gib": round(n * 4 / 2**30, 2),
        "features_fp16_gib": round(n * d * 2 / 2**30, 1),
    }


def run_kmeans_bench(out_dir: str, quick: bool) -> dict:
    """Cluster planted synthetic features (:data:`FULL` or :data:`QUICK` sizes) in a temporary folder under
    ``out_dir``; returns the measurements (sizes, phases, memory, recovery, agreement, the scale model)."""
    size = QUICK if quick else FULL
    n, dim, k = size["rows"], size["dim"], size["clusters"]
    train_size = k * size["per_centroid"]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".kmeans-bench-") as tmp:
        t = time.perf_counter()
        truth = write_planted(Path(tmp), n, dim, k, size["shard_rows"], SEED)
        generate_s = time.perf_counter() - t
        store = FeatureStore(tmp)

        with peak_memory() as kmeans_mem:
            t = time.perf_counter()
            sample = draw_sample(store, train_size, SEED)
            sample_s = time.perf_counter() - t
            t = time.perf_counter()
            centroids = train_kmeans(sample, k, size["niter"], seed=SEED, use_gpu=False)
            train_s = time.perf_counter() - t
            del sample
        with peak_memory() as assign_mem:
            exact = Assigner(centroids, use_gpu=False)
            exact_labels, exact_s = _timed_assign(store, exact)
        approx = {}
        for kind in ("ivf", "hnsw"):
            t = time.perf_counter()
            assigner = Assigner(centroids, use_gpu=False, kind=kind, nprobe=NPROBE, ef_search=EF_SEARCH, seed=SEED)
            build_s = time.perf_counter() - t
            labels, seconds = _timed_assign(store, assigner)
            held = draw_sample(store, min(AGREEMENT_ROWS, n), (SEED, 1))  # as unicom-cluster draws it
            approx[kind] = {
                "build_s": round(build_s, 2),
                "rows_per_s": round(n / seconds),
                "speedup_vs_exact": round(exact_s / seconds, 2),
                "agreement_all_rows": round(float((labels == exact_labels).mean()), 5),
                "agreement_estimate": round(agreement(held, exact, assigner, BATCH), 5),
                "agreement_rows": len(held),
                "recovery": recovery(labels, truth),
            }

    measured = {
        "kmeans_gflops": round(2.0 * train_size * k * dim * size["niter"] / train_s / 1e9, 1),
        "exact_gflops": round(2.0 * n * k * dim / exact_s / 1e9, 1),
    }
    return {
        "benchmark": "kmeans",
        "quick": quick,
        "machine": {"cpu_model": _report.cpu_model(), "cpus": os.cpu_count(), "load_avg_end": list(os.getloadavg())},
        "versions": _versions(),
        "sizes": {**size, "train_size": train_size, "noise": NOISE, "seed": SEED, "assign_batch": BATCH},
        "seconds": {
            "generate": round(generate_s, 2),
            "sample": round(sample_s, 2),
            "kmeans": round(train_s, 2),
            "assign_exact": round(exact_s, 2),
        },
        "rates": {
            "sample_rows_per_s": round(train_size / sample_s),
            "kmeans_point_iters_per_s": round(train_size * size["niter"] / train_s),
            "exact_rows_per_s": round(n / exact_s),
            **measured,
        },
        "memory_mib": {
            "feature_matrix_float32": round(n * dim * 4 / MIB, 1),
            "one_shard_float32": round(size["shard_rows"] * dim * 4 / MIB, 1),
            "sample_float32": round(train_size * dim * 4 / MIB, 1),
            "labels_int32": round(n * 4 / MIB, 1),
            "kmeans_peak": kmeans_mem,
            "assign_exact_peak": assign_mem,
        },
        "recovery_exact": recovery(exact_labels, truth),
        "approximate": approx,
        "model": scale_model(measured),
    }


def _versions() -> dict:
    import faiss
    import sklearn

    return {"faiss": faiss.__version__, "numpy": np.__version__, "sklearn": sklearn.__version__}
