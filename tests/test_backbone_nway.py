"""test_backbone.py --embeddings NAME=PATH ... (issue 21): the N-way comparison on tiny synthetic sets written
through embeddings.save, its pieces by hand, and the learned fusion of three sets through train_fusion.py."""
import json
from dataclasses import replace

import numpy as np
import pytest

import embeddings
import metrics
import test_backbone as tb
import train_fusion as tf

CLASSES = ["normal", "pneumonia", "COVID-19"]


def make_sets(folder, n=30, noises=(0.5, 1.5, 3.0), seed=0, order=None):
    """Three sets of the same n images (ids img0.., two per patient): class centres plus noise of each scale;
    set i is written as folder/s{i}.npy, its rows in `order` (default: list order)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    ids = np.array([f"img{i}" for i in range(n)])
    pids = np.array([f"p{i // 2}" for i in range(n)])
    centres = rng.standard_normal((3, 16))
    paths = []
    for i, noise in enumerate(noises):
        e = (centres[labels] + noise * rng.standard_normal((n, 16))).astype(np.float32)
        rows = np.arange(n) if order is None or i == 0 else order
        meta = embeddings.make_meta(model_name=f"synthetic{i}", model_args={"noise": noise}, embedding_dim=16,
                                    weights="synthetic", class_names=CLASSES)
        s = embeddings.EmbeddingSet(e, labels, ids, pids, CLASSES, meta).take(rows)
        paths.append(str(embeddings.save(folder / f"s{i}.npy", s).path))
    return paths, labels, pids


def nway_args(tmp_path, named, *extra):
    return tb.get_args_parser().parse_args(["--embeddings", *named, "--save-dir", str(tmp_path / "out"),
                                            "--bootstrap", "200", "--permutations", "200", *extra])


# ----------------------------------------------------------------------------- pieces by hand

def test_holm_and_bonferroni_by_hand():
    p = [0.01, 0.04, 0.03, 0.5, np.nan]
    # Holm, m = 4 tests (NaN = no test): sorted 0.01*4 = 0.04, 0.03*3 = 0.09, 0.04*2 = 0.08 -> running max 0.09,
    # 0.5*1 = 0.5; back in input order
    np.testing.assert_allclose(tb.adjust_pvalues(p, "holm"), [0.04, 0.09, 0.09, 0.5, np.nan])
    np.testing.assert_allclose(tb.adjust_pvalues(p, "bonferroni"), [0.04, 0.16, 0.12, 1.0, np.nan])
    np.testing.assert_allclose(tb.adjust_pvalues(p, "none"), p)


def test_named_sets_parsed_and_bad_names_refused():
    assert tb.parse_named_sets(["a=x.npy", "b = y.npy"]) == [("a", "x.npy"), ("b", "y.npy")]
    with pytest.raises(ValueError, match=r"'x\.npy': expected NAME=PATH"):
        tb.parse_named_sets(["x.npy", "b=y.npy"])
    with pytest.raises(ValueError, match=r"\['a'\] are given twice"):
        tb.parse_named_sets(["a=x.npy", "a=y.npy"])
    with pytest.raises(ValueError, match="given twice; each set is one model"):
        tb.parse_named_sets(["a=x.npy", "b=./x.npy"])
    with pytest.raises(ValueError, match="two or more"):
        tb.parse_named_sets(["a=x.npy"])


def test_rrf_over_all_sets_matches_the_pair_rrf_and_is_the_model_for_copies():
    rng = np.random.default_rng(2)
    e1, e2 = (tb._normalise(rng.standard_normal((25, d)).astype(np.float32), "x") for d in (6, 4))
    labels = rng.integers(0, 3, 25)
    pair = tb.compare_embeddings(e1, e2, labels, k=4, progress=False)
    np.testing.assert_array_equal(tb.rrf_all([e1, e2], labels, 4, chunk_size=7), pair["rrf"])
    # three copies of one set: sum of a monotone function of one rank -> the model's own ranking
    own, _ = tb.single_model_scores(e1, labels, 4)
    np.testing.assert_array_equal(tb.rrf_all([e1, e1, e1], labels, 4), own)


# ----------------------------------------------------------------------------- main end to end

def test_nway_main_table_matrices_tests_and_files(tmp_path, capsys):
    paths, labels, pids = make_sets(tmp_path)
    named = [f"{n}={p}" for n, p in zip(("good", "mid", "poor"), paths)]
    args = nway_args(tmp_path, named, "--exclude-same-patient", "--k-values", "1", "5", "10")
    assert tb.main(args) == 0
    out = tmp_path / "out"
    text = capsys.readouterr().out
    assert "P@k as in Denner et al. 2025" in text and "mP@k" in text and "holm correction over the 3 pairs" in text
    res = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in res["models"]] == ["good", "mid", "poor"] and res["num_queries"] == 30
    # the per-model numbers are metrics.evaluate's (P@k = mP@k), each with a bootstrap CI around it
    for m, p in zip(res["models"], paths):
        e = tb._normalise(embeddings.load(p).embeddings, p)
        ev = metrics.evaluate(e, labels, query_groups=pids, exclude_same_group=True, k_values=(1, 5, 10), vote_k=())
        for key, ref in (("P@1", "mP@1"), ("P@5", "mP@5"), ("P@10", "mP@10"), ("R@5", "R@5"), ("mAP@5", "mAP@5"),
                         ("mAP", "mAP"), ("MAP@R", "MAP@R")):
            assert m["metrics"][key]["mean"] == pytest.approx(ev[ref]), key
            lo, hi = m["metrics"][key]["ci95"]
            assert lo <= m["metrics"][key]["mean"] <= hi
    ov, rho = np.array(res["overlap_matrix"]["values"]), np.array(res["spearman_matrix"]["values"])
    assert np.allclose(ov, ov.T) and np.allclose(np.diag(ov), 5) and np.allclose(np.diag(rho), 1)
    # pair (good, mid) is exactly the two-model path's pair
    pair = tb.compare_embeddings(*(tb._normalise(embeddings.load(p).embeddings, p) for p in paths[:2]), labels, 5,
                                 patient_ids=pids, progress=False)
    assert ov[0, 1] == pytest.approx(pair["overlap"].mean()) and rho[0, 1] == pytest.approx(pair["rho"].mean())
    alpha, h_map, _, _ = tb.heldout_alpha(pair["fusion"], [0.3, 0.5, 0.7], 0)
    fused = res["heldout"]["fusions"][0]
    assert fused["models"] == ["good", "mid"] and (fused["alpha"], fused["mAP@5"]) == (alpha, pytest.approx(h_map))
    assert len(res["paired_models"]["tests"]) == 3 and res["paired_models"]["correction"] == "holm"
    t = res["paired_models"]["tests"]
    assert [(x["a"], x["b"]) for x in t] == [("good", "mid"), ("good", "poor"), ("mid", "poor")]
    assert all(x["p_adjusted"] >= x["p"] for x in t)
    assert res["rrf"]["k"] == 60 and "RRF all (k=60)" in res["heldout"]["mAP@5"]
    assert len(res["heldout"]["tests"]) == 4  # three pair fusions and RRF, each against its better input
    with np.load(out / "nway_per_query.npz") as z:
        assert z["model_P@1"].shape == (3, 30) and z["pair_overlap"].shape == (3, 30)
    for f in ("overlap_matrix.png", "spearman_matrix.png"):
        assert (out / f).stat().st_size > 0
    # results already there: refused before any work, kept; --overwrite replaces them
    before = (out / "results.json").read_text()
    assert tb.main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before


def test_sets_of_other_images_refused_naming_both_and_other_order_aligned(tmp_path, capsys):
    paths, labels, _ = make_sets(tmp_path, order=np.arange(30)[::-1])  # s1, s2 stored in reverse order
    s0 = embeddings.load(paths[0])
    other = embeddings.save(tmp_path / "other.npy", embeddings.EmbeddingSet(
        s0.embeddings, s0.labels, np.array([f"x{i}" for i in range(30)]), s0.patient_ids, CLASSES, s0.meta)).path
    meta20 = dict(s0.meta, num_images=20)
    short = embeddings.save(tmp_path / "short.npy", replace(s0.take(np.arange(20)), meta=meta20)).path
    for bad, what in ((other, "not of the same images"), (short, "not of the same image list")):
        args = nway_args(tmp_path, [f"A={paths[0]}", f"B={paths[1]}", f"Z={bad}"])
        assert tb.main(args) == 2
        err = capsys.readouterr().err
        assert what in err and "--embeddings Z" in err and str(bad) in err and str(paths[0]) in err
        assert not (tmp_path / "out").exists()  # before any work
    # another order of the same images: matched by image id, as the two-model mode
    names, sets = tb.load_named_sets(nway_args(tmp_path, [f"A={paths[0]}", f"B={paths[1]}"]))
    assert sets[1].image_ids.tolist() == sets[0].image_ids.tolist() and sets[1].labels.tolist() == labels.tolist()


def test_mode_flags_refused_before_any_work(tmp_path, capsys):
    paths, _, _ = make_sets(tmp_path, n=12)
    for extra in (["--model1-embeddings", paths[0]], ["--model1-name", "x"], ["--image-dir", str(tmp_path)]):
        assert tb.main(nway_args(tmp_path, [f"a={paths[0]}", f"b={paths[1]}"], *extra)) == 2
    assert tb.main(tb.get_args_parser().parse_args([])) == 2
    err = capsys.readouterr().err
    assert "give one form" in err and "two-model flags" in err and "NAME=PATH" in err
    assert tb.main(nway_args(tmp_path, [f"a={paths[0]}", f"b={paths[1]}", "--k-values", "1", "20"])) == 2
    assert "--k-values" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_learned_fusion_of_three_sets_through_train_fusion(tmp_path, capsys):
    # train_fusion.py takes any number of sets; its fused set joins the N-way table as one more row
    (tmp_path / "train").mkdir()
    train, _, _ = make_sets(tmp_path / "train", n=48, seed=1)
    test, _, _ = make_sets(tmp_path, n=30)
    assert tf.main(tf.get_args_parser().parse_args(["--embeddings", *train, "--epochs", "2", "-k", "4",
                                                    "--device", "cpu", "--save-dir", str(tmp_path / "fusion")])) == 0
    ckpt = next((tmp_path / "fusion").glob("*/*_best_ckpt.pth"))
    fused = tmp_path / "fused.npy"
    assert tf.main(tf.get_args_parser().parse_args(["--apply", str(ckpt), "--embeddings", *test,
                                                    "--output", str(fused)])) == 0
    args = nway_args(tmp_path, [f"m{i}={p}" for i, p in enumerate(test)], "--learned-embeddings", str(fused),
                     "--learned-name", "learned", "--k-values", "1", "5")
    assert tb.main(args) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "learned" in res["heldout"]["mAP@5"] and res["heldout"]["fusions"][-1]["name"] == "learned"
