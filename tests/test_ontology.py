"""Hierarchical retrieval metrics (AHD@k, MS@k, hP@k), the hierarchy reader and the finding vocabulary.

Expected values are worked out by hand on small trees, written as fractions.
"""
import json

import numpy as np
import pytest

import metrics
import test as test_script
import test_backbone
from ontology import load_vocabulary

# An unbalanced tree: A hangs directly under the root, C and D two levels deeper.
#        root
#       /    \
#      A      X
#            / \
#           B   Y
#              / \
#             C   D
# edges: A-B 3, A-C 4, A-D 4, B-C 3, B-D 3, C-D 2  ->  h = edges / 2, H = 2
UNBALANCED = "root -\nA root\nX root\nB X\nY X\nC Y\nD Y\n"
CLASSES = ["A", "B", "C", "D"]


def tree(text=UNBALANCED, classes=CLASSES):
    # the hand-computed values below are half the tree path (the toolkit's default is the LCA height)
    return metrics.build_hierarchy(metrics.parse_hierarchy(text, "t.txt"), classes, "t.txt", distance="half-path")


def circle(deg):
    a = np.radians(np.asarray(deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)


def test_distances_of_an_unbalanced_tree():
    h = tree()
    assert h.distance.tolist() == [[0, 3 / 2, 2, 2], [3 / 2, 0, 3 / 2, 3 / 2], [2, 3 / 2, 0, 1], [2, 3 / 2, 1, 0]]
    assert h.H == 2


def test_metrics_on_a_hand_made_ranking():
    # gallery labels A B C D A; two queries with their top 3 written out:
    #   q0 (A): gallery 4 1 2 -> A B C -> h 0, 3/2, 2      q1 (C): gallery 3 1 2 -> D B C -> h 1, 3/2, 0
    glab = np.array([0, 1, 2, 3, 0])
    qlab = np.array([0, 2])
    idx = np.array([[4, 1, 2], [3, 1, 2]])
    r = metrics.hierarchical_metrics(idx, qlab, glab, tree(), k_values=(1, 3))
    assert r["AHD@1"] == pytest.approx(1 / 2)                 # (0 + 1) / 2
    assert r["AHD@3"] == pytest.approx(1)                     # (7/2 / 3 + 5/2 / 3) / 2
    assert r["MS@1"] == pytest.approx(1)                      # one mistake (q1: D), h 1
    assert r["MS@3"] == pytest.approx(3 / 2)                  # (3/2 + 2 + 1 + 3/2) / 4 mistakes
    assert r["hP@1"] == pytest.approx(3 / 4)                  # (1 + 1/2) / 2
    assert r["hP@3"] == pytest.approx(1 / 2)                  # ((1 + 1/4 + 0) / 3 + (1/2 + 1/4 + 1) / 3) / 2
    assert r["hierarchy"]["H"] == 2 and r["hierarchy"]["h"]["C|D"] == 1
    # no mistakes at all: MS is null, the others are perfect
    ok = metrics.hierarchical_metrics(np.array([[4], [2]]), qlab, glab, tree(), k_values=(1,))
    assert ok["MS@1"] is None and ok["AHD@1"] == 0 and ok["hP@1"] == 1


def test_covidx_tree_on_a_leave_one_out_ranking():
    # images at 0, 10, 30, 100 degrees, labels normal pneumonia COVID-19 COVID-19; nearest other image:
    #   q0 -> 1 (pneumonia, h 3/2), q1 -> 0 (normal, 3/2), q2 -> 1 (pneumonia, 1), q3 -> 2 (COVID-19, 0)
    labels = np.array([0, 1, 2, 2])
    hier = metrics.load_hierarchy(metrics.DEFAULT_HIERARCHIES["covid"], ["normal", "pneumonia", "COVID-19"],
                                  "half-path")
    assert hier.H == 3 / 2 and hier.distance[1, 2] == 1 and hier.distance[0, 2] == 3 / 2
    ranking = metrics.rank(circle([0, 10, 30, 100]), labels, k=3)
    r = metrics.hierarchical_metrics(ranking.indices, labels, None, hier, k_values=(1,), bootstrap=200, seed=0)
    assert r["AHD@1"] == pytest.approx(1)                     # (3/2 + 3/2 + 1 + 0) / 4
    assert r["MS@1"] == pytest.approx(4 / 3)                  # (3/2 + 3/2 + 1) / 3
    assert r["hP@1"] == pytest.approx(1 / 3)                  # (0 + 0 + 1/3 + 1) / 4
    lo, hi = r["ci95"]["AHD@1"]
    assert 0 <= lo <= 1 <= hi <= 3 / 2 and r["ci95"]["MS@1"][0] <= 4 / 3 <= r["ci95"]["MS@1"][1]


def test_ties_follow_the_gallery_index():
    # gallery 1 (normal) and 2 (COVID-19) are the same vector: the lower index ranks first, for every metric
    hier = metrics.load_hierarchy(metrics.DEFAULT_HIERARCHIES["covid"], ["normal", "pneumonia", "COVID-19"],
                                  "half-path")
    r = metrics.rank(circle([0]), np.array([2]), circle([90, 20, 20]), np.array([2, 0, 2]), k=2)
    assert r.indices.tolist() == [[1, 2]]
    out = metrics.hierarchical_metrics(r.indices, [2], [2, 0, 2], hier, k_values=(1, 2))
    assert out["AHD@1"] == 3 / 2 and out["AHD@2"] == pytest.approx(3 / 4)


@pytest.mark.parametrize("text, classes, match", [
    ("root -\na b\nb a\n", ["a", "b"], "cycle"),
    ("r1 -\nr2 -\nA r1\nB r2\n", ["A", "B"], "two or more roots"),
    ("root -\nA root\nB other\n", ["A", "B"], "more than one root"),
    ("A root\nB root\n", ["A", "B"], "more than one root"),
    (UNBALANCED + "E Y\n", CLASSES, r"leaf \['E'\] is not a class"),
    ("root -\nA root\nB root\n", ["A", "B", "C"], r"class \['C'\] is missing"),
    ("root -\nA root\nB A\n", ["A", "B"], "has children"),
    ("root -\nA root extra\n", ["A"], r"t.txt:2: expected 'child parent'"),
    ("root -\nA root\nA root\n", ["A"], "t.txt:3: 'A' already has a parent"),
])
def test_hierarchy_reader_errors(text, classes, match):
    with pytest.raises(ValueError, match=match):
        tree(text, classes)


def test_vocabulary_codes_are_sourced_and_resolvable():
    v = load_vocabulary()
    for cid in ("opacity", "consolidation", "ground_glass_opacity", "interstitial_opacity", "nodule", "mass",
                "atelectasis", "pleural_effusion", "pneumothorax", "cardiomegaly", "pulmonary_edema", "fibrosis",
                "emphysema", "hilar_enlargement", "fracture", "support_devices", "normal", "pneumonia", "covid19",
                "left", "right", "bilateral", "upper_zone", "lower_zone", "peripheral", "central", "focal"):
        assert cid in v.concepts
    c = v.concepts
    assert c["consolidation"].umls_cui == "C0521530" and c["consolidation"].radlex_id == "RID43255"
    assert c["ground_glass_opacity"].umls_cui == "C3544344" and c["pneumothorax"].umls_cui == "C0032326"
    assert c["covid19"].umls_cui == "" and c["ground_glass_opacity"].radlex_id == ""  # unverified stays empty
    assert all(x.umls_source for x in c.values() if x.umls_cui)
    assert v.resolve("GGO") == "ground_glass_opacity" and v.resolve("Ground-glass opacity") == "ground_glass_opacity"
    assert v.resolve("effusion") == "pleural_effusion" and v.resolve("no such finding") is None
    assert "interstitial_opacity" in v.ancestors("ground_glass_opacity") and v.modifier_group("left") == "laterality"
    assert v.label_maps["chestxray14"]["Effusion"] == "pleural_effusion"
    assert any(r["disease"] == "covid19" and r["category"] == "typical" for r in v.relations)


# --------------------------------------------------------------------------- scripts

@pytest.fixture
def npy(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 3
    emb = (rng.standard_normal((30, 6)) + 2 * np.eye(6)[labels]).astype(np.float32)
    np.save(tmp_path / "e.npy", emb)
    np.save(tmp_path / "e_labels.npy", labels)
    return tmp_path, emb, labels


def test_test_py_prints_and_saves_the_default_hierarchy_metrics(npy, capsys):
    d, emb, labels = npy
    # the class names travel with the embeddings (X_meta.json), as extract_embeddings.py writes them
    (d / "e_meta.json").write_text(json.dumps({"class_names": ["normal", "pneumonia", "COVID-19"]}))
    args = test_script.get_args_parser().parse_args(
        ["--embeddings", str(d / "e.npy"), "--labels", str(d / "e_labels.npy"), "--save-dir", str(d / "r"),
         "--bootstrap", "50", "--k-values", "1", "5"])
    assert test_script.main(args) == 0
    out = capsys.readouterr().out
    assert "AHD@5" in out and "MS@5" in out and "hP@5" in out and "covidx_hierarchy.txt" in out
    res = json.loads((d / "r" / "results.json").read_text())
    hier = metrics.load_hierarchy(metrics.DEFAULT_HIERARCHIES["covid"], ["normal", "pneumonia", "COVID-19"])
    ranking = metrics.rank(emb, labels, k=5)
    expected = metrics.hierarchical_metrics(ranking.indices, labels, None, hier, k_values=(1, 5))
    for key in ("AHD@1", "MS@1", "hP@1", "AHD@5", "MS@5", "hP@5"):
        assert res[key] == pytest.approx(expected[key])
        assert key in res["ci95"]
    # --hierarchy none skips them; a broken file is one line on stderr before anything is written
    args.hierarchy, args.save_dir = "none", d / "r2"
    assert test_script.main(args) == 0 and "AHD@1" not in json.loads((d / "r2" / "results.json").read_text())
    (d / "bad.txt").write_text("root -\nnormal root\npneumonia root\n")
    args.hierarchy, args.save_dir = str(d / "bad.txt"), d / "r3"
    assert test_script.main(args) == 2
    err = capsys.readouterr().err
    assert "test.py: error:" in err and "COVID-19" in err and "missing" in err and not (d / "r3").exists()


def test_test_backbone_reports_hierarchy_metrics(npy, capsys):
    d, emb, labels = npy
    np.save(d / "f.npy", emb[:, ::-1].copy())
    args = test_backbone.get_args_parser().parse_args(
        ["--model1-embeddings", str(d / "e.npy"), "--model2-embeddings", str(d / "f.npy"), "--save-dir", str(d / "c"),
         "--visualize-samples", "0", "--hierarchy", str(metrics.DEFAULT_HIERARCHIES["covid"]),
         "--class-names", "normal", "pneumonia", "COVID-19"])  # arrays without X_meta.json: ids are the names
    assert test_backbone.main(args) == 0
    res = json.loads((d / "c" / "backbone_comparison_results.json").read_text())
    hier = metrics.load_hierarchy(metrics.DEFAULT_HIERARCHIES["covid"], ["normal", "pneumonia", "COVID-19"])
    expected = metrics.hierarchical_metrics(metrics.rank(emb, labels, k=5).indices, labels, None, hier, k_values=(5,))
    assert res["model1"]["AHD@5"] == pytest.approx(expected["AHD@5"])
    assert res["model1"]["hP@5"] == pytest.approx(expected["hP@5"]) and "MS@5" in res["model2"]
    assert "AHD@5" in capsys.readouterr().out
