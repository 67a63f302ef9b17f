"""test.py end to end: from saved .npy embeddings and from a checkpoint on the demo data."""
import json

import numpy as np
import pytest
import torch

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
    saved = np.load(out / "embeddings.npz")
    assert np.array_equal(saved["labels"], labels) and saved["image_ids"][3] == "img3"

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
         "has 59 labels but the embeddings have 60"),
        (["--embeddings", tmp_path / "nan.npy", "--labels", p["lab"]], "1 of 60 rows contain NaN"),
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
    for name in ("confusion_matrix.png", "retrieval_examples.png", "embeddings.npz"):
        assert (out / name).stat().st_size > 0
    # the embeddings are the model's output under its own eval transform, in list order
    saved = np.load(out / "embeddings.npz")
    ds = ImageListDataset(demo_data / "test_split.txt", test_image_dir(demo_data),
                          transform=model_mod.get_transform(model))
    with torch.no_grad():
        z = model.eval()(ds[2][0][None])[0].numpy()
    np.testing.assert_allclose(saved["embeddings"][2], z, atol=1e-5)
    assert saved["image_ids"][2] == ds.image_ids[2]
    expected = metrics.evaluate(saved["embeddings"], ds.labels, k_values=(1, 5))
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
    # 20 images per class, leave-one-out: 19 relevant, so vote@20 cannot be won by a class alone
    assert "vote@k for k = [20] exceeds the 19 gallery images" in printed
    res = json.loads((out / "results.json").read_text())
    assert set(res["per_class"]) == {"normal", "pneumonia", "COVID-19"}
    assert set(res["vote"]["5"]["per_class"]) == {"normal", "pneumonia", "COVID-19"}
    assert res["vote_k_above_smallest_class"] == [20] and res["smallest_class_gallery"]["relevant_images"] == 19
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
