"""concepts.py: probes on planted linear concepts, span share, explanations, the ConceptCLIP concept path on a
stand-in with planted concept directions, bad input; label readers; the demo's planted findings."""
import csv
import json
import math
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import concepts as C
from ontology import load_vocabulary, read_concept_labels

VOCAB = load_vocabulary()


def run(argv, capsys=None):
    return C.main(C.get_args_parser().parse_args([str(a) for a in argv]))


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """240 images of 120 patients (2 noisy views each) in 16-d; consolidation = side of a planted hyperplane,
    pneumothorax = a coin flip per patient, 'left' known for 2 of 3 patients only, fracture always 0."""
    d = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    base = rng.standard_normal((120, 16))
    emb = np.repeat(base, 2, axis=0) + 0.05 * rng.standard_normal((240, 16))
    w = np.eye(16)[0]
    cons = (np.repeat(base, 2, axis=0) @ w > 0).astype(int)
    coin = np.repeat(rng.integers(0, 2, 120), 2)
    left = np.repeat((base[:, 1] > 0).astype(int), 2).astype(object)
    left[np.repeat(np.arange(120) % 3 == 0, 2)] = ""          # unknown for every third patient
    ids = np.array([f"img{i}" for i in range(240)])
    np.save(d / "e.npy", unit(emb).astype(np.float32))
    np.save(d / "e_image_ids.npy", ids)
    np.save(d / "e_patient_ids.npy", np.repeat([f"p{i}" for i in range(120)], 2))
    (d / "e_meta.json").write_text(json.dumps({"model_name": "planted", "resume": None, "class_names": ["a"]}))
    rows = ["image_id,consolidation,pneumothorax,left,fracture"]
    rows += [f"{i},{c},{p},{lf},0" for i, c, p, lf in zip(ids, cons, coin, left)]
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    return d, cons, left


def test_probe_finds_planted_concepts_and_not_random_ones(planted, tmp_path, capsys):
    d, cons, left = planted
    assert run(["probe", "--embeddings", d / "e.npy", "--concept-labels", d / "labels.csv", "--save-dir", tmp_path]) == 0
    res = json.loads((tmp_path / "probes.json").read_text())
    c = res["concepts"]
    assert c["consolidation"]["auroc"] > 0.97                   # a linear concept: near 1
    assert 0.35 < c["pneumothorax"]["auroc"] < 0.65             # a coin flip: near 0.5
    assert c["consolidation"]["n_pos"] == int(cons.sum()) and c["consolidation"]["n_neg"] == 240 - int(cons.sum())
    known = left != ""
    assert c["left"]["n_pos"] + c["left"]["n_neg"] == int(known.sum()) == 160   # blanks are not counted
    assert c["left"]["auroc"] > 0.97
    assert c["fracture"]["auroc"] is None and "only one value" in c["fracture"]["note"]
    assert res["grouped_by"] == "patient" and res["model"].startswith("planted") and res["seed"] == 0
    z = np.load(tmp_path / "probes.npz")
    assert list(z["concepts"]) == ["consolidation", "pneumothorax", "left"] and z["weights"].shape == (3, 16)
    # the consolidation probe points along the planted direction
    assert abs(unit(z["weights"][0]) @ np.eye(16)[0]) > 0.9
    out = capsys.readouterr().out
    assert "consolidation" in out and "only one value" in out
    # the outputs are not replaced without --overwrite
    assert run(["probe", "--embeddings", d / "e.npy", "--concept-labels", d / "labels.csv", "--save-dir", tmp_path]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_profile_from_probes_is_the_logistic_of_the_probe(planted, tmp_path):
    d, _, _ = planted
    assert run(["probe", "--embeddings", d / "e.npy", "--concept-labels", d / "labels.csv",
                "--save-dir", tmp_path / "p"]) == 0
    assert run(["profile", "--probes", tmp_path / "p" / "probes.npz", "--embeddings", d / "e.npy",
                "--output", tmp_path / "prof.csv"]) == 0
    prof = csv.reader(open(tmp_path / "prof.csv"))
    head, first = next(prof), next(prof)
    z = np.load(tmp_path / "p" / "probes.npz")
    e = np.load(d / "e.npy")[0].astype(np.float64)
    expect = 1 / (1 + np.exp(-(z["weights"].astype(np.float64) @ e + z["bias"])))
    assert head == ["image_id", "consolidation", "pneumothorax", "left"] and first[0] == "img0"
    assert [float(x) for x in first[1:]] == pytest.approx(expect, abs=1e-4)


def test_span_share_inside_orthogonal_and_by_hand():
    e = np.eye(4)
    w = np.array([[2.0, 0, 0, 0], [1, 1, 0, 0]])                # span {e0, e1}
    assert C.span_share(unit(e[0] + e[1]), [unit(e[0] + 2 * e[1])], w) == pytest.approx([1.0])
    assert C.span_share(unit(e[2] + e[3]), [unit(e[2] + 0.5 * e[3])], w) == pytest.approx([0.0])
    # q = (e0 + e2)/sqrt2, r = (e0 + 2 e2)/sqrt5: cos 3/sqrt10, inside part 1/sqrt10 -> share 1/3
    assert C.span_share(unit(e[0] + e[2]), [unit(e[0] + 2 * e[2])], w) == pytest.approx([1 / 3])


def test_explain_names_shared_and_one_sided_findings(tmp_path, capsys):
    # axes: 0 consolidation, 1 ground glass, 2 'right', 3 free; probes 10 * axis - 5 (so 0.71 -> p 0.89, 0 -> p 0.01)
    e = np.eye(4)
    emb = unit([e[0] + e[2],                 # query: consolidation, right
                e[0] + e[2] + 0.1 * e[3],    # nearest: consolidation, right (+ a little outside the span)
                e[1] + e[2],                 # ground glass, right
                e[3]])                       # nothing
    np.save(tmp_path / "e.npy", emb.astype(np.float32))
    np.save(tmp_path / "e_image_ids.npy", np.array(["q", "a", "b", "c"]))
    np.savez(tmp_path / "probes.npz", concepts=np.array(["consolidation", "ground_glass_opacity", "right"]),
             weights=10 * e[:3].astype(np.float32), bias=np.full(3, -5.0, np.float32),
             model=np.array("unknown (no _meta.json beside the embeddings)"), embedding_dim=np.array(4))
    assert run(["explain", "--embeddings", tmp_path / "e.npy", "--probes", tmp_path / "probes.npz", "--query", "q",
                "--k", "2", "--save-dir", tmp_path / "x"]) == 0
    out = json.loads((tmp_path / "x" / "explain_q.json").read_text())
    r1, r2 = out["results"]
    assert (r1["image_id"], r2["image_id"]) == ("a", "b")
    assert [s["concept"] for s in r1["shared"]] == ["consolidation"] and r1["shared"][0]["query_modifiers"] == ["right"]
    assert r1["span_share"] == pytest.approx(1.0)               # the query lies in the span: q . r = Pq . Pr
    assert [s["concept"] for s in r2["query_only"]] == ["consolidation"]
    assert [s["concept"] for s in r2["result_only"]] == ["ground_glass_opacity"] and r2["shared"] == []
    assert "UMLS C0521530" in r1["summary"] and "RadLex RID43255" in r1["summary"] and "100% of the cosine" in r1["summary"]
    assert "only the result shows ground-glass opacity (UMLS C3544344) [right]" in r2["summary"]
    assert (tmp_path / "x" / "explain_q.md").read_text().startswith("# Query q")


def test_bad_input_is_one_clear_line(planted, tmp_path, capsys):
    d, _, _ = planted
    (tmp_path / "unknown.csv").write_text("image_id,consolidation,flux capacitor,GGO,blorb\nimg0,1,0,1,0\n")
    assert run(["probe", "--embeddings", d / "e.npy", "--concept-labels", tmp_path / "unknown.csv",
                "--save-dir", tmp_path / "o"]) == 2
    err = capsys.readouterr().err
    assert "unknown concept" in err and "'flux capacitor'" in err and "'blorb'" in err and "GGO" not in err.split("[")[1]
    assert not (tmp_path / "o").exists()
    # labels of images that are not embedded: a note (some match) or an error (none match)
    (tmp_path / "extra.csv").write_text((d / "labels.csv").read_text() + "ghost1,1,0,1,0\nghost2,0,1,0,0\n")
    assert run(["probe", "--embeddings", d / "e.npy", "--concept-labels", tmp_path / "extra.csv",
                "--save-dir", tmp_path / "o2"]) == 0
    assert "2 labelled images are not in the embeddings and are ignored (first: ghost1, ghost2)" in capsys.readouterr().out
    (tmp_path / "none.csv").write_text("image_id,consolidation\nghost1,1\nghost2,0\n")
    assert run(["probe", "--embeddings", d / "e.npy", "--concept-labels", tmp_path / "none.csv",
                "--save-dir", tmp_path / "o3"]) == 2
    assert "none of its 2 image ids is in the embeddings" in capsys.readouterr().err
    (tmp_path / "value.csv").write_text("image_id,consolidation\nimg0,yes\n")
    assert run(["probe", "--embeddings", d / "e.npy", "--concept-labels", tmp_path / "value.csv",
                "--save-dir", tmp_path / "o4"]) == 2
    assert "value.csv:2" in capsys.readouterr().err
    # probes of another model are refused
    assert run(["probe", "--embeddings", d / "e.npy", "--concept-labels", d / "labels.csv",
                "--save-dir", tmp_path / "p"]) == 0
    np.save(tmp_path / "g.npy", np.load(d / "e.npy")[:, :8])
    np.save(tmp_path / "g_image_ids.npy", np.load(d / "e_image_ids.npy"))
    assert run(["profile", "--probes", tmp_path / "p" / "probes.npz", "--embeddings", tmp_path / "g.npy",
                "--output", tmp_path / "x.csv"]) == 2
    assert "16-d" in capsys.readouterr().err


def test_chexpert_and_chestxray14_readers(tmp_path):
    (tmp_path / "train.csv").write_text(
        "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Edema,Pleural Effusion\n"
        "CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg,F,68,Frontal,AP,1.0,,0.0,\n"
        "CheXpert-v1.0/train/patient00002/study2/view1_frontal.jpg,M,50,Frontal,PA,,-1.0,1.0,1.0\n")
    lab = read_concept_labels(tmp_path / "train.csv", VOCAB)
    assert lab.concepts == ["normal", "cardiomegaly", "pulmonary_edema", "pleural_effusion"]
    assert list(lab.image_ids) == ["patient00001_study1_view1_frontal", "patient00002_study2_view1_frontal"]
    assert list(lab.patient_ids) == ["patient00001", "patient00002"]
    v = lab.values
    assert v[0, 0] == 1 and math.isnan(v[0, 1]) and v[0, 2] == 0 and math.isnan(v[1, 1]) and v[1, 3] == 1
    ones = read_concept_labels(tmp_path / "train.csv", VOCAB, "chexpert", uncertain="positive")
    assert ones.values[1, 1] == 1
    (tmp_path / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID\n00000001_000.png,Cardiomegaly|Effusion,0,1\n"
        "00000002_000.png,No Finding,0,2\n")
    nih = read_concept_labels(tmp_path / "Data_Entry_2017.csv", VOCAB)
    j = {c: i for i, c in enumerate(nih.concepts)}
    assert len(nih.concepts) == 15 and list(nih.image_ids) == ["00000001_000", "00000002_000"]
    assert nih.values[0, j["cardiomegaly"]] == 1 and nih.values[0, j["pleural_effusion"]] == 1
    assert nih.values[0, j["mass"]] == 0 and nih.values[1, j["normal"]] == 1   # complete labels: unlisted = 0
    (tmp_path / "bad14.csv").write_text("Image Index,Finding Labels\n1.png,Cardiomegaly|Unicorn\n")
    with pytest.raises(ValueError, match=r"bad14.csv:2: unknown ChestX-ray14 label\(s\) \['Unicorn'\]"):
        read_concept_labels(tmp_path / "bad14.csv", VOCAB)


def test_demo_concept_labels_follow_the_pa_convention(tmp_path):
    from make_demo_data import _patient_params, _render, make_demo_data, planted_findings
    for i in range(6):  # pneumonia: the blob drawn on the image left is the patient's right
        params = _patient_params(np.random.default_rng([0, i]), 1)
        f = planted_findings(params)
        diff = (_render(params, 64, np.random.default_rng([0, i, 0])).astype(int)
                - _render({**params, "blobs": []}, 64, np.random.default_rng([0, i, 0])).astype(int))
        image_left = diff[:, :32].sum() > diff[:, 32:].sum()
        assert (f["right"], f["left"], f["bilateral"]) == ((1, 0, 0) if image_left else (0, 1, 0))
        assert f["consolidation"] == f["focal"] == 1 and f["ground_glass_opacity"] == 0
    covid = planted_findings(_patient_params(np.random.default_rng([0, 2]), 2))
    assert covid["bilateral"] == covid["peripheral"] == covid["multifocal"] == covid["ground_glass_opacity"] == 1
    assert covid["central"] == 0
    normal = planted_findings(_patient_params(np.random.default_rng([0, 0]), 0))
    assert normal["opacity"] == 0 and normal["left"] is None
    make_demo_data(tmp_path, num_patients=6, images_per_patient=2, size=40)
    lab = read_concept_labels(tmp_path / "concept_labels.csv", VOCAB)
    assert len(lab.image_ids) == 12 and np.isnan(lab.values[0, 3])  # demo0000 is normal: laterality unknown


# --------------------------------------------------------------------------- ConceptCLIP stand-in

MODELING = '''
import math
import torch
import torch.nn as nn
from transformers import PretrainedConfig, PreTrainedModel


class PlantedCLIPConfig(PretrainedConfig):
    model_type = "planted_conceptclip"


class PlantedCLIP(PreTrainedModel):
    """Tokens = red * e0 + green * e1 + 0.5 * e3 per 4 x 4 patch; text 'consolidation' -> e0,
    'ground' -> e1, negated by 'no'; every text also has e3. So red marks consolidation, green ground glass."""
    config_class = PlantedCLIPConfig

    def __init__(self, config):
        super().__init__(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(20.0)))
        self.post_init()

    def encode_image(self, pixel_values):
        x = torch.nn.functional.avg_pool2d(pixel_values, 4)          # (B, 3, 7, 7) patch means
        b, _, g, _ = x.shape
        t = torch.zeros(b, g * g, 4)
        t[..., 0], t[..., 1], t[..., 3] = x[:, 0].flatten(1), x[:, 1].flatten(1), 0.5
        return t.mean(1), t

    def encode_text(self, input_ids):
        out = torch.zeros(len(input_ids), 4)
        out[:, 3] = 1.0
        for i, (code, neg) in enumerate(input_ids.tolist()):
            if code:
                out[i, code - 1] = -1.0 if neg else 1.0
        return out

    def forward(self, pixel_values=None, input_ids=None):
        return {"image_features": self.encode_image(pixel_values)[0]}
'''

PROCESSING = '''
import torch
from transformers import ProcessorMixin


class PlantedProcessor(ProcessorMixin):
    attributes = ["image_processor"]
    image_processor_class = "SiglipImageProcessor"

    def __init__(self, image_processor=None, **kwargs):
        super().__init__(image_processor, **kwargs)

    def __call__(self, images=None, text=None, **kwargs):
        if text is not None:
            code = lambda t: 1 if "consolidation" in t else 2 if "ground" in t else 0
            return {"input_ids": torch.tensor([[code(t.lower()), int(" no " in t)] for t in text])}
        return self.image_processor(images, **kwargs)
'''


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    d = tmp_path_factory.mktemp("planted_conceptclip")
    (d / "config.json").write_text(json.dumps({
        "model_type": "planted_conceptclip", "architectures": ["PlantedCLIP"],
        "auto_map": {"AutoConfig": "modeling_planted.PlantedCLIPConfig", "AutoModel": "modeling_planted.PlantedCLIP"}}))
    (d / "modeling_planted.py").write_text(textwrap.dedent(MODELING))
    (d / "processing_planted.py").write_text(textwrap.dedent(PROCESSING))
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "processor_class": "PlantedProcessor",
        "auto_map": {"AutoProcessor": "processing_planted.PlantedProcessor"},
        "do_resize": True, "size": {"height": 28, "width": 28}, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0, 0, 0], "image_std": [1, 1, 1]}))
    from safetensors.torch import save_file
    save_file({"logit_scale": torch.tensor(math.log(20.0))}, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_conceptclip_zero_shot_and_maps_on_planted_directions(standin, tmp_path):
    imgs = tmp_path / "test"
    imgs.mkdir()
    red = np.zeros((28, 28, 3), np.uint8)
    red[:12, :12, 0] = 255                                      # consolidation, top-left
    green = np.zeros((28, 28, 3), np.uint8)
    green[16:, 16:, 1] = 255                                    # ground glass, bottom-right
    Image.fromarray(red).save(imgs / "red.png")
    Image.fromarray(green).save(imgs / "green.png")
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(imgs / "black.png")
    (tmp_path / "list.txt").write_text("p1 red.png pneumonia\np2 green.png COVID-19\np3 black.png normal\n")
    assert run(["profile", "--conceptclip-path", standin, "--dataset-dir", tmp_path, "--test-image-list",
                tmp_path / "list.txt", "--concepts", "consolidation", "GGO", "pneumothorax",
                "--output", tmp_path / "cc.csv", "--maps", tmp_path / "maps.npz", "--device", "cpu"]) == 0
    prof = csv.reader(open(tmp_path / "cc.csv"))
    head = next(prof)
    rows = {r[0]: [float(x) for x in r[1:]] for r in prof}
    assert head == ["image_id", "consolidation", "ground_glass_opacity", "pneumothorax"]
    assert rows["red"][0] > 0.9 and rows["green"][1] > 0.9      # the planted concept of each image
    # no evidence either way: the positive and the negative prompt are equally close -> exactly 1/2
    assert rows["red"][1] == pytest.approx(0.5) and rows["green"][0] == pytest.approx(0.5)
    assert rows["black"] == pytest.approx([0.5, 0.5, 0.5]) and rows["red"][2] == pytest.approx(0.5)
    z = np.load(tmp_path / "maps.npz")
    maps = z["maps"]
    assert maps.shape == (3, 3, 7, 7) and list(z["image_ids"]) == ["red", "green", "black"]
    # where in the image: the consolidation map peaks in the red patches, the ground-glass map in the green ones
    r, c = np.unravel_index(maps[0, 0].argmax(), (7, 7))
    assert r < 3 and c < 3 and maps[0, 0, 0, 0] > maps[0, 0, 6, 6]
    r, c = np.unravel_index(maps[1, 1].argmax(), (7, 7))
    assert r >= 4 and c >= 4


# --------------------------------------------------------------------------- CV AUROC with a fold that cannot fit

def _one_class_fold_set(d):
    """6 images of 3 patients, positives at +e0 and negatives at -e0: StratifiedGroupKFold(2, seed 0) puts both
    positives (and two negatives) in one fold, so the other fold's training part holds positives only."""
    ids = np.array([f"img{i}" for i in range(6)])
    y = np.array([1, 0, 0, 0, 0, 1])
    np.save(d / "e.npy", np.where(y[:, None] == 1, [1.0, 0.0], [-1.0, 0.0]).astype(np.float32))
    np.save(d / "e_image_ids.npy", ids)
    np.save(d / "e_patient_ids.npy", np.array(["p0", "p0", "p0", "p1", "p1", "p2"]))
    (d / "labels.csv").write_text("image_id,consolidation\n" + "".join(f"{i},{v}\n" for i, v in zip(ids, y)))
    return y


def _rescaled_logistic_regression():
    """LogisticRegression whose scores go through a monotone map: an AUROC of comparable scores cannot change."""
    from sklearn.linear_model import LogisticRegression

    class Rescaled(LogisticRegression):
        def decision_function(self, x):
            return super().decision_function(x) / 1000 - 3

        def predict_proba(self, x):
            p = super().predict_proba(x) ** 5
            return p / p.sum(axis=1, keepdims=True)
    return Rescaled


def test_probe_auroc_pools_only_fitted_folds_and_says_how_many(tmp_path, monkeypatch):
    from sklearn.model_selection import StratifiedGroupKFold
    y = _one_class_fold_set(tmp_path)
    g = np.load(tmp_path / "e_patient_ids.npy")
    # the configuration: seed 0 gives a fold whose training part holds one class
    assert any(len(set(y[tr])) < 2 for tr, _ in StratifiedGroupKFold(2, shuffle=True, random_state=0).split(y, y, g))
    args = ["probe", "--embeddings", tmp_path / "e.npy", "--concept-labels", tmp_path / "labels.csv"]
    assert run(args + ["--save-dir", tmp_path / "a"]) == 0
    got = json.loads((tmp_path / "a" / "probes.json").read_text())["concepts"]["consolidation"]
    # by hand: every fold's model sees positives at +e0 and negatives at -e0 with balanced weights, so its
    # intercept is 0 and every positive scores sigmoid(w_f) > 1/2 > sigmoid(-w_f): each of the 2 x 4 pairs is
    # ordered, AUROC 8/8 (the old pooling of a constant 0 with other folds' logits gave 0.75)
    assert got["auroc"] == pytest.approx(1.0)
    assert (got["folds"], got["folds_used"], got["folds_dropped"], got["n_scored"]) == (2, 2, 0, 6)
    assert got["split_seed"] > 0 and "seed 0" in got["note"]
    # the same AUROC when every score goes through a monotone map
    import sklearn.linear_model
    monkeypatch.setattr(sklearn.linear_model, "LogisticRegression", _rescaled_logistic_regression())
    assert run(args + ["--save-dir", tmp_path / "b"]) == 0
    assert json.loads((tmp_path / "b" / "probes.json").read_text())["concepts"]["consolidation"]["auroc"] == \
        pytest.approx(got["auroc"])
    # one split seed only: the fold that cannot be fitted is dropped, its rows unscored, and that is recorded;
    # its held-out part holds every negative, so the rows left hold one class: no AUROC rather than a made-up one
    monkeypatch.setattr(C, "SPLIT_TRIES", 1)
    assert run(args + ["--save-dir", tmp_path / "c"]) == 0
    got = json.loads((tmp_path / "c" / "probes.json").read_text())["concepts"]["consolidation"]
    assert (got["auroc"], got["folds_used"], got["folds_dropped"], got["split_seed"]) == (None, 1, 1, 0)
    assert got["n_scored"] == 2 and "1 of 2 folds dropped" in got["note"]


def test_cv_auroc_of_a_split_with_a_fold_that_cannot_fit():
    # 3 folds by hand; fold 3's training part (rows 0-3) holds negatives only: dropped, rows 4 and 5 not scored.
    # Every positive is then unscored, so no AUROC (a constant pooled in would have produced one)
    x = np.array([[-1.0], [-0.5], [-0.8], [-0.2], [1.0], [0.5]])
    y = np.array([0, 0, 0, 0, 1, 1])
    splits = [(np.array([2, 3, 4, 5]), np.array([0, 1])), (np.array([0, 1, 4, 5]), np.array([2, 3])),
              (np.array([0, 1, 2, 3]), np.array([4, 5]))]
    assert C.cv_auroc(x, y, splits) == (None, 2, 1, 4)
    # all three folds fitted: 4 x 2 pairs; the score of x under each fold's model rises with x, and every
    # positive's x is above every negative's in each fold, so, with balanced folds, the pooled AUROC is 1
    y2 = np.array([0, 1, 0, 1, 0, 1])
    x2 = np.array([[-1.0], [1.0], [-1.0], [1.0], [-1.0], [1.0]])
    splits2 = [(np.array([2, 3, 4, 5]), np.array([0, 1])), (np.array([0, 1, 4, 5]), np.array([2, 3])),
               (np.array([0, 1, 2, 3]), np.array([4, 5]))]
    assert C.cv_auroc(x2, y2, splits2) == (1.0, 3, 0, 6)


def test_span_share_stays_in_0_1_when_the_parts_have_opposite_signs():
    e = np.eye(3)
    # span e0; q = (0.6, 0.8), r = (-0.6, 0.8): in span -0.36, rest +0.64, cosine 0.28. The old ratio
    # -0.36 / 0.28 = -1.29 left [0, 1]; the share of the parts' sizes is 0.36 / (0.36 + 0.64)
    assert C.span_share([0.6, 0.8, 0], [[-0.6, 0.8, 0]], e[:1]) == pytest.approx([0.36])
    # cosine 0 (q = (0.6, 0.8), r = (-0.8, 0.6)): parts -0.48 and +0.48; the ratio has no value, the share 1/2
    assert C.span_share([0.6, 0.8, 0], [[-0.8, 0.6, 0]], e[:1]) == pytest.approx([0.5])
    # the README demo's parts, -0.134 in the span and +0.154 outside (cosine 0.02), printed -6.62; now 0.134 / 0.288.
    # r = (-0.134 / 0.6, 0.154 / 0.8, rest along e2, which q lacks) is a unit vector with these parts
    r0, r1 = -0.134 / 0.6, 0.154 / 0.8
    r = [[r0, r1, math.sqrt(1 - r0 ** 2 - r1 ** 2)]]
    assert C.span_share([0.6, 0.8, 0], r, e[:1]) == pytest.approx([0.134 / 0.288])


def _four_images(tmp_path):
    e = np.eye(4)
    emb = unit([e[0] + e[2], e[0] + e[2] + 0.1 * e[3], e[1] + e[2], e[3]])
    np.save(tmp_path / "e.npy", emb.astype(np.float32))
    np.save(tmp_path / "e_image_ids.npy", np.array(["q", "a", "b", "c"]))
    np.savez(tmp_path / "probes.npz", concepts=np.array(["consolidation", "ground_glass_opacity", "right"]),
             weights=10 * e[:3].astype(np.float32), bias=np.full(3, -5.0, np.float32),
             model=np.array("unknown (no _meta.json beside the embeddings)"), embedding_dim=np.array(4))


def test_explain_takes_several_queries(tmp_path, capsys):
    _four_images(tmp_path)
    base = ["explain", "--embeddings", tmp_path / "e.npy", "--probes", tmp_path / "probes.npz", "--k", "2"]
    assert run(base + ["--query", "q", "b", "3", "--save-dir", tmp_path / "x"]) == 0
    for qid in ("q", "b", "c"):                                    # row 3 is image c
        out = json.loads((tmp_path / "x" / f"explain_{qid}.json").read_text())
        assert out["query"]["image_id"] == qid and len(out["results"]) == 2
        assert qid not in [r["image_id"] for r in out["results"]]  # each query left out of its own results
    # each query's file equals a run with that query alone
    assert run(base + ["--query", "b", "--save-dir", tmp_path / "y"]) == 0
    assert (tmp_path / "y" / "explain_b.json").read_text() == (tmp_path / "x" / "explain_b.json").read_text()
    # bad input before any output: an unknown query, a query named twice, an existing output of one query
    capsys.readouterr()
    assert run(base + ["--query", "q", "zz", "--save-dir", tmp_path / "z"]) == 2
    assert "'zz' is not an image id" in capsys.readouterr().err and not (tmp_path / "z").exists()
    assert run(base + ["--query", "q", "0", "--save-dir", tmp_path / "z"]) == 2
    assert "again" in capsys.readouterr().err and not (tmp_path / "z").exists()
    assert run(base + ["--query", "a", "b", "--save-dir", tmp_path / "y"]) == 2
    assert "explain_b.json" in capsys.readouterr().err and not (tmp_path / "y" / "explain_a.json").exists()


def test_explain_table_prints_a_share_in_0_1_and_the_two_parts(tmp_path):
    # span of the probes = e0; query (0.6, 0.8), result (-0.6, 0.8): parts -0.36 and +0.64, cosine 0.28
    np.save(tmp_path / "e.npy", np.array([[0.6, 0.8, 0], [-0.6, 0.8, 0], [0, 0, 1]], np.float32))
    np.save(tmp_path / "e_image_ids.npy", np.array(["q", "r", "far"]))
    np.savez(tmp_path / "probes.npz", concepts=np.array(["consolidation"]), weights=np.eye(3, dtype=np.float32)[:1],
             bias=np.zeros(1, np.float32), model=np.array("unknown (no _meta.json beside the embeddings)"),
             embedding_dim=np.array(3))
    assert run(["explain", "--embeddings", tmp_path / "e.npy", "--probes", tmp_path / "probes.npz", "--query", "q",
                "--k", "1", "--save-dir", tmp_path / "x"]) == 0
    res = json.loads((tmp_path / "x" / "explain_q.json").read_text())["results"][0]
    assert res["image_id"] == "r" and res["span_share"] == pytest.approx(0.36)
    assert res["cosine_in_span"] == pytest.approx(-0.36) and res["cosine_outside_span"] == pytest.approx(0.64)
    row = [ln for ln in (tmp_path / "x" / "explain_q.md").read_text().splitlines() if ln.startswith("| 1 |")][0]
    assert "| 0.36 | -0.360 / +0.640 |" in row
    assert "contributes -0.360 to the cosine and the rest of the embedding +0.640" in res["summary"]


def test_help_lines_do_not_repeat_their_default():
    # ArgumentDefaultsHelpFormatter appends "(default: ...)"; a help text that says its own default repeats it
    sub = next(a for a in C.get_args_parser()._actions if a.choices and "probe" in a.choices)
    for name, parser in sub.choices.items():
        fmt = parser._get_formatter()
        for action in parser._actions:
            text = fmt._expand_help(action) if action.help else ""
            assert text.lower().count("default") <= 1, f"{name} {action.option_strings}: {text}"


# --------------------------------------------------------------------------- issue 20: sets through embeddings.py

def test_probes_of_one_fusion_head_are_refused_on_another_heads_set(planted, tmp_path, capsys):
    import embeddings
    d, _, _ = planted
    heads = {h: tmp_path / f"head_{h}.pth" for h in "ab"}
    for h, f in heads.items():
        f.write_bytes(f"fusion head {h}".encode())
    old = lambda h: {"model_name": "fusion", "model_args": {}, "checkpoint": str(heads[h])}  # noqa: E731
    new = lambda h: embeddings.make_meta(model_name="fusion", model_args={}, embedding_dim=16,  # noqa: E731
                                         checkpoint=heads[h])

    def fused_set(name, meta):
        f = tmp_path / name
        f.mkdir()
        for part in ("e.npy", "e_image_ids.npy", "e_patient_ids.npy"):
            (f / part).write_bytes((d / part).read_bytes())
        (f / "e_meta.json").write_text(json.dumps(meta))
        return f / "e.npy"

    for kind, meta in (("old", old), ("new", new)):
        a, b = fused_set(f"{kind}_a", meta("a")), fused_set(f"{kind}_b", meta("b"))
        assert run(["probe", "--embeddings", a, "--concept-labels", d / "labels.csv",
                    "--save-dir", tmp_path / f"p_{kind}"]) == 0
        probes = tmp_path / f"p_{kind}" / "probes.npz"
        assert run(["profile", "--probes", probes, "--embeddings", a, "--output", tmp_path / f"{kind}_a.csv"]) == 0
        capsys.readouterr()
        # before issue 20 both sets were tagged 'fusion (no checkpoint)' and the probes were applied to head b
        assert run(["profile", "--probes", probes, "--embeddings", b, "--output", tmp_path / f"{kind}_b.csv"]) == 2
        err = capsys.readouterr().err
        assert "were fitted on embeddings of" in err and str(heads["b"] if kind == "old" else "sha256:") in err


def test_probes_written_before_issue_20_still_apply_to_their_checkpoints_sets(planted, tmp_path):
    d, _, _ = planted
    f = tmp_path / "s"
    f.mkdir()
    for part in ("e.npy", "e_image_ids.npy", "e_patient_ids.npy"):
        (f / part).write_bytes((d / part).read_bytes())
    (f / "e_meta.json").write_text(json.dumps({"model_name": "hybrid", "resume": "ckpt/run_best.pth"}))
    assert run(["probe", "--embeddings", f / "e.npy", "--concept-labels", d / "labels.csv",
                "--save-dir", tmp_path / "p"]) == 0
    z = dict(np.load(tmp_path / "p" / "probes.npz"))
    assert str(z["model"]) == "hybrid checkpoint ckpt/run_best.pth"
    np.savez(tmp_path / "old_probes.npz", **dict(z, model=np.array("hybrid (ckpt/run_best.pth)")))  # the old tag
    assert run(["profile", "--probes", tmp_path / "old_probes.npz", "--embeddings", f / "e.npy",
                "--output", tmp_path / "prof.csv"]) == 0
    np.savez(tmp_path / "other.npz", **dict(z, model=np.array("hybrid (ckpt/other_best.pth)")))
    assert run(["profile", "--probes", tmp_path / "other.npz", "--embeddings", f / "e.npy",
                "--output", tmp_path / "prof2.csv"]) == 2


def test_profile_batch_size_is_the_shared_eval_batch_size():
    parse = lambda *a: C.get_args_parser().parse_args(["profile", "--output", "x.csv", *a])  # noqa: E731
    assert parse().eval_batch_size == 32 and parse("--eval-batch-size", "4").eval_batch_size == 4
    assert parse("--batch-size", "16").eval_batch_size == 16  # the older name still works
