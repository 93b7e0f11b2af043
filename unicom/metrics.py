"""Retrieval metrics with exact cosine search: Recall@K, mAP@R and mAP@100.

Definitions (``R`` = number of gallery items sharing the query's label, the query itself excluded
in leave-one-out mode):

- ranking: gallery items by descending cosine similarity; equal similarities are ordered by
  gallery index (lower first), so results do not depend on the search library's tie order. The
  search fetches ``TIE_SLACK`` neighbours beyond those needed, and more (doubling, up to the whole
  gallery) for a query whose equal scores at the cut reach the last neighbour fetched, so the order
  holds however large a group of equal scores.
- Recall@K: share of queries with at least one relevant item among the first K.
- mAP@R (Musgrave et al., 2020): mean over queries of ``(1/R) sum_{i<=R} P@i * rel_i``.
- mAP@100: mean over queries of ``(1/min(R, 100)) sum_{i<=100} P@i * rel_i``.

- kNN@k accuracy (optional): the majority label of the first k neighbours equals the query's
  label; a tie in votes goes to the label whose best-ranked vote comes first. Every query counts.

Queries with ``R = 0`` (e.g. a class with one member in leave-one-out) cannot be scored; they
are excluded from every metric and counted in ``queries_without_relevant``. When no query can be
scored the metrics are undefined: :class:`MetricsError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .config import UserError

TIE_SLACK = 16  # neighbours fetched beyond those needed; a tie at the cut reaching past them costs another search
GPU_MAX_K = 2048  # faiss GPU k-selection limit: a larger k is searched on the CPU
RESEARCH_ENTRIES = 1 << 24  # neighbours per call when queries are searched again (12 bytes each: bounds memory)


class MetricsError(UserError, ValueError):
    """The metrics are undefined for this data (no query has a relevant gallery item)."""


def _normalise(x: np.ndarray) -> np.ndarray:
    """Rows of ``x [n, d]`` scaled to unit norm as float32; an all-zero row stays zero. The squared
    norms are summed in float64: in float32 they overflow above about 1e19 per entry (and underflow
    below 1e-19), which turned such rows into zeros or scaled them wrongly."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return x * scale.astype(np.float32)[:, None]


def search(query: np.ndarray, gallery: np.ndarray, k: int, use_gpu: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k``: (scores ``[nq, k]`` float32, gallery indices ``[nq, k]`` int64).

    Uses faiss ``IndexFlatIP`` (on a GPU when faiss sees one and ``k <= GPU_MAX_K``). Equal scores
    come in the library's order, and at the cut the library chooses which of them are returned.
    """
    import faiss

    index = faiss.IndexFlatIP(gallery.shape[1])
    if use_gpu and k <= GPU_MAX_K and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    scores, ids = index.search(np.ascontiguousarray(query, dtype=np.float32), k)
    return scores, ids.astype(np.int64)


def _rank(
    q: np.ndarray, g: np.ndarray, rows: np.ndarray, fetch: int, length: int, loo: bool, use_gpu: bool
) -> tuple[np.ndarray, np.ndarray]:
    """First ``length`` of the ranking for queries ``q[rows]`` from the top ``fetch``.

    Returns gallery indices ``[len(rows), length]`` int64 and ``complete [len(rows)]`` bool: False
    where the score at the cut equals the lowest one fetched, so equal scores left out by the search
    (possibly of lower index) may belong before the cut; those rows need a larger ``fetch``.
    """
    scores, ids = search(q[rows], g, fetch, use_gpu)
    lowest = scores.min(axis=1)  # every item scoring above it was fetched
    if loo:
        scores = np.where(ids == rows[:, None], -np.inf, scores)
    order = np.lexsort((ids, -scores), axis=-1)[:, :length]
    cut = np.take_along_axis(scores, order[:, -1:], axis=1)[:, 0]
    complete = (cut > lowest) | (fetch >= len(g))
    return np.take_along_axis(ids, order, axis=1), complete


def _ranked_ids(q: np.ndarray, g: np.ndarray, length: int, loo: bool, use_gpu: bool) -> np.ndarray:
    """Gallery indices ``[nq, length]`` int64: each query's first ``length`` items in the ranking.

    Descending score, then ascending gallery index; the query itself left out when ``loo``. One
    search of ``length + TIE_SLACK`` neighbours (plus one for the query itself in leave-one-out) for
    all queries; only queries whose tie at the cut may extend past what was fetched are searched
    again, with twice the neighbours (up to the gallery size), in calls of at most
    ``RESEARCH_ENTRIES`` neighbours.
    """
    out = np.empty((len(q), length), np.int64)
    if length == 0:
        return out
    rows = np.arange(len(q))
    fetch = min(len(g), length + (1 if loo else 0) + TIE_SLACK)
    batch = max(1, len(q))
    while len(rows):
        pending = []
        for start in range(0, len(rows), batch):
            part = rows[start : start + batch]
            ids, complete = _rank(q, g, part, fetch, length, loo, use_gpu)
            out[part[complete]] = ids[complete]
            pending.append(part[~complete])
        rows = np.concatenate(pending)
        fetch = min(len(g), 2 * fetch)
        batch = max(1, RESEARCH_ENTRIES // fetch)
    return out


def ranked_relevance(
    query: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    depth: int = 100,
    use_gpu: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Relevance of the ranked neighbours: (``rel [nq, L]`` bool, ``R [nq]`` int64).

    ``gallery=None`` means leave-one-out over ``query``. ``L`` covers ``depth`` and every query's R.
    """
    loo = gallery is None
    q = _normalise(query)
    g = q if loo else _normalise(gallery)
    ql = np.asarray(query_labels, dtype=np.int64)
    gl = ql if loo else np.asarray(gallery_labels, dtype=np.int64)
    if len(q) != len(ql) or len(g) != len(gl):
        raise ValueError("embeddings and labels must have the same number of rows")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query dim {q.shape[1]} != gallery dim {g.shape[1]}")
    classes, counts = np.unique(gl, return_counts=True)
    pos = np.searchsorted(classes, ql)
    pos = np.minimum(pos, len(classes) - 1)
    relevant = np.where(classes[pos] == ql, counts[pos], 0) - (1 if loo else 0)
    available = len(g) - (1 if loo else 0)
    length = min(available, max(depth, int(relevant.max(initial=0))))
    ids = _ranked_ids(q, g, length, loo, use_gpu)
    rel = gl[ids] == ql[:, None]
    return rel, relevant


def retrieval_metrics(
    query: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    use_gpu: bool = True,
    knn_k: int = 0,
) -> dict[str, float]:
    """Recall@K for ``ks``, mAP@R and mAP@100 of ``query [nq, D]`` against ``gallery [ng, D]``.

    Leave-one-out over ``query`` when ``gallery`` is None. Labels are ``[n]`` integers.
    ``knn_k > 0`` adds ``knn@<knn_k>`` accuracy. Returns floats in [0, 1] plus the counts
    ``queries`` and ``queries_without_relevant``; :class:`MetricsError` when no query has a relevant item.
    """
    rel, r = ranked_relevance(query, query_labels, gallery, gallery_labels, max(max(ks), 100), use_gpu)
    valid = r > 0
    if not valid.any():
        hint = "leave-one-out needs classes of two or more" if gallery is None else "no class is in both sets"
        raise MetricsError(
            f"no query can be scored: none of the {len(valid)} queries has a relevant item (same label), "
            f"so Recall@K and mAP are undefined; {hint}"
        )
    rel, r = rel[valid], r[valid]
    out: dict[str, float] = {"queries": int(valid.sum()), "queries_without_relevant": int((~valid).sum())}
    if knn_k > 0:
        out[f"knn@{knn_k}"] = knn_accuracy(query, query_labels, gallery, gallery_labels, knn_k, use_gpu)
    for k in ks:
        out[f"recall@{k}"] = float(rel[:, :k].any(axis=1).mean())
    ranks = np.arange(1, rel.shape[1] + 1)
    precision = np.cumsum(rel, axis=1) / ranks
    hits = precision * rel
    within_r = ranks[None, :] <= r[:, None]
    out["map@r"] = float(((hits * within_r).sum(1) / r).mean())
    top = min(100, rel.shape[1])
    out["map@100"] = float((hits[:, :top].sum(1) / np.minimum(r, 100)).mean())
    return out


def knn_accuracy(
    query: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    k: int = 10,
    use_gpu: bool = True,
) -> float:
    """Share of queries whose k nearest gallery items (self excluded in leave-one-out) vote for their label."""
    loo = gallery is None
    q = _normalise(query)
    g = q if loo else _normalise(gallery)
    ql = np.asarray(query_labels, dtype=np.int64)
    gl = ql if loo else np.asarray(gallery_labels, dtype=np.int64)
    k = min(k, len(g) - (1 if loo else 0))
    votes = gl[_ranked_ids(q, g, k, loo, use_gpu)]
    correct = 0
    for row, label in zip(votes, ql, strict=True):
        values, first, counts = np.unique(row, return_index=True, return_counts=True)
        best = np.flatnonzero(counts == counts.max())
        correct += int(values[best[np.argmin(first[best])]] == label)
    return correct / len(q)
