"""Retrieval metrics against hand-computed cases (ties, single-member classes, leave-one-out)."""

import numpy as np
import pytest

for _module in ("yaml", "tqdm"):  # the pipeline extra
    pytest.importorskip(_module)

pytest.importorskip("faiss")

from unicom import metrics  # noqa: E402
from unicom.metrics import knn_accuracy, retrieval_metrics  # noqa: E402


def test_leave_one_out_hand_computed():
    # Four unit vectors on a quarter circle; labels [0, 0, 1, 1].
    x = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1]], np.float32)
    m = retrieval_metrics(x, np.array([0, 0, 1, 1]), ks=(1, 2))
    # rankings: q0 -> 1,2,3 (hit at 1); q1 -> 2,0,3 (hit at 2); q2 -> 1,3,0 (hit at 2); q3 -> 2,1,0 (hit at 1)
    assert m["recall@1"] == pytest.approx(0.5)
    assert m["recall@2"] == pytest.approx(1.0)
    assert m["map@r"] == pytest.approx(0.5)  # R = 1: AP@R is 1, 0, 0, 1
    assert m["map@100"] == pytest.approx(0.75)  # 1, 1/2, 1/2, 1
    assert m["queries"] == 4 and m["queries_without_relevant"] == 0


def test_ties_break_by_gallery_index():
    q = np.array([[1, 0]], np.float32)
    g = np.array([[0, 1], [1, 0], [1, 0]], np.float32)  # g1 and g2 tie exactly
    m = retrieval_metrics(q, np.array([7]), g, np.array([7, 3, 7]), ks=(1, 2))
    # ranking g1 (miss), g2 (hit), g0 (hit); R = 2
    assert m["recall@1"] == 0.0 and m["recall@2"] == 1.0
    assert m["map@r"] == pytest.approx(0.5 / 2)
    assert m["map@100"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    swapped = retrieval_metrics(q, np.array([7]), g, np.array([7, 7, 3]), ks=(1,))
    assert swapped["recall@1"] == 1.0


def test_single_member_classes_are_not_scored():
    x = np.array([[1, 0], [0.9, 0.1], [0, 1]], np.float32)
    m = retrieval_metrics(x, np.array([0, 0, 5]), ks=(1,))
    assert m["queries"] == 2 and m["queries_without_relevant"] == 1
    assert m["recall@1"] == 1.0 and m["map@r"] == 1.0


def test_leave_one_out_excludes_self_even_with_duplicates():
    # Query == gallery: with the query itself in the gallery every Recall@1 would be 1.
    x = np.array([[1, 0], [1, 0], [0, 1], [0.1, 1]], np.float32)
    labels = np.array([0, 1, 0, 1])
    loo = retrieval_metrics(x, labels, ks=(1,))
    assert loo["recall@1"] == 0.0  # each point's nearest other point has the other label
    explicit = retrieval_metrics(x, labels, x, labels, ks=(1,))
    # The query itself is now in the gallery; only x1 misses: it ties exactly with x0, which comes first.
    assert explicit["recall@1"] == 0.75


def test_perfect_and_random_bounds():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))
    labels = np.repeat(np.arange(5), 20)
    x = centres[labels] + 1e-3 * rng.normal(size=(100, 16))
    m = retrieval_metrics(x, labels)
    assert m["recall@1"] == 1.0 and m["map@r"] == pytest.approx(1.0) and m["map@100"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="dim"):
        retrieval_metrics(x, labels, x[:, :8], labels)


def test_knn_accuracy_hand_computed():
    x = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1]], np.float32)
    labels = np.array([0, 0, 1, 1])
    # k = 1 matches Recall@1 here; with k = 3 every query's majority among the other three is the other label.
    assert knn_accuracy(x, labels, k=1) == pytest.approx(0.5)
    assert knn_accuracy(x, labels, k=3) == pytest.approx(0.0)
    # a 1-1 tie in votes goes to the label voted for first (the nearest)
    q = np.array([[1, 0]], np.float32)
    g = np.array([[0.9, 0.1], [0.5, 0.5]], np.float32)
    assert knn_accuracy(q, np.array([4]), g, np.array([4, 2]), k=2) == 1.0
    assert retrieval_metrics(x, labels, ks=(1,), knn_k=1)["knn@1"] == pytest.approx(0.5)


def _documented_metrics(q, ql, g, gl, ks, knn_k):
    """The module's definitions by brute force: every gallery item ranked by (-score, index)."""
    loo = g is None
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    qn = unit(np.asarray(q, np.float32))
    gn, gl = (qn, ql) if loo else (unit(np.asarray(g, np.float32)), gl)
    recall, map_r, map_100, knn = {k: [] for k in ks}, [], [], []
    for i in range(len(qn)):
        s = gn @ qn[i]
        order = [j for j in sorted(range(len(gn)), key=lambda j: (-s[j], j)) if not (loo and j == i)]
        votes = list(gl[order[:knn_k]])
        best = max(votes.count(v) for v in votes)
        knn.append(next(v for v in votes if votes.count(v) == best) == ql[i])
        rel = gl[order] == ql[i]
        r = int(rel.sum())
        if r == 0:
            continue
        hits = np.cumsum(rel) / np.arange(1, len(rel) + 1) * rel
        for k in ks:
            recall[k].append(rel[:k].any())
        map_r.append(hits[:r].sum() / r)
        map_100.append(hits[:100].sum() / min(r, 100))
    out = {f"recall@{k}": np.mean(v) for k, v in recall.items()}
    return out | {"map@r": np.mean(map_r), "map@100": np.mean(map_100), f"knn@{knn_k}": np.mean(knn)}


@pytest.mark.parametrize("loo", [False, True])
def test_tie_groups_larger_than_the_slack_follow_gallery_index(loo, monkeypatch):
    # Embeddings on the six axis directions of 3-D: scores are exactly 1, 0 or -1, so each tie group
    # (about 160 items at score 0) is far larger than TIE_SLACK and straddles every cut (k = 60,
    # R ~ 120, 100, kNN k = 50). Which tied items come first must not depend on the search library.
    rng = np.random.default_rng(3)
    axes = np.concatenate([np.eye(3), -np.eye(3)]).astype(np.float32)
    g, gl = axes[rng.integers(0, 6, 240)], rng.integers(0, 2, 240)
    q, ql = (g, gl) if loo else (axes[rng.integers(0, 6, 30)], rng.integers(0, 2, 30))
    ks = (1, 8, 60)
    got = retrieval_metrics(q, ql, None if loo else g, None if loo else gl, ks=ks, use_gpu=False, knn_k=50)
    want = _documented_metrics(q, ql, None if loo else g, None if loo else gl, ks, 50)
    assert {name: got[name] for name in want} == pytest.approx(want)
    monkeypatch.setattr(metrics, "RESEARCH_ENTRIES", 1)  # queries searched again one per call
    assert retrieval_metrics(q, ql, None if loo else g, None if loo else gl, ks=ks, use_gpu=False, knn_k=50) == got


@pytest.mark.parametrize("scale", [1e20, 1e-20])
def test_metrics_do_not_depend_on_the_embeddings_scale(scale):
    """Cosine search: rows far from unit norm (squares beyond float32's range) score as unit rows do."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    labels = rng.integers(0, 6, 60)
    want = retrieval_metrics(x, labels, ks=(1, 5), use_gpu=False)
    got = retrieval_metrics(x * np.float32(scale), labels, ks=(1, 5), use_gpu=False)
    assert got == want
