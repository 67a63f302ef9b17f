"""metrics.py against hand-computed neighbour tables (expected values written as fractions)."""
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

import metrics


def circle(deg):
    """Unit 2-D vectors at the given angles: cosine similarity falls with the angle between them."""
    a = np.radians(np.asarray(deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)


# Five images on a circle; every row's angle gaps are distinct, so no ties:
#   index   0   1   2   3   4
#   angle   0  10  30  55 115
#   label   A   A   B   A   B
# Rankings (self excluded) and relevance:
#   q0: 1 2 3 4 -> 1 0 1 0     q1: 0 2 3 4 -> 1 0 1 0     q2: 1 3 0 4 -> 0 0 0 1
#   q3: 2 1 0 4 -> 0 1 1 0     q4: 3 2 1 0 -> 0 1 0 0
ANGLES = [0, 10, 30, 55, 115]
LABELS = np.array([0, 0, 1, 0, 1])
PATIENTS = np.array(["x", "x", "y", "z", "y"])


def test_rank_tables_leave_one_out():
    r = metrics.rank(circle(ANGLES), LABELS, k=4)
    assert r.indices.tolist() == [[1, 2, 3, 4], [0, 2, 3, 4], [1, 3, 0, 4], [2, 1, 0, 4], [3, 2, 1, 0]]
    # AP: q0 (1 + 2/3)/2, q1 same, q2 (1/4)/1, q3 (1/2 + 2/3)/2, q4 (1/2)/1
    assert r.ap == pytest.approx([5 / 6, 5 / 6, 1 / 4, 7 / 12, 1 / 2])
    assert r.map_at_r == pytest.approx([1 / 2, 1 / 2, 0, 1 / 4, 0])
    assert r.num_relevant.tolist() == [2, 2, 1, 2, 1]


def test_evaluate_leave_one_out():
    res = metrics.evaluate(circle(ANGLES), LABELS, k_values=(1, 2, 3), vote_k=(2, 3))
    assert res["num_queries"] == 5 and res["num_gallery"] == 5 and res["queries_without_relevant"] == 0
    assert res["R@1"] == pytest.approx(2 / 5)
    assert res["R@2"] == pytest.approx(4 / 5)
    assert res["mP@2"] == pytest.approx(2 / 5)
    assert res["mAP"] == pytest.approx(3 / 5)          # (5/6 + 5/6 + 1/4 + 7/12 + 1/2) / 5
    assert res["mAP@2"] == pytest.approx(3 / 5)        # (1 + 1 + 0 + 1/2 + 1/2) / 5
    assert res["mAP@3"] == pytest.approx(11 / 20)      # (5/6 + 5/6 + 0 + 7/12 + 1/2) / 5
    assert res["MAP@R"] == pytest.approx(1 / 4)        # (1/2 + 1/2 + 0 + 1/4 + 0) / 5
    assert "mAP@1" not in res                          # it is R@1
    # vote@3: A A A A A -> right for q0 q1 q3; but class B has R = 1 < 3/2: a B query loses vote@3 even when
    # ranked perfectly, so vote@3 is not reported (the vote itself is still A A A A A)
    assert metrics.majority_vote(LABELS[metrics.rank(circle(ANGLES), LABELS, k=3).indices], 3).tolist() == [0] * 5
    assert "3" not in res["vote"] and res["vote_k_without_majority"] == {"3": {"1": 1}}
    # vote@2 ties go to the higher-ranked label:
    # q0 [A B] -> A, q1 [A B] -> A, q2 [A A] -> A, q3 [B A] -> B, q4 [A B] -> A
    assert res["vote"]["2"]["accuracy"] == pytest.approx(2 / 5)
    assert res["vote"]["2"]["confusion_matrix"] == [[2, 1], [2, 0]]
    assert res["per_class"]["0"]["R@1"] == pytest.approx(2 / 3)
    assert res["per_class"]["1"]["mAP"] == pytest.approx(3 / 8)  # (1/4 + 1/2) / 2


def test_same_patient_exclusion():
    # groups x = {0, 1}, y = {2, 4}: q0 ranks 2 3 4 -> 0 1 0, q1 the same, q2 and q4 lose their
    # only relevant image (R = 0: left out of mAP, counted), q3 is unchanged.
    res, r = metrics.evaluate(circle(ANGLES), LABELS, k_values=(1, 2), vote_k=(), query_groups=PATIENTS,
                              exclude_same_group=True, return_ranking=True)
    assert r.indices[:, :2].tolist() == [[2, 3], [2, 3], [1, 3], [2, 1], [3, 1]]
    assert res["queries_without_relevant"] == 2
    assert res["mAP"] == pytest.approx(19 / 36)        # (1/2 + 1/2 + 7/12) / 3
    assert res["MAP@R"] == pytest.approx(1 / 12)       # (0 + 0 + 1/4) / 3
    assert res["R@1"] == 0
    assert res["R@2"] == pytest.approx(3 / 5)          # q0, q1, q3; q2 and q4 have nothing to find
    assert res["exclude_same_patient"] is True
    assert res["queries_with_same_patient_in_gallery"] == 4
    # without the exclusion the groups only count
    plain = metrics.evaluate(circle(ANGLES), LABELS, k_values=(1,), vote_k=(), query_groups=PATIENTS)
    assert plain["mAP"] == pytest.approx(3 / 5) and plain["queries_with_same_patient_in_gallery"] == 4


def test_separate_gallery_keeps_index_zero():
    # queries 0 deg (A), 60 deg (B); gallery 10 A, 40 B, 70 A, 100 B
    # q0: 0 1 2 3 -> 1 0 1 0, AP 5/6; q1: 2 1 3 0 -> 0 1 1 0, AP (1/2 + 2/3)/2 = 7/12
    res, r = metrics.evaluate(circle([0, 60]), [0, 1], circle([10, 40, 70, 100]), [0, 1, 0, 1],
                              k_values=(1, 4), vote_k=(), return_ranking=True)
    assert r.indices.tolist() == [[0, 1, 2, 3], [2, 1, 3, 0]]
    assert res["mAP"] == pytest.approx(17 / 24)
    assert res["R@1"] == pytest.approx(1 / 2)
    assert res["protocol"] == "separate gallery"


def test_queries_without_relevant_are_counted_not_nan():
    res = metrics.evaluate(circle([0, 60, 90]), [0, 1, 2], circle([10, 40, 70]), [0, 1, 0],
                           k_values=(1,), vote_k=())
    # class 2 has no gallery image: the query is left out of mAP (q0 AP (1 + 2/3)/2, q1 AP 1/2)
    assert res["queries_without_relevant"] == 1
    assert res["mAP"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert res["R@1"] == pytest.approx(1 / 3)
    none = metrics.evaluate(circle([0, 60]), [2, 2], circle([10, 40]), [0, 1], k_values=(1,), vote_k=())
    assert none["mAP"] is None and none["MAP@R"] is None and none["queries_without_relevant"] == 2


def test_per_query_helpers():
    rel = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [0, 1, 1, 1]], bool)
    assert metrics.recall_at_k(rel, 1).mean() == pytest.approx(1 / 3)
    assert metrics.recall_at_k(rel, 2).mean() == pytest.approx(2 / 3)
    assert metrics.precision_at_k(rel, 2).mean() == pytest.approx(1 / 3)
    assert metrics.precision_at_k(rel, 4).mean() == pytest.approx(1 / 2)
    # q0 (1 + 2/3)/2, q1 (1/4)/1, q2 (1/2 + 2/3 + 3/4)/3
    assert metrics.map_at_k(rel, 4) == pytest.approx([5 / 6, 1 / 4, 23 / 36])
    assert metrics.map_at_k(rel, 2) == pytest.approx([1, 0, 1 / 2])


def test_full_ap_and_map_at_r_from_similarity():
    sim = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    rel = np.array([[1, 0, 1, 0, 1]], bool)
    assert metrics.average_precision(sim, rel) == pytest.approx([34 / 45])  # (1 + 2/3 + 3/5)/3
    assert metrics.map_at_r(sim, rel) == pytest.approx([5 / 9])              # (1 + 2/3)/3
    # excluding the first item (e.g. self) by mask
    ex = np.array([[1, 0, 0, 0, 0]], bool)
    assert metrics.average_precision(sim, rel, exclude_mask=ex) == pytest.approx([1 / 2])  # (1/2 + 2/4)/2
    assert np.isnan(metrics.average_precision(sim, np.zeros_like(rel))[0])


def test_tie_rule_lower_gallery_index_first():
    sim = np.array([[0.5, 0.9, 0.5, 0.5]])
    # order 1, 0, 2, 3: the relevant items tie with item 0 and come after it
    assert metrics.topk_from_similarity(sim, 3).tolist() == [[1, 0, 2]]
    assert metrics.average_precision(sim, np.array([[0, 0, 1, 1]], bool)) == pytest.approx([5 / 12])
    # a relevant item with the lower index wins its tie: order 1, 0(rel), 2
    sim3 = np.array([[0.5, 0.9, 0.5]])
    assert metrics.average_precision(sim3, np.array([[1, 0, 0]], bool)) == pytest.approx([1 / 2])
    assert metrics.average_precision(sim3, np.array([[0, 0, 1]], bool)) == pytest.approx([1 / 3])
    # -0.0 equals +0.0: order 2, 0, 1
    z = np.array([[-0.0, 0.0, 0.5]], np.float32)
    assert metrics.average_precision(z, np.array([[0, 1, 0]], bool)) == pytest.approx([1 / 3])
    assert metrics.topk_from_similarity(z, 3).tolist() == [[2, 0, 1]]


def test_tie_rule_through_search():
    # exact ties from embeddings: sims to the query [1, 0] are 0, 0, 1, 0
    gallery = np.array([[0, 1], [0, -1], [1, 0], [0, 1]], np.float32)
    res, r = metrics.evaluate(np.array([[1, 0]], np.float32), [0], gallery, [1, 0, 1, 0],
                              k_values=(1, 2), vote_k=(), return_ranking=True)
    assert r.indices.tolist() == [[2, 0]]
    assert res["mAP"] == pytest.approx(5 / 12)  # ranking 2 0 1 3 -> 0 0 1 1
    res = metrics.evaluate(np.array([[1, 0]], np.float32), [0], gallery, [0, 0, 1, 1], k_values=(1,), vote_k=())
    assert res["mAP"] == pytest.approx(7 / 12)  # ranking 2 0 1 3 -> 0 1 1 0
    sims, idx = metrics.knn_search(np.array([[1, 0]], np.float32), gallery, 3)
    assert idx.tolist() == [[2, 0, 1]] and sims.tolist() == [[1, 0, 0]]
    # a tie straddling the k-th place: the lowest indices are kept
    sims, idx = metrics.knn_search(np.array([[1, 0]], np.float32), gallery[[1, 0, 3, 2]], 2)
    assert idx.tolist() == [[3, 0]]


def test_majority_vote_tie_goes_to_higher_ranked_label():
    lab = np.array([[2, 1, 1, 2, 0], [0, 1, 2, 3, 4]])
    assert metrics.majority_vote(lab, 4).tolist() == [2, 0]   # 2:2 vs 1:2 -> 2 ranks first
    assert metrics.majority_vote(lab, 3).tolist() == [1, 0]   # 1 has 2 votes
    assert metrics.majority_vote(lab, 1).tolist() == [2, 0]


def random_set(n=240, d=16, c=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    x = rng.standard_normal((n, d)).astype(np.float32) + 1.5 * np.eye(d, dtype=np.float32)[labels]
    return x, labels


def test_full_ap_matches_sklearn():
    x, labels = random_set()
    r = metrics.rank(x, labels, k=5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    for i in range(0, len(x), 7):
        keep = np.arange(len(x)) != i
        assert r.ap[i] == pytest.approx(average_precision_score(labels[keep] == labels[i], sim[i, keep]), abs=1e-9)


@pytest.mark.parametrize("use_groups", [True, False])
def test_brute_force_reference_with_ties(use_groups):
    """Everything against a per-query stable argsort (the tie rule by construction)."""
    # rows from 24 unit vectors whose dot products are exact multiples of 1/4: ties everywhere
    signs = np.array(np.meshgrid(*[[-0.5, 0.5]] * 4)).reshape(4, -1).T
    atoms = np.concatenate([signs, np.eye(4), -np.eye(4)]).astype(np.float32)
    rng = np.random.default_rng(3)
    x = atoms[rng.integers(0, len(atoms), 120)]
    labels = rng.integers(0, 3, 120)
    groups = np.arange(120) // 3 if use_groups else np.arange(120)  # own group = self only
    kw = {"query_groups": groups} if use_groups else {}
    r = metrics.rank(x, labels, k=10, **kw)
    gallery_kw = {"gallery_groups": groups} if use_groups else {}
    _, topk_only = metrics.knn_search(x, x, 10, exclude_self=True, **kw, **gallery_kw)
    xn = metrics.as_embeddings(x).numpy()
    sim = xn @ xn.T
    ap_matrix, mapr_matrix = metrics.average_precision(sim, labels[:, None] == labels[None, :], return_map_at_r=True,
                                                       exclude_mask=groups[:, None] == groups[None, :])
    for i in range(len(x)):
        keep = np.flatnonzero(groups != groups[i])
        order = keep[np.argsort(-sim[i, keep], kind="stable")]
        rel = labels[order] == labels[i]
        assert r.indices[i].tolist() == order[:10].tolist()
        assert topk_only[i].tolist() == order[:10].tolist()
        prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        assert r.ap[i] == pytest.approx((prec * rel).sum() / rel.sum())
        assert ap_matrix[i] == pytest.approx(r.ap[i]) and mapr_matrix[i] == pytest.approx(r.map_at_r[i])
        nr = rel.sum()
        assert r.map_at_r[i] == pytest.approx((prec[:nr] * rel[:nr]).sum() / nr)


def test_chunked_equals_unchunked(monkeypatch):
    # +-1 entries in 16-d: unit rows of +-0.25, so every cosine is a multiple of 1/16 computed exactly in float32
    # by any BLAS blocking. Gaussian data would let a product of 7 rows round differently from one of 150 rows
    # (1e-7), and a near-tie then flips two images' order; here equal values are real ties and the tie rule
    # (lower gallery index first) must give the same ranking in both paths.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 150)
    proto = rng.choice([-1.0, 1.0], size=(4, 16))
    x = np.where(rng.random((150, 16)) < 0.3, -proto[labels], proto[labels]).astype(np.float32)
    full = metrics.rank(x, labels, k=10)
    monkeypatch.setattr(metrics, "BLOCK_ELEMENTS", 300)  # 2 rows per block
    chunked = metrics.rank(x, labels, k=10, chunk_size=7)
    assert np.array_equal(full.indices, chunked.indices)
    np.testing.assert_allclose(full.sims, chunked.sims, atol=1e-6)
    np.testing.assert_allclose(full.ap, chunked.ap, atol=1e-12)
    np.testing.assert_allclose(full.map_at_r, chunked.map_at_r, atol=1e-12)


def test_faiss_exact_equals_torch():
    pytest.importorskip("faiss")
    x, labels = random_set(n=200)
    groups = np.arange(200) // 4
    for kw in ({}, {"query_groups": groups, "exclude_same_group": True}):
        a = metrics.evaluate(x, labels, k_values=(1, 5, 10), vote_k=(5,), **kw)
        b = metrics.evaluate(x, labels, k_values=(1, 5, 10), vote_k=(5,), backend="faiss", **kw)
        assert b["knn_backend"] == "faiss-flat"
        for key in ("R@1", "R@5", "mP@10", "mAP", "mAP@5", "mAP@10", "MAP@R"):
            assert a[key] == b[key]
    s1, i1 = metrics.knn_search(x, x, 10, exclude_self=True)
    s2, i2 = metrics.knn_search(x, x, 10, exclude_self=True, backend="faiss")
    assert np.array_equal(i1, i2)
    assert 0 not in i1[0] and 1 not in i1[1]


def test_bootstrap_ci_seeded():
    res = metrics.evaluate(*random_set(), k_values=(1, 5), vote_k=(), bootstrap=200, seed=1)
    again = metrics.evaluate(*random_set(), k_values=(1, 5), vote_k=(), bootstrap=200, seed=1)
    assert res["ci95"] == again["ci95"]
    for key in ("R@1", "mAP", "mAP@5"):
        lo, hi = res["ci95"][key]
        assert lo <= res[key] <= hi


@pytest.mark.parametrize("call, message", [
    (lambda: metrics.evaluate(np.ones((5, 2)), [0, 1, 0, 1]), "4 entries but query embeddings has 5 rows"),
    (lambda: metrics.evaluate(np.array([[1, 0], [np.nan, 1], [0, 1]]), [0, 1, 0]), "NaN or inf"),
    (lambda: metrics.evaluate(np.array([[1, 0], [0, 0], [0, 1]]), [0, 1, 0]), "all zero"),
    (lambda: metrics.evaluate(circle(ANGLES), LABELS, k_values=(1, 5)), "k = 5 is larger than the gallery"),
    (lambda: metrics.evaluate(circle(ANGLES), LABELS, k_values=(4,), query_groups=PATIENTS,
                              exclude_same_group=True), "k = 4 is larger"),
    (lambda: metrics.evaluate(circle([0]), [0], np.ones((2, 3)), [0, 1]), "dimension"),
    (lambda: metrics.evaluate(circle([0, 1]), [0, 1], exclude_same_group=True), "patient ids"),
])
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_vote_k_above_gallery_is_skipped():
    res = metrics.evaluate(circle(ANGLES), LABELS, k_values=(1,), vote_k=(1, 5, 10))
    assert list(res["vote"]) == ["1"] and res["vote_skipped_k"] == [5, 10]
    assert all(math.isfinite(v) for v in res["vote"]["1"].values() if isinstance(v, float))


# --------------------------------------------------------------------------- issue 19: hierarchy distance, vote@k

COVIDX = ["normal", "pneumonia", "COVID-19"]


def test_lca_height_and_half_path_on_the_unbalanced_covidx_tree():
    # root -> normal; root -> abnormal -> {pneumonia, COVID-19}. Heights: abnormal 1, root 2 (root-abnormal-leaf).
    lca = metrics.load_hierarchy(metrics.DEFAULT_HIERARCHIES["covid"], COVIDX)  # lca-height is the default
    half = metrics.load_hierarchy(metrics.DEFAULT_HIERARCHIES["covid"], COVIDX, distance="half-path")
    assert lca.distance_name == "lca-height" and half.distance_name == "half-path"
    assert lca.distance.tolist() == [[0, 2, 2], [2, 0, 1], [2, 1, 0]] and lca.H == 2
    assert half.distance.tolist() == [[0, 3 / 2, 3 / 2], [3 / 2, 0, 1], [3 / 2, 1, 0]] and half.H == 3 / 2


def test_height_is_the_longest_path_down_and_balanced_trees_agree():
    # unbalanced: root -> A, root -> X -> {B, Y -> {C, D}}: height(root) = 3 (root-X-Y-C), X 2, Y 1
    text = "root -\nA root\nX root\nB X\nY X\nC Y\nD Y\n"
    h = metrics.build_hierarchy(metrics.parse_hierarchy(text), ["A", "B", "C", "D"])
    assert h.distance.tolist() == [[0, 3, 3, 3], [3, 0, 2, 2], [3, 2, 0, 1], [3, 2, 1, 0]] and h.H == 3
    # balanced (every leaf at depth 2): both distances are the same, 1 within a parent and 2 across
    text = "root -\nX root\nY root\nA X\nB X\nC Y\nD Y\n"
    both = [metrics.build_hierarchy(metrics.parse_hierarchy(text), ["A", "B", "C", "D"], distance=d)
            for d in metrics.HIERARCHY_DISTANCES]
    assert both[0].distance.tolist() == both[1].distance.tolist() == [[0, 1, 2, 2], [1, 0, 2, 2], [2, 2, 0, 1],
                                                                      [2, 2, 1, 0]]
    r = metrics.hierarchical_metrics(np.array([[2]]), [0], [0, 1, 2], both[0], k_values=(1,))
    assert r["AHD@1"] == 2 and r["hierarchy"]["distance"] == "lca-height"
    with pytest.raises(ValueError, match="hierarchy distance 'path'"):
        metrics.build_hierarchy(metrics.parse_hierarchy(text), ["A", "B", "C", "D"], distance="path")


def test_vote_k_a_class_cannot_win_is_not_computed():
    # three classes of 7 images, each its own direction (a perfect embedding). Leave-one-out R = 6: vote@20 sees
    # the 6 own images and 14 of the other two classes, at least 7 of one of them, so every query loses: the old
    # code reported accuracy 0.0 for a perfect ranking. Winnable iff 2R >= k: k = 12 yes, k = 13 and 20 no.
    labels = np.repeat(np.arange(3), 7)
    emb = np.eye(3)[labels] + 1e-3 * np.arange(21)[:, None] * np.array([[0, 0, 1]])
    res = metrics.evaluate(emb, labels, k_values=(1,), vote_k=(1, 12, 13, 20), class_names=["a", "b", "c"])
    assert list(res["vote"]) == ["1", "12"] and res["vote"]["12"]["accuracy"] == 1.0
    assert res["vote_skipped_k"] == [13, 20]
    assert res["vote_k_without_majority"] == {"13": {"a": 6, "b": 6, "c": 6}, "20": {"a": 6, "b": 6, "c": 6}}
    # with a separate gallery a query class absent from it (R = 0) cannot be right at any k: not a k problem
    # (query class 2); class 0 has R = 2: vote@4 is winnable (a 2-2 tie goes to the higher-ranked label), @5 not
    res = metrics.evaluate(np.eye(3)[[0, 2]], [0, 2], np.eye(3)[[0, 0, 1, 1, 1]], [0, 0, 1, 1, 1], k_values=(1,),
                           vote_k=(1, 4, 5))
    assert list(res["vote"]) == ["1", "4"] and res["vote_k_without_majority"] == {"5": {"0": 2}}


def test_paired_comparison_without_bootstrap_is_never_significant():
    # n_boot 0 gives no CI (low = high = diff), so a non-zero difference must not be marked significant
    a, b = np.array([1.0, 1.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0, 0.0])
    (row,) = metrics.paired_comparison({"a": a, "b": b}, n_boot=0, n_perm=0)
    assert row["diff"] == 0.5 and row["ci"] == [0.5, 0.5]
    assert row["significant"] is False
    (row,) = metrics.paired_comparison({"a": a, "b": b}, n_boot=200, n_perm=0)
    assert row["significant"] is (row["ci"][0] > 0)
