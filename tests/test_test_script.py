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
        (["--embeddings", p["emb"], "--labels", p["lab"], "--exclude-same-patient"], "needs --patient-ids"),
        (["--embeddings", p["emb"]], "needs --labels"),
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
