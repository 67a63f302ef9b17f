"""Retrieval metrics: exact cosine kNN, full-ranking AP, majority vote. Pure functions.

Arrays or tensors in, numbers or NumPy arrays out: no I/O, no argparse. Every entry point
(test.py, train.py, test_backbone.py) uses these so that a number means the same everywhere.

Protocol
    Leave-one-out by default: every query image is searched against all other images of the same
    set; the query itself is removed BY INDEX (query i is gallery item i), never by dropping the
    first column. A separate gallery (e.g. the training archive) is supported. With groups
    (patient ids) and ``exclude_same_group=True``, every gallery image of the query's patient is
    removed as well. Relevant = same label. Embeddings are L2-normalised here; similarity = cosine.

Definitions (R = number of relevant gallery images for the query after exclusions)
    R@K    fraction of queries with at least one relevant image in the top K.
    mP@K   mean over queries of (relevant in top K) / K.
    mAP    mean over queries of AP over the full ranking, AP = (1/R) sum_k P@k * rel_k.
           Queries with R = 0 are left out and counted (``queries_without_relevant``).
    mAP@K  mean over queries of (sum_{k<=K} P@k * rel_k) / (relevant in top K), 0 for a query with
           none in its top K (torchmetrics RetrievalMAP(top_k=K)).
    MAP@R  mean over queries of (1/R) sum_{k<=R} P@k * rel_k (Musgrave et al., 2020).
    R@K, mP@K and mAP@K average over all queries (a query with R = 0 scores 0).
    Vote@k the most frequent label among the top k; a tie goes to the tied label ranked highest. Not
           computed for a k that exceeds 2R of some query with R > 0 (it would lose with a perfect ranking).
    With a class hierarchy (``child parent`` file, leaves = class names) h(a, b) is a distance between
    classes a and b, H = the largest h between two classes. ``lca-height`` (the default): the height of
    their lowest common ancestor, the height of a node being the longest path from it down to a leaf below
    it (Bertinetto et al., CVPR 2020, "Making Better Mistakes"); ``half-path``: half the number of edges on
    the tree path between a and b. The two agree when every leaf lies at the same depth, not otherwise
    (COVIDx tree: normal vs pneumonia is 2 by LCA height, 3/2 by half-path).
    AHD@k  mean over queries of the mean h(query label, result label) over its top k.
    MS@k   mean h over all top-k results, pooled over queries, whose label differs from the query's.
    hP@k   mean over queries of the mean of 1 - h/H over its top k.
    (Reading the hierarchy file, ``load_hierarchy``, is the one function here that touches a file.)

Tie rule
    Equal similarities are ordered by gallery index, lower index first, in the top-k lists and in
    the full ranking alike, so no number depends on a sort's hidden order.

How full-ranking AP stays cheap (the floor is one matrix product + one np.sort of each row)
    Queries and gallery are visited grouped by label, so a block of same-label queries has its
    relevant gallery images in one contiguous column range. Each similarity's float bits become an
    order-preserving integer packed with the reversed ORIGINAL gallery index into one int64 key,
    ``ordered(sim) << 32 | (M - 1 - index)``: sorting keys (values only, no argsort) gives the
    ranking under the tie rule. The relevant keys and the non-relevant keys are sorted separately;
    a relevant item's rank = its rank among the relevant ones + the non-relevant keys above it
    (binary search). Top-k is merged from the segments' tails. Blocks of rows stay in cache and run
    on several threads (NumPy's sort and search release the GIL).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TIE_RULE = "equal similarities are ordered by gallery index, lower index first"
DEFAULT_K_VALUES = (1, 5, 10)
DEFAULT_VOTE_K = (1, 5, 10, 15, 20)
# Similarity-matrix elements per query chunk (float32: 256 MiB). Peak memory follows this, not N x M.
CHUNK_ELEMENTS = 1 << 26
# Elements per cache-resident block for the key/sort/AP step (int64 keys: 4 MiB).
BLOCK_ELEMENTS = 1 << 19


# --------------------------------------------------------------------------- input checks

def as_embeddings(x, name: str = "embeddings") -> torch.Tensor:
    """(N, D) finite, non-zero rows -> L2-normalised float32 CPU tensor. ValueError otherwise."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    t = t.detach().to("cpu", torch.float32)
    norms = torch.linalg.vector_norm(t, dim=1)
    if not torch.isfinite(norms).all():  # one cheap pass in the common case; details only on failure
        bad = ~torch.isfinite(t).all(dim=1)
        if bad.any():
            rows = torch.nonzero(bad).flatten()
            raise ValueError(f"{name}: {len(rows)} of {t.shape[0]} rows contain NaN or inf "
                             f"(first rows: {rows[:5].tolist()}); fix the embedding extraction")
        big = ~torch.isfinite(norms)  # finite values whose squares overflow float32
        norms[big] = torch.linalg.vector_norm(t[big].double(), dim=1).float()
        t[big] = (t[big].double() / torch.linalg.vector_norm(t[big].double(), dim=1, keepdim=True)).float()
        norms[big] = 1.0
    zero = norms == 0
    if zero.any():
        rows = torch.nonzero(zero).flatten()
        raise ValueError(f"{name}: {len(rows)} of {t.shape[0]} rows are all zero (no direction, "
                         f"cosine undefined; first rows: {rows[:5].tolist()})")
    return (t / norms[:, None]).contiguous()


def as_labels(labels, n: int, name: str = "labels", embeddings_name: str = "embeddings") -> np.ndarray:
    """1-D integer labels of length n -> int64 array. ValueError naming both counts otherwise."""
    a = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if len(a) != n:
        raise ValueError(f"{name} has {len(a)} entries but {embeddings_name} has {n} rows; "
                         f"they must come from the same image list")
    if a.dtype.kind not in "iub":
        if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise ValueError(f"{name} must be integer class ids, got dtype {a.dtype}")
    return a.astype(np.int64)


def _group_codes(query_groups, gallery_groups, nq: int, ng: int):
    """Arbitrary hashable ids (e.g. patient id strings) -> int64 codes shared by both sides."""
    qg = np.asarray(query_groups).astype(str)
    gg = np.asarray(gallery_groups).astype(str)
    if qg.ndim != 1 or len(qg) != nq:
        raise ValueError(f"query_groups has {qg.size} entries but there are {nq} queries")
    if gg.ndim != 1 or len(gg) != ng:
        raise ValueError(f"gallery_groups has {gg.size} entries but the gallery has {ng} images")
    _, inv = np.unique(np.concatenate([qg, gg]), return_inverse=True)
    return inv[:nq].astype(np.int64), inv[nq:].astype(np.int64)


def _exclusion_counts(qlab, glab, exclude_self, qgrp, ggrp):
    """Per query: gallery size and number of relevant images after exclusions (no search needed)."""
    m = len(glab)
    nlab = int(max(qlab.max(), glab.max())) + 1
    rel_count = np.bincount(glab, minlength=nlab)[qlab]
    if qgrp is not None:
        ngrp = int(max(qgrp.max(), ggrp.max())) + 1
        grp_count = np.bincount(ggrp, minlength=ngrp)[qgrp]
        pair = np.bincount(ggrp * nlab + glab, minlength=ngrp * nlab)
        grp_rel = pair[qgrp * nlab + qlab]
        return m - grp_count, rel_count - grp_rel
    if exclude_self:
        return np.full(len(qlab), m - 1), rel_count - 1
    return np.full(len(qlab), m), rel_count


def candidate_counts(query_labels, gallery_labels=None, query_groups=None, gallery_groups=None,
                     exclude_same_group: bool = False):
    """Per query (candidates, relevant): gallery size and relevant images after exclusions.

    gallery_labels=None means leave-one-out. Needs no embeddings, so scripts can check k values
    before any image is embedded.
    """
    qlab = as_labels(query_labels, len(query_labels), "query labels")
    loo = gallery_labels is None
    glab = qlab if loo else as_labels(gallery_labels, len(gallery_labels), "gallery labels")
    qgrp = ggrp = None
    if exclude_same_group:
        if query_groups is None:
            raise ValueError("excluding same-patient images needs patient ids")
        qgrp, ggrp = _group_codes(query_groups, query_groups if loo else gallery_groups,
                                  len(qlab), len(glab))
    return _exclusion_counts(qlab, glab, loo, qgrp, ggrp)


def check_k(k_values, candidates) -> None:
    """ValueError when a k exceeds the smallest per-query candidate count."""
    kmax, cmin = max(k_values), int(np.min(candidates))
    if kmax > cmin:
        raise ValueError(f"k = {kmax} is larger than the gallery after exclusions (a query has only "
                         f"{cmin} candidate images); pass smaller k values (--k-values)")


# --------------------------------------------------------------------------- per-query helpers

def recall_at_k(rel, k: int) -> np.ndarray:
    """Per query: 1.0 if any of the first k columns of ``rel`` (Q, >=k bool) is relevant."""
    rel = np.asarray(rel, dtype=bool)
    return rel[:, :k].any(axis=1).astype(np.float64)


def precision_at_k(rel, k: int) -> np.ndarray:
    """Per query: (relevant in top k) / k."""
    rel = np.asarray(rel, dtype=bool)
    return rel[:, :k].sum(axis=1) / float(k)


def map_at_k(rel, k: int) -> np.ndarray:
    """Per query: (sum_{i<=k} P@i * rel_i) / (relevant in top k); 0 when none is relevant."""
    r = np.asarray(rel, dtype=bool)[:, :k].astype(np.float64)
    hits = np.cumsum(r, axis=1)
    prec = hits / np.arange(1, r.shape[1] + 1)
    n = hits[:, -1]
    out = np.zeros(len(r))
    np.divide((prec * r).sum(axis=1), n, out=out, where=n > 0)
    return out


def majority_vote(neighbour_labels, k: int) -> np.ndarray:
    """Most frequent label among the first k neighbours; a tie goes to the tied label ranked highest."""
    lab = np.asarray(neighbour_labels)[:, :k].astype(np.int64)
    q = len(lab)
    classes, inv = np.unique(lab, return_inverse=True)
    inv = inv.reshape(lab.shape)
    c = len(classes)
    counts = np.zeros((q, c), np.int64)
    np.add.at(counts, (np.arange(q)[:, None], inv), 1)
    first = np.full((q, c), k, np.int64)
    np.minimum.at(first, (np.arange(q)[:, None], inv), np.broadcast_to(np.arange(k), inv.shape))
    # more votes wins; among equal votes the label whose first neighbour ranks highest
    score = counts * (k + 1) - first
    return classes[score.argmax(axis=1)]


def bootstrap_ci(values, n_boot: int, seed: int = 0, level: float = 0.95):
    """Percentile CI of the mean of per-query ``values`` over n_boot resamples (seeded)."""
    v = np.asarray(values, dtype=np.float64)
    if n_boot <= 0 or len(v) == 0:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    step = max(1, (1 << 22) // len(v))  # bound the (reps, n) index matrix
    for s in range(0, n_boot, step):
        reps = min(step, n_boot - s)
        means[s:s + reps] = v[rng.integers(0, len(v), size=(reps, len(v)))].mean(axis=1)
    a = (1 - level) / 2
    return [float(np.quantile(means, a)), float(np.quantile(means, 1 - a))]


# --------------------------------------------------------------------------- ranking core

def _ordered_int32(sim: np.ndarray) -> np.ndarray:
    """float32 -> int32 with the same order (-0.0 and +0.0 mapped alike). sim is modified."""
    sim += np.float32(0.0)  # -0.0 + 0.0 = +0.0, so equal values get equal keys
    bits = sim.view(np.int32)
    return bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))


def _ap_block(sim: np.ndarray, rel: np.ndarray):
    """Full-ranking sums for a block of rows with an arbitrary relevance mask.

    sim: (B, M) float32, excluded entries -inf (modified in place); rel: (B, M) bool, False where
    excluded. Keys ordered(sim) << 32 | (M - 1 - index) << 1 | rel give the whole ranking under the
    tie rule in one np.sort of values; the relevant positions are read back from the low bit.
    Returns per-row sum_k P@k rel_k over the full ranking and over the first R ranks, and R.
    """
    b, m = sim.shape
    key = np.left_shift(_ordered_int32(sim), 32, dtype=np.int64)
    key |= np.arange(m - 1, -1, -1, dtype=np.int64) << 1
    key |= rel
    key.sort(axis=1)  # ascending: the ranking read from the right end
    f = np.flatnonzero(key & 1)  # positions of relevant items, row-major, ascending
    rows = f // m
    rank = m - (f - rows * m)  # 1 = most similar
    num_rel = np.bincount(rows, minlength=b)
    j = np.cumsum(num_rel)[rows] - np.arange(len(f))  # relevant items ranked at or above this one
    prec = j / rank
    return (np.bincount(rows, prec, minlength=b),
            np.bincount(rows, prec * (rank <= num_rel[rows]), minlength=b), num_rel)


def _topk(sim: torch.Tensor, k: int):
    """Top-k of each row of a (c, M) float tensor (excluded entries -inf) under the tie rule.

    torch.topk is O(M) but orders ties arbitrarily; so the k results are re-sorted by
    (similarity desc, index asc), and rows where a tie straddles the k-th place (more equal
    values in the row than in the top k) get their lowest-index members chosen explicitly.
    """
    vals, idx = torch.topk(sim, k, dim=1)
    thr = vals[:, -1:]
    n_eq_row = (sim == thr).sum(dim=1)
    n_eq_top = (vals == thr).sum(dim=1)
    for r in torch.nonzero(n_eq_row > n_eq_top).flatten().tolist():
        row = sim[r]
        take = row > thr[r]
        eq = torch.nonzero(row == thr[r]).flatten()[:k - int(take.sum())]  # lowest indices first
        take[eq] = True
        idx[r] = torch.nonzero(take).flatten()
        vals[r] = row[idx[r]]
    # order: similarity descending, then index ascending (sort by index, then stable by value)
    idx, order = idx.sort(dim=1)
    vals = vals.gather(1, order)
    vals, order = vals.sort(dim=1, descending=True, stable=True)
    idx = idx.gather(1, order)
    return idx.cpu().numpy().astype(np.int64), vals.cpu().numpy().astype(np.float32)


_EXCLUDED = np.iinfo(np.int64).min  # key of an excluded gallery item: below every real key


def _keys(sim: np.ndarray, index_code: np.ndarray) -> np.ndarray:
    """int64 keys ordered(sim) << 32 | (M - 1 - gallery index) of a (B, M) similarity block.

    Ascending key = ascending similarity, and among equal similarities the LOWER gallery index
    sorts later, i.e. ranks first (the tie rule). sim is modified (-0.0 becomes +0.0).
    """
    key = np.left_shift(_ordered_int32(sim), 32, dtype=np.int64)
    key |= index_code
    return key


def _rank_class_block(key: np.ndarray, r_tot: int, kmax: int, n_excluded_pos: np.ndarray):
    """Rank a block of queries of ONE class; key columns are [non-relevant | relevant].

    key: (B, M) from _keys, excluded entries = _EXCLUDED; the last r_tot columns are the gallery
    images of the query class. Both parts are sorted separately (no more work than one full sort);
    each relevant item's rank = its rank among the relevant ones + the number of non-relevant keys
    above it (one binary search per row). No relevance mask is scanned. Returns top-k original
    gallery indices, per-row sums of P@k rel_k over the full ranking and over the first R ranks,
    and R.
    """
    nb, m = key.shape
    n_neg = m - r_tot
    neg, pos = key[:, :n_neg], key[:, n_neg:]
    neg.sort(axis=1)
    pos.sort(axis=1)
    n_rel = r_tot - n_excluded_pos
    ap_sum = np.zeros(nb)
    mapr_sum = np.zeros(nb)
    if r_tot:
        above = np.empty((nb, r_tot), np.int64)  # non-relevant keys above each relevant key
        for i in range(nb):  # per row: a binary search beats scanning a mask of all M items
            above[i] = np.searchsorted(neg[i], pos[i])
        np.subtract(n_neg, above, out=above)
        j = np.arange(r_tot, 0, -1)  # pos ascending: the last one is the best relevant item (j = 1)
        rank = j + above
        prec = j / rank
        prec[np.arange(r_tot) < n_excluded_pos[:, None]] = 0.0  # excluded keys sort first
        ap_sum = prec.sum(axis=1)
        prec[rank > n_rel[:, None]] = 0.0
        mapr_sum = prec.sum(axis=1)
    # top-k: merge the best kmax of each sorted part
    cand = np.concatenate([s[:, -kmax:] for s in (neg, pos) if s.shape[1]], axis=1)
    cand.sort(axis=1)
    top = cand[:, -kmax:][:, ::-1]
    top_idx = (m - 1) - (top & 0xFFFFFFFF)
    return top_idx, ap_sum, mapr_sum, n_rel


@dataclass
class Ranking:
    """Per-query search results. Arrays are indexed by query; gallery indices refer to the gallery."""
    indices: np.ndarray            # (Q, K) int64, ranked, excluded items never present
    sims: np.ndarray               # (Q, K) float32 cosine similarities
    relevant: np.ndarray | None    # (Q, K) bool, same label
    ap: np.ndarray | None          # (Q,) float64 full-ranking AP, NaN where num_relevant == 0
    map_at_r: np.ndarray | None    # (Q,) float64, NaN where num_relevant == 0
    num_relevant: np.ndarray | None  # (Q,) int64 R after exclusions
    num_candidates: np.ndarray     # (Q,) int64 gallery size after exclusions
    exclude_self: bool
    exclude_same_group: bool


def _resolve(query, gallery, query_labels, gallery_labels, exclude_self, query_groups,
             gallery_groups, k, checked=False):
    q = query if checked else as_embeddings(query, "query embeddings")
    loo = gallery is None
    g = q if loo else gallery if checked else as_embeddings(gallery, "gallery embeddings")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query embeddings have dimension {q.shape[1]} but gallery embeddings "
                         f"have {g.shape[1]}; they must come from the same model")
    if exclude_self is None:
        exclude_self = loo
    if exclude_self and q.shape[0] != g.shape[0]:
        raise ValueError(f"exclude_self needs query i == gallery i, but there are {q.shape[0]} "
                         f"queries and {g.shape[0]} gallery images")
    qlab = glab = None
    if query_labels is not None:
        qlab = as_labels(query_labels, q.shape[0], "query labels", "query embeddings")
        glab = qlab if loo and gallery_labels is None else as_labels(
            gallery_labels, g.shape[0], "gallery labels", "gallery embeddings")
        if qlab.min() < 0 or glab.min() < 0:
            raise ValueError("labels must be non-negative class ids")
    qgrp = ggrp = None
    if query_groups is not None:
        qgrp, ggrp = _group_codes(query_groups, query_groups if gallery_groups is None and loo
                                  else gallery_groups, q.shape[0], g.shape[0])
    if qlab is not None:
        cand, nrel = _exclusion_counts(qlab, glab, exclude_self, qgrp, ggrp)
    else:
        cand, nrel = _exclusion_counts(np.zeros(q.shape[0], np.int64), np.zeros(g.shape[0], np.int64),
                                       exclude_self, qgrp, ggrp)
        nrel = None
    if k > cand.min():
        worst = int(np.argmin(cand))
        raise ValueError(f"k = {k} is larger than the gallery after exclusions: query {worst} has only "
                         f"{int(cand.min())} candidate images (gallery {g.shape[0]}, self excluded: "
                         f"{bool(exclude_self)}, same-patient excluded: {qgrp is not None}); "
                         f"use smaller k values")
    return q, g, qlab, glab, qgrp, ggrp, bool(exclude_self), cand, nrel


def _default_chunk(m: int, chunk_size):
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    return max(1, CHUNK_ELEMENTS // m)


def rank(query, query_labels=None, gallery=None, gallery_labels=None, *, k: int = 10,
         exclude_self=None, query_groups=None, gallery_groups=None, full_ranking: bool = True,
         chunk_size=None, backend: str = "torch", device=None, faiss_index: str = "flat",
         _checked: bool = False) -> Ranking:
    """Exact cosine search of every query, with exclusions; top-k plus (optionally) full-ranking AP.

    gallery=None means leave-one-out (gallery = query set, self excluded by index).
    query_groups/gallery_groups given -> gallery images of the query's group are excluded too.
    backend "faiss" does the top-k with faiss (``faiss_index`` "flat" is exact); full-ranking
    AP and MAP@R always come from the exact chunked torch/NumPy pass and need ``full_ranking``.
    """
    if backend not in ("torch", "faiss"):
        raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q, g, qlab, glab, qgrp, ggrp, exclude_self, cand, nrel = _resolve(
        query, gallery, query_labels, gallery_labels, exclude_self, query_groups, gallery_groups, k,
        _checked)
    if full_ranking and qlab is None:
        raise ValueError("full_ranking needs query labels")
    nq, m = q.shape[0], g.shape[0]
    device = torch.device(device) if device is not None else torch.device("cpu")
    top_idx = np.empty((nq, k), np.int64)
    top_sims = np.empty((nq, k), np.float32)
    ap = mapr = None
    use_torch_topk = backend == "torch"
    if backend == "faiss":
        top_sims[:], top_idx[:] = _faiss_topk(q, g, k, exclude_self, qgrp, ggrp, cand, faiss_index)
        if not full_ranking:
            use_torch_topk = False
    if full_ranking:
        ti, ts, ap_sum, mapr_sum, num_rel = _full_ranking_by_class(
            q, g, qlab, glab, qgrp, ggrp, exclude_self, k, chunk_size, device)
        if use_torch_topk:
            top_idx, top_sims = ti, ts
    elif use_torch_topk:
        chunk = _default_chunk(m, chunk_size)
        gd = g.to(device)
        ggrp_t = torch.from_numpy(ggrp).to(device) if ggrp is not None else None
        for s in range(0, nq, chunk):
            e = min(nq, s + chunk)
            sim = (q[s:e].to(device) @ gd.T).float()  # (c, M), the only big buffer
            if exclude_self:  # query i is gallery item i: removed by index
                rows = torch.arange(e - s, device=sim.device)
                sim[rows, s + rows] = -torch.inf
            if qgrp is not None:
                sim.masked_fill_(torch.from_numpy(qgrp[s:e]).to(device)[:, None] == ggrp_t[None, :], -torch.inf)
            top_idx[s:e], top_sims[s:e] = _topk(sim, k)
    if full_ranking:
        assert np.array_equal(num_rel, nrel), "relevant counts disagree with label counts"
        with np.errstate(invalid="ignore", divide="ignore"):
            ap = np.where(num_rel > 0, ap_sum / np.maximum(num_rel, 1), np.nan)
            mapr = np.where(num_rel > 0, mapr_sum / np.maximum(num_rel, 1), np.nan)
    relevant = (glab[top_idx] == qlab[:, None]) if qlab is not None else None
    return Ranking(indices=top_idx, sims=top_sims, relevant=relevant, ap=ap, map_at_r=mapr,
                   num_relevant=nrel, num_candidates=cand, exclude_self=exclude_self,
                   exclude_same_group=qgrp is not None)


def _full_ranking_by_class(q, g, qlab, glab, qgrp, ggrp, exclude_self, k, chunk_size, device):
    """Chunked exact search with full-ranking AP.

    Queries are visited grouped by label (stable sort), so a block of queries shares one class;
    within a cache-resident block the similarity columns are reordered to [other classes | the
    query class] (the gallery itself is never copied). Keys carry the ORIGINAL gallery index, so
    the tie rule does not depend on the reordering.
    """
    nq, m = q.shape[0], g.shape[0]
    q_order = np.argsort(qlab, kind="stable")
    qlab_sorted = qlab[q_order]
    # position of each gallery image among the images of its class (ascending index)
    g_order = np.argsort(glab, kind="stable")
    class_start = np.searchsorted(glab[g_order], glab)
    within_class = np.empty(m, np.int64)
    within_class[g_order] = np.arange(m)
    within_class -= class_start
    gd = g.to(device)
    q_order_t = torch.from_numpy(q_order)
    top_idx = np.empty((nq, k), np.int64)
    top_sims = np.empty((nq, k), np.float32)
    ap_sum, mapr_sum, num_rel = np.empty(nq), np.empty(nq), np.empty(nq, np.int64)
    chunk = _default_chunk(m, chunk_size)
    max_block = max(1, BLOCK_ELEMENTS // m)
    columns = {}  # class -> (column order, index code, number in class); blocks come class by class

    def class_columns(c):
        if c not in columns:
            columns.clear()
            is_c = glab == c
            cols = np.concatenate([np.flatnonzero(~is_c), np.flatnonzero(is_c)])
            columns[c] = (cols, (m - 1) - cols, int(is_c.sum()))
        return columns[c]

    def run_block(sim, s, bs, be, cols, index_code, r_tot):
        rows = slice(s + bs, s + be)
        key = _keys(np.take(sim[bs:be], cols, axis=1), index_code)
        if qgrp is not None:
            same = qgrp[q_order[rows], None] == ggrp[cols][None, :]
            key[same] = _EXCLUDED
            n_ex = same[:, m - r_tot:].sum(axis=1)
        elif exclude_self:  # query i is gallery item i, a member of its own class: removed by index
            key[np.arange(be - bs), m - r_tot + within_class[q_order[rows]]] = _EXCLUDED
            n_ex = np.ones(be - bs, np.int64)
        else:
            n_ex = np.zeros(be - bs, np.int64)
        ti, ap_sum[rows], mapr_sum[rows], num_rel[rows] = _rank_class_block(key, r_tot, k, n_ex)
        top_idx[rows] = ti
        top_sims[rows] = np.take_along_axis(sim[bs:be], ti, axis=1)

    # NumPy's sort and binary search release the GIL: blocks run on as many threads as torch uses
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        for s in range(0, nq, chunk):
            e = min(nq, s + chunk)
            sim = (q[q_order_t[s:e]].to(device) @ gd.T).float().cpu().numpy()  # (c, M): the big buffer
            jobs, bs = [], 0
            while bs < e - s:  # blocks of at most max_block rows of one query label
                c = qlab_sorted[s + bs]
                be = min(e - s, bs + max_block, bs + int(np.searchsorted(qlab_sorted[s + bs:e], c, "right")))
                jobs.append(pool.submit(run_block, sim, s, bs, be, *class_columns(c)))
                bs = be
            for j in jobs:
                j.result()
            del sim, jobs  # free this chunk before the next product allocates its own
    inv = np.empty(nq, np.int64)
    inv[q_order] = np.arange(nq)  # back to the caller's query order
    return top_idx[inv], top_sims[inv], ap_sum[inv], mapr_sum[inv], num_rel[inv]


def knn_search(query, gallery, k: int, *, exclude_self: bool = False, query_groups=None,
               gallery_groups=None, chunk_size=None, backend: str = "torch", device=None,
               faiss_index: str = "flat"):
    """Exact top-k by cosine similarity -> (sims (Q, k) float32, indices (Q, k) int64), NumPy.

    Excluded entries (self by index, same group) are never returned; ties: lower gallery index first.
    For leave-one-out pass the same array as query and gallery with exclude_self=True.
    """
    same = gallery is query
    r = rank(query, None, None if same and exclude_self else gallery, None, k=k,
             exclude_self=exclude_self, query_groups=query_groups,
             gallery_groups=gallery_groups, full_ranking=False, chunk_size=chunk_size,
             backend=backend, device=device, faiss_index=faiss_index)
    return r.sims, r.indices


# --------------------------------------------------------------------------- faiss backend

def _faiss_topk(q, g, k, exclude_self, qgrp, ggrp, cand, index_type):
    """Top-k with faiss, then exclusions and the tie rule applied on exactly recomputed sims."""
    try:
        import faiss  # noqa: F401  (fail here, with the install hint, before any work)
    except ImportError as e:  # optional dependency
        raise ValueError("backend='faiss' needs faiss: pip install faiss-cpu") from e
    qn, gn = q.numpy(), g.numpy()
    index = build_faiss_index(gn, index_type)
    # ask for enough extra neighbours to survive the exclusions, plus slack for near-ties
    n_excl = int((len(gn) - cand).max())
    kk = min(len(gn), k + n_excl + 8)
    while True:
        _, idx = index.search(qn, kk)
        idx = idx.astype(np.int64)
        valid = idx >= 0
        safe = np.where(valid, idx, 0)
        sims = np.einsum("qd,qkd->qk", qn, gn[safe]).astype(np.float32)
        sims[~valid] = -np.inf
        if exclude_self:
            sims[safe == np.arange(len(qn))[:, None]] = -np.inf
        if qgrp is not None:
            sims[ggrp[safe] == qgrp[:, None]] = -np.inf
        # sort by (-sim, index): lexsort's last key is primary
        order = np.lexsort((safe, -sims), axis=1)
        sims = np.take_along_axis(sims, order, 1)
        safe = np.take_along_axis(safe, order, 1)
        enough = (sims[:, k - 1] > -np.inf).all()
        if enough or kk == len(gn):
            break
        kk = min(len(gn), kk * 2)
    return sims[:, :k], safe[:, :k]


def build_faiss_index(gallery: np.ndarray, index_type: str = "flat", nlist=None, nprobe: int = 16,
                      hnsw_m: int = 32, ef_search: int = 128):
    """faiss inner-product index on unit rows: "flat" (exact), "ivf" or "hnsw" (approximate)."""
    import faiss
    d = gallery.shape[1]
    g = np.ascontiguousarray(gallery, dtype=np.float32)
    if index_type == "flat":
        index = faiss.IndexFlatIP(d)
    elif index_type == "ivf":
        nlist = nlist or max(1, int(4 * math.sqrt(len(g))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(g)
        index.nprobe = nprobe
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    else:
        raise ValueError(f"faiss index must be 'flat', 'ivf' or 'hnsw', got {index_type!r}")
    index.add(g)
    return index


# --------------------------------------------------------------------------- full matrices

def topk_from_similarity(sim, k: int, exclude_mask=None) -> np.ndarray:
    """Top-k indices (Q, k) of a similarity matrix under the tie rule; masked entries never returned."""
    s = np.array(sim.detach().cpu().numpy() if isinstance(sim, torch.Tensor) else sim,
                 dtype=np.float32, copy=True)
    if exclude_mask is not None:
        s[np.asarray(exclude_mask, dtype=bool)] = -np.inf
    avail = np.isfinite(s).sum(axis=1).min() if exclude_mask is not None else s.shape[1]
    if k > avail:
        raise ValueError(f"k = {k} is larger than the {avail} candidates left after exclusions")
    out = np.empty((len(s), k), np.int64)
    chunk = max(1, CHUNK_ELEMENTS // s.shape[1])
    for b in range(0, len(s), chunk):
        out[b:b + chunk] = _topk(torch.from_numpy(s[b:b + chunk]), k)[0]
    return out


def average_precision(sim, relevant, exclude_mask=None, return_map_at_r: bool = False):
    """Full-ranking AP per row of a similarity matrix (NaN where a row has no relevant item).

    ``relevant`` (Q, M) bool; ``exclude_mask`` (Q, M) bool entries are removed from the ranking.
    With return_map_at_r also returns MAP@R per row.
    """
    s = np.array(sim.detach().cpu().numpy() if isinstance(sim, torch.Tensor) else sim,
                 dtype=np.float32, copy=True)
    rel = np.asarray(relevant, dtype=bool)
    if rel.shape != s.shape:
        raise ValueError(f"relevant has shape {rel.shape} but sim has shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("similarity matrix contains NaN or inf")
    if exclude_mask is not None:
        ex = np.asarray(exclude_mask, dtype=bool)
        s[ex] = -np.inf
        rel = rel & ~ex
    ap_sum, mapr_sum, nrel = np.empty(len(s)), np.empty(len(s)), np.empty(len(s), np.int64)
    block = max(1, BLOCK_ELEMENTS // s.shape[1])
    for b in range(0, len(s), block):
        ap_sum[b:b + block], mapr_sum[b:b + block], nrel[b:b + block] = _ap_block(
            s[b:b + block], rel[b:b + block])
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(nrel > 0, ap_sum / np.maximum(nrel, 1), np.nan)
        mapr = np.where(nrel > 0, mapr_sum / np.maximum(nrel, 1), np.nan)
    return (ap, mapr) if return_map_at_r else ap


def map_at_r(sim, relevant, exclude_mask=None) -> np.ndarray:
    """MAP@R per row of a similarity matrix (NaN where a row has no relevant item)."""
    return average_precision(sim, relevant, exclude_mask, return_map_at_r=True)[1]


# --------------------------------------------------------------------------- summary

def _mean(x) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    return float(x.mean()) if len(x) else None


def vote_metrics(y_true, y_pred, labels, class_names) -> dict:
    """Accuracy, macro/weighted precision/recall/F1, per-class report, confusion matrix (sklearn)."""
    from sklearn.metrics import (accuracy_score, classification_report, confusion_matrix,
                                 precision_recall_fscore_support)
    out = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg,
                                                     zero_division=0)
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = float(p), float(r), float(f)
    rep = classification_report(y_true, y_pred, labels=labels, target_names=class_names,
                                output_dict=True, zero_division=0)
    out["per_class"] = {n: {kk: float(v) for kk, v in rep[n].items()} for n in class_names}
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def vote_short_classes(num_relevant, query_labels, vote_k, names) -> dict:
    """{str(k): {class name: R}} for each vote k that some query class cannot win even with a perfect ranking:
    R = the fewest relevant gallery images a query of the class has (queries with none left aside: they
    cannot be right at any k) and 2R < k. A tie R = k/2 is winnable: it goes to the label ranked highest."""
    if num_relevant is None:
        return {}
    qlab, nrel = np.asarray(query_labels), np.asarray(num_relevant)
    fewest = {c: int(nrel[(qlab == c) & (nrel > 0)].min()) for c in np.unique(qlab)
              if ((qlab == c) & (nrel > 0)).any()}
    out = {}
    for k in sorted(set(int(k) for k in vote_k)):
        small = {names[c]: r for c, r in sorted(fewest.items(), key=lambda x: (x[1], x[0])) if 2 * r < k}
        if small:
            out[str(k)] = small
    return out


def retrieval_metrics(ranking: Ranking, query_labels, gallery_labels=None, *,
                      k_values=DEFAULT_K_VALUES, vote_k=DEFAULT_VOTE_K, class_names=None,
                      bootstrap: int = 0, seed: int = 0) -> dict:
    """Flat results dict (fractions in [0, 1]) from a Ranking made with labels.

    vote_k values larger than the ranking's k, or too large for a query class to win (vote_short_classes,
    listed in ``vote_k_without_majority``), are skipped and listed in ``vote_skipped_k``; k_values larger
    than the ranking's k raise ValueError.
    """
    qlab = np.asarray(query_labels, dtype=np.int64)
    glab = qlab if gallery_labels is None else np.asarray(gallery_labels, dtype=np.int64)
    kmax = ranking.indices.shape[1]
    for k in k_values:
        if k < 1 or k > kmax:
            raise ValueError(f"k = {k} outside 1..{kmax} (the ranking was computed with k = {kmax})")
    rel = ranking.relevant
    labels = sorted(set(np.unique(qlab).tolist()) | set(np.unique(glab).tolist()))
    if class_names is None:
        names = {c: str(c) for c in labels}
    else:
        names = {c: (class_names[c] if c < len(class_names) else str(c)) for c in labels}
    has_rel = ranking.num_relevant > 0
    res = {
        "num_queries": int(len(qlab)),
        "num_gallery": int(len(glab)),
        "protocol": "leave-one-out" if ranking.exclude_self else "separate gallery",
        "exclude_same_patient": bool(ranking.exclude_same_group),
        "queries_without_relevant": int((~has_rel).sum()),
        "tie_rule": TIE_RULE,
    }
    for k in k_values:
        res[f"R@{k}"] = _mean(recall_at_k(rel, k))
    for k in k_values:
        res[f"mP@{k}"] = _mean(precision_at_k(rel, k))
    res["mAP"] = _mean(ranking.ap[has_rel]) if ranking.ap is not None else None
    for k in k_values:
        if k > 1:  # mAP@1 is R@1 by definition
            res[f"mAP@{k}"] = _mean(map_at_k(rel, k))
    res["MAP@R"] = _mean(ranking.map_at_r[has_rel]) if ranking.map_at_r is not None else None

    # A vote over k neighbours is fair only when every query's class can hold a majority of them: a query with
    # R relevant gallery images (after exclusions) and 2R < k loses even when all R rank first, since the other
    # k - R votes may all go to one class (the demo's vote@20 with R = 6 scored 0 for every query). Such k are
    # not computed; results list them with every class that is too small and its R.
    short = vote_short_classes(ranking.num_relevant, qlab, vote_k, names)
    neighbour_labels = glab[ranking.indices]
    res["vote"] = {}
    res["vote_skipped_k"] = sorted(int(k) for k in set(vote_k) if k > kmax or str(k) in short)
    res["vote_k_without_majority"] = short
    for k in vote_k:
        if k <= kmax and str(k) not in short:
            pred = majority_vote(neighbour_labels, k)
            res["vote"][str(k)] = vote_metrics(qlab, pred, labels, [names[c] for c in labels])

    r1 = recall_at_k(rel, 1)
    per_class = {}
    for c in labels:
        sel = qlab == c
        if not sel.any():
            continue
        sel_ap = sel & has_rel
        per_class[names[c]] = {
            "num_queries": int(sel.sum()),
            "R@1": _mean(r1[sel]),
            "mAP": _mean(ranking.ap[sel_ap]) if ranking.ap is not None and sel_ap.any() else None,
            "queries_without_relevant": int((sel & ~has_rel).sum()),
        }
    res["per_class"] = per_class

    ci = {}
    if bootstrap > 0:
        ci["R@1"] = bootstrap_ci(r1, bootstrap, seed)
        if ranking.ap is not None and has_rel.any():
            ci["mAP"] = bootstrap_ci(ranking.ap[has_rel], bootstrap, seed)
        if kmax >= 5:
            ci["mAP@5"] = bootstrap_ci(map_at_k(rel, 5), bootstrap, seed)
        ci["num_bootstrap"] = int(bootstrap)
        ci["seed"] = int(seed)
    res["ci95"] = ci
    return res


def evaluate(query_embeddings, query_labels, gallery_embeddings=None, gallery_labels=None, *,
             k_values=DEFAULT_K_VALUES, vote_k=DEFAULT_VOTE_K, query_groups=None,
             gallery_groups=None, exclude_same_group: bool = False, class_names=None,
             bootstrap: int = 0, seed: int = 0, full_ranking: bool = True, chunk_size=None,
             backend: str = "torch", device=None, faiss_index: str = "flat",
             return_ranking: bool = False):
    """Embeddings + labels -> flat results dict (see module docstring for the definitions).

    No gallery: leave-one-out. Groups (patient ids) are used for exclusion only when
    exclude_same_group=True; otherwise, when given, ``queries_with_same_patient_in_gallery``
    counts the queries that have another image of their own patient in the gallery.
    """
    k_values = sorted(set(int(k) for k in k_values))
    if not k_values or k_values[0] < 1:
        raise ValueError(f"k values must be >= 1, got {k_values}")
    q = as_embeddings(query_embeddings, "query embeddings")
    qlab = as_labels(query_labels, q.shape[0], "query labels", "query embeddings")
    loo = gallery_embeddings is None
    g = q if loo else as_embeddings(gallery_embeddings, "gallery embeddings")
    glab = qlab if loo else as_labels(gallery_labels, g.shape[0], "gallery labels",
                                      "gallery embeddings")
    if not loo and gallery_labels is None:
        raise ValueError("gallery embeddings given without gallery labels")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query embeddings have dimension {q.shape[1]} but gallery embeddings "
                         f"have {g.shape[1]}; they must come from the same model")
    qgrp = ggrp = None
    same_patient = None
    if query_groups is not None:
        if not loo and gallery_groups is None:
            raise ValueError("query groups (patient ids) given without gallery groups")
        qgrp, ggrp = _group_codes(query_groups, query_groups if loo else gallery_groups,
                                  q.shape[0], g.shape[0])
        grp_count = np.bincount(ggrp, minlength=int(max(qgrp.max(), ggrp.max())) + 1)[qgrp]
        same_patient = int(((grp_count - (1 if loo else 0)) > 0).sum())
    elif exclude_same_group:
        raise ValueError("exclude_same_group needs patient ids (query_groups)")
    # the smallest candidate count bounds k; vote k above it is skipped, requested k above it is an error
    cand, _ = _exclusion_counts(qlab, glab, loo, qgrp if exclude_same_group else None,
                                ggrp if exclude_same_group else None)
    check_k(k_values, cand)
    kmax = max([k_values[-1]] + [k for k in vote_k if k <= cand.min()] + ([5] if cand.min() >= 5 else []))
    ranking = rank(q, qlab, None if loo else g, None if loo else glab, k=kmax, exclude_self=loo,
                   query_groups=qgrp if exclude_same_group else None,
                   gallery_groups=ggrp if exclude_same_group else None,
                   full_ranking=full_ranking, chunk_size=chunk_size, backend=backend,
                   device=device, faiss_index=faiss_index, _checked=True)
    res = retrieval_metrics(ranking, qlab, glab, k_values=k_values, vote_k=vote_k,
                            class_names=class_names, bootstrap=bootstrap, seed=seed)
    if same_patient is not None:
        res["queries_with_same_patient_in_gallery"] = same_patient
    res["knn_backend"] = backend if backend == "torch" else f"faiss-{faiss_index}"
    return (res, ranking) if return_ranking else res


# --------------------------------------------------------------------------- class hierarchy

# Hierarchy files shipped with the toolkit, by --dataset (test.py's default --hierarchy).
HIERARCHY_DIR = Path(__file__).resolve().parent / "data" / "ontology"
DEFAULT_HIERARCHIES = {"covid": HIERARCHY_DIR / "covidx_hierarchy.txt"}
# h(a, b): the height of the lowest common ancestor (the mistake severity of Bertinetto et al. 2020), or half
# the tree path; equal on trees whose leaves all lie at one depth (see the module docstring).
HIERARCHY_DISTANCES = ("lca-height", "half-path")


@dataclass
class Hierarchy:
    """A class tree checked against the class names; distances between classes precomputed.

    ``distance[a, b]`` = h(a, b) under ``distance_name`` (one of HIERARCHY_DISTANCES, see the module
    docstring; class ids index ``classes``); ``H`` = the largest h between two classes.
    """
    source: str
    parents: dict                  # node -> parent node (the root maps to None)
    classes: list                  # class names in label-id order
    distance: np.ndarray           # (C, C) float64
    H: float
    distance_name: str = "lca-height"


def parse_hierarchy(text: str, source: str = "hierarchy") -> dict:
    """``child parent`` lines (the root's parent is ``-``; blank lines and ``#`` comments skipped)
    -> {node: parent or None}. Checks the tree itself: one root, no node with two parents, every
    parent defined, no cycle. ValueError naming SOURCE:LINE otherwise."""
    parents, line_of = {}, {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source}:{n}: expected 'child parent' (the root's parent is '-'), got {raw.strip()!r}")
        child, parent = parts
        if child == "-":
            raise ValueError(f"{source}:{n}: '-' marks the root's parent and cannot be a node name")
        if child in parents:
            raise ValueError(f"{source}:{n}: '{child}' already has a parent (line {line_of[child]}); "
                             f"a node has exactly one parent")
        if child == parent:
            raise ValueError(f"{source}:{n}: '{child}' is its own parent (a cycle)")
        parents[child], line_of[child] = (None if parent == "-" else parent), n
    if not parents:
        raise ValueError(f"{source}: no 'child parent' lines")
    undefined = sorted({p for p in parents.values() if p is not None and p not in parents})
    roots = sorted(c for c, p in parents.items() if p is None)
    if undefined:
        raise ValueError(f"{source}: parent(s) {undefined} have no line of their own, so the tree would have "
                         f"more than one root; give each a parent, or mark the one root with 'NAME -'")
    if len(roots) != 1:
        raise ValueError(f"{source}: " + (f"two or more roots {roots} (lines {[line_of[r] for r in roots]}); "
                                          f"a hierarchy has exactly one node whose parent is '-'" if roots else
                                          "no root: exactly one node must have the parent '-'"))
    for start in parents:  # every walk upwards must reach the root
        seen, node = [start], parents[start]
        while node is not None:
            if node in seen:
                cyc = seen[seen.index(node):] + [node]
                raise ValueError(f"{source}: cycle {' -> '.join(cyc)} (line {line_of[start]}); a hierarchy is a tree")
            seen.append(node)
            node = parents[node]
    return parents


def build_hierarchy(parents: dict, class_names, source: str = "hierarchy",
                    distance: str = "lca-height") -> Hierarchy:
    """Check that the leaves are exactly the classes, then precompute h for every class pair."""
    if distance not in HIERARCHY_DISTANCES:
        raise ValueError(f"hierarchy distance {distance!r}: expected one of {list(HIERARCHY_DISTANCES)}")
    classes = [str(c) for c in class_names]
    if len(classes) < 2:
        raise ValueError(f"{source}: hierarchical metrics need at least two classes, got {classes}")
    inner = {p for p in parents.values() if p is not None}
    leaves = [c for c in parents if c not in inner]
    not_class = [c for c in leaves if c not in classes]
    if not_class:
        raise ValueError(f"{source}: leaf {not_class} is not a class; the leaves must be the class names "
                         f"{classes}")
    missing = [c for c in classes if c not in parents]
    if missing:
        raise ValueError(f"{source}: class {missing} is missing from the hierarchy; add a line "
                         f"'{missing[0]} PARENT' for each")
    inner_cls = [c for c in classes if c in inner]
    if inner_cls:
        raise ValueError(f"{source}: class {inner_cls} has children in the hierarchy; classes must be leaves")

    def path_up(node):  # node, parent, ..., root
        out = []
        while node is not None:
            out.append(node)
            node = parents[node]
        return out

    # height of a node = the longest path from it down to a leaf below it: the largest number of steps
    # any leaf needs to climb to it (every leaf is visited, not only the classes)
    height = {}
    for leaf in leaves:
        for d, node in enumerate(path_up(leaf)):
            height[node] = max(height.get(node, 0), d)
    paths = [path_up(c) for c in classes]
    c = len(classes)
    dist = np.zeros((c, c))
    for i in range(c):
        up_i = {n: d for d, n in enumerate(paths[i])}  # node -> edges from class i up to it
        for j in range(i + 1, c):
            # the first ancestor of j that is also an ancestor of i is the lowest common ancestor
            dj, lca = next((d, n) for d, n in enumerate(paths[j]) if n in up_i)
            h = height[lca] if distance == "lca-height" else (up_i[lca] + dj) / 2.0
            dist[i, j] = dist[j, i] = h
    return Hierarchy(source=str(source), parents=dict(parents), classes=classes, distance=dist,
                     H=float(dist.max()), distance_name=distance)


def load_hierarchy(path, class_names, distance: str = "lca-height") -> Hierarchy:
    """Read a hierarchy file (see parse_hierarchy), check it against the class names, h by ``distance``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--hierarchy {path}: file not found (a file of 'child parent' lines)")
    try:  # shown and stored relative to the working folder when it lies below it
        path = path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        pass
    return build_hierarchy(parse_hierarchy(path.read_text(encoding="utf-8"), str(path)), class_names, str(path),
                           distance)


def hierarchy_class_names(class_names, *label_arrays):
    """The class names a hierarchy's leaves must match: the given names, else the label ids as strings."""
    if class_names is not None:
        return [str(c) for c in class_names]
    top = max(int(np.max(a)) for a in label_arrays if a is not None and len(a))
    return [str(i) for i in range(top + 1)]


def hierarchical_distances(indices, query_labels, gallery_labels, hierarchy: Hierarchy, k: int) -> np.ndarray:
    """(Q, k) h(query label, result label) of the first k results of ``indices`` (a ranking's top-k)."""
    idx = np.asarray(indices)[:, :k]
    qlab = np.asarray(query_labels, dtype=np.int64)
    glab = qlab if gallery_labels is None else np.asarray(gallery_labels, dtype=np.int64)
    c = len(hierarchy.classes)
    if qlab.max() >= c or glab.max() >= c or qlab.min() < 0 or glab.min() < 0:
        raise ValueError(f"labels range {min(qlab.min(), glab.min())}..{max(qlab.max(), glab.max())} but the "
                         f"hierarchy has {c} classes {hierarchy.classes}")
    return hierarchy.distance[qlab[:, None], glab[idx]]


def _bootstrap_ratio_ci(num, den, n_boot: int, seed: int = 0, level: float = 0.95):
    """Percentile CI of sum(num) / sum(den) with queries resampled (resamples with sum(den) = 0 skipped)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if n_boot <= 0 or len(num) == 0 or den.sum() == 0:
        return None
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    step = max(1, (1 << 22) // len(num))
    for s in range(0, n_boot, step):
        reps = min(step, n_boot - s)
        pick = rng.integers(0, len(num), size=(reps, len(num)))
        d = den[pick].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s:s + reps] = np.where(d > 0, num[pick].sum(axis=1) / np.maximum(d, 1), np.nan)
    out = out[np.isfinite(out)]
    a = (1 - level) / 2
    return [float(np.quantile(out, a)), float(np.quantile(out, 1 - a))]


def hierarchical_metrics(indices, query_labels, gallery_labels, hierarchy: Hierarchy, *, k_values=DEFAULT_K_VALUES,
                         bootstrap: int = 0, seed: int = 0) -> dict:
    """AHD@k, MS@k and hP@k from a ranking's top-k ``indices`` (Q, >= max k); same ranking, tie rule
    and exclusions as the other metrics, since the indices come from ``rank``.

    AHD@k  mean over queries of the mean h(query label, result label) over its top k.
    MS@k   mean h over all top-k results, pooled over queries, whose label differs from the query's
           (None when there is none).
    hP@k   mean over queries of the mean of 1 - h / H over its top k.
    Returns {"AHD@k": ..., "MS@k": ..., "hP@k": ..., "ci95": {same keys: [lo, hi]}, "hierarchy": {...}}.
    """
    if hierarchy.H <= 0:
        raise ValueError(f"{hierarchy.source}: every class pair has h = 0; hP@k is undefined")
    qlab = np.asarray(query_labels, dtype=np.int64)
    glab = qlab if gallery_labels is None else np.asarray(gallery_labels, dtype=np.int64)
    out, ci = {}, {}
    for k in sorted(set(int(k) for k in k_values)):
        if k < 1 or k > np.asarray(indices).shape[1]:
            raise ValueError(f"k = {k} outside 1..{np.asarray(indices).shape[1]} (the ranking's k)")
        h = hierarchical_distances(indices, qlab, glab, hierarchy, k)             # (Q, k)
        wrong = glab[np.asarray(indices)[:, :k]] != qlab[:, None]                  # (Q, k)
        ahd_q, hp_q = h.mean(axis=1), (1.0 - h / hierarchy.H).mean(axis=1)
        num, den = (h * wrong).sum(axis=1), wrong.sum(axis=1)
        out[f"AHD@{k}"] = float(ahd_q.mean())
        out[f"MS@{k}"] = float(num.sum() / den.sum()) if den.sum() else None
        out[f"hP@{k}"] = float(hp_q.mean())
        if bootstrap > 0:
            ci[f"AHD@{k}"] = bootstrap_ci(ahd_q, bootstrap, seed)
            ci[f"MS@{k}"] = _bootstrap_ratio_ci(num, den, bootstrap, seed)
            ci[f"hP@{k}"] = bootstrap_ci(hp_q, bootstrap, seed)
    out["ci95"] = ci
    c = hierarchy.classes
    out["hierarchy"] = {"file": hierarchy.source, "distance": hierarchy.distance_name, "classes": c,
                        "H": hierarchy.H,
                        "h": {f"{c[i]}|{c[j]}": float(hierarchy.distance[i, j])
                              for i in range(len(c)) for j in range(i + 1, len(c))}}
    return out


# --------------------------------------------------------------------------- paired comparison of two methods

def _paired_group_sums(a, b, groups):
    """Per-group sums of the per-query differences a - b and per-group query counts (groups None: one per query).

    Resampling or sign-flipping whole groups (patients) keeps a patient's queries together: they are not
    independent, and treating them as such gives too narrow CIs and too small p-values.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired scores must be two equal-length 1-D arrays, got shapes {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired scores hold non-finite values; drop queries without a defined score first")
    d = a - b
    if groups is None:
        return d, np.ones_like(d)
    groups = np.asarray(groups)
    if groups.shape != d.shape:
        raise ValueError(f"groups have shape {groups.shape}, the scores {d.shape}")
    code = np.unique(groups.astype(str), return_inverse=True)[1].reshape(-1)
    return np.bincount(code, weights=d), np.bincount(code).astype(np.float64)


def paired_bootstrap_ci(a, b, groups=None, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """Mean of a - b over queries and its percentile bootstrap CI, resampling groups (patients) with all their
    queries when ``groups`` is given, else queries. Returns (diff, low, high); low = high = diff for n_boot 0."""
    sums, counts = _paired_group_sums(a, b, groups)
    diff = float(sums.sum() / counts.sum())
    if n_boot <= 0:
        return diff, diff, diff
    rng = np.random.default_rng(seed)
    g = len(sums)
    means = np.empty(n_boot)
    step = max(1, (1 << 22) // g)  # bound the (reps, groups) count matrix
    for s in range(0, n_boot, step):
        reps = min(step, n_boot - s)
        w = rng.multinomial(g, np.full(g, 1.0 / g), size=reps)  # how often each group is drawn
        means[s:s + reps] = (w @ sums) / (w @ counts)
    q = (1 - level) / 2
    return diff, float(np.quantile(means, q)), float(np.quantile(means, 1 - q))


def paired_permutation_test(a, b, groups=None, n_perm: int = 1000, seed: int = 0) -> float:
    """Two-sided paired permutation (sign-flip) p-value for mean(a - b) = 0: under the null the two methods'
    labels are exchangeable within each query (each group when ``groups`` is given), so each group's
    difference flips sign at random. p = (1 + #{|T*| >= |T|}) / (1 + n_perm), so p > 0 and identical inputs
    give p = 1."""
    sums, counts = _paired_group_sums(a, b, groups)
    n = counts.sum()
    observed = abs(sums.sum()) / n
    if n_perm <= 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    hits = 0
    step = max(1, (1 << 22) // len(sums))
    tol = 1e-12 * max(1.0, observed)  # float round-off must not turn |T*| = |T| into a miss
    for s in range(0, n_perm, step):
        reps = min(step, n_perm - s)
        signs = rng.integers(0, 2, size=(reps, len(sums))) * 2 - 1
        hits += int((np.abs(signs @ sums) / n >= observed - tol).sum())
    return (1 + hits) / (1 + n_perm)


def paired_comparison(scores: dict, groups=None, n_boot: int = 1000, n_perm: int = 1000, seed: int = 0,
                      level: float = 0.95) -> list:
    """Every pair of methods in ``scores`` (name -> per-query scores on the same queries, in insertion order):
    dicts with a, b, diff = mean(a - b), ci [low, high], p, and significant (the CI excludes 0; never without a
    bootstrap, n_boot 0, since then there is no CI: low = high = diff)."""
    names = list(scores)
    out = []
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            diff, low, high = paired_bootstrap_ci(scores[x], scores[y], groups, n_boot, seed, level)
            p = paired_permutation_test(scores[x], scores[y], groups, n_perm, seed)
            out.append({"a": x, "b": y, "diff": diff, "ci": [low, high], "p": p,
                        "significant": bool(n_boot > 0 and (low > 0 or high < 0))})
    return out
