"""test.py end to end: from saved .npy embeddings and from a checkpoint on the demo data."""
import json

import numpy as np
import pytest
import torch

import embeddings
import metrics
import test as test_script

ISSUE_KEYS = {"num_queries", "num_gallery", "exclude_same_patient", "queries_without_relevant", "R@1", "R@5",
              "R@10", "mP@1", "mP@5", "mP@10", "mAP", "mAP@5", "mAP@10", "MAP@R", "vote", "per_class", "ci95"}


def run(argv):
    return test_script.main(test_script.get_args_parser().parse_args([str(a) for a in argv]))


@pytest.fixture
def npy_files(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    labels = np.arange(n) % 3
    emb = (rng.standard_normal((n, 8)) + 2 * np.eye(8)[labels]).astype(np.float32)
    paths = {"emb": tmp_path / "e.npy", "lab": tmp_path / "e_labels.npy", "ids": tmp_path / "e_image_ids.npy",
             "pid": tmp_path / "e_patient_ids.npy"}
    np.save(paths["emb"], emb)
    np.save(paths["lab"], labels)
    np.save(paths["ids"], np.array([f"img{i}" for i in range(n)]))
    np.save(paths["pid"], np.array([f"p{i // 2}" for i in range(n)]))  # two images per patient
    return paths, emb, labels


def test_from_npy_files(npy_files, tmp_path, capsys):
    p, emb, labels = npy_files
    out = tmp_path / "res"
    assert run(["--embeddings", p["emb"], "--labels", p["lab"], "--image-ids", p["ids"], "--patient-ids", p["pid"],
                "--save-dir", out, "--bootstrap", 50]) == 0
    printed = capsys.readouterr().out
    assert "60 of 60 queries have another image of the same patient" in printed and "--exclude-same-patient" in printed
    res = json.loads((out / "results.json").read_text())
    assert ISSUE_KEYS <= set(res)
    expected = metrics.evaluate(emb, labels, k_values=(1, 5, 10))
    for key in ("R@1", "R@5", "mP@10", "mAP", "mAP@5", "mAP@10", "MAP@R"):
        assert res[key] == pytest.approx(expected[key]) and 0 <= res[key] <= 1
    assert set(res["vote"]) == {"1", "5", "10", "15", "20"}
    assert set(res["ci95"]) >= {"R@1", "mAP", "mAP@5"}
    assert (out / "confusion_matrix.png").stat().st_size > 0
    # from saved sets the input sets are the run's sets: named in results.json, not copied
    assert res["embedding_sets"] == {"queries": str(p["emb"]), "gallery": None}
    assert not (out / "embeddings.npy").exists() and not (out / "embeddings.npz").exists()

    # the same patient excluded: every query loses its twin
    out2 = tmp_path / "res_excl"
    assert run(["--embeddings", p["emb"], "--labels", p["lab"], "--patient-ids", p["pid"], "--save-dir", out2,
                "--exclude-same-patient", "--bootstrap", 0]) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    assert res2["exclude_same_patient"] is True
    groups = np.array([f"p{i // 2}" for i in range(60)])
    expected = metrics.evaluate(emb, labels, query_groups=groups, exclude_same_group=True)
    assert res2["mAP"] == pytest.approx(expected["mAP"])


def test_npy_separate_gallery_and_faiss(npy_files, tmp_path):
    p, emb, labels = npy_files
    np.save(tmp_path / "q.npy", emb[:10])
    np.save(tmp_path / "q_labels.npy", labels[:10])
    np.save(tmp_path / "g.npy", emb[10:])
    np.save(tmp_path / "g_labels.npy", labels[10:])
    for backend in ("torch", "faiss"):
        out = tmp_path / backend
        assert run(["--embeddings", tmp_path / "q.npy", "--labels", tmp_path / "q_labels.npy",
                    "--gallery-embeddings", tmp_path / "g.npy", "--gallery-labels", tmp_path / "g_labels.npy",
                    "--knn-backend", backend, "--save-dir", out, "--bootstrap", 0]) == 0
    a = json.loads((tmp_path / "torch" / "results.json").read_text())
    b = json.loads((tmp_path / "faiss" / "results.json").read_text())
    assert a["num_queries"] == 10 and a["num_gallery"] == 50 and a["protocol"] == "separate gallery"
    assert {k: a[k] for k in ISSUE_KEYS - {"ci95"}} == {k: b[k] for k in ISSUE_KEYS - {"ci95"}}


def test_bad_input_is_one_line_error(npy_files, tmp_path, capsys):
    p, emb, labels = npy_files
    np.save(tmp_path / "short_labels.npy", labels[:-1])
    bad = emb.copy()
    bad[4, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    out = tmp_path / "out"
    cases = [
        (["--embeddings", p["emb"], "--labels", tmp_path / "short_labels.npy"],
         "59 entries (shape (59,)) but --embeddings"),
        (["--embeddings", tmp_path / "nan.npy", "--labels", p["lab"]], "1 of 60 rows hold NaN"),
        (["--embeddings", p["emb"], "--labels", p["lab"], "--k-values", 1, 60], "k = 60 is larger than the gallery"),
        (["--embeddings", tmp_path / "nan.npy", "--labels", p["lab"], "--exclude-same-patient"], "needs patient ids"),
        (["--embeddings", tmp_path / "nan.npy"], "nan_labels.npy does not exist, pass --labels"),
        ([], "exactly one of --resume"),
        (["--embeddings", tmp_path / "missing.npy", "--labels", p["lab"]], "file not found"),
    ]
    for argv, message in cases:
        assert run(argv + ["--save-dir", out]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (out / "results.json").exists()
    # an existing results.json is kept unless --overwrite
    assert run(["--embeddings", p["emb"], "--labels", p["lab"], "--save-dir", out, "--bootstrap", 0]) == 0
    before = (out / "results.json").read_text()
    assert run(["--embeddings", p["emb"], "--labels", p["lab"], "--save-dir", out]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before
    assert run(["--embeddings", p["emb"], "--labels", p["lab"], "--save-dir", out, "--overwrite",
                "--bootstrap", 0]) == 0


def test_from_checkpoint(demo_data, tmp_path, capsys):
    model_mod = pytest.importorskip("model")
    from dataset import ImageListDataset, test_image_dir

    torch.manual_seed(0)
    model = model_mod.build_model("convnextv2", convnext_backbone="convnextv2_atto", pretrained=False, img_size=64,
                                  embedding_dim=16)
    ckpt = tmp_path / "tiny.pth"
    torch.save(model_mod.make_checkpoint(model, epoch=1), ckpt)
    out = tmp_path / "res"
    common = ["--resume", ckpt, "--dataset-dir", demo_data, "--test-image-list", demo_data / "test_split.txt",
              "--workers", 0, "--eval-batch-size", 16, "--device", "cpu"]
    assert run(common + ["--k-values", 1, 5, "--save-dir", out, "--bootstrap", 20]) == 0
    res = json.loads((out / "results.json").read_text())
    n = len((demo_data / "test_split.txt").read_text().split("\n")) - 1
    assert res["num_queries"] == res["num_gallery"] == n and res["protocol"] == "leave-one-out"
    for name in ("confusion_matrix.png", "retrieval_examples.png", "embeddings.npy"):
        assert (out / name).stat().st_size > 0
    # the embeddings are the model's output under its own eval transform, in list order: an embedding set
    saved = embeddings.load(out / "embeddings.npy", required=("labels", "image_ids", "patient_ids"))
    ds = ImageListDataset(demo_data / "test_split.txt", test_image_dir(demo_data),
                          transform=model_mod.get_transform(model))
    with torch.no_grad():
        z = model.eval()(ds[2][0][None])[0].numpy()
    np.testing.assert_allclose(saved.embeddings[2], z, atol=1e-5)
    assert saved.image_ids[2] == ds.image_ids[2] and saved.labels.tolist() == ds.labels.tolist()
    assert saved.meta["model_source"] == {"checkpoint": str(ckpt), "sha256": embeddings.file_sha256(ckpt)}
    assert res["embedding_sets"] == {"queries": str(out / "embeddings.npy"), "gallery": None}
    assert not (out / "gallery_embeddings.npy").exists()
    expected = metrics.evaluate(saved.embeddings, ds.labels, k_values=(1, 5))
    assert res["mAP"] == pytest.approx(expected["mAP"])

    # queries against the training archive, with patients excluded
    out2 = tmp_path / "gallery"
    assert run(common + ["--k-values", 1, 5, "--save-dir", out2, "--bootstrap", 0, "--gallery-image-list",
                         demo_data / "train_split.txt", "--exclude-same-patient"]) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    assert res2["protocol"] == "separate gallery" and res2["num_gallery"] > res2["num_queries"]

    # flags checked against the checkpoint; k checked before any image is embedded
    capsys.readouterr()
    assert run(common + ["--k-values", 1, "--model", "vit", "--save-dir", tmp_path / "x"]) == 2
    assert "holds model 'convnextv2'" in capsys.readouterr().err
    assert run(common + ["--k-values", 1, "--embedding-dim", 32, "--save-dir", tmp_path / "x"]) == 2
    assert "--embedding-dim 32" in capsys.readouterr().err
    assert run(common + ["--k-values", 1, 100, "--save-dir", tmp_path / "x"]) == 2
    assert "k = 100 is larger" in capsys.readouterr().err


@pytest.mark.parametrize("gallery", [False, True], ids=["leave-one-out", "separate-gallery"])
def test_sets_written_from_a_checkpoint_give_the_same_numbers_again(demo_data, tmp_path, capsys, gallery):
    # test.py --resume writes the embedding sets it evaluated; test.py --embeddings on them prints the same numbers
    model_mod = pytest.importorskip("model")
    torch.manual_seed(0)
    model = model_mod.build_model("convnextv2", convnext_backbone="convnextv2_atto", pretrained=False, img_size=64,
                                  embedding_dim=16)
    ckpt = tmp_path / "tiny.pth"
    torch.save(model_mod.make_checkpoint(model, epoch=1, args={"exclude_classes": ["COVID-19"]}), ckpt)
    same_patient = ["--exclude-same-patient"] if gallery else []
    flags = ["--k-values", 1, 5, "--bootstrap", 30, "--seed", 3, *same_patient]
    first = tmp_path / "from_ckpt"
    assert run(["--resume", ckpt, "--dataset-dir", demo_data, "--test-image-list", demo_data / "test_split.txt",
                "--workers", 0, "--device", "cpu", "--save-dir", first, *flags]
               + (["--gallery-image-list", demo_data / "train_split.txt"] if gallery else [])) == 0
    written = {"queries": first / "embeddings.npy", "gallery": first / "gallery_embeddings.npy" if gallery else None}
    a = json.loads((first / "results.json").read_text())
    assert a["embedding_sets"] == {k: None if v is None else str(v) for k, v in written.items()}
    assert (first / "gallery_embeddings.npy").exists() == gallery
    q = embeddings.load(written["queries"], required=("labels", "image_ids", "patient_ids"))
    assert q.meta["exclude_classes"] == ["COVID-19"] and q.meta["list_file"] == str(demo_data / "test_split.txt")
    if gallery:  # the gallery set: the training list, the same model and class numbering
        g = embeddings.load(written["gallery"], required=("labels", "image_ids", "patient_ids"))
        assert g.n == a["num_gallery"] and g.model_identity == q.model_identity and g.class_names == q.class_names
        assert g.meta["image_dir"] == str(demo_data / "train")

    second = tmp_path / "from_sets"
    assert run(["--embeddings", written["queries"], "--save-dir", second, *flags]
               + (["--gallery-embeddings", written["gallery"]] if gallery else [])) == 0
    b = json.loads((second / "results.json").read_text())
    assert b["embedding_sets"] == a["embedding_sets"]  # the sets read are the sets written
    drop = {"source", "git_revision"}
    assert {k: v for k, v in b.items() if k not in drop} == {k: v for k, v in a.items() if k not in drop}
    assert a["num_queries"] == q.n and "AHD@1" in a and a["ci95"]
    for key in ("ap", "r1", "image_ids", "patient_ids"):
        np.testing.assert_array_equal(np.load(first / "per_query.npz")[key], np.load(second / "per_query.npz")[key])

    # a set of an earlier run is never replaced silently
    (first / "results.json").unlink()
    capsys.readouterr()
    assert run(["--resume", ckpt, "--dataset-dir", demo_data, "--test-image-list", demo_data / "test_split.txt",
                "--workers", 0, "--device", "cpu", "--save-dir", first, "--k-values", 1, "--bootstrap", 0]) == 2
    err = capsys.readouterr().err
    assert "embeddings.npy" in err and "--overwrite" in err and not (first / "results.json").exists()


# ---------------------------------------------------------------- class identity, defaults, warnings

def _set(tmp_path, name, emb, labels, class_names=None):
    np.save(tmp_path / f"{name}.npy", np.asarray(emb, np.float32))
    np.save(tmp_path / f"{name}_labels.npy", np.asarray(labels, np.int64))
    if class_names is not None:
        (tmp_path / f"{name}_meta.json").write_text(json.dumps({"class_names": class_names}))
    return tmp_path / f"{name}.npy"


def test_separately_extracted_sets_are_matched_by_class_name(tmp_path, capsys):
    e = np.eye(3)
    # gallery numbers a, b, c as 0, 1, 2; the queries (no class a) number b, c as 0, 1
    g = _set(tmp_path, "g", e[[0, 0, 1, 1, 2, 2]], [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    q = _set(tmp_path, "q", e[[1, 2]], [0, 1], ["b", "c"])
    out = tmp_path / "res"
    assert run(["--embeddings", q, "--gallery-embeddings", g, "--save-dir", out, "--bootstrap", 0,
                "--k-values", 1]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["R@1"] == 1.0 and res["mAP"] == 1.0  # by raw ids it would be 0: b (0) vs b (1)
    assert set(res["per_class"]) == {"b", "c"}
    # one set with names and one without cannot be matched: an error naming both files
    (tmp_path / "q_meta.json").unlink()
    assert run(["--embeddings", q, "--gallery-embeddings", g, "--save-dir", tmp_path / "x", "--k-values", 1]) == 2
    err = capsys.readouterr().err
    assert str(q) in err and str(g) in err and not (tmp_path / "x").exists()


def test_sibling_files_and_names_from_meta_and_vote_warning(npy_files, tmp_path, capsys):
    p, emb, labels = npy_files
    (tmp_path / "e_meta.json").write_text(json.dumps({"class_names": ["normal", "pneumonia", "COVID-19"]}))
    out = tmp_path / "res"
    assert run(["--embeddings", p["emb"], "--save-dir", out, "--bootstrap", 0]) == 0  # labels, ids, patients found
    printed = capsys.readouterr().out
    assert "60 of 60 queries have another image of the same patient" in printed
    # 20 images per class, leave-one-out: 19 relevant, 2 * 19 >= 20, so every vote k can be won: all computed
    assert "not computed" not in printed
    res = json.loads((out / "results.json").read_text())
    assert set(res["per_class"]) == {"normal", "pneumonia", "COVID-19"}
    assert set(res["vote"]["5"]["per_class"]) == {"normal", "pneumonia", "COVID-19"}
    assert set(res["vote"]) == {"1", "5", "10", "15", "20"} and res["vote_k_without_majority"] == {}
    # hand-made arrays without a meta file keep their integer ids as names
    assert run(["--embeddings", tmp_path / "hand.npy" if np.save(tmp_path / "hand.npy", emb) is None else None,
                "--labels", p["lab"], "--save-dir", tmp_path / "hand", "--bootstrap", 0]) == 0
    assert set(json.loads((tmp_path / "hand" / "results.json").read_text())["per_class"]) == {"0", "1", "2"}


def test_example_queries_show_failures_first():
    rel = np.array([[True], [False], [True], [False], [True], [True]])
    r = metrics.Ranking(indices=np.zeros((6, 1), np.int64), sims=np.zeros((6, 1), np.float32), relevant=rel,
                        ap=None, map_at_r=None, num_relevant=None, num_candidates=np.ones(6, np.int64),
                        exclude_self=True, exclude_same_group=False)
    qs, failed = test_script.example_queries(r, 4, seed=0)
    assert sorted(qs[:2]) == [1, 3] and list(failed) == [True, True, False, False]
    assert set(qs[2:]) <= {0, 2, 4, 5}


def test_wrong_checkpoint_path_fails_first_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert run(["--resume", tmp_path / "nope.pth", "--test-image-list", "x.txt", "--dataset-dir", tmp_path,
                "--save-dir", out]) == 2
    err = capsys.readouterr().err
    assert "nope.pth: file not found" in err and not out.exists()


@pytest.mark.parametrize("script", ["train", "test", "extract_embeddings"])
def test_help_documents_every_flag_with_its_default(script):
    import importlib
    mod = importlib.import_module(script)
    parser = mod.get_args_parser()
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert not undocumented
    text = parser.format_help()
    assert "(default:" in text
    if script == "test":
        assert "--train-image-list" not in text and "--val-image-list" not in text


# ---------------------------------------------------------------- issue 19 (items 8, 10, 12, 20)

def circle(deg):
    a = np.radians(np.asarray(deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)


@pytest.mark.parametrize("distance, ahd, ms, hp", [
    # LOO nearest other image (angles 0, 10, 30, 100; normal pneumonia COVID-19 COVID-19):
    #   q0 -> pneumonia, q1 -> normal, q2 -> pneumonia, q3 -> COVID-19
    # LCA height: normal|disease = 2 (the root: root-abnormal-pneumonia), pneumonia|COVID-19 = 1, H = 2
    ("lca-height", (2 + 2 + 1 + 0) / 4, (2 + 2 + 1) / 3, (0 + 0 + 1 / 2 + 1) / 4),
    # half path: normal|disease = 3/2, pneumonia|COVID-19 = 1, H = 3/2
    ("half-path", (3 / 2 + 3 / 2 + 1 + 0) / 4, (3 / 2 + 3 / 2 + 1) / 3, (0 + 0 + 1 / 3 + 1) / 4),
])
def test_hierarchy_distance_flag_is_used_and_recorded(tmp_path, distance, ahd, ms, hp):
    e = _set(tmp_path, "e", circle([0, 10, 30, 100]), [0, 1, 2, 2], ["normal", "pneumonia", "COVID-19"])
    extra = [] if distance == "lca-height" else ["--hierarchy-distance", distance]  # lca-height is the default
    assert run(["--embeddings", e, "--save-dir", tmp_path / "r", "--k-values", 1, "--vote-k", 1,
                "--bootstrap", 0] + extra) == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["AHD@1"] == pytest.approx(ahd) and res["MS@1"] == pytest.approx(ms) and res["hP@1"] == pytest.approx(hp)
    assert res["hierarchy"]["distance"] == distance


def test_hierarchy_leaf_error_says_ids_are_the_names_without_meta(npy_files, tmp_path, capsys):
    p, _, _ = npy_files  # e.npy without e_meta.json: the names are "0", "1", "2", whatever --dataset says
    out = tmp_path / "never"
    assert run(["--embeddings", p["emb"], "--dataset", "covid", "--hierarchy", metrics.DEFAULT_HIERARCHIES["covid"],
                "--save-dir", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "leaf" in err and "is not a class" in err
    assert "e_meta.json does not exist, so the class names are the label ids" in err
    assert "pass --class-names" in err and "label map" not in err and not out.exists()
    # with --class-names the same tree fits
    assert run(["--embeddings", p["emb"], "--hierarchy", metrics.DEFAULT_HIERARCHIES["covid"], "--save-dir", out,
                "--class-names", "normal", "pneumonia", "COVID-19", "--bootstrap", 0]) == 0


def test_vote_k_a_class_cannot_win_is_na_and_every_short_class_is_named(tmp_path, capsys):
    # classes a, b, c, d with 4, 5, 6, 30 images, each class its own direction (a perfect embedding).
    # Leave-one-out R = 3, 4, 5, 29. vote@k is lost by construction when 2R < k:
    #   k = 10: a (6 < 10), b (8 < 10); k = 20: a, b, c (10 < 20); k = 1, 5: every class can win
    sizes = [4, 5, 6, 30]
    labels = np.repeat(np.arange(4), sizes)
    e = _set(tmp_path, "e", np.eye(4)[labels] + 0.01 * np.arange(len(labels))[:, None] % 0.05, labels,
             ["a", "b", "c", "d"])
    assert run(["--embeddings", e, "--save-dir", tmp_path / "r", "--k-values", 1, "--vote-k", 1, 5, 10, 20,
                "--bootstrap", 0, "--hierarchy", "none"]) == 0
    printed = capsys.readouterr().out
    assert "vote@k for k = [10, 20] not computed (n/a)" in printed and "'a' 3, 'b' 4, 'c' 5" in printed
    rows = {l.split()[0]: l.split()[1] for l in printed.splitlines() if l[:2] in ("1 ", "5 ", "10", "20")}
    assert rows["10"] == rows["20"] == "n/a" and rows["1"] == rows["5"] == "1.0000"
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert set(res["vote"]) == {"1", "5"} and res["vote_skipped_k"] == [10, 20]
    assert res["vote_k_without_majority"] == {"10": {"a": 3, "b": 4}, "20": {"a": 3, "b": 4, "c": 5}}


def test_examples_title_uses_singular_for_one(tmp_path, monkeypatch):
    from PIL import Image
    import matplotlib.figure
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"i{i}.png")
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(paths[-1])
    rel = np.array([[False], [True], [True]])  # one failure, two successes
    r = metrics.Ranking(indices=np.array([[1], [0], [0]]), sims=np.ones((3, 1), np.float32), relevant=rel, ap=None,
                        map_at_r=None, num_relevant=None, num_candidates=np.full(3, 2), exclude_self=True,
                        exclude_same_group=False)
    s = {"labels": np.array([0, 1, 1]), "image_ids": np.array(["i0", "i1", "i2"]),
         "patient_ids": np.array(["p0", "p1", "p2"]), "paths": paths}
    titles = []
    orig = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                        lambda self, t, **kw: titles.append(t) or orig(self, t, **kw))
    test_script.plot_examples(r, s, s, ["x", "y"], 3, 0, tmp_path / "ex.png", k=1)
    assert titles[0].startswith("1 failure (top-1 of another class) and 2 successes")


def _fusion_checkpoint(tmp_path):
    model_mod = pytest.importorskip("model")
    head = model_mod.build_model("fusion", backbone="fusion-concat:8,8", embedding_dim=4)
    path = tmp_path / "fusion_best_ckpt.pth"
    torch.save(model_mod.make_checkpoint(head, epoch=1), path)
    return path


def test_fusion_checkpoint_is_one_line_before_any_work(demo_data, tmp_path, capsys, monkeypatch):
    # needs model.load_checkpoint to refuse a learned-fusion head for image tools (model.CheckpointError)
    ckpt = _fusion_checkpoint(tmp_path)
    out = tmp_path / "never"
    monkeypatch.setattr("ood.load_reference", lambda *a, **kw: pytest.fail("OOD reference fitted before the check"))
    np.save(tmp_path / "ref.npy", np.ones((4, 4), np.float32))
    assert run(["--resume", ckpt, "--dataset-dir", demo_data, "--test-image-list", demo_data / "test_split.txt",
                "--device", "cpu", "--ood-reference", tmp_path / "ref.npy", "--save-dir", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("test.py: error:") and str(ckpt) in err
    assert not out.exists()


def test_checkpoint_is_checked_before_anything_else_reads_it(demo_data, tmp_path, capsys, monkeypatch):
    import model as model_mod

    def refuse(path, **kw):
        raise model_mod.CheckpointError(f"checkpoint {path} is of a kind test.py cannot use")
    monkeypatch.setattr(model_mod, "load_checkpoint", refuse)
    monkeypatch.setattr("ood.load_reference", lambda *a, **kw: pytest.fail("OOD reference fitted before the check"))
    monkeypatch.setattr("ood.checkpoint_embedding_dim", lambda *a: pytest.fail("checkpoint read before the check"))
    monkeypatch.setattr(test_script, "ImageListDataset", lambda *a, **kw: pytest.fail("lists read before the check"))
    assert run(["--resume", demo_data / "test_split.txt", "--dataset-dir", demo_data, "--test-image-list",
                demo_data / "test_split.txt", "--ood-reference", tmp_path / "ref.npy", "--dataset", "generic",
                "--save-dir", tmp_path / "never"]) == 2
    assert capsys.readouterr().err.strip() == f"test.py: error: checkpoint {demo_data / 'test_split.txt'} is of a " \
                                              f"kind test.py cannot use"


def test_own_help_lines_do_not_repeat_their_default():
    from dataset import get_data_parser
    shared = {a.dest for a in get_data_parser(lists=("test",))._actions}  # dataset.py's flags: not test.py's
    own = [a for a in test_script.get_args_parser()._actions if a.dest not in shared and a.help]
    assert [a.option_strings for a in own if "default" in a.help.lower().replace("by default", "")] == []
