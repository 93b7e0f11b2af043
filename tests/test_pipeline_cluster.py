"""k-means recovers planted clusters; sharded assignment equals one pass; tiny clusters are dropped."""

import json

import numpy as np
import pytest

for _module in ("yaml", "tqdm"):  # the pipeline extra
    pytest.importorskip(_module)

pytest.importorskip("faiss")

from unicom import atomic, config  # noqa: E402
from unicom.cluster import (  # noqa: E402
    Assigner,
    ClusterConfig,
    assign_rows,
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
    assert labels.shape == (201,) and labels.max() == summary["kept_clusters"] - 1
    assert (tmp_path / "c" / "ids.txt").read_text().splitlines()[0] == "id0"
    assert np.load(tmp_path / "c" / "centroids.npy").shape == (summary["kept_clusters"], 32)
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["points"] == 201
    assert (tmp_path / "c" / "sizes.csv").read_text().startswith("label,size\n")
    with pytest.raises(config.ConfigError, match="num_clusters=500 exceeds the 201 feature rows"):
        run(config.make(ClusterConfig, {**vars(cfg), "num_clusters": 500, "train_size": 0}), quiet=True)
