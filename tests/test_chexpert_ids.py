"""Image ids unique within a list (dataset.list_image_ids), and CheXpert's folder layout end to end: a tiny
CheXpert-shaped tree, embeddings extracted by extract_embeddings.main, probes fitted from CheXpert's train.csv."""
import json

import numpy as np
import pytest
from PIL import Image

import concepts
import extract_embeddings as ee
import dataset
from dataset import ImageListDataset
from ontology import load_vocabulary, read_concept_labels

TINY = ["--model", "convnextv2", "--convnext-backbone", "convnextv2_atto", "--no-pretrained", "--img-size", "64"]


def test_id_rule_stem_then_patient_study_view_then_path():
    # unique stems: the stem (what every list so far got)
    assert dataset.list_image_ids(["a/x.png", "b/y.png"]) == ["x", "y"]
    # CheXpert: every stem is view1_frontal; the last three parts, whatever folder the paths start in
    cx = ["CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg",
          "CheXpert-v1.0/train/patient00002/study1/view1_frontal.jpg"]
    want = ["patient00001_study1_view1_frontal", "patient00002_study1_view1_frontal"]
    assert dataset.list_image_ids(cx) == want
    assert dataset.list_image_ids([p.split("/", 2)[2] for p in cx]) == want            # patient00001/study1/...
    # one patient, two studies: still patient_study_view (not the shorter study_view)
    assert dataset.list_image_ids(["p/patient1/study1/view1_frontal.jpg", "p/patient1/study2/view1_frontal.jpg"]) == [
        "patient1_study1_view1_frontal", "patient1_study2_view1_frontal"]
    # three parts repeat: the whole relative path
    assert dataset.list_image_ids(["a/b/c/d.png", "z/b/c/d.png"]) == ["a_b_c_d", "z_b_c_d"]


def test_extraction_refuses_ids_that_collide_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    for name in ("x.png", "x.jpg", "y.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a" / name)
    (tmp_path / "list.txt").write_text("p1 a/x.png normal\n# comment\np2 a/y.png normal\np3 a/x.jpg COVID-19\n")
    monkeypatch.setattr(ee, "build", lambda *a: pytest.fail("the model was built before the ids were checked"))
    args = ee.get_args_parser().parse_args(
        ["--dataset-dir", str(tmp_path), "--test-image-list", str(tmp_path / "list.txt"),
         "--output", str(tmp_path / "out" / "e.npy"), "--workers", "0", "--device", "cpu", *TINY])
    with pytest.raises(ValueError, match=r"list\.txt:4: 'a/x\.jpg' gets image id 'a_x', as does 'a/x\.png' on line 1"):
        ee.run(args)
    assert not (tmp_path / "out").exists()


def _chexpert_tree(root, n=8):
    """root/CheXpert-v1.0/train/patientXXXXX/study1/view1_frontal.jpg (+ a lateral view for patient 1), CheXpert's
    train.csv (Cardiomegaly 1 for odd patients, Edema unknown for two), and an image list with CheXpert's paths."""
    rows = ["Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Edema"]
    lines = []
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        views = ["view1_frontal"] + (["view2_lateral"] if i == 1 else [])
        for v in views:
            rel = f"CheXpert-v1.0/train/patient{i:05d}/study1/{v}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8)).save(root / rel)
            edema = "" if i in (3, 4) else f"{float(i % 3 == 0)}"
            rows.append(f"{rel},F,60,Frontal,AP,,{float(i % 2)},{edema}")
            lines.append(f"patient{i:05d} {rel} {'pneumonia' if i % 2 else 'normal'}")
    (root / "CheXpert-v1.0" / "train.csv").write_text("\n".join(rows) + "\n")
    (root / "list.txt").write_text("\n".join(lines) + "\n")


def test_chexpert_layout_extract_then_probe_end_to_end(tmp_path, capsys):
    _chexpert_tree(tmp_path)
    out = tmp_path / "emb" / "cx.npy"
    args = ee.get_args_parser().parse_args(
        ["--dataset-dir", str(tmp_path), "--test-image-list", str(tmp_path / "list.txt"), "--output", str(out),
         "--workers", "0", "--device", "cpu", "--batch-size", "16", *TINY])
    assert ee.main(args) == 0
    ids = np.load(tmp_path / "emb" / "cx_image_ids.npy")
    labels = read_concept_labels(tmp_path / "CheXpert-v1.0" / "train.csv", load_vocabulary())
    # the reader and the extraction name the same files alike, and the ids are unique
    assert list(ids) == list(labels.image_ids) and len(set(ids)) == 9
    assert ids[0] == "patient00001_study1_view1_frontal" and ids[1] == "patient00001_study1_view2_lateral"
    # the same ids from a list relative to CheXpert-v1.0/train (the other usual layout)
    rel = tmp_path / "rel.txt"
    rel.write_text((tmp_path / "list.txt").read_text().replace(" CheXpert-v1.0/train/", " "))
    assert ImageListDataset(rel, tmp_path / "CheXpert-v1.0" / "train").image_ids == list(ids)
    capsys.readouterr()
    assert concepts.main(concepts.get_args_parser().parse_args(
        ["probe", "--embeddings", str(out), "--concept-labels", str(tmp_path / "CheXpert-v1.0" / "train.csv"),
         "--save-dir", str(tmp_path / "probes")])) == 0
    assert "note:" not in capsys.readouterr().out                          # every label row found its embedding
    res = json.loads((tmp_path / "probes" / "probes.json").read_text())
    c = res["concepts"]
    # Cardiomegaly: odd patients (1, 3, 5, 7; patient 1 with 2 images) -> 5 positive images, 4 negative
    assert (c["cardiomegaly"]["n_pos"], c["cardiomegaly"]["n_neg"]) == (5, 4)
    assert c["cardiomegaly"]["auroc"] is not None and c["cardiomegaly"]["folds_used"] >= 2
    # Edema: unknown for patients 3 and 4 (one image each), so 7 of the 9 images are counted
    assert c["pulmonary_edema"]["n_pos"] + c["pulmonary_edema"]["n_neg"] == 7
    assert res["grouped_by"] == "patient"


def test_embeddings_with_repeated_ids_are_refused(tmp_path, capsys):
    # embeddings extracted before ids were unique: every CheXpert image was 'view1_frontal'
    np.save(tmp_path / "e.npy", np.eye(3, dtype=np.float32))
    np.save(tmp_path / "e_image_ids.npy", np.array(["view1_frontal"] * 3))
    (tmp_path / "l.csv").write_text("image_id,consolidation\nview1_frontal,1\n")
    assert concepts.main(concepts.get_args_parser().parse_args(
        ["probe", "--embeddings", str(tmp_path / "e.npy"), "--concept-labels", str(tmp_path / "l.csv"),
         "--save-dir", str(tmp_path / "p")])) == 2
    err = capsys.readouterr().err
    # the check of embeddings.load (every reader of a set): the ids file, the repeated id, what to do
    assert "e_image_ids.npy: 1 image ids repeat (view1_frontal)" in err and "re-extract" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "p").exists()
