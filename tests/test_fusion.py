"""train_fusion.py and the paired statistics of metrics.py: hand-made score vectors and planted signals."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import metrics
import model as M
import train_fusion as tf


# ----------------------------------------------------------------------------- paired statistics by hand

def test_identical_inputs_give_zero_ci_and_p_one():
    a = np.array([0.2, 0.9, 0.4, 1.0, 0.0, 0.7])
    diff, lo, hi = metrics.paired_bootstrap_ci(a, a.copy(), n_boot=500, seed=1)
    assert (diff, lo, hi) == (0.0, 0.0, 0.0)
    assert metrics.paired_permutation_test(a, a.copy(), n_perm=500, seed=1) == 1.0
    assert metrics.paired_comparison({"x": a, "y": a})[0]["significant"] is False


def test_constant_shift_gives_ci_excluding_zero_and_small_p():
    rng = np.random.default_rng(0)
    b = rng.random(20)
    diff, lo, hi = metrics.paired_bootstrap_ci(b + 0.1, b, n_boot=500, seed=0)
    assert diff == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    # every sign flip but the two all-equal ones shrinks |T|: p = (1 + hits) / 1001 with hits ~ 1000 * 2 / 2^20
    p = metrics.paired_permutation_test(b + 0.1, b, n_perm=1000, seed=0)
    assert p <= 3 / 1001
    pair = metrics.paired_comparison({"shifted": b + 0.1, "base": b}, n_boot=200, n_perm=200)[0]
    assert pair["significant"] and (pair["a"], pair["b"]) == ("shifted", "base")


def test_permutation_p_by_hand():
    # d = [1, 1, 0, 0]: T = 0.5; random signs on the two non-zero entries give |T*| = 0.5 half the time
    a, b = np.array([1.0, 1.0, 0.0, 0.0]), np.zeros(4)
    p = metrics.paired_permutation_test(a, b, n_perm=4000, seed=0)
    assert p == pytest.approx(0.5, abs=0.03)
    # patients [u, u, v, v]: a patient's queries flip together, |T*| = 0.5 always -> p = 1
    assert metrics.paired_permutation_test(a, b, groups=["u", "u", "v", "v"], n_perm=500) == 1.0


def test_patient_resampling_keeps_a_patients_queries_together():
    a, b = np.array([1.0, 0.0, 1.0, 0.0, 0.5]), np.zeros(5)
    # one patient holds every query: every resample is the whole set, so the CI collapses onto the mean
    diff, lo, hi = metrics.paired_bootstrap_ci(a, b, groups=["p"] * 5, n_boot=300, seed=0)
    assert diff == lo == hi == pytest.approx(0.5)
    # per query the resampled means vary
    _, lo_q, hi_q = metrics.paired_bootstrap_ci(a, b, n_boot=300, seed=0)
    assert lo_q < 0.5 < hi_q
    # two patients {1, 0} and {1, 0, 0.5}: each resample's mean is one of (1/2, 1/2.., mixtures) by hand:
    # draws (P1,P1) -> 0.5, (P2,P2) -> 0.5, (P1,P2) -> 2.5/5 = 0.5: always 0.5
    diff, lo, hi = metrics.paired_bootstrap_ci(a, b, groups=["1", "1", "2", "2", "2"], n_boot=300, seed=0)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)


def test_paired_input_checks():
    with pytest.raises(ValueError, match="equal-length"):
        metrics.paired_bootstrap_ci(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.paired_permutation_test(np.array([np.nan, 1.0]), np.zeros(2))


# ----------------------------------------------------------------------------- planted fusion signal

def planted_sets(n, seed, noise_dims=64):
    """4 classes c = 2 * b1 + b0; set A carries b0 only, set B b1 only (each half the class signal), both
    drowned in large nuisance dimensions that a learned projection can drop but a sum of similarities cannot."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    b0, b1 = labels % 2, labels // 2
    sig_a = np.stack([2 * b0 - 1, 1 - 2 * b0], 1) * 3.0
    sig_b = np.stack([2 * b1 - 1, 1 - 2 * b1], 1) * 3.0
    a = np.concatenate([sig_a + 0.3 * rng.standard_normal((n, 2)), 2.0 * rng.standard_normal((n, noise_dims))], 1)
    b = np.concatenate([sig_b + 0.3 * rng.standard_normal((n, 2)), 2.0 * rng.standard_normal((n, noise_dims))], 1)
    return a.astype(np.float32), b.astype(np.float32), labels


def write_set(folder, name, emb, labels, ids, pids=None, names=None):
    np.save(folder / f"{name}.npy", emb)
    np.save(folder / f"{name}_labels.npy", np.asarray(labels, np.int64))
    np.save(folder / f"{name}_image_ids.npy", np.asarray(ids, dtype=str))
    if pids is not None:
        np.save(folder / f"{name}_patient_ids.npy", np.asarray(pids, dtype=str))
    if names is not None:
        (folder / f"{name}_meta.json").write_text(json.dumps({"class_names": names}))
    return str(folder / f"{name}.npy")


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def map10(emb, labels):
    return metrics.evaluate(emb, labels, k_values=(1, 10), full_ranking=False)["mAP@10"]


def train_args(tmp_path, files, *extra):
    return tf.get_args_parser().parse_args(["--embeddings", *files, "--save-dir", str(tmp_path / "ck"),
                                            "--epochs", "8", "-k", "16", *extra])


@pytest.mark.parametrize("head,epochs", [("concat", "8"), ("mlp", "16"), ("gated", "8")])
def test_fusion_head_beats_both_inputs_and_weighted_sum_on_held_out(tmp_path, head, epochs):
    a, b, y = planted_sets(800, seed=0)
    ids = [f"tr{i}" for i in range(800)]
    fa = write_set(tmp_path, "a", a, y, ids, [f"p{i // 2}" for i in range(800)])
    fb = write_set(tmp_path, "b", b, y, ids)
    assert tf.main(train_args(tmp_path, [fa, fb], "--head", head, "--embedding-dim", "16",
                                     "--epochs", epochs)) == 0
    ckpt = next((tmp_path / "ck").glob(f"fusion_{head}_*/*_best_ckpt.pth"))
    model, state = M.load_checkpoint(ckpt, kind="fusion")  # rebuilt from the checkpoint alone
    assert model.model_name == "fusion" and state["selection_metric"] == "val mAP@10"
    # held-out images, never seen in training
    ta, tb_, ty = planted_sets(400, seed=1)
    tids = [f"te{i}" for i in range(400)]
    ga, gb = write_set(tmp_path, "ta", ta, ty, tids), write_set(tmp_path, "tb", tb_, ty, tids)
    out = tmp_path / "fused.npy"
    assert tf.main(tf.get_args_parser().parse_args(["--apply", str(ckpt), "--embeddings", ga, gb,
                                                    "--output", str(out)])) == 0
    fused = np.load(out)
    assert np.load(tmp_path / "fused_labels.npy").tolist() == ty.tolist()
    m_a, m_b, m_f = map10(ta, ty), map10(tb_, ty), map10(fused, ty)
    # weighted sum of cosine similarities = dot product of [sqrt(w) a, sqrt(1 - w) b] (unit rows)
    m_sum = max(map10(np.concatenate([np.sqrt(w) * unit(ta), np.sqrt(1 - w) * unit(tb_)], 1), ty)
                for w in (0.3, 0.5, 0.7))
    assert m_f > max(m_a, m_b, m_sum) + 0.05, (m_a, m_b, m_sum, m_f)


def test_rows_matched_by_image_id(tmp_path):
    a, b, y = planted_sets(60, seed=2)
    ids = np.array([f"img{i}" for i in range(60)])
    perm = np.random.default_rng(0).permutation(60)
    fa = write_set(tmp_path, "a", a, y, ids)
    fb = write_set(tmp_path, "b", b[perm], y[perm], ids[perm])       # same images, another order
    sets, labels, got_ids, _, _ = tf.load_sets([fa, fb])
    assert got_ids.tolist() == ids.tolist() and labels.tolist() == y.tolist()
    np.testing.assert_array_equal(sets[1], b)


def test_labels_matched_by_class_name(tmp_path):
    a, b, y = planted_sets(40, seed=3)
    ids = [f"i{i}" for i in range(40)]
    fa = write_set(tmp_path, "a", a, y, ids, names=["w", "x", "y", "z"])
    fb = write_set(tmp_path, "b", b, 3 - y, ids, names=["z", "y", "x", "w"])  # same classes, reversed ids
    assert tf.load_sets([fa, fb])[1].tolist() == y.tolist()
    fc = write_set(tmp_path, "c", b, y, ids)                                   # no names: cannot be matched
    with pytest.raises(ValueError, match=r"a\.npy carries class names.*c\.npy has none"):
        tf.load_sets([fa, fc])


def test_bad_inputs_refused_before_any_work(tmp_path):
    a, b, y = planted_sets(40, seed=4)
    ids = [f"i{i}" for i in range(40)]
    fa = write_set(tmp_path, "a", a, y, ids)
    cases = {
        "single": ([fa], "two or more"),
        "ids": ([fa, write_set(tmp_path, "b1", b, y, [f"j{i}" for i in range(40)])], "not of the same images"),
        "length": ([fa, write_set(tmp_path, "b2", b[:30], y[:30], ids[:30])], r"\(40 rows\).*\(30 rows\)"),
    }
    bn = b.copy()
    bn[5, 1] = np.nan
    cases["nan"] = ([fa, write_set(tmp_path, "b3", bn, y, ids)], r"1 of 40 rows hold NaN or inf \(rows 5 \(i5\)\)")
    for name, (files, msg) in cases.items():
        with pytest.raises(ValueError, match=msg):
            tf.run(train_args(tmp_path, files))
        assert not (tmp_path / "ck").exists(), name


def test_apply_checks_widths_and_overwrite(tmp_path):
    a, b, y = planted_sets(120, seed=5)
    ids = [f"i{i}" for i in range(120)]
    fa, fb = write_set(tmp_path, "a", a, y, ids), write_set(tmp_path, "b", b, y, ids)
    assert tf.main(train_args(tmp_path, [fa, fb], "--epochs", "1", "--head", "concat")) == 0
    ckpt = str(next((tmp_path / "ck").glob("*/*_best_ckpt.pth")))
    with pytest.raises(ValueError, match="already holds a run"):
        tf.run(train_args(tmp_path, [fa, fb], "--epochs", "1", "--head", "concat"))
    out = str(tmp_path / "f.npy")
    with pytest.raises(ValueError, match=r"widths \[66, 66\]"):
        tf.run(tf.get_args_parser().parse_args(["--apply", ckpt, "--embeddings", fb,
                                                 write_set(tmp_path, "s", a[:, :10], y, ids), "--output", out]))
    assert tf.main(tf.get_args_parser().parse_args(["--apply", ckpt, "--embeddings", fa, fb, "--output", out])) == 0
    meta = json.loads((tmp_path / "f_meta.json").read_text())  # embeddings.make_meta: the head by path and hash
    assert meta["model_name"] == "fusion" and meta["model_source"]["checkpoint"] == ckpt
    assert meta["inputs"] == [fa, fb] and len(meta["model_source"]["sha256"]) == 64
    with pytest.raises(ValueError, match="--overwrite"):
        tf.run(tf.get_args_parser().parse_args(["--apply", ckpt, "--embeddings", fa, fb, "--output", out]))
    # the fused set is a valid input of test_backbone.py --learned-embeddings
    import test_backbone as tbk
    args = tbk.get_args_parser().parse_args(["--model1-embeddings", fa, "--model2-embeddings", fb,
                                             "--learned-embeddings", out, "--save-dir", str(tmp_path / "cmp"),
                                             "--visualize-samples", "0", "--bootstrap", "100",
                                             "--permutations", "100", "--class-names", "a", "b", "c", "d"])
    assert tbk.main(args) == 0
    res = json.loads((tmp_path / "cmp" / "backbone_comparison_results.json").read_text())
    assert "Learned fusion" in res["paired"]["mAP@5"] and len(res["paired"]["pairs"]) == 10


def test_test_py_saves_per_query_ap_and_r1(tmp_path):
    import test as test_script
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)  # neighbours: 0<->1, 2<->3
    y = np.array([0, 0, 1, 0])                                              # query 2's neighbour 3 is wrong
    f = write_set(tmp_path, "e", emb, y, ["a", "b", "c", "d"])
    args = test_script.get_args_parser().parse_args(["--embeddings", f, "--save-dir", str(tmp_path / "out"),
                                                     "--k-values", "1", "2", "--vote-k", "1"])
    assert test_script.main(args) == 0
    with np.load(tmp_path / "out" / "per_query.npz") as z:
        assert z["r1"].tolist() == [1.0, 1.0, 0.0, 0.0] and z["image_ids"].tolist() == ["a", "b", "c", "d"]
        assert z["ap"][0] == pytest.approx(1.0) and np.isnan(z["ap"][2])  # query 2 has no relevant image


def test_test_py_compares_runs_on_the_same_queries(tmp_path, capsys):
    import test as test_script
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.7, 0.7], [0.6, 0.8]], np.float32)
    y = np.array([0, 0, 1, 1, 0, 1])
    f = write_set(tmp_path, "e", emb, y, ["a", "b", "c", "d", "e", "f"])

    def run(out, *extra):
        return test_script.main(test_script.get_args_parser().parse_args(
            ["--embeddings", f, "--save-dir", str(tmp_path / out), "--k-values", "1", "--vote-k", "1",
             "--bootstrap", "200", "--permutations", "200", *extra]))

    assert run("a") == 0
    # the same run again: difference 0, CI [0, 0], p = 1
    assert run("b", "--compare-with", str(tmp_path / "a")) == 0
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    (row,) = res["paired"]
    assert row["AP"]["diff"] == 0 and row["AP"]["ci"] == [0, 0] and row["AP"]["p"] == 1.0
    assert not row["AP"]["significant"] and row["R@1"]["num_queries"] == 6
    # a hand-made earlier run, stored in reversed query order, whose AP is lower by 0.25 on every query:
    # matched by image id, the difference is +0.25 with a CI that excludes 0
    with np.load(tmp_path / "a" / "per_query.npz") as z:
        ap, r1, ids = z["ap"], z["r1"], z["image_ids"]
    np.savez(tmp_path / "worse.npz", ap=(ap - 0.25)[::-1], r1=r1[::-1], image_ids=ids[::-1])
    assert run("c", "--compare-with", str(tmp_path / "worse.npz")) == 0
    (row,) = json.loads((tmp_path / "c" / "results.json").read_text())["paired"]
    assert row["AP"]["diff"] == pytest.approx(0.25) and row["AP"]["ci"] == pytest.approx([0.25, 0.25])
    assert row["AP"]["significant"] and row["R@1"]["diff"] == 0
    assert "paired vs" in capsys.readouterr().out
    # other queries, or no file: refused, nothing written
    np.savez(tmp_path / "other.npz", ap=ap[:5], r1=r1[:5], image_ids=ids[:5])
    assert run("d", "--compare-with", str(tmp_path / "other.npz")) == 2
    assert "not the 6 queries" in capsys.readouterr().err and not (tmp_path / "d" / "results.json").exists()
    assert run("e", "--compare-with", str(tmp_path / "nothing")) == 2
    assert "no per_query.npz" in capsys.readouterr().err and not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------- issue 19: inputs, advice, warnings

def with_model(path, model_name, checkpoint, names=("a", "b", "c", "d")):
    """Give a set's _meta.json the model identity extract_embeddings.py records."""
    meta = {"class_names": list(names), "model_name": model_name, "model_args": {"embedding_dim": 66},
            "resume": checkpoint}
    Path(path).with_name(Path(path).stem + "_meta.json").write_text(json.dumps(meta))
    return path


def test_apply_refuses_equal_width_inputs_in_swapped_order(tmp_path, capsys):
    a, b, y = planted_sets(120, seed=6)                  # both 66 wide: the width check cannot tell them apart
    ids, tids = [f"i{i}" for i in range(120)], [f"t{i}" for i in range(120)]
    names = ["a", "b", "c", "d"]
    fa = with_model(write_set(tmp_path, "train_m1", a, y, ids), "convnextv2", "ck/m1.pth")
    fb = with_model(write_set(tmp_path, "train_m2", b, y, ids), "conceptclip", None)
    assert tf.main(train_args(tmp_path, [fa, fb], "--epochs", "1", "--head", "concat")) == 0
    ckpt = str(next((tmp_path / "ck").glob("*/*_best_ckpt.pth")))
    # the test list's sets: other file names, the same models
    ta = with_model(write_set(tmp_path, "m1", a, y, tids, names=names), "convnextv2", "./ck/m1.pth")
    tb = with_model(write_set(tmp_path, "m2", b, y, tids, names=names), "conceptclip", None)
    out = tmp_path / "fused.npy"
    apply = lambda *files: tf.run(tf.get_args_parser().parse_args(  # noqa: E731
        ["--apply", ckpt, "--embeddings", *files, "--output", str(out), "--overwrite"]))
    with pytest.raises(ValueError, match=r"another order than in training: input 1 m2.npy \(conceptclip\) is the "
                                         r"model of training input 2"):
        apply(tb, ta)
    assert not out.exists()
    capsys.readouterr()
    assert apply(ta, tb) == 0 and "warning" not in capsys.readouterr().err  # the training order: no warning
    # no model in a set's meta: accepted, with a warning that the order cannot be checked
    tc = write_set(tmp_path, "m3", b, y, tids, names=names)
    assert apply(ta, tc) == 0
    assert "input 2 (m3.npy): its meta file names no model, so its position cannot be checked" \
        in capsys.readouterr().err


def test_apply_refuses_an_image_model_checkpoint_with_advice_it_can_follow(tmp_path):
    ckpt = tmp_path / "convnext_best_ckpt.pth"
    torch.save({"format": M.CHECKPOINT_FORMAT, "format_version": 1, "model_name": "convnextv2",
                "model_args": {}, "embedding_dim": 8, "model": {}}, ckpt)
    a, b, y = planted_sets(20, seed=7)
    ids = [f"i{i}" for i in range(20)]
    files = [write_set(tmp_path, "a", a, y, ids), write_set(tmp_path, "b", b, y, ids)]
    with pytest.raises(ValueError) as e:
        tf.run(tf.get_args_parser().parse_args(["--apply", str(ckpt), "--embeddings", *files,
                                                 "--output", str(tmp_path / "f.npy")]))
    msg = str(e.value)
    # train_fusion.py has no --model flag: the advice names what to give instead
    assert "--model" not in msg and "'convnextv2'" in msg and "train_fusion.py" in msg
    assert not (tmp_path / "f.npy").exists()


def test_mismatched_ids_are_printed_as_plain_strings(tmp_path):
    a, b, y = planted_sets(10, seed=8)
    fa = write_set(tmp_path, "a", a, y, [f"i{i}" for i in range(10)])
    fb = write_set(tmp_path, "b", b, y, [f"j{i}" for i in range(10)])
    with pytest.raises(ValueError) as e:
        tf.load_sets([fa, fb])
    assert "only in the first: ['i0', 'i1', 'i2']" in str(e.value) and "np.str_" not in str(e.value)


def test_training_refuses_output_before_any_work(tmp_path):
    a, b, y = planted_sets(40, seed=9)
    ids = [f"i{i}" for i in range(40)]
    files = [write_set(tmp_path, "a", a, y, ids), write_set(tmp_path, "b", b, y, ids)]
    with pytest.raises(ValueError, match="--output .* is written by --apply only"):
        tf.run(train_args(tmp_path, files, "--output", str(tmp_path / "f.npy")))
    assert not (tmp_path / "ck").exists() and not (tmp_path / "f.npy").exists()


def test_validation_that_cannot_choose_an_epoch_is_warned(tmp_path, capsys):
    # 4 classes x 2 patients x 5 images; --val-fraction 0.5 moves one patient per class to validation, so no
    # validation image has another patient's image of its class: AP 0 for every query, whatever the head does
    y = np.repeat(np.arange(4), 10)
    pids = [f"p{c}_{(i % 10) // 5}" for i, c in enumerate(y)]
    ids = [f"i{i}" for i in range(40)]
    a, b, _ = planted_sets(40, seed=10)
    files = [write_set(tmp_path, "a", a, y, ids, pids), write_set(tmp_path, "b", b, y, ids)]
    assert tf.main(train_args(tmp_path, files, "--epochs", "2", "--val-fraction", "0.5", "-k", "4")) == 0
    err = capsys.readouterr().err
    assert "20 of 20 validation images have no image of their class from another patient" in err
    assert "stayed 0.0000 in all 2 epochs" in err and "larger --val-fraction" in err
    assert json.loads(next((tmp_path / "ck").glob("*/args.json")).read_text())["val_warning"].startswith("20 of 20")


# ----------------------------------------------------------------------------- issue 20: one owner for embedding sets

def meta_set(name, meta):
    import embeddings
    return embeddings.EmbeddingSet(np.zeros((1, 2), np.float32), meta=meta, path=Path(f"emb/{name}.npy"))


def test_identities_of_old_meta_and_old_checkpoints_still_refuse_a_swap():
    # a checkpoint written before issue 20 stored model_name / model_args / checkpoint per input
    trained = [{"file": "train_a.npy", "model_name": "convnextv2", "model_args": {"d": 1}, "checkpoint": "ck/a.pth"},
               {"file": "train_b.npy", "model_name": "fusion", "model_args": {"d": 2}, "checkpoint": "ck/f.pth"}]
    # today's test sets: extract_embeddings.py's old "resume" (path spelled differently) and --apply's old "checkpoint"
    a = tf.input_identity(meta_set("a", {"model_name": "convnextv2", "model_args": {"d": 1}, "resume": "./ck/a.pth"}))
    b = tf.input_identity(meta_set("b", {"model_name": "fusion", "model_args": {"d": 2}, "checkpoint": "ck/f.pth"}))
    assert tf.check_input_order(trained, [a, b], "h.pth") == []
    with pytest.raises(ValueError, match=r"input 1 b.npy \(fusion from ck/f.pth\) is the model of training input 2"):
        tf.check_input_order(trained, [b, a], "h.pth")


def test_two_fusion_heads_are_two_models(tmp_path):
    # the bug of issue 20: both fused sets said only "checkpoint", so ood.py / concepts.py took them for one model
    a, b, y = planted_sets(60, seed=11)
    ids = [f"i{i}" for i in range(60)]
    files = [write_set(tmp_path, "a", a, y, ids), write_set(tmp_path, "b", b, y, ids)]
    outs = []
    for seed in ("0", "1"):
        assert tf.main(train_args(tmp_path, files, "--epochs", "1", "--head", "concat", "--seed", seed, "-k", "4")) == 0
        ckpt = next((tmp_path / "ck").glob(f"*seed_{seed}/*_best_ckpt.pth"))
        outs.append(tmp_path / f"fused{seed}.npy")
        assert tf.main(tf.get_args_parser().parse_args(["--apply", str(ckpt), "--embeddings", *files,
                                                        "--output", str(outs[-1])])) == 0
    import embeddings
    s0, s1 = (embeddings.load(o) for o in outs)
    assert s0.model_identity != s1.model_identity and s0.model_identity.startswith("fusion checkpoint sha256:")
    assert s0.image_ids.tolist() == ids and s0.labels.tolist() == y.tolist()


def test_device_default_is_automatic():
    assert tf.get_args_parser().parse_args(["--embeddings", "a.npy", "b.npy"]).device is None
