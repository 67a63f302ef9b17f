"""test_backbone.py: every quantity on hand-computed small cases, the input checks, and main end to end."""
import json
import re
import warnings

import numpy as np
import pytest
import scipy.stats

import test_backbone as tb


def circle(angles_deg):
    """Unit 2-d embeddings at the given angles: cosine similarity falls with angular distance."""
    a = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)


# Model 1 puts images 0..4 at 0, 10, 25, 45, 70 degrees; model 2 at 0, 70, 10, 45, 25 degrees. Top-2 by hand:
#   model 1: q0 {1,2}  q1 {0,2}  q2 {1,3}  q3 {2,4}  q4 {3,2}
#   model 2: q0 {2,4}  q1 {3,4}  q2 {0,4}  q3 {4,1}  q4 {2,3}
#   overlap:    1         0         0         1         2      -> mean 4/5, overlap <= 1 for 4/5 of the queries
E1, E2 = circle([0, 10, 25, 45, 70]), circle([0, 70, 10, 45, 25])
LABELS = np.array([0, 0, 1, 1, 0])


def test_overlap_and_map_at_k_hand_case():
    r = tb.compare_embeddings(E1, E2, LABELS, k=2, alphas=(0.5,), progress=False)
    assert r["top1"].tolist() == [[1, 2], [0, 2], [1, 3], [2, 4], [3, 2]]
    assert [sorted(t) for t in r["top2"].tolist()] == [[2, 4], [3, 4], [0, 4], [1, 4], [2, 3]]
    assert r["overlap"].tolist() == [1, 0, 0, 1, 2]
    assert r["overlap"].mean() == pytest.approx(4 / 5)
    assert (r["overlap"] <= 2 // 2).mean() == pytest.approx(4 / 5)
    # model 1 relevance of the top-2: q0 [1,0] q1 [1,0] q2 [0,1] q3 [1,0] q4 [0,0]
    # AP@2 = sum P@k rel_k / (relevant in top 2): 1, 1, (1/2)/1, 1, 0  -> mAP@2 = 7/2 / 5
    assert r["ap1"].tolist() == pytest.approx([1, 1, 1 / 2, 1, 0])
    assert r["ap1"].mean() == pytest.approx(7 / 10)
    assert r["r1_1"].tolist() == [1, 1, 0, 1, 0]


def test_descending_ranks_match_scipy_with_ties():
    s = np.array([[0.5, 0.2, 0.5, 0.9, 0.2, 0.2], [1, 2, 3, 4, 5, 6], [3, 3, 3, 3, 3, 3]], dtype=np.float32)
    expect = scipy.stats.rankdata(-s, axis=1, method="average")
    np.testing.assert_array_equal(tb.descending_ranks(s), expect)
    # by hand, row 0: 0.9 -> 1, the two 0.5 share ranks 2 and 3 -> 2.5, the three 0.2 share 4, 5, 6 -> 5
    assert tb.descending_ranks(s)[0].tolist() == [2.5, 5, 2.5, 1, 5, 5]


@pytest.mark.parametrize("ties", [False, True])
def test_spearman_equals_scipy_per_row_with_self_removed(ties):
    rng = np.random.default_rng(0)
    if ties:  # small integer vectors: exact dot products, many equal similarities in every row
        e1 = rng.integers(-2, 3, (23, 6)).astype(np.float32)
        e2 = rng.integers(-1, 2, (23, 4)).astype(np.float32)
        e1[:, 0] += 3 * (np.abs(e1).sum(1) == 0)  # no all-zero row
        e2[:, 0] += 3 * (np.abs(e2).sum(1) == 0)
    else:
        e1 = rng.standard_normal((23, 6)).astype(np.float32)
        e2 = rng.standard_normal((23, 4)).astype(np.float32)
    labels = rng.integers(0, 3, 23)
    r = tb.compare_embeddings(e1, e2, labels, k=3, chunk_size=7, progress=False)  # chunks of uneven size
    s1, s2 = e1 @ e1.T, e2 @ e2.T
    for q in range(23):
        keep = np.arange(23) != q
        rho = scipy.stats.spearmanr(s1[q, keep], s2[q, keep]).statistic
        assert r["rho"][q] == pytest.approx(rho, abs=1e-6)


def test_fusion_alpha_one_is_model1_and_zero_is_model2():
    rng = np.random.default_rng(1)
    e1 = rng.standard_normal((40, 8)).astype(np.float32)
    e2 = rng.standard_normal((40, 5)).astype(np.float32)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 /= np.linalg.norm(e2, axis=1, keepdims=True)
    labels = rng.integers(0, 3, 40)
    r = tb.compare_embeddings(e1, e2, labels, k=5, alphas=(1.0, 0.0), chunk_size=16, progress=False)
    np.testing.assert_array_equal(r["fusion"][0], r["ap1"])
    np.testing.assert_array_equal(r["fusion"][1], r["ap2"])


def test_zscore_hand_rows():
    s = np.array([[1.0, 2.0, 3.0], [4.0, 1.0, 7.0]], dtype=np.float32)
    # row 0, self = column 0: the others 2, 3 have mean 5/2 and std 1/2 -> z = (s - 5/2) / (1/2)
    # row 1, self = column 1: the others 4, 7 have mean 11/2 and std 3/2 -> z = (s - 11/2) / (3/2)
    z = tb.zscore_rows(s, np.array([0, 1]))
    np.testing.assert_allclose(z, [[-3, -1, 1], [-1, -3, 1]], atol=1e-6)


def test_rrf_hand_case():
    # ranks of three gallery images by model 1: 1, 2, 3; by model 2: 3, 1, 2
    s = tb.rrf_scores(np.array([[1.0, 2.0, 3.0]]), np.array([[3.0, 1.0, 2.0]]))
    expect = [1 / 61 + 1 / 63, 1 / 62 + 1 / 61, 1 / 63 + 1 / 62]
    assert s[0].tolist() == pytest.approx(expect)
    assert np.argsort(-s[0]).tolist() == [1, 0, 2]  # image 1 wins: two good ranks beat one best and one worst


def test_rrf_in_comparison_hand_case():
    # Three gallery images per query; models agree on nothing but RRF still returns a full list.
    r = tb.compare_embeddings(E1, E2, LABELS, k=2, alphas=(0.5,), progress=False)
    # q4 (label 0): model 1 ranks 3, 2, 1, 0 (25, 45, 60, 70 deg away); model 2 ranks 2, 3, 0, 1 (15, 20, 25, 45)
    # RRF: img3 1/61 + 1/62, img2 1/62 + 1/61, img1 1/63 + 1/64, img0 1/64 + 1/63: tie 3/2 -> lower index first
    # top-2 = [2, 3], both label 1 -> AP@2 = 0
    assert r["rrf"][4] == 0.0


def test_heldout_split_is_seeded_and_disjoint():
    aps = np.zeros((3, 10))
    aps[1] = 1.0  # alpha 0.5 is best on every query
    a, m, sel, ev = tb.heldout_alpha(aps, [0.3, 0.5, 0.7], seed=4)
    assert (a, m) == (0.5, 1.0)
    assert sorted(np.concatenate([sel, ev]).tolist()) == list(range(10)) and len(sel) == 5
    a2, m2, sel2, ev2 = tb.heldout_alpha(aps, [0.3, 0.5, 0.7], seed=4)
    assert sel2.tolist() == sel.tolist()
    assert tb.heldout_alpha(aps, [0.3, 0.5, 0.7], seed=5)[2].tolist() != sel.tolist()


def _verdict(overlap, rho, fusion_map, ci, bootstrap=1000):
    """interpret() on held-out rows A 0.70, B 0.75, fusion F; the pair is stored as B - F (model first)."""
    heldout = {"A": 0.70, "B": 0.75, "F": fusion_map}
    pairs = [{"a": "B", "b": "F", "diff": 0.75 - fusion_map, "ci": [-ci[1], -ci[0]]}]
    return tb.interpret(overlap, rho, 5, heldout, pairs, ("A", "B"), ["F"], 10, bootstrap)


def test_interpretation_rules():
    assert _verdict(2.5, 0.5, 0.8, (0.01, 0.09)).startswith("Fusion looks beneficial")  # CI of F - B above 0
    assert _verdict(2.5, 0.5, 0.8, (-0.01, 0.09)).startswith("Mixed evidence: the CI includes 0")
    assert _verdict(2.5, 0.5, 0.8, (0.05, 0.05), bootstrap=0).startswith("Mixed evidence: there is no CI")
    assert _verdict(2.5, 0.5, 0.7, (-0.1, 0.0)).startswith("Fusion is not beneficial here")  # does not beat B
    assert _verdict(4.5, 0.9, 0.9, (0.1, 0.2)).startswith("Fusion is not beneficial")
    assert _verdict(3.5, 0.7, 0.9, (0.1, 0.2)).startswith("Mixed evidence: the backbones are not clearly diverse")
    text = _verdict(2.5, 0.5, 0.8, (0.01, 0.09))
    assert "held-out rows (10 queries)" in text and "+0.0500 (paired 95% CI [+0.0100, +0.0900])" in text


# ----------------------------------------------------------------------------- files and main

def write_set(folder, name, emb, labels, ids=None, pids=None):
    np.save(folder / f"{name}.npy", emb)
    np.save(folder / f"{name}_labels.npy", np.asarray(labels, dtype=np.int64))
    if ids is not None:
        np.save(folder / f"{name}_image_ids.npy", np.asarray(ids, dtype=str))
    if pids is not None:
        np.save(folder / f"{name}_patient_ids.npy", np.asarray(pids, dtype=str))
    return str(folder / f"{name}.npy")


def args_for(tmp_path, a, b, *extra):
    return tb.get_args_parser().parse_args(
        ["--model1-embeddings", a, "--model2-embeddings", b, "--save-dir", str(tmp_path / "out"), *extra])


def random_sets(n=30, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    centres = rng.standard_normal((3, 16))
    e1 = (centres[labels] + rng.standard_normal((n, 16))).astype(np.float32)
    e2 = (centres[labels][:, :12] + 2 * rng.standard_normal((n, 12))).astype(np.float32)
    return e1, e2, labels


def test_main_writes_exact_keys_and_plots(tmp_path, capsys):
    e1, e2, labels = random_sets()
    ids = [f"img{i}" for i in range(30)]
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    from PIL import Image
    for i in range(0, 30, 2):  # half the images exist; the rest must be drawn as labelled blanks
        Image.fromarray(np.full((16, 16), 8 * i, np.uint8)).save(img_dir / f"img{i}.png")
    a = write_set(tmp_path, "m1", e1, labels, ids, [f"p{i // 2}" for i in range(30)])
    b = write_set(tmp_path, "m2", 3 * e2, labels, ids)  # not unit length: re-normalised
    args = args_for(tmp_path, a, b, "--image-dir", str(img_dir), "--visualize-samples", "4",
                    "--model1-name", "A", "--model2-name", "B")
    assert tb.main(args) == 0
    out = tmp_path / "out"
    res = json.loads((out / "backbone_comparison_results.json").read_text())
    assert list(res) == ["k", "num_queries", "model1", "model2", "mean_overlap", "pct_low_overlap", "mean_spearman",
                         "std_spearman", "fusion", "fusion_zscore", "rrf", "heldout", "paired", "verdict"]
    assert list(res["model1"]) == ["name", "mAP@5", "R@1", "mAP"] and res["model1"]["name"] == "A"
    assert [list(f) for f in res["fusion"]] == [["alpha", "mAP@5"]] * 3
    assert [f["alpha"] for f in res["fusion_zscore"]] == [0.3, 0.5, 0.7]
    assert list(res["rrf"]) == ["mAP@5"] and list(res["heldout"]) == ["alpha", "mAP@5"]
    assert res["num_queries"] == 30 and 0 <= res["pct_low_overlap"] <= 1 and 0 <= res["mean_overlap"] <= 5
    with np.load(out / "backbone_comparison_results.npz") as z:
        assert sorted(z.files) == sorted(["model1_name", "model2_name", "model1_map", "model2_map", "overlaps",
                                          "mean_overlap", "correlations", "mean_spearman", "std_spearman",
                                          "fusion_alphas", "fusion_maps", "aps_model1", "aps_model2",
                                          "r1_model1", "r1_model2", "aps_rrf", "aps_fusion",
                                          "heldout_eval_indices"])
        assert z["overlaps"].shape == (30,) and z["aps_model1"].mean() == pytest.approx(res["model1"]["mAP@5"])
    assert (out / "overlap_histogram.png").stat().st_size > 0
    assert len(list(out.glob("query_*_comparison.png"))) == 4
    text = capsys.readouterr().out
    assert "Mean Overlap@5" in text and "Spearman rho" in text and "RRF" in text
    # results already there: refused (main: one line, exit code 2; run raises), then replaced with --overwrite
    with pytest.raises(ValueError, match="--overwrite"):
        tb.run(args)
    capsys.readouterr()
    assert tb.main(args) == 2 and "test_backbone.py: error: " in capsys.readouterr().err
    assert tb.main(args_for(tmp_path, a, b, "--overwrite", "--visualize-samples", "0", "--exclude-same-patient")) == 0


def test_old_flag_names_are_accepted(tmp_path):
    args = tb.get_args_parser().parse_args(["--convnext-embeddings", "a.npy", "--conceptclip-embeddings", "b.npy"])
    assert (args.model1_embeddings, args.model2_embeddings) == ("a.npy", "b.npy")


def test_different_counts_error_names_files_and_counts(tmp_path):
    e1, e2, labels = random_sets()
    a = write_set(tmp_path, "m1", e1, labels)
    b = write_set(tmp_path, "m2", e2[:29], labels[:29])
    with pytest.raises(ValueError, match=r"m1\.npy has 30 rows.*m2\.npy has 29 rows"):
        tb.load_inputs(args_for(tmp_path, a, b))


def test_label_count_error(tmp_path):
    e1, e2, labels = random_sets()
    a, b = write_set(tmp_path, "m1", e1, labels), write_set(tmp_path, "m2", e2, labels)
    np.save(tmp_path / "short.npy", labels[:20])
    with pytest.raises(ValueError, match=r"short\.npy: 20 entries.*m1\.npy has 30 rows"):  # embeddings.load
        tb.load_inputs(args_for(tmp_path, a, b, "--labels", str(tmp_path / "short.npy")))


def test_rows_matched_by_image_id_and_other_images_refused(tmp_path):
    # issue 20: model 2 in another order is matched by image id (embeddings.align), no longer refused
    e1, e2, labels = random_sets()
    ids = np.array([f"img{i}" for i in range(30)])
    a = write_set(tmp_path, "m1", e1, labels, ids)
    b = write_set(tmp_path, "m2", e2[::-1], labels[::-1], ids[::-1])
    got1, got2, lab, got_ids, _ = tb.load_inputs(args_for(tmp_path, a, b))
    assert got_ids.tolist() == ids.tolist() and lab.tolist() == labels.tolist()
    np.testing.assert_allclose(got2, e2 / np.linalg.norm(e2, axis=1, keepdims=True), atol=1e-6)
    # the same order of ids with the labels of another order: the labels disagree
    b = write_set(tmp_path, "m2", e2, labels[::-1], ids)
    with pytest.raises(ValueError, match=r"labels of .*m1\.npy and .*m2\.npy disagree"):
        tb.load_inputs(args_for(tmp_path, a, b))
    b = write_set(tmp_path, "m2", e2, labels, [f"other{i}" for i in range(30)])
    with pytest.raises(ValueError, match=r"are not of the same images"):
        tb.load_inputs(args_for(tmp_path, a, b))


def test_non_finite_error_counts(tmp_path):
    e1, e2, labels = random_sets()
    e2[3, 0], e2[7, :2] = np.nan, np.inf
    a, b = write_set(tmp_path, "m1", e1, labels), write_set(tmp_path, "m2", e2, labels)
    with pytest.raises(ValueError, match=r"m2\.npy: 2 of 30 rows hold NaN or inf \(rows 3, 7\)"):  # embeddings.load
        tb.load_inputs(args_for(tmp_path, a, b))


def test_missing_labels_and_bad_k(tmp_path):
    e1, e2, labels = random_sets()
    np.save(tmp_path / "m1.npy", e1)
    b = write_set(tmp_path, "m2", e2, labels)
    with pytest.raises(ValueError, match=r"m1_labels\.npy not found; pass --labels"):
        tb.load_inputs(args_for(tmp_path, str(tmp_path / "m1.npy"), b))
    with pytest.raises(ValueError, match="--k 30"):
        tb.check_args(args_for(tmp_path, "x", "y", "--k", "30"), 30, labels)


# ----------------------------------------------------------------------------- issue 10 items 1, 11, 19, 22

def write_meta(path, names):
    from pathlib import Path
    Path(path).with_name(Path(path).stem + "_meta.json").write_text(json.dumps({"class_names": names}))


def test_labels_aligned_by_class_name(tmp_path):
    # the same images, extracted separately with different class orders: ids differ, names agree
    e1, e2, labels = random_sets()
    names1 = ["a", "b", "c"]
    names2 = ["c", "a", "b"]              # model 2's id of class "a" is 1, "b" 2, "c" 0
    l2 = np.array([names2.index(names1[x]) for x in labels])
    a, b = write_set(tmp_path, "m1", e1, labels), write_set(tmp_path, "m2", e2, l2)
    write_meta(a, names1), write_meta(b, names2)
    args = args_for(tmp_path, a, b)
    _, _, lab, _, _ = tb.load_inputs(args)
    assert lab.tolist() == labels.tolist()
    assert tb.check_args(args, 30, lab) == names1
    # ids equal but names differ: the same id means different classes -> refused
    write_meta(b, ["b", "a", "c"])
    with pytest.raises(ValueError, match=r"labels of .*m1\.npy and .*m2\.npy disagree on \d+ of 30 images"):
        tb.load_inputs(args_for(tmp_path, a, b))


def test_names_on_one_file_only_is_an_error_naming_both(tmp_path):
    e1, e2, labels = random_sets()
    a, b = write_set(tmp_path, "m1", e1, labels), write_set(tmp_path, "m2", e2, labels)
    write_meta(a, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"m1\.npy carries class names.*m2\.npy has none"):
        tb.load_inputs(args_for(tmp_path, a, b))


def test_help_shows_defaults_and_every_flag_has_help():
    p = tb.get_args_parser()
    assert p.formatter_class is __import__("utils").HelpFormatter
    missing = [a.option_strings for a in p._actions if not a.help]
    assert missing == []
    assert "(default: 5)" in p.format_help()
    assert p.parse_args(["--model1-embeddings", "a", "--model2-embeddings", "b", "--output-dir", "o"]).save_dir == "o"


def test_choose_queries_names_the_cases():
    overlaps = np.array([3, 0, 5, 2, 2, 1])
    picks = tb.choose_queries(overlaps, 4, seed=0)
    assert picks[:3] == [(1, "low overlap"), (picks[1][0], "medium overlap"), (2, "high overlap")]
    assert overlaps[picks[1][0]] == 2 and picks[3][1] == "random"


def test_table_separates_pair_stats_and_heldout_on_same_queries(tmp_path, capsys):
    e1, e2, labels = random_sets()
    a, b = write_set(tmp_path, "m1", e1, labels), write_set(tmp_path, "m2", e2, labels)
    assert tb.main(args_for(tmp_path, a, b, "--visualize-samples", "0", "--bootstrap", "200",
                            "--permutations", "200")) == 0
    text = capsys.readouterr().out
    model_rows = [l for l in text.splitlines() if l.startswith(("m1 ", "m2 ")) and "|" in l]  # named by file
    assert len(model_rows) == 4 and all("Overlap" not in l and "rho" not in l for l in model_rows)
    assert "pair m1 / m2: Mean Overlap@5" in text
    out = tmp_path / "out"
    res = json.loads((out / "backbone_comparison_results.json").read_text())
    with np.load(out / "backbone_comparison_results.npz") as z:
        ev = z["heldout_eval_indices"]
        # the held-out rows are each model on the SAME held-out queries, not the full-set means
        assert res["paired"][f"mAP@5"]["m1"] == pytest.approx(z["aps_model1"][ev].mean())
        assert res["paired"][f"mAP@5"]["m2"] == pytest.approx(z["aps_model2"][ev].mean())
    assert res["paired"]["queries"] == len(ev) == 15
    pair = res["paired"]["pairs"][0]
    assert (pair["a"], pair["b"]) == ("m1", "m2")
    assert pair["diff"] == pytest.approx(res["paired"]["mAP@5"]["m1"] - res["paired"]["mAP@5"]["m2"])
    assert pair["significant"] == (pair["ci"][0] > 0 or pair["ci"][1] < 0)


# ----------------------------------------------------------------------------- issue 19 (items 8, 14, 15, 20)

def test_verdict_uses_the_heldout_rows_not_the_all_query_best(tmp_path, monkeypatch, capsys):
    # Constructed per-query AP@5: model 1 0.5 and model 2 0.4 everywhere; fusion alpha 0.3 scores 1.0 on the
    # queries that choose alpha and 0.2 on the held-out ones (all-query mean 0.6 > both models: the old verdict
    # said "beneficial"); RRF and z-score 0.3. Diverse backbones (overlap 0, rho 0.1). Held out: fusion 0.2 < 0.5.
    n, k = 20, 5
    e1, e2, labels = random_sets(n)
    a, b = write_set(tmp_path, "m1", e1, labels), write_set(tmp_path, "m2", e2, labels)
    select = tb.heldout_alpha(np.zeros((1, n)), [0.5], seed=0)[2]
    fusion = np.full((3, n), 0.1)
    fusion[0] = 0.2
    fusion[0, select] = 1.0
    fake = {"top1": np.tile(np.arange(1, k + 1), (n, 1)), "top2": np.tile(np.arange(6, 6 + k), (n, 1)),
            "ap1": np.full(n, 0.5), "ap2": np.full(n, 0.4), "r1_1": np.ones(n), "r1_2": np.ones(n),
            "fullap1": np.full(n, 0.5), "fullap2": np.full(n, 0.4), "rho": np.full(n, 0.1), "fusion": fusion,
            "zscore": np.full((3, n), 0.3), "rrf": np.full(n, 0.3), "overlap": np.zeros(n, np.int64)}
    monkeypatch.setattr(tb, "compare_embeddings", lambda *a, **kw: fake)
    assert tb.main(args_for(tmp_path, a, b, "--visualize-samples", "0", "--bootstrap", "200",
                            "--permutations", "0")) == 0
    printed = capsys.readouterr().out
    assert "Fusion looks beneficial" not in printed
    res = json.loads((tmp_path / "out" / "backbone_comparison_results.json").read_text())
    assert max(f["mAP@5"] for f in res["fusion"]) == pytest.approx(0.6)  # all queries: fusion beats both
    verdict = res["verdict"]
    assert verdict in printed
    assert "beneficial" in verdict and not verdict.startswith(("Fusion looks beneficial", "Mixed"))
    assert "held-out rows (10 queries)" in verdict and "RRF (k=60) 0.3000" in verdict and "m1 0.5000" in verdict


def test_default_names_from_meta_else_file_stem(tmp_path, capsys):
    e1, e2, labels = random_sets()
    a, b = write_set(tmp_path, "emb_a", e1, labels), write_set(tmp_path, "emb_b", e2, labels)
    from pathlib import Path
    Path(a).with_name("emb_a_meta.json").write_text(json.dumps(
        {"model_name": "convnextv2", "model_args": {"convnext_backbone": "convnextv2_atto", "embedding_dim": 16}}))
    assert tb.main(args_for(tmp_path, a, b, "--visualize-samples", "0", "--bootstrap", "0",
                            "--permutations", "0")) == 0
    res = json.loads((tmp_path / "out" / "backbone_comparison_results.json").read_text())
    assert (res["model1"]["name"], res["model2"]["name"]) == ("convnextv2 (convnextv2_atto)", "emb_b")
    assert "ConvNeXtV2" not in capsys.readouterr().out
    # the same model twice: the file names keep the rows apart; given names win
    Path(b).with_name("emb_b_meta.json").write_text(Path(a).with_name("emb_a_meta.json").read_text())
    assert tb.model_names(args_for(tmp_path, a, b)) == ("convnextv2 (convnextv2_atto) [emb_a]",
                                                       "convnextv2 (convnextv2_atto) [emb_b]")
    assert tb.model_names(args_for(tmp_path, a, b, "--model1-name", "X")) == ("X", "convnextv2 (convnextv2_atto)")


def test_image_dir_typo_is_an_error_before_any_work(tmp_path):
    e1, e2, labels = random_sets()
    ids = [f"img{i}" for i in range(30)]
    a, b = write_set(tmp_path, "m1", e1, labels, ids), write_set(tmp_path, "m2", e2, labels, ids)
    with pytest.raises(ValueError, match=r"--image-dir .*imagse: not a folder"):
        tb.run(args_for(tmp_path, a, b, "--image-dir", str(tmp_path / "imagse")))
    (tmp_path / "other").mkdir()  # a folder without any of the images: the wrong folder
    with pytest.raises(ValueError, match=r"--image-dir .*other: none of the 30 images \(e\.g\. img0\.png\)"):
        tb.run(args_for(tmp_path, a, b, "--image-dir", str(tmp_path / "other")))
    assert not (tmp_path / "out").exists()


def test_comparison_figure_marks_shared_results_and_keeps_text_inside(tmp_path, monkeypatch):
    import matplotlib.figure
    e1, e2, labels = random_sets()
    ids = np.array([f"1.2.840.113619.2.55.3.{i:04d}.20200401.long-study-id" for i in range(30)])  # long ids
    r = tb.compare_embeddings(tb._normalise(e1, "a"), tb._normalise(e2, "b"), labels, k=5, progress=False)
    q = int(np.argmax(r["overlap"]))
    assert r["overlap"][q] > 0
    figs = []
    orig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **kw: figs.append(self) or
                        orig(self, *a, **kw))
    names = ("hybrid_convnext_vit (convnextv2_tiny.fcmae_ft_in22k_in1k + vit_base_patch16_224.augreg_in21k)",
             "conceptclip")
    tb.plot_query(q, e1, e2, r["top1"], r["top2"], labels, ids, ["a", "b", "c"], names, lambda i: None, 5,
                  int(r["overlap"][q]), tmp_path / "q.png", "high overlap")
    fig = figs[0]
    tags = [t for ax in fig.axes for t in ax.texts if t.get_text() == "both"]
    assert len(tags) == 2 * r["overlap"][q]  # each shared result, in both rows
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)  # the figure was closed after saving: draw it again to measure the texts
    canvas.draw()
    renderer = canvas.get_renderer()
    box = fig.bbox
    texts = [fig._suptitle] + [t for ax in fig.axes for t in [ax.title, ax.yaxis.label] if t.get_text()]
    for t in texts:
        ext = t.get_window_extent(renderer)
        assert box.x0 - 1 <= ext.x0 and ext.x1 <= box.x1 + 1 and ext.y1 <= box.y1 + 1, t.get_text()


def test_hierarchy_distance_is_used_and_recorded(tmp_path):
    # angles 0, 10, 30, 100 with labels normal pneumonia COVID-19 COVID-19: nearest other image of q0..q3 is
    # pneumonia, normal, pneumonia, COVID-19; AHD@1 = (2 + 2 + 1 + 0) / 4 by LCA height, (3/2 + 3/2 + 1) / 4 half
    e, labels = circle([0, 10, 30, 100]), np.array([0, 1, 2, 2])
    a, b = write_set(tmp_path, "m1", e, labels), write_set(tmp_path, "m2", e.copy(), labels)
    hier = ["--hierarchy", "data/ontology/covidx_hierarchy.txt", "--class-names", "normal", "pneumonia", "COVID-19",
            "--k", "1", "--visualize-samples", "0", "--bootstrap", "0", "--permutations", "0"]
    from pathlib import Path
    hier[1] = str(Path(tb.__file__).parent / hier[1])
    for distance, ahd in (("lca-height", 5 / 4), ("half-path", 1.0)):
        out = tmp_path / distance
        args = tb.get_args_parser().parse_args(["--model1-embeddings", a, "--model2-embeddings", b, "--save-dir",
                                                str(out), "--hierarchy-distance", distance, *hier])
        assert tb.main(args) == 0
        res = json.loads((out / "backbone_comparison_results.json").read_text())
        assert res["model1"]["AHD@1"] == pytest.approx(ahd) and res["hierarchy"]["distance"] == distance
    assert tb.get_args_parser().parse_args(["--model1-embeddings", a, "--model2-embeddings", b]).hierarchy_distance \
        == "lca-height"


def test_help_lines_do_not_repeat_their_default():
    p = tb.get_args_parser()
    assert [a.option_strings for a in p._actions if a.help and "default" in a.help.lower()] == []


# ----------------------------------------------------------------------------- issue 20: metrics.rank, embeddings.load

def test_each_model_ranked_by_metrics_rank_and_chunk_size_changes_nothing():
    e1, e2, labels = random_sets(40, seed=3)
    e1, e2 = tb._normalise(e1, "a"), tb._normalise(e2, "b")
    pids = np.array([f"p{i // 2}" for i in range(40)])
    import metrics
    for groups in (None, pids):
        auto = tb.compare_embeddings(e1, e2, labels, k=5, patient_ids=groups, progress=False)  # chunk_size None
        for key, e in (("1", e1), ("2", e2)):
            ev = metrics.evaluate(e, labels, query_groups=groups, exclude_same_group=groups is not None,
                                  k_values=(1, 5), vote_k=())
            assert auto["ap" + key].mean() == pytest.approx(ev["mAP@5"]) and auto["r1_" + key].mean() == ev["R@1"]
            assert np.nanmean(auto["fullap" + key]) == pytest.approx(ev["mAP"])
        small = tb.compare_embeddings(e1, e2, labels, k=5, patient_ids=groups, chunk_size=7, progress=False)
        for key in auto:
            np.testing.assert_array_equal(auto[key], small[key])
    assert tb.get_args_parser().parse_args(["--model1-embeddings", "a", "--model2-embeddings", "b"]).chunk_size is None


def test_learned_set_matched_by_image_id(tmp_path):
    e1, e2, labels = random_sets()
    ids = np.array([f"img{i}" for i in range(30)])
    a, b = write_set(tmp_path, "m1", e1, labels, ids), write_set(tmp_path, "m2", e2, labels, ids)
    perm = np.random.default_rng(0).permutation(30)
    f = write_set(tmp_path, "fused", e2[perm], labels[perm], ids[perm])
    args = args_for(tmp_path, a, b, "--learned-embeddings", f)
    s1, _ = tb.load_sets(args)
    np.testing.assert_allclose(tb.load_learned(args, s1), tb._normalise(e2, "b"), atol=1e-6)
    g = write_set(tmp_path, "other", e2, labels, [f"x{i}" for i in range(30)])
    with pytest.raises(ValueError, match="not of the same images"):
        tb.load_learned(args_for(tmp_path, a, b, "--learned-embeddings", g), s1)


def test_full_map_is_na_not_nan_when_no_query_has_a_relevant_image(tmp_path, capsys):
    # every image its own class: no query has a relevant image, so full-ranking mAP is undefined (not nan)
    rng = np.random.default_rng(0)
    e1, e2 = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((3, 3)).astype(np.float32)
    labels = np.arange(3)  # the three covid classes, one image each
    p1, p2 = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(p1, e1), np.save(p2, e2), np.save(tmp_path / "labels.npy", labels)
    args = tb.get_args_parser().parse_args(["--model1-embeddings", str(p1), "--model2-embeddings", str(p2),
                                            "--labels", str(tmp_path / "labels.npy"), "--k", "1",
                                            "--bootstrap", "0", "--permutations", "0",
                                            "--visualize-samples", "0", "--save-dir", str(tmp_path / "out")])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "Mean of empty slice"
        assert tb.main(args) == 0
    out = capsys.readouterr().out
    assert not re.search(r"\bnan\b", out) and "n/a" in out
    res = json.loads((tmp_path / "out" / "backbone_comparison_results.json").read_text())
    assert res["model1"]["mAP"] is None and res["model2"]["mAP"] is None
