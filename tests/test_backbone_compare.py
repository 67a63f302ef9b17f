"""test_backbone.py: every quantity on hand-computed small cases, the input checks, and main end to end."""
import json

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


def test_interpretation_rules():
    assert tb.interpret(2.5, 0.5, 0.8, 0.7, 0.75, 5).startswith("Fusion looks beneficial")
    assert tb.interpret(2.5, 0.5, 0.7, 0.7, 0.75, 5).startswith("Mixed")      # fusion does not beat both
    assert tb.interpret(4.5, 0.9, 0.9, 0.7, 0.75, 5).startswith("Fusion is not beneficial")
    assert tb.interpret(3.5, 0.7, 0.9, 0.7, 0.75, 5).startswith("Mixed")


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
                         "std_spearman", "fusion", "fusion_zscore", "rrf", "heldout", "paired"]
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
    # results already there: refused, then replaced with --overwrite
    with pytest.raises(ValueError, match="--overwrite"):
        tb.main(args)
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
    with pytest.raises(ValueError, match=r"short\.npy holds 20 labels.*30 rows"):
        tb.load_inputs(args_for(tmp_path, a, b, "--labels", str(tmp_path / "short.npy")))


def test_image_id_mismatch_error(tmp_path):
    e1, e2, labels = random_sets()
    ids = [f"img{i}" for i in range(30)]
    a = write_set(tmp_path, "m1", e1, labels, ids)
    b = write_set(tmp_path, "m2", e2, labels, ids[::-1])
    with pytest.raises(ValueError, match=r"m1_image_ids\.npy and .*m2_image_ids\.npy differ at 30 of 30"):
        tb.load_inputs(args_for(tmp_path, a, b))


def test_non_finite_error_counts(tmp_path):
    e1, e2, labels = random_sets()
    e2[3, 0], e2[7, :2] = np.nan, np.inf
    a, b = write_set(tmp_path, "m1", e1, labels), write_set(tmp_path, "m2", e2, labels)
    with pytest.raises(ValueError, match=r"m2\.npy: 3 non-finite values in 2 of 30 rows"):
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
    with pytest.raises(ValueError, match="compared by class name"):
        tb.load_inputs(args_for(tmp_path, a, b))


def test_names_on_one_file_only_is_an_error_naming_both(tmp_path):
    e1, e2, labels = random_sets()
    a, b = write_set(tmp_path, "m1", e1, labels), write_set(tmp_path, "m2", e2, labels)
    write_meta(a, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"m1\.npy carries class names.*m2\.npy has none"):
        tb.load_inputs(args_for(tmp_path, a, b))


def test_help_shows_defaults_and_every_flag_has_help():
    p = tb.get_args_parser()
    assert p.formatter_class is __import__("argparse").ArgumentDefaultsHelpFormatter
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
    model_rows = [l for l in text.splitlines() if l.startswith(("ConvNeXtV2 ", "ConceptCLIP "))]
    assert all("Overlap" not in l and "rho" not in l for l in model_rows)
    assert "pair ConvNeXtV2 / ConceptCLIP: Mean Overlap@5" in text
    out = tmp_path / "out"
    res = json.loads((out / "backbone_comparison_results.json").read_text())
    with np.load(out / "backbone_comparison_results.npz") as z:
        ev = z["heldout_eval_indices"]
        # the held-out rows are each model on the SAME held-out queries, not the full-set means
        assert res["paired"][f"mAP@5"]["ConvNeXtV2"] == pytest.approx(z["aps_model1"][ev].mean())
        assert res["paired"][f"mAP@5"]["ConceptCLIP"] == pytest.approx(z["aps_model2"][ev].mean())
    assert res["paired"]["queries"] == len(ev) == 15
    pair = res["paired"]["pairs"][0]
    assert (pair["a"], pair["b"]) == ("ConvNeXtV2", "ConceptCLIP")
    assert pair["diff"] == pytest.approx(res["paired"]["mAP@5"]["ConvNeXtV2"] - res["paired"]["mAP@5"]["ConceptCLIP"])
    assert pair["significant"] == (pair["ci"][0] > 0 or pair["ci"][1] < 0)
