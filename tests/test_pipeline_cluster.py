"""k-means recovers planted clusters; the sample and the assignment stream shard by shard; sharded, approximate
and exact centroid searches agree; tiny clusters are dropped."""

import json

import numpy as np
import pytest

for _module in ("yaml", "tqdm"):  # the pipeline extra
    pytest.importorskip(_module)

pytest.importorskip("faiss")

from unicom import atomic, cluster, config  # noqa: E402
from unicom.cluster import (  # noqa: E402
    Assigner,
    ClusterConfig,
    assign_rows,
    draw_sample,
    drop_small,
    rank_block,
    run,
    train_kmeans,
)
from unicom.features import FeatureStore  # noqa: E402


def mixture(n_per=200, k=8, dim=32, noise=0.25, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(k), n_per)
    x = centres[labels] + noise * rng.normal(size=(len(labels), dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def write_store(path, x, shard=300):
    shards = []
    for s, start in enumerate(range(0, len(x), shard)):
        atomic.save_npy(path / f"shard_{s:05d}.npy", x[start : start + shard].astype(np.float16))
        shards.append({"file": f"shard_{s:05d}.npy", "rows": len(x[start : start + shard])})
    atomic.write_text(path / "ids.txt", "".join(f"id{i}\n" for i in range(len(x))))
    atomic.write_json(path / "index.json", {"dim": x.shape[1], "rows": len(x), "shards": shards})


def test_recovers_planted_clusters():
    from sklearn.metrics import normalized_mutual_info_score

    x, truth = mixture()
    centroids = train_kmeans(x, 8, niter=20, nredo=3, seed=0)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    labels, _ = Assigner(centroids)(x)
    assert normalized_mutual_info_score(truth, labels) > 0.9


def test_sharded_assignment_equals_one_pass(tmp_path):
    x, _ = mixture(n_per=125)
    write_store(tmp_path, x)
    store = FeatureStore(tmp_path)
    assigner = Assigner(train_kmeans(store.rows(), 8, seed=1))
    one = assign_rows(store, assigner, 0, len(store), batch=10_000)
    for world in (2, 3, 7):
        blocks = [rank_block(len(store), r, world) for r in range(world)]
        assert blocks[0][0] == 0 and blocks[-1][1] == len(store)
        parts = [assign_rows(store, assigner, a, b, batch=37) for a, b in blocks]
        np.testing.assert_array_equal(np.concatenate(parts), one)


def test_drop_small_relabels_contiguously():
    labels = np.array([0, 0, 0, 2, 3, 3, 3, 3])
    new, kept = drop_small(labels, 5, min_size=2)
    assert kept.tolist() == [0, 3] and new.tolist() == [0, 0, 0, -1, 1, 1, 1, 1]
    # Rows without a centroid (-1) stay -1 and count for no cluster.
    new, kept = drop_small(np.array([-1, 4, 4, -1, 0, 4]), 5, min_size=2)
    assert kept.tolist() == [4] and new.tolist() == [-1, 0, 0, -1, -1, 0]


def _cluster_cfg(tmp_path, **kw):
    values = dict(features_dir=str(tmp_path / "f"), output_dir=str(tmp_path / "c"), num_clusters=4, device="cpu")
    return config.make(ClusterConfig, values | kw)


def test_all_zero_rows_get_no_label_and_no_centroid(tmp_path):
    """An all-zero feature (pixels of a blank image) ties with every centroid: an inner-product search
    put all of them into cluster 0, and a sample rich in them gave k-means a zero centroid."""
    x, truth = mixture(n_per=50, k=4)
    zero = np.zeros((120, x.shape[1]), np.float32)
    x, truth = np.concatenate([x[:100], zero, x[100:]]), np.concatenate([truth[:100], -np.ones(120), truth[100:]])
    write_store(tmp_path / "f", x)
    for seed in range(4):  # seeds at which zero rows used to win a centroid of their own
        summary = run(_cluster_cfg(tmp_path, seed=seed, min_cluster_size=1), quiet=True)
        labels = np.load(tmp_path / "c" / "labels.npy")
        assert (labels[truth < 0] == -1).all() and (labels[truth >= 0] >= 0).all()
        assert summary["zero_rows"] == 120 and summary["dropped_points"] == 120 and summary["num_classes"] == 4
        np.testing.assert_allclose(np.linalg.norm(np.load(tmp_path / "c" / "centroids.npy"), axis=1), 1.0, atol=1e-5)
        assert sum(summary["sizes"]["histogram"].values()) == 4
    write_store(tmp_path / "f", np.concatenate([x[:3], zero]))
    with pytest.raises(config.ConfigError, match="exceeds the 3 non-zero feature rows"):
        run(_cluster_cfg(tmp_path), quiet=True)


def test_interrupted_rerun_never_leaves_the_files_of_two_runs(tmp_path, monkeypatch):
    """A rerun killed between writing labels.npy and centroids.npy left the old centroids beside the
    new labels, and training took the pair (its label range fits) without a word."""
    from unicom.data import DataError
    from unicom.train import cluster_files

    x, _ = mixture(n_per=50, k=4)
    write_store(tmp_path / "f", x)
    run(_cluster_cfg(tmp_path, num_clusters=6, min_cluster_size=1), quiet=True)
    save = atomic.save_npy

    def killed_after_labels(path, array):
        save(path, array)
        if path.name == "labels.npy":
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "save_npy", killed_after_labels)
    with pytest.raises(KeyboardInterrupt):
        run(_cluster_cfg(tmp_path, num_clusters=3, min_cluster_size=1), quiet=True)
    with pytest.raises(DataError, match="centroids.npy"):
        cluster_files(str(tmp_path / "c"))
    assert not (tmp_path / "c" / "summary.json").exists()


def test_run_writes_outputs(tmp_path):
    x, truth = mixture(n_per=50, k=4)
    x = np.concatenate([x, x[:1] * -1])  # one far-away outlier that gets its own cluster
    write_store(tmp_path / "f", x)
    cfg = config.make(
        ClusterConfig,
        dict(
            features_dir=str(tmp_path / "f"),
            output_dir=str(tmp_path / "c"),
            num_clusters=5,
            min_cluster_size=3,
            train_size=150,
            device="cpu",
        ),
    )
    summary = run(cfg, quiet=True)
    labels = np.load(tmp_path / "c" / "labels.npy")
    assert labels.dtype == np.int32 and labels.shape == (201,)
    assert labels.max() == summary["num_classes"] - 1 == summary["kept_clusters"] - 1
    assert summary["kmeans"]["train_points"] == 150 and summary["assignment"]["index"] == "exact"
    assert (tmp_path / "c" / "ids.txt").read_text().splitlines()[0] == "id0"
    assert np.load(tmp_path / "c" / "centroids.npy").shape == (summary["kept_clusters"], 32)
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["points"] == 201
    assert (tmp_path / "c" / "sizes.csv").read_text().startswith("label,size\n")
    with pytest.raises(config.ConfigError, match="num_clusters=500 exceeds the 201 feature rows"):
        run(config.make(ClusterConfig, {**vars(cfg), "num_clusters": 500, "train_size": 0}), quiet=True)


# -- at scale: sampled training, streamed assignment, centroid indexes -----------------------------------------------


def sharded_store(tmp_path, n=2000, shard=200, dim=32):
    x, truth = mixture(n_per=n // 8, dim=dim)
    write_store(tmp_path, x, shard=shard)
    return FeatureStore(tmp_path), x, truth


class CountingStore:
    """A FeatureStore that records every row range the caller reads."""

    def __init__(self, store):
        self.store, self.reads = store, []
        self.offsets, self.dim = store.offsets, store.dim

    def __len__(self):
        return len(self.store)

    def rows(self, a, b):
        self.reads.append((a, b))
        return self.store.rows(a, b)


def test_sample_is_stratified_per_shard_and_seeded():
    shard_rows = [7, 0, 13, 30, 50]
    picks = cluster.sample_indices(shard_rows, 20, seed=4)
    counts = [len(p) for p in picks]
    assert sum(counts) == 20 and counts == [
        20 * c // 100 - 20 * b // 100 for b, c in ((0, 7), (7, 7), (7, 20), (20, 50), (50, 100))
    ]
    for p, rows in zip(picks, shard_rows, strict=True):
        assert np.all(np.diff(p) > 0) and (len(p) == 0 or (p[0] >= 0 and p[-1] < rows))
    again = cluster.sample_indices(shard_rows, 20, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(picks, again, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(picks, cluster.sample_indices(shard_rows, 20, 5), strict=True))
    assert [len(p) for p in cluster.sample_indices(shard_rows, 100, 0)] == shard_rows
    with pytest.raises(ValueError, match="'size'"):
        cluster.sample_indices(shard_rows, 101, 0)


def test_sample_reads_memory_mapped_shards_one_at_a_time(tmp_path):
    import tracemalloc

    store, x, _ = sharded_store(tmp_path)
    assert all(isinstance(s, np.memmap) for s in store.shards)
    picks = cluster.sample_indices(np.diff(store.offsets), 300, seed=2)
    expected = x[np.concatenate([store.offsets[s] + p for s, p in enumerate(picks)])].astype(np.float16)
    tracemalloc.start()
    sample = draw_sample(store, 300, seed=2)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(sample, expected.astype(np.float32))
    np.testing.assert_array_equal(draw_sample(store, 300, seed=2), sample)
    shard_bytes = 200 * store.dim * 4
    assert peak < sample.nbytes + 2 * shard_bytes, peak  # never the whole matrix (2000 rows)
    np.testing.assert_array_equal(draw_sample(store, 0, seed=2), store.rows())


def test_kmeans_on_the_sample_is_deterministic(tmp_path):
    store, _, _ = sharded_store(tmp_path)
    runs = [train_kmeans(draw_sample(store, 400, seed=1), 8, niter=5, seed=1) for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])


def test_streamed_assignment_equals_in_memory_bitwise(tmp_path):
    store, x, _ = sharded_store(tmp_path)
    assigner = Assigner(train_kmeans(store.rows(), 8, seed=1))
    streamed = assign_rows(store, assigner, 0, len(store), batch=37)
    assert streamed.dtype == np.int32
    np.testing.assert_array_equal(streamed, assigner(x.astype(np.float16).astype(np.float32))[0])


def test_assignment_never_reads_more_than_one_shard(tmp_path):
    import tracemalloc

    store, _, _ = sharded_store(tmp_path)
    assigner = Assigner(train_kmeans(store.rows(), 8, seed=1))
    counting = CountingStore(store)
    tracemalloc.start()
    labels = assign_rows(counting, assigner, 150, 1850, batch=10_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert counting.reads[0][0] == 150 and counting.reads[-1][1] == 1850
    for a, b in counting.reads:
        shard = np.searchsorted(store.offsets, a, side="right") - 1
        assert b <= store.offsets[shard + 1], (a, b)  # within one shard
    shard_bytes = 200 * store.dim * 4
    assert peak < labels.nbytes + 3 * shard_bytes, peak  # the whole block would be 1700 rows


def test_index_shards_of_cpu_sub_indexes_agree_with_exact(tmp_path, monkeypatch):
    import faiss

    x, _ = mixture(n_per=50, k=8)
    centroids = train_kmeans(x, 10, seed=0)
    exact = Assigner(centroids, use_gpu=False)(x)[0]

    def flat(_, part):
        index = faiss.IndexFlatIP(part.shape[1])
        index.add(part)
        return index

    index = cluster.sharded_index(centroids, 3, flat)  # 10 centroids in 4 + 3 + 3
    assert index.count() == 3 and index.ntotal == 10
    np.testing.assert_array_equal(index.search(x, 1)[1][:, 0], exact)
    # The multi-GPU path of one process, its GPU sub-indexes replaced by CPU ones.
    monkeypatch.setattr(cluster, "_gpus", lambda use_gpu: 4 if use_gpu else 0)
    monkeypatch.setattr(Assigner, "_gpu_flat", lambda self, device, part: flat(device, part))
    assigner = Assigner(centroids, use_gpu=True, gpu_id=None)
    assert isinstance(assigner.index, faiss.IndexShards) and assigner.index.count() == 4
    np.testing.assert_array_equal(assigner(x)[0], exact)


@pytest.mark.parametrize("kind, option", [("ivf", {"nprobe": 1}), ("hnsw", {"ef_search": 1})])
def test_approximate_assignment_reports_measured_agreement(tmp_path, capsys, kind, option):
    x, _ = mixture(n_per=300, k=8, noise=50.0)  # close to uniform on the sphere: hard for an approximate search
    write_store(tmp_path / "f", x)
    cfg = config.make(
        ClusterConfig,
        dict(features_dir=str(tmp_path / "f"), output_dir=str(tmp_path / "c"), num_clusters=600, device="cpu",
             assign_index=kind, agreement_rows=500, **option),
    )  # fmt: skip
    summary = run(cfg)
    store = FeatureStore(tmp_path / "f")
    centroids = np.load(tmp_path / "c" / "centroids_all.npy")
    exact = Assigner(centroids, use_gpu=False)
    approx = Assigner(centroids, use_gpu=False, kind=kind, **option)
    held = draw_sample(store, 500, (0, 1))
    assert summary["assignment"]["agreement_rows"] == 500
    assert summary["assignment"]["agreement"] == round(cluster.agreement(held, exact, approx, 65536), 5)
    assert 0.3 < summary["assignment"]["agreement"] < 1.0  # one probe / a tiny beam misses some
    assert f"{kind} assignment agrees with exact on" in capsys.readouterr().err
    raw = np.load(tmp_path / "c" / "centroids.npy")
    assert summary["num_classes"] == len(raw) == np.load(tmp_path / "c" / "labels.npy").max() + 1


@pytest.mark.parametrize(
    "values, name",
    [
        ({"assign_index": "annoy"}, "assign_index"),
        ({"nprobe": 0}, "nprobe"),
        ({"ef_search": 0}, "ef_search"),
        ({"agreement_rows": -1}, "agreement_rows"),
        ({"num_clusters": 2**31}, "num_clusters"),
        ({"seed": -1}, "seed"),  # faiss and numpy refuse negative seeds
        ({"seed": 2**31}, "seed"),  # faiss' k-means seed is a C int
        ({"seed": 2**64}, "seed"),
    ],
)
def test_cluster_config_rejects(tmp_path, values, name):
    base = dict(features_dir="f", output_dir=str(tmp_path / "c"))
    with pytest.raises(config.ConfigError, match=f"'{name}'"):
        config.make(ClusterConfig, {**base, **values})


def test_cluster_seed_range_is_faiss_own(tmp_path):
    """The largest accepted seed runs k-means (faiss takes it); one above it is refused at validation."""
    write_store(tmp_path / "f", mixture(n_per=10, k=2, dim=8)[0])
    cfg = config.make(
        ClusterConfig,
        dict(features_dir=str(tmp_path / "f"), output_dir=str(tmp_path / "c"), num_clusters=2, niter=2, train_size=10,
             seed=cluster.SEED_MAX, use_gpu=False, device="cpu"),
    )  # fmt: skip
    assert run(cfg, quiet=True)["num_classes"] == 2


def test_kmeans_bench_quick(tmp_path):
    pytest.importorskip("sklearn")
    from benchmarks._bench_kmeans import run_kmeans_bench

    result = run_kmeans_bench(str(tmp_path), quick=True)
    assert list(tmp_path.iterdir()) == []  # the synthetic shards are removed
    assert result["sizes"]["rows"] == 20_000 and result["sizes"]["clusters"] == 200
    assert result["recovery_exact"]["nmi"] > 0.9
    for kind in ("ivf", "hnsw"):
        approx = result["approximate"][kind]
        assert 0.9 < approx["agreement_all_rows"] <= 1 and 0.9 < approx["agreement_estimate"] <= 1
    assert result["rates"]["exact_rows_per_s"] > 0 and result["memory_mib"]["assign_exact_peak"]["anon_mib"] >= 0
    model = result["model"]
    assert model["assign_pflop"] == round(2 * 400e6 * 1e6 * 768 / 1e15, 1)
