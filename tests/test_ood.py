"""ood.py by hand: kNN / Mahalanobis / MCM scores, metrics, the 95% threshold, the ID/OOD split, bad input;
train.py --exclude-classes and test.py --ood-reference (the X-MIR protocol end to end)."""
import csv
import json
import math

import numpy as np
import pytest
import torch

import model as M
import ood

NAMES = ["normal", "pneumonia", "COVID-19"]


def unit(x):
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def on_circle(deg):
    r = np.radians(deg)
    return np.stack([np.cos(r), np.sin(r)], 1).astype(np.float32)


def planted(seed=0, d=16, n_per=30, q_per=8, noise=0.1):
    """Three tight clusters on the sphere: training rows, query rows and their labels."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(3, d)))
    tl, ql = np.repeat([0, 1, 2], n_per), np.repeat([0, 1, 2], q_per)
    return (unit(centres[tl] + noise * rng.normal(size=(len(tl), d))), tl,
            unit(centres[ql] + noise * rng.normal(size=(len(ql), d))), ql, centres)


def save_set(folder, stem, emb, labels=None, pids=None, names=NAMES):
    """Files in extract_embeddings.py's layout."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{stem}.npy", emb.astype(np.float32))
    if labels is not None:
        np.save(folder / f"{stem}_labels.npy", np.asarray(labels, np.int64))
    np.save(folder / f"{stem}_image_ids.npy", np.array([f"{stem}{i}" for i in range(len(emb))]))
    if pids is not None:
        np.save(folder / f"{stem}_patient_ids.npy", np.asarray(pids).astype(str))
    if names is not None:
        (folder / f"{stem}_meta.json").write_text(json.dumps({"class_names": names}))
    return folder / f"{stem}.npy"


def run_ood(*argv):
    return ood.main(ood.get_args_parser().parse_args([str(a) for a in argv]))


# ----------------------------------------------------------------------------- scores by hand

def test_knn_is_the_distance_to_the_kth_neighbour_on_the_circle():
    train = on_circle([0, 10, 20, 90])
    q = on_circle([0, 45])
    # chord between angles a and b: 2 sin(|a - b| / 2). Query 0 deg: 0, 10, 20, 90 deg away; query 45: 45, 35, 25, 45
    hand = {1: [0.0, 2 * math.sin(math.radians(12.5))], 2: [2 * math.sin(math.radians(5)), 2 * math.sin(math.radians(17.5))],
            3: [2 * math.sin(math.radians(10)), 2 * math.sin(math.radians(22.5))]}
    for k, want in hand.items():
        for backend in ood.KNN_BACKENDS:
            np.testing.assert_allclose(ood.knn_scores(train, q, k, backend), want, atol=2e-4)  # float32 cosines


def test_knn_equals_brute_force_on_planted_clusters_for_every_backend():
    train, _, q, _, _ = planted(seed=1)
    far = unit(np.random.default_rng(5).normal(size=(6, train.shape[1])))
    q = np.concatenate([q, far, 3.0 * q[:2]])  # raw (non-unit) rows are normalised first
    qn = unit(q)
    dist = np.sqrt(((qn[:, None, :].astype(np.float64) - train[None].astype(np.float64)) ** 2).sum(-1))
    for k in (1, 7, 30):
        brute = np.sort(dist, axis=1)[:, k - 1]
        for backend in ood.KNN_BACKENDS:
            np.testing.assert_allclose(ood.knn_scores(train, q, k, backend, chunk_size=5), brute, atol=1e-5)
    s = ood.knn_scores(train, q, 7)
    assert s[-8:-2].min() > s[:-8].max()  # the random directions are farther than every cluster query


def test_mahalanobis_by_hand_in_one_dimension():
    # class 0: {-1, 1} (mean 0), class 1: {9, 11} (mean 10); pooled variance (1+1+1+1)/4 = 1
    means, precision, classes, a = ood.fit_mahalanobis(np.array([[-1.0], [1.0], [9.0], [11.0]]), [0, 0, 1, 1], 0.0)
    assert classes.tolist() == [0, 1] and a == 0.0 and precision.item() == pytest.approx(1.0)
    np.testing.assert_allclose(ood.mahalanobis_scores(np.array([[3.0], [5.0], [12.0], [-4.0]]), means, precision),
                               [3.0, 5.0, 2.0, 4.0])


def test_mahalanobis_against_numpy_and_pytorch_ood():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 5)) * [1, 2, 0.5, 1, 3] + np.repeat([[0] * 5, [4] * 5, [-3] * 5], 100, 0)
    y = np.repeat([0, 1, 2], 100)
    q = rng.normal(size=(40, 5)) * 3
    for a in (0.0, 0.3):
        mu = np.stack([x[y == c].mean(0) for c in range(3)])
        cen = x - mu[y]
        sigma = cen.T @ cen / len(x)
        sigma = (1 - a) * sigma + a * np.trace(sigma) / 5 * np.eye(5)
        p = np.linalg.inv(sigma)
        want = np.sqrt(np.min([np.einsum("qd,de,qe->q", q - m, p, q - m) for m in mu], 0))
        means, prec, _, _ = ood.fit_mahalanobis(x, y, a)
        np.testing.assert_allclose(ood.mahalanobis_scores(q, means, prec, chunk_size=7), want, rtol=1e-10)
    # pytorch-ood: half the squared distance under the unnormalised scatter N * Sigma (plus a 1e-6 ridge)
    from pytorch_ood.detector import Mahalanobis
    ref = Mahalanobis(None).fit_features(torch.tensor(x, dtype=torch.float32), torch.tensor(y))
    theirs = ref.predict_features(torch.tensor(q, dtype=torch.float32)).double().numpy()
    means, prec, _, _ = ood.fit_mahalanobis(x, y, 0.0)
    np.testing.assert_allclose(ood.mahalanobis_scores(q, means, prec) ** 2, 2 * len(x) * theirs, rtol=1e-4)


def test_ledoit_wolf_makes_a_small_archive_usable():
    x, y = unit(np.random.default_rng(3).normal(size=(10, 32))), np.repeat([0, 1], 5)  # N < D: singular
    with pytest.raises(ValueError, match="singular.*--shrinkage auto"):
        ood.fit_mahalanobis(x, y, 0.0)
    from sklearn.covariance import ledoit_wolf_shrinkage
    mu = np.stack([x[y == c].mean(0) for c in (0, 1)])
    _, _, _, a = ood.fit_mahalanobis(x, y, "auto")
    assert a == pytest.approx(ledoit_wolf_shrinkage(x - mu[y], assume_centered=True)) and 0 < a <= 1


class StandInCLIP:
    """A vision-language stand-in: text prompts map to planted directions (as CLIP's encode_text)."""
    directions = {"normal": [1.0, 0, 0], "pneumonia": [0, 1.0, 0], "COVID-19": [0, 0, 1.0]}

    def __init__(self):
        self.prompts = None

    def encode_text(self, prompts):
        self.prompts = list(prompts)
        return torch.tensor([self.directions[p.split(": ")[1]] for p in prompts]) * 2.0  # not unit: normalised


def test_mcm_by_hand_on_a_stand_in_text_tower():
    clip = StandInCLIP()
    text = ood.class_text_embeddings(clip, NAMES[:2], "x-ray: {}")
    assert clip.prompts == ["x-ray: normal", "x-ray: pneumonia"]
    np.testing.assert_allclose(text, [[1, 0, 0], [0, 1, 0]])
    q = np.array([[1, 0, 0], [0, 0, 1], [0, 2, 0]], np.float32)
    # cosines (1, 0) -> -e/(1+e); (0, 0) -> -1/2; with T = 0.5 cosines (0, 1)/0.5 -> -e^2/(1+e^2)
    e = math.e
    np.testing.assert_allclose(ood.mcm_scores(q, text), [-e / (1 + e), -0.5, -e / (1 + e)], rtol=1e-6)
    np.testing.assert_allclose(ood.mcm_scores(q, text, 0.5)[2], -e ** 2 / (1 + e ** 2), rtol=1e-6)
    with pytest.raises(ValueError, match="encode_text"):
        ood.class_text_embeddings(object(), NAMES)


# ----------------------------------------------------------------------------- metrics, threshold, split

def test_metrics_by_hand():
    s = np.r_[np.arange(1, 21), [5.5, 19.5, 25, 30]].astype(float)
    is_ood = np.r_[np.zeros(20, bool), np.ones(4, bool)]
    m = ood.ood_metrics(s, is_ood)
    # P(OOD > ID): 5.5 beats 5 ID scores, 19.5 beats 19, 25 and 30 beat all 20 -> 64 / 80
    assert m["AUROC"] == pytest.approx(0.8)
    # accept 19 of 20 ID (score <= 19): OOD 5.5 is accepted too -> 1/4
    assert m["FPR@95TPR"] == pytest.approx(0.25)
    # flag 4 of 4 OOD (score >= 5.5): 15 ID scores 6..20 are flagged -> 15/20
    assert m["FPR@95TPR_ood_positive"] == pytest.approx(0.75)


def test_metrics_against_scikit_learn():
    from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve
    rng = np.random.default_rng(4)
    is_ood = rng.random(500) < 0.3
    s = np.round(rng.normal(size=500) + 1.2 * is_ood, 1)  # rounded: many ties
    m = ood.ood_metrics(s, is_ood)
    assert m["AUROC"] == pytest.approx(roc_auc_score(is_ood, s), abs=1e-12)
    p, r, _ = precision_recall_curve(is_ood, s)
    assert m["AUPR-OUT"] == pytest.approx(auc(r, p), abs=1e-12)
    p, r, _ = precision_recall_curve(~is_ood, -s)
    assert m["AUPR-IN"] == pytest.approx(auc(r, p), abs=1e-12)
    fpr, tpr, _ = roc_curve(~is_ood, -s, drop_intermediate=False)
    assert m["FPR@95TPR"] == pytest.approx(fpr[np.searchsorted(tpr, 0.95)], abs=1e-12)
    fpr, tpr, _ = roc_curve(is_ood, s, drop_intermediate=False)
    assert m["FPR@95TPR_ood_positive"] == pytest.approx(fpr[np.searchsorted(tpr, 0.95)], abs=1e-12)
    assert all(v is None for v in ood.ood_metrics(s, np.zeros(500, bool)).values())


def test_threshold_accepts_exactly_95_percent():
    scores = np.array([0.31, 0.05, 0.77, 0.12, 0.64, 0.48, 0.93, 0.26, 0.55, 0.09,
                       0.71, 0.38, 0.18, 0.84, 0.42, 0.67, 0.22, 0.59, 0.35, 0.99])
    thr, n = ood.calibrate_threshold(scores, 0.95)
    assert thr == 0.93 and n == 19  # the 19th smallest of 20: only 0.99 is flagged
    assert (scores > thr).sum() == 1
    thr, n = ood.calibrate_threshold(np.r_[scores, scores + 1], 0.95)  # 38 of 40: 1.99 and 1.93 flagged
    assert thr == pytest.approx(1.84) and n == 38
    assert ood.calibrate_threshold(scores[:10], 0.9) == (0.77, 9)


def test_id_ood_split_by_labels():
    truth = ood.split_truth([0, 1, 2, 2, 1, 3], id_labels=[0, 1], ood_ids=[2])
    assert truth.tolist() == ["ID", "ID", "OOD", "OOD", "ID", "other"]


# ----------------------------------------------------------------------------- the script

@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("emb")
    train, tl, q, ql, centres = planted(seed=0)
    save_set(d, "train", train, tl, [f"p{i // 3}" for i in range(len(tl))])
    save_set(d, "test", q, ql)
    save_set(d, "other", unit(np.random.default_rng(9).normal(size=(5, 16))), names=None)
    np.save(d / "text.npy", centres)
    return d


def test_main_embeddings_xmir_protocol(emb_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_ood("--train-embeddings", emb_dir / "train.npy", "--embeddings", emb_dir / "test.npy",
                   "--ood-classes", "COVID-19", "--ood-embeddings", emb_dir / "other.npy", "--k", 5,
                   "--save-dir", out) == 0
    res = json.loads((out / "ood.json").read_text())
    c = res["counts"]
    # 30 COVID-19 training rows leave the archive; 60 rows in 20 patients -> 4 patients (12 rows) calibrate
    assert (c["train_rows"], c["train_rows_used"], c["fit_rows"], c["calibration_rows"]) == (90, 60, 48, 12)
    assert (c["queries"], c["id"], c["ood"], c["ood_from_classes"], c["ood_embeddings"]) == (24, 16, 13, 8, 5)
    assert res["id_classes"] == ["normal", "pneumonia"] and res["ood_classes"] == ["COVID-19"]
    assert res["metrics"]["AUROC"] == 1.0 and res["metrics"]["FPR@95TPR"] == 0.0  # clusters far apart
    assert "ID as the positive class" in res["convention"]["positive_class"]
    scores = np.load(out / "ood_scores.npy")
    assert scores.shape == (29,)
    rows = list(csv.DictReader((out / "ood_scores.csv").open()))
    assert [r["set"] for r in rows] == ["query"] * 24 + ["ood:other.npy"] * 5
    assert [int(r["flagged"]) for r in rows] == (scores > res["threshold"]["value"]).astype(int).tolist()
    assert rows[20]["label"] == "COVID-19" and rows[20]["truth"] == "OOD" and rows[0]["truth"] == "ID"
    assert (out / "ood.png").stat().st_size > 0
    assert "ID as the positive class" in capsys.readouterr().out
    # never overwritten without --overwrite
    assert run_ood("--train-embeddings", emb_dir / "train.npy", "--embeddings", emb_dir / "test.npy",
                   "--save-dir", out) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_main_mahalanobis_and_mcm(emb_dir, tmp_path):
    common = ["--train-embeddings", emb_dir / "train.npy", "--embeddings", emb_dir / "test.npy", "--ood-classes",
              "COVID-19"]
    assert run_ood(*common, "--method", "mahalanobis", "--save-dir", tmp_path / "m") == 0
    assert json.loads((tmp_path / "m" / "ood.json").read_text())["metrics"]["AUROC"] == 1.0
    assert run_ood(*common, "--method", "mcm", "--text-embeddings", emb_dir / "text.npy", "--save-dir",
                   tmp_path / "c") == 0
    res = json.loads((tmp_path / "c" / "ood.json").read_text())
    assert res["metrics"]["AUROC"] == 1.0 and res["counts"]["calibration_rows"] == 60  # mcm fits nothing
    s = np.load(tmp_path / "c" / "ood_scores.npy")
    assert s.min() >= -1 and s.max() <= -0.5 + 1e-9  # -max softmax over 2 ID prompts


def test_no_ood_rows_still_writes_scores_and_flags(emb_dir, tmp_path, capsys):
    out = tmp_path / "none"
    assert run_ood("--train-embeddings", emb_dir / "train.npy", "--embeddings", emb_dir / "test.npy", "--k", 3,
                   "--save-dir", out) == 0
    res = json.loads((out / "ood.json").read_text())
    assert all(v is None for v in res["metrics"].values()) and res["metrics_note"].startswith("n/a")
    assert res["counts"]["ood"] == 0 and len(np.load(out / "ood_scores.npy")) == 24
    assert len((out / "ood_scores.csv").read_text().splitlines()) == 25
    assert "n/a" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--ood-classes", "lateral"], "--ood-classes lateral: not a class name.*normal, pneumonia, COVID-19"),
    (["--k", "200"], "--k 200 is larger than the archive.*72 training rows .18 of 90 are held out"),
    (["--embeddings", "BAD_DIM"], "8-d rows but --train-embeddings .* 16-d"),
    (["--method", "mcm"], "--text-embeddings"),
    (["--ood-transforms", "invert"], "--ood-transforms needs --resume"),
])
def test_bad_input_is_one_line_before_any_output(emb_dir, tmp_path, capsys, extra, message):
    save_set(emb_dir, "bad8", np.ones((4, 8), np.float32), [0, 0, 1, 1])
    argv = ["--train-embeddings", emb_dir / "train.npy", "--embeddings", emb_dir / "test.npy"]
    extra = [str(emb_dir / "bad8.npy") if e == "BAD_DIM" else e for e in extra]
    if extra[0] == "--embeddings":
        argv = argv[:2]
    out = tmp_path / "never"
    assert run_ood(*argv, *extra, "--save-dir", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("ood.py: error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    import re
    assert re.search(message, err), err
    assert not out.exists()


# ----------------------------------------------------------------------------- checkpoint mode, train.py, test.py

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = M.build_model("convnextv2", convnext_backbone="convnextv2_atto", pretrained=False, img_size=64,
                          embedding_dim=32)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_ckpt.pth"
    torch.save(M.make_checkpoint(model, epoch=1, args={"exclude_classes": ["COVID-19"]}), path)
    return path


def test_far_ood_transforms_by_hand():
    from PIL import Image
    a = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    img = Image.fromarray(a, mode="L")
    as_gray = lambda im: np.asarray(im)[..., 0]  # noqa: E731
    np.testing.assert_array_equal(as_gray(ood.FarOOD("invert")(img)), 255 - a)
    np.testing.assert_array_equal(as_gray(ood.FarOOD("hflip")(img)), a[:, ::-1])
    np.testing.assert_array_equal(as_gray(ood.FarOOD("rot90")(img)), np.rot90(a))
    n1, n2 = np.asarray(ood.FarOOD("noise", 3)(img)), np.asarray(ood.FarOOD("noise", 3)(img))
    np.testing.assert_array_equal(n1, n2)  # seeded by the image, not by call order
    assert (n1[..., 0] == n1[..., 2]).all() and not (n1[..., 0] == a).all()
    with pytest.raises(ValueError, match="unknown"):
        ood.parse_transforms("invert,solarize")


def test_main_checkpoint_far_ood(demo_data, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "ck"
    assert run_ood("--resume", tiny_ckpt, "--dataset-dir", demo_data, "--train-image-list",
                   demo_data / "train_split.txt", "--test-image-list", demo_data / "test_split.txt",
                   "--ood-transforms", "invert,noise", "--k", 2, "--workers", 0, "--device", "cpu",
                   "--save-dir", out) == 0
    assert "--exclude-classes COVID-19, so those are the OOD classes" in capsys.readouterr().out
    res = json.loads((out / "ood.json").read_text())
    # demo fixture: 12 patients x 3 images, 1 test patient per class; 3 of 9 training patients are COVID-19
    assert (res["counts"]["train_rows"], res["counts"]["train_rows_used"], res["counts"]["queries"]) == (27, 18, 9)
    assert (res["counts"]["id"], res["counts"]["ood"]) == (6, 3)
    assert set(res["far_ood"]) == {"invert", "noise"} and res["far_ood"]["invert"]["num"] == 6
    assert res["far_ood"]["invert"]["metrics"]["AUROC"] is not None
    rows = list(csv.DictReader((out / "ood_scores.csv").open()))
    assert [r["set"] for r in rows].count("far:noise") == 6 and len(np.load(out / "ood_scores.npy")) == 9


def test_train_exclude_classes(demo_data, tmp_path):
    import train
    base = ["--model", "convnextv2", "--convnext-backbone", "convnextv2_atto", "--img-size", "64",
            "--no-pretrained", "--embedding-dim", "16", "-k", "4", "--iters-per-epoch", "1", "--epochs", "1",
            "--workers", "0", "--device", "cpu", "--val-fraction", "0.3", "--dataset-dir", str(demo_data),
            "--train-image-list", str(demo_data / "train_split.txt"),
            "--test-image-list", str(demo_data / "test_split.txt"), "--save-dir", str(tmp_path)]
    full = train.setup(train.parse_args(base + ["-p", "3"]))
    run = train.setup(train.parse_args(base + ["-p", "2", "--exclude-classes", "COVID-19"]))
    tr, va, te = run[4], run[5], run[6]
    assert 2 not in tr.labels and 2 not in va.labels and 2 in te.labels  # test images stay
    keep = lambda ds: [i for i, lab in zip(ds.image_ids, ds.labels) if lab != 2]  # noqa: E731
    assert tr.image_ids == keep(full[4]) and va.image_ids == keep(full[5])  # same split, minus the class
    with pytest.raises(ValueError, match="pass -p 2"):
        train.setup(train.parse_args(base + ["-p", "3", "--exclude-classes", "COVID-19"]))
    with pytest.raises(ValueError, match="not a class.*normal, pneumonia, COVID-19"):
        train.setup(train.parse_args(base + ["-p", "2", "--exclude-classes", "covid"]))
    assert train.main(train.parse_args(base + ["-p", "2", "--exclude-classes", "COVID-19"])) == 0
    ckpt = torch.load(next(tmp_path.rglob("*_last_ckpt.pth")), weights_only=True)
    assert ckpt["args"]["exclude_classes"] == ["COVID-19"]


def test_test_script_ood_reference(emb_dir, tmp_path, capsys):
    import test as test_script
    ref = emb_dir / "train.npy"
    q = np.concatenate([np.load(emb_dir / "test.npy")[:16], np.load(emb_dir / "other.npy")])
    save_set(tmp_path, "q", q, np.r_[np.load(emb_dir / "test_labels.npy")[:16], [0] * 5])
    argv = ["--embeddings", str(tmp_path / "q.npy"), "--labels", str(tmp_path / "q_labels.npy"),
            "--image-ids", str(tmp_path / "q_image_ids.npy"), "--bootstrap", "0", "--ood-reference", str(ref), "--ood-k", "5", "--save-dir", str(tmp_path / "r")]
    assert test_script.main(test_script.get_args_parser().parse_args(argv)) == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    # the 5 random directions are unlike the archive; the 16 cluster queries are not
    assert res["ood"]["num_flagged"] >= 5 and res["ood"]["flagged_image_ids"][-5:] == [f"q{i}" for i in range(16, 21)]
    rows = list(csv.DictReader((tmp_path / "r" / "query_ood.csv").open()))
    assert len(rows) == 21 and all(r["ood_flagged"] == "1" for r in rows[16:])
    # the label column holds the class names of q_meta.json
    q_labels = np.load(tmp_path / "q_labels.npy")
    assert [r["label"] for r in rows] == [NAMES[int(v)] for v in q_labels]
    assert "unlike the archive" in capsys.readouterr().out
    # hand-made arrays without a meta file keep their integer ids as names
    (tmp_path / "q_meta.json").unlink()
    assert test_script.main(test_script.get_args_parser().parse_args(argv[:-1] + [str(tmp_path / "r_ids")])) == 0
    rows = list(csv.DictReader((tmp_path / "r_ids" / "query_ood.csv").open()))
    assert [r["label"] for r in rows] == [str(int(v)) for v in q_labels]
    save_set(tmp_path, "ref8", unit(np.random.default_rng(1).normal(size=(60, 8))), np.zeros(60))
    bad = argv[:argv.index("--ood-reference")] + ["--ood-reference", str(tmp_path / "ref8.npy"), "--ood-k", "5", "--save-dir",
                                                   str(tmp_path / "r2")]
    assert test_script.main(test_script.get_args_parser().parse_args(bad)) == 2
    assert "8-d reference" in capsys.readouterr().err


# ----------------------------------------------------------------------------- issue 19

def test_embeddings_mode_takes_the_checkpoints_excluded_class_as_ood(demo_data, tiny_ckpt, tmp_path, capsys):
    import extract_embeddings as ee
    emb = tmp_path / "emb"
    for name, lst, folder in (("train", "train_split.txt", "train"), ("test", "test_split.txt", "test")):
        assert ee.main(ee.get_args_parser().parse_args(
            ["--resume", str(tiny_ckpt), "--dataset-dir", str(demo_data), "--test-image-list", str(demo_data / lst),
             "--test-dataset-dir", str(demo_data / folder), "--output", str(emb / f"{name}.npy"), "--workers", "0",
             "--device", "cpu"])) == 0
    out = tmp_path / "from_emb"
    assert run_ood("--train-embeddings", emb / "train.npy", "--embeddings", emb / "test.npy", "--k", 2,
                   "--save-dir", out) == 0
    assert f"the checkpoint {tiny_ckpt} was trained with --exclude-classes COVID-19" in capsys.readouterr().out
    res = json.loads((out / "ood.json").read_text())
    # the numbers of checkpoint mode (test_main_checkpoint_far_ood): 9 COVID-19 training rows dropped, the
    # test patient's 3 COVID-19 queries are OOD, the other 6 ID
    assert res["ood_classes"] == ["COVID-19"] and res["id_classes"] == ["normal", "pneumonia"]
    assert (res["counts"]["train_rows"], res["counts"]["train_rows_used"], res["counts"]["queries"]) == (27, 18, 9)
    assert (res["counts"]["id"], res["counts"]["ood"]) == (6, 3) and res["metrics"]["AUROC"] is not None
    # a field in the meta wins over the checkpoint it names
    meta = json.loads((emb / "train_meta.json").read_text())
    (emb / "train_meta.json").write_text(json.dumps(dict(meta, exclude_classes=["pneumonia"])))
    assert run_ood("--train-embeddings", emb / "train.npy", "--embeddings", emb / "test.npy", "--k", 2,
                   "--save-dir", tmp_path / "meta_field") == 0
    assert json.loads((tmp_path / "meta_field" / "ood.json").read_text())["ood_classes"] == ["pneumonia"]
    # an explicit --ood-classes still wins over both
    assert run_ood("--train-embeddings", emb / "train.npy", "--embeddings", emb / "test.npy", "--k", 2,
                   "--ood-classes", "normal", "--save-dir", tmp_path / "flag") == 0
    assert json.loads((tmp_path / "flag" / "ood.json").read_text())["ood_classes"] == ["normal"]


def test_ood_png_one_colour_per_set_in_both_panels_and_titles(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    figs = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figs.append(fig), close(fig)))
    rng = np.random.default_rng(0)
    ood.plot(tmp_path / "ood.png", rng.normal(0, 1, 40), rng.normal(3, 1, 20), {"invert": rng.normal(5, 1, 15)},
             1.5, "knn")
    hist_ax, roc_ax = figs[0].axes
    assert hist_ax.get_title() and roc_ax.get_title()
    hist = {}
    for handle, label in zip(*hist_ax.get_legend_handles_labels()):
        if not label.startswith("threshold"):
            colour = handle.get_edgecolor() if label.startswith("far") else handle.get_facecolor()
            hist[label.rsplit(" (", 1)[0]] = to_rgb(colour[:3])
    roc = {line.get_label().split(": AUROC")[0]: to_rgb(line.get_color()) for line in roc_ax.get_lines()
           if ": AUROC" in line.get_label()}
    assert set(roc) == {"OOD", "far-OOD: invert"} and set(hist) == {"ID", "OOD", "far-OOD: invert"}
    assert all(roc[name] == hist[name] for name in roc), (hist, roc)
    assert len(set(hist.values())) == 3  # and the sets differ from each other


# ----------------------------------------------------------------------------- issue 20: sets through embeddings.py

def _with_meta(folder, stem, meta, emb_dir):
    """A copy of the planted test set whose meta file says which model made it."""
    path = save_set(folder, stem, np.load(emb_dir / "test.npy"), np.load(emb_dir / "test_labels.npy"))
    (folder / f"{stem}_meta.json").write_text(json.dumps({**meta, "class_names": NAMES}))
    return path


def test_sets_of_two_fusion_heads_are_told_apart(emb_dir, tmp_path, capsys):
    import embeddings
    head_a, head_b = tmp_path / "head_a.pth", tmp_path / "head_b.pth"
    head_a.write_bytes(b"fusion head a")
    head_b.write_bytes(b"fusion head b")
    old = lambda ckpt: {"model_name": "fusion", "model_args": {"dims": [16]}, "checkpoint": str(ckpt)}  # noqa: E731
    new = lambda ckpt: embeddings.make_meta(model_name="fusion", model_args={"dims": [16]},  # noqa: E731
                                            embedding_dim=16, checkpoint=ckpt)
    resume = {"model_name": "fusion", "model_args": {"dims": [16]}, "resume": "checkpoints/run_best_ckpt.pth"}
    cases = [("old a, old b", old(head_a), old(head_b), True),    # both "checkpoint": passed as one model before
             ("new a, new b", new(head_a), new(head_b), True),    # told apart by sha256
             ("old a, resume", old(head_a), resume, True),        # a fused set vs extract_embeddings.py's set
             ("new a, new a", new(head_a), new(head_a), False),
             ("old a, old a", old(head_a), old(head_a), False)]
    for i, (what, m_train, m_query, differ) in enumerate(cases):
        d = tmp_path / f"case{i}"
        train = save_set(d, "train", *[np.load(emb_dir / f) for f in ("train.npy", "train_labels.npy")])
        (d / "train_meta.json").write_text(json.dumps({**m_train, "class_names": NAMES}))
        query = _with_meta(d, "test", m_query, emb_dir)
        capsys.readouterr()
        assert run_ood("--train-embeddings", train, "--embeddings", query, "--ood-classes", "COVID-19", "--k", 5,
                       "--save-dir", d / "out") == 0, what
        out = capsys.readouterr().out
        assert ("come from different models/checkpoints" in out) == differ, (what, out)
        if differ and "new" in what:
            assert "sha256:" in out


def test_excluded_classes_from_the_meta_field_the_model_source_or_old_resume(tiny_ckpt, tmp_path):
    import embeddings
    from embeddings import EmbeddingSet

    def es(meta):
        return EmbeddingSet(np.zeros((1, 2), np.float32), meta=meta, path=tmp_path / "x.npy")

    new = embeddings.make_meta(model_name="convnextv2", model_args={}, embedding_dim=32, checkpoint=tiny_ckpt)
    names, where = ood.excluded_classes(es(new))
    assert names == ["COVID-19"] and where == f"the checkpoint {tiny_ckpt} was trained with --exclude-classes COVID-19"
    assert ood.excluded_classes(es({"model_name": "convnextv2", "resume": str(tiny_ckpt)}))[0] == ["COVID-19"]
    # the meta's own field wins, and the note names the meta file
    names, where = ood.excluded_classes(es(dict(new, exclude_classes=["pneumonia"])))
    assert names == ["pneumonia"] and str(tmp_path / "x_meta.json") in where
    # no checkpoint behind the set (frozen weights, an old fused set's head): nothing to read
    assert ood.excluded_classes(es(embeddings.make_meta(model_name="m", model_args={}, weights="rad-dino"))) == \
        (None, None)
    assert ood.excluded_classes(es({"model_name": "fusion", "checkpoint": str(tiny_ckpt)})) == (None, None)
    # a checkpoint rewritten since the set was extracted is not read: its --exclude-classes may differ
    moved = tmp_path / "retrained.pth"
    moved.write_bytes(tiny_ckpt.read_bytes())
    meta = embeddings.make_meta(model_name="convnextv2", model_args={}, embedding_dim=32, checkpoint=moved)
    moved.write_bytes(tiny_ckpt.read_bytes() + b"\0")
    names, where = ood.excluded_classes(es(meta))
    assert names is None and "has changed since" in where and "--ood-classes" in where
    names, where = ood.excluded_classes(es({"resume": str(tmp_path / "gone.pth")}))
    assert names is None and "cannot be read" in where
