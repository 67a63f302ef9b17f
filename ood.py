"""Out-of-distribution scores for retrieval queries: is this query even like the archive?

A retrieval system answers every query, even a lateral view, an inverted film or a disease it never saw.
This script scores how unusual each query is against the training archive, calibrates a threshold on
in-distribution (ID) validation embeddings and flags the queries whose neighbours mean little.
Scores (LARGER = MORE UNUSUAL, for every method):
  knn          Sun et al., ICML 2022: the Euclidean distance of the L2-normalised query to its k-th nearest
               L2-normalised training embedding (--k). Exact chunked search (metrics.knn_search, --knn-backend
               torch, CPU or CUDA) or faiss; pytorch-ood's KNN (scikit-learn search) is a third backend.
  mahalanobis  Lee et al., NeurIPS 2018: class means and one shared covariance of the training embeddings
               (Ledoit-Wolf shrinkage by default, --shrinkage); the Mahalanobis distance to the nearest class mean.
  mcm          Ming et al., NeurIPS 2022, zero-shot for vision-language models (ConceptCLIP): -max_c softmax_c(
               cos(z, t_c) / T) over the class-prompt text embeddings t_c of the training classes (pytorch-ood MCM).
ID = queries whose label is among the training labels; OOD = queries of --ood-classes plus every row of
--ood-embeddings. Rows of --ood-classes are dropped from the training and validation side (X-MIR protocol,
Hu et al., WACV 2022: train without COVID-19, detect it as the anomaly). Metrics and their convention: CONVENTION.

From saved embedding sets (extract_embeddings.py output, read by embeddings.load: the labels, image ids, patient
ids and meta files beside X.npy are found by default; without --ood-classes, the classes the model was trained
without are the OOD classes, as in checkpoint mode: the training set's meta field "exclude_classes", else the
train.py --exclude-classes stored in the checkpoint its meta names as the model's source):
    python ood.py --train-embeddings emb/train.npy --embeddings emb/test.npy --ood-classes COVID-19 \\
        --method knn --k 50 --save-dir results/ood
    python ood.py --train-embeddings emb/train.npy --train-labels emb/relabelled_train.npy --embeddings emb/test.npy \\
        --labels emb/relabelled_test.npy --ood-embeddings emb/lateral.npy --val-embeddings emb/val.npy \\
        --method mahalanobis --save-dir results/ood_maha
    # ConceptCLIP zero-shot: one text-embedding row per class name, in class-index order
    python ood.py --method mcm --train-embeddings emb/cc_train.npy --embeddings emb/cc_test.npy \\
        --text-embeddings emb/cc_prompts.npy --ood-classes COVID-19 --save-dir results/ood_mcm
From a checkpoint and lists (the model and its eval transform are rebuilt from the checkpoint; --ood-classes
defaults to the checkpoint's train.py --exclude-classes), with far-OOD copies of the ID test images:
    python ood.py --resume checkpoints/RUN/RUN_best_ckpt.pth --dataset-dir data/demo \\
        --train-image-list data/demo/train_split.txt --test-image-list data/demo/test_split.txt \\
        --ood-transforms invert,rot90,hflip,blur,noise --k 5 --save-dir results/ood_demo
    # CPU only
    CUDA_VISIBLE_DEVICES="" python ood.py --resume CKPT ... --device cpu --workers 2
Single process (one chunked matrix product per block of queries, as metrics.py); no torchrun.

Writes SAVE_DIR/ood.json (arguments, method, convention, metrics, threshold, counts), ood_scores.npy (one
score per row of --embeddings, then of --ood-embeddings), ood_scores.csv (image id, label, score, flag; far-OOD
rows too), ood.png (score histograms with the threshold, ROC curves); nothing is replaced without --overwrite.
Other scripts: test.py --ood-reference TRAIN_EMB uses load_reference() and score_queries() from here.
"""
import argparse
import csv
import io
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import embeddings
import metrics
from dataset import LABEL_MAPS, ImageListDataset, get_data_parser, patient_split, test_image_dir, train_image_dir
from embeddings import EmbeddingSet
from utils import (HelpFormatter, atomic_np_save, atomic_write_text, ensure_writable_dir, get_device,
                   get_runtime_parser, git_revision, print_args, resolve_amp, run_main, save_figure, save_json)

METHODS = ("knn", "mahalanobis", "mcm")
KNN_BACKENDS = ("torch", "faiss", "pytorch-ood")
FAR_OOD = ("invert", "rot90", "hflip", "blur", "noise")
OUTPUTS = ("ood.json", "ood_scores.npy", "ood_scores.csv", "ood.png")
DEFAULT_PROMPT = "a chest X-ray showing {}"
METRIC_KEYS = ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR@95TPR", "FPR@95TPR_ood_positive")
CONVENTION = {
    "score": "larger = more unusual (more out-of-distribution), for every method",
    "positive_class": "OOD is the positive class of AUROC, AUPR-OUT and of the flags; AUPR-IN and FPR@95TPR "
                      "take ID as the positive class (ranked by -score)",
    "AUROC": "probability that a random OOD row scores higher than a random ID row, ties counted half",
    "AUPR-IN": "area under the precision-recall curve with ID positive (ranked by -score), trapezoidal rule "
               "over scikit-learn's precision_recall_curve points (pytorch-ood)",
    "AUPR-OUT": "the same with OOD positive (ranked by score)",
    "FPR@95TPR": "ID positive: the fraction of OOD rows accepted as ID at the first threshold that accepts at "
                 "least 95% of the ID rows evaluated (the convention of Liang et al. 2018 and Sun et al. 2022); "
                 "lower is better",
    "FPR@95TPR_ood_positive": "the opposite convention (pytorch-ood FPRAtTPR): the fraction of ID rows flagged at "
                              "the first threshold that flags at least 95% of the OOD rows",
    "threshold": "flagged = score > threshold; the threshold is the ceil(accept * n)-th smallest score of the n "
                 "ID calibration rows, so at least that share of them (exactly, without ties) is accepted",
}


# ----------------------------------------------------------------------------- scores

def get_ood_warning_parser():
    """Parent parser of the OOD-warning flags that test.py and explain.py take: one definition each."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("out-of-distribution warning (ood.py)")
    g.add_argument("--ood-reference", type=Path, default=None,
                   help="archive embedding set TRAIN_EMB.npy: each query gets an OOD score (larger = more unusual) "
                        "and a flag at the threshold that accepts 95%% of a seeded held-out part of the archive")
    g.add_argument("--ood-method", default="knn", choices=["knn", "mahalanobis"], help="OOD score (ood.py)")
    g.add_argument("--ood-k", type=int, default=50, help="knn OOD score: distance to the k-th archive neighbour")
    return p


def knn_scores(train, query, k, backend="torch", chunk_size=None, device=None):
    """(Q,) float64: distance of each L2-normalised query row to its k-th nearest L2-normalised training row.

    On unit vectors ||q - t||^2 = 2 - 2 cos(q, t), so the k-th largest cosine (exact chunked search of
    metrics.knn_search: one (chunk, N) product at a time, never Q x N) gives the k-th smallest distance.
    """
    if backend == "pytorch-ood":
        from pytorch_ood.detector import KNN
        tr = metrics.as_embeddings(train, "training embeddings")
        det = KNN(None, k=k).fit_features(tr, torch.zeros(len(tr), dtype=torch.long))
        return det.predict_features(metrics.as_embeddings(query, "query embeddings")).cpu().numpy().astype(np.float64)
    sims, _ = metrics.knn_search(query, train, k, chunk_size=chunk_size, backend=backend, device=device)
    return np.sqrt(np.clip(2.0 - 2.0 * sims[:, k - 1].astype(np.float64), 0.0, None))


def fit_mahalanobis(train, labels, shrinkage="auto"):
    """Class means (C, D), shared precision (D, D) float64, the class ids and the shrinkage used.

    Sigma = (1/N) sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T, shrunk towards (tr Sigma / D) I:
    (1 - a) Sigma + a (tr Sigma / D) I, a from Ledoit-Wolf ("auto") or given. Without shrinkage a
    training set smaller than the embedding width (N < D) has a singular Sigma.
    """
    x = torch.as_tensor(np.asarray(train), dtype=torch.float64)
    y = np.asarray(labels)
    classes = np.unique(y)
    if len(x) <= len(classes):
        raise ValueError(f"mahalanobis needs more training rows ({len(x)}) than classes ({len(classes)})")
    yi = torch.as_tensor(np.searchsorted(classes, y))
    means = torch.zeros(len(classes), x.shape[1], dtype=torch.float64).index_add_(0, yi, x)
    means /= torch.bincount(yi, minlength=len(classes))[:, None]
    centred = x - means[yi]
    sigma = centred.T @ centred / len(x)
    if shrinkage == "auto":
        from sklearn.covariance import ledoit_wolf_shrinkage
        shrinkage = float(ledoit_wolf_shrinkage(centred.numpy(), assume_centered=True))
    shrinkage = float(shrinkage)
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"--shrinkage must be in [0, 1] or auto, got {shrinkage}")
    mu = torch.trace(sigma) / x.shape[1]
    sigma = (1 - shrinkage) * sigma + shrinkage * mu * torch.eye(x.shape[1], dtype=torch.float64)
    w, v = torch.linalg.eigh(sigma)
    if w.min() <= 1e-12 * max(float(w.max()), 1e-300):
        raise ValueError(f"the shared covariance of {len(x)} training rows in {x.shape[1]} dimensions is singular; "
                         f"use --shrinkage auto (or a value > 0)")
    precision = (v / w) @ v.T  # V diag(1/w) V^T, symmetric by construction
    return means, precision, classes, shrinkage


def mahalanobis_scores(query, means, precision, chunk_size=None):
    """(Q,) float64: min over classes of sqrt((x - mu_c)^T P (x - mu_c)), in chunks of queries.

    d^2 = x P x - 2 x P mu_c + mu_c P mu_c: one (chunk, D) x (D, D) product per chunk, no (Q, C, D) tensor.
    """
    q = np.asarray(query)
    out = np.empty(len(q), np.float64)
    mp = means @ precision                      # (C, D)
    mpm = (mp * means).sum(1)                   # (C,)
    chunk = chunk_size or max(1, metrics.CHUNK_ELEMENTS // (4 * precision.shape[0]))
    for s in range(0, len(q), chunk):
        x = torch.as_tensor(q[s:s + chunk], dtype=torch.float64)
        xp = x @ precision
        d2 = (xp * x).sum(1, keepdim=True) - 2 * x @ mp.T + mpm[None, :]
        out[s:s + chunk] = d2.clamp_min(0).min(1).values.sqrt().numpy()
    return out


def mcm_scores(query, text_embeddings, temperature=1.0):
    """(Q,) float64: -max_c softmax(cos(z, t_c) / temperature), pytorch-ood's MCM on (C, D) class-prompt rows."""
    from pytorch_ood.detector import MCM
    det = MCM(None, torch.as_tensor(np.asarray(text_embeddings), dtype=torch.float32), temperature=temperature)
    return det.predict_features(torch.as_tensor(np.asarray(query), dtype=torch.float32)).double().numpy()


def class_text_embeddings(model, class_names, template=DEFAULT_PROMPT):
    """(C, D) L2-normalised text embeddings of one prompt per class, from a vision-language model.

    The interface: `model.encode_text(list_of_prompts) -> (C, D)` in the space of its image embeddings
    (as CLIP's encode_text). model.py's encoders with a text tower (biomedclip, medsiglip, clip) have it, without
    a trainable head; the ConceptCLIP wrapper exposes only the image tower (use --text-embeddings for it).
    """
    if not callable(getattr(model, "encode_text", None)):
        raise ValueError(f"--method mcm needs a vision-language model with encode_text(prompts); "
                         f"{type(model).__name__} has none: pass --text-embeddings T.npy (one row per class)")
    prompts = [template.format(n) for n in class_names]
    with torch.no_grad():
        t = torch.as_tensor(model.encode_text(prompts)).float()
    if t.shape[0] != len(prompts):
        raise ValueError(f"encode_text returned {t.shape[0]} rows for {len(prompts)} prompts")
    return torch.nn.functional.normalize(t, dim=1).cpu().numpy()


# ----------------------------------------------------------------------------- detector, threshold, metrics

@dataclass
class OODDetector:
    """A fitted score (see the module docstring) and, once calibrated, its threshold."""
    method: str
    state: dict
    dim: int
    k: int | None = None
    knn_backend: str = "torch"
    chunk_size: int | None = None
    device: object = None
    threshold: float | None = None
    info: dict = field(default_factory=dict)

    def score(self, x):
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"embeddings of shape {x.shape} do not match the {self.dim}-d reference; "
                             f"both must come from the same model")
        if len(x) == 0:
            return np.zeros(0, np.float64)
        if self.method == "knn":
            return knn_scores(self.state["train"], x, self.k, self.knn_backend, self.chunk_size, self.device)
        if self.method == "mahalanobis":
            return mahalanobis_scores(x, self.state["means"], self.state["precision"], self.chunk_size)
        return mcm_scores(x, self.state["text"], self.state["temperature"])

    def calibrate(self, val_scores, accept=0.95):
        self.threshold, n_accepted = calibrate_threshold(val_scores, accept)
        self.info.update(accept=accept, num_calibration=len(val_scores), calibration_accepted=n_accepted)
        return self.threshold

    def flag(self, scores):
        if self.threshold is None:
            raise ValueError("the detector has no threshold yet (calibrate it on ID validation scores)")
        return np.asarray(scores) > self.threshold


def fit_detector(method, train, labels=None, *, k=50, knn_backend="torch", shrinkage="auto", text=None,
                 temperature=1.0, chunk_size=None, device=None):
    """An OODDetector fitted on training embeddings (N, D); for mcm `text` holds the (C, D) prompt rows."""
    train = np.asarray(train)
    if method == "knn":
        if k < 1 or k > len(train):
            raise ValueError(f"k = {k} must be between 1 and the {len(train)} archive embeddings the kNN score "
                             f"searches; pass a smaller k (ood.py --k, test.py --ood-k)")
        state = {"train": metrics.as_embeddings(train, "training embeddings")}
        info = {"num_fit": len(train)}
    elif method == "mahalanobis":
        if labels is None:
            raise ValueError("--method mahalanobis needs the training labels (--train-labels)")
        means, precision, classes, a = fit_mahalanobis(train, labels, shrinkage)
        state = {"means": means, "precision": precision}
        info = {"num_fit": len(train), "shrinkage": a, "classes": classes.tolist()}
    elif method == "mcm":
        if text is None:
            raise ValueError("--method mcm needs class-prompt text embeddings (--text-embeddings T.npy)")
        state = {"text": np.asarray(text, np.float32), "temperature": float(temperature)}
        info = {"num_fit": 0, "num_prompts": len(text), "temperature": float(temperature)}
    else:
        raise ValueError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    return OODDetector(method, state, train.shape[1] if method != "mcm" else np.asarray(text).shape[1],
                       k=k if method == "knn" else None, knn_backend=knn_backend, chunk_size=chunk_size,
                       device=device, info=info)


def calibrate_threshold(val_scores, accept=0.95):
    """(threshold, accepted count): the ceil(accept * n)-th smallest of n ID scores; flag = score > threshold."""
    s = np.sort(np.asarray(val_scores, np.float64))
    if len(s) == 0:
        raise ValueError("no in-distribution calibration rows: give --val-embeddings or a larger training side")
    if not 0 < accept <= 1:
        raise ValueError(f"--accept must be in (0, 1], got {accept}")
    m = max(1, math.ceil(accept * len(s) - 1e-9))  # 0.95 * 20 = 19 exactly, not 19.000000000000004
    thr = float(s[m - 1])
    return thr, int((s <= thr).sum())


def ood_metrics(scores, is_ood):
    """AUROC, AUPR-IN, AUPR-OUT, FPR@95TPR (ID positive) and FPR@95TPR_ood_positive; None without ID or OOD rows."""
    from pytorch_ood.metrics import functional as F
    is_ood = np.asarray(is_ood, bool)
    if is_ood.all() or not is_ood.any():
        return {k: None for k in METRIC_KEYS}
    s = torch.as_tensor(np.asarray(scores, np.float64))
    lab = torch.as_tensor(np.where(is_ood, -1, 0))      # pytorch-ood: labels < 0 mark the positive (OOD) rows
    swapped = torch.as_tensor(np.where(is_ood, 0, -1))  # ID positive, ranked by -score
    return {"AUROC": float(F.auroc(s, lab)), "AUPR-IN": float(F.aupr(s, lab, positive="id")),
            "AUPR-OUT": float(F.aupr(s, lab, positive="ood")), "FPR@95TPR": float(F.fpr_at_tpr(-s, swapped, 0.95)),
            "FPR@95TPR_ood_positive": float(F.fpr_at_tpr(s, lab, 0.95))}


def split_truth(labels, id_labels, ood_ids):
    """Per row "ID" (label among the training labels), "OOD" (label in ood_ids) or "other"."""
    labels = np.asarray(labels)
    truth = np.full(len(labels), "other", dtype=object)
    truth[np.isin(labels, list(id_labels))] = "ID"
    truth[np.isin(labels, list(ood_ids))] = "OOD"
    return truth


def calibration_split(n, labels=None, patient_ids=None, fraction=0.2, seed=0):
    """(fit indices, calibration indices) of a training side: patient-disjoint when patient ids are known."""
    if not 0 < fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {fraction}")
    if patient_ids is not None:
        lab = np.zeros(n, np.int64) if labels is None else np.asarray(labels)
        fit, val = patient_split(list(np.asarray(patient_ids).astype(str)), lab, fraction, seed)
    else:
        perm = np.random.default_rng(seed).permutation(n)
        n_val = min(n - 1, max(1, round(fraction * n)))
        fit, val = np.sort(perm[n_val:]), np.sort(perm[:n_val])
    if len(fit) == 0 or len(val) == 0:
        raise ValueError(f"cannot split {n} training rows into a fitting and a calibration part; "
                         f"give --val-embeddings (or --val-image-list)")
    return fit, val


# ----------------------------------------------------------------------------- saved embeddings

def read_text_embeddings(path):
    """--text-embeddings T.npy: one class-prompt embedding per class name, a plain (C, D) array."""
    return embeddings.read_array(path, "--text-embeddings", fix="save it with numpy.save, one row per class name")


def load_reference(path, method="knn", k=50, *, seed=0, val_fraction=0.2, accept=0.95, expected_dim=None,
                   knn_backend="torch", device=None):
    """A detector fitted on an archive's saved embeddings and calibrated on a seeded held-out part of it.

    For test.py / explain.py --ood-reference: the held-out part is patient-disjoint when the set has patient
    ids; the detector is fitted on the rest. Every check happens here, before any image is embedded.
    """
    ref = embeddings.load(path, required=(), flag="--ood-reference")
    if expected_dim is not None and ref.embeddings.shape[1] != expected_dim:
        raise ValueError(f"--ood-reference {path} holds {ref.embeddings.shape[1]}-d embeddings but the model gives "
                         f"{expected_dim}-d; extract the reference with the same model")
    fit, cal = calibration_split(len(ref.embeddings), ref.labels, ref.patient_ids, val_fraction, seed)
    det = fit_detector(method, ref.embeddings[fit], None if ref.labels is None else ref.labels[fit], k=k,
                       knn_backend=knn_backend, device=device)
    det.calibrate(det.score(ref.embeddings[cal]), accept)
    det.info.update(reference=str(path), num_reference=len(ref.embeddings), seed=seed,
                    calibration=f"seeded {'patient-disjoint ' if ref.patient_ids is not None else ''}split: "
                                f"{len(cal)} of {len(ref.embeddings)} reference rows held out (--seed {seed})")
    return det


def score_queries(detector, embeddings):
    """(scores (Q,) float64, flags (Q,) bool) of query embeddings against a calibrated detector."""
    scores = detector.score(embeddings)
    return scores, detector.flag(scores)


def checkpoint_embedding_dim(path):
    """The embedding width a checkpoint gives, read without loading its tensors (None when unreadable:
    the script's own checkpoint loading then reports the problem)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["embedding_dim"])
    except Exception:
        return None


def query_report(detector, scores, flags, image_ids=None, labels=None, class_names=None):
    """(summary dict, CSV text image_id,label,ood_score,ood_flagged) to show beside retrieval results.
    The label column holds the class name when class_names is given, else the integer id."""
    n = len(scores)
    ids = np.arange(n).astype(str) if image_ids is None else np.asarray(image_ids).astype(str)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image_id", "label", "ood_score", "ood_flagged"])
    for i in range(n):
        label = "" if labels is None else int(labels[i])
        if labels is not None and class_names is not None:
            label = class_names[label]
        w.writerow([ids[i], label, f"{scores[i]:.6g}", int(flags[i])])
    summary = {"reference": detector.info.get("reference"), "method": detector.method, "k": detector.k,
               "threshold": detector.threshold, "accept": detector.info.get("accept"),
               "calibration": detector.info.get("calibration"), "num_queries": n, "num_flagged": int(np.sum(flags)),
               "flagged_image_ids": ids[np.asarray(flags, bool)].tolist(), "score": CONVENTION["score"]}
    return summary, buf.getvalue()


# ----------------------------------------------------------------------------- far-OOD copies

BLUR_SIGMA = 0.03   # Gaussian blur std as a fraction of the shorter image side
NOISE_STD = 0.25    # additive Gaussian noise std as a fraction of the 0..255 range


class FarOOD:
    """An RGB PIL image made far-OOD: invert, rot90, hflip (mirror: heart on the right), blur or noise.

    Applied before the model's eval transform. Noise is seeded by (--seed, the image's bytes), so a
    copy does not depend on loader order or workers. A class (not a lambda) so DataLoader workers can pickle it.
    """

    def __init__(self, name, seed=0):
        if name not in FAR_OOD:
            raise ValueError(f"--ood-transforms {name}: unknown; choose from {','.join(FAR_OOD)}")
        self.name, self.seed = name, int(seed)

    def __call__(self, img):
        from PIL import Image, ImageFilter, ImageOps
        img = img.convert("RGB")
        if self.name == "invert":
            return ImageOps.invert(img)
        if self.name == "rot90":
            return img.transpose(Image.Transpose.ROTATE_90)
        if self.name == "hflip":
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.name == "blur":
            return img.filter(ImageFilter.GaussianBlur(radius=BLUR_SIGMA * min(img.size)))
        a = np.asarray(img, np.float32)
        rng = np.random.default_rng([self.seed, zlib.crc32(a.tobytes())])
        noise = rng.normal(0.0, NOISE_STD * 255, a.shape[:2])[..., None]  # one field for all 3 channels: stays gray
        return Image.fromarray(np.clip(a + noise, 0, 255).round().astype(np.uint8))


def parse_transforms(text):
    if not text:
        return []
    names = list(FAR_OOD) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    for n in names:
        FarOOD(n)  # raises on an unknown name
    if len(set(names)) != len(names):
        raise ValueError(f"--ood-transforms {text}: a transform is listed twice")
    return names


# ----------------------------------------------------------------------------- command line

def get_args_parser():
    p = argparse.ArgumentParser(description="Out-of-distribution scores of retrieval queries against the archive",
                                parents=[get_data_parser(), get_runtime_parser()], formatter_class=HelpFormatter)
    g = p.add_argument_group("from saved embedding sets (extract_embeddings.py output; the files beside X.npy are "
                             "found by default)")
    g.add_argument("--train-embeddings", type=Path, default=None, help="(N, D) .npy of the archive / training side")
    g.add_argument("--train-labels", type=Path, default=None,
                   help="(N,) int .npy; not given: the labels file beside --train-embeddings")
    g.add_argument("--train-patient-ids", type=Path, default=None,
                   help="(N,) .npy; makes the calibration split patient-disjoint; not given: the patient ids file "
                        "beside --train-embeddings")
    g.add_argument("--embeddings", type=Path, default=None, help="(Q, D) .npy of the queries")
    g.add_argument("--labels", type=Path, default=None, help="(Q,) int .npy of the queries; not given: beside")
    g.add_argument("--image-ids", type=Path, default=None, help="(Q,) .npy of query image ids; not given: beside")
    g.add_argument("--ood-embeddings", type=Path, nargs="+", default=None,
                   help="one or more .npy whose every row is OOD (e.g. lateral views, other body parts)")
    g.add_argument("--val-embeddings", type=Path, default=None,
                   help="ID validation embeddings for the threshold; not given: a seeded split of the training side")
    g.add_argument("--val-labels", type=Path, default=None, help="(V,) int .npy; not given: beside")
    g.add_argument("--text-embeddings", type=Path, default=None,
                   help="mcm: (C, D) .npy, one class-prompt text embedding per class name, in class-index order")
    g = p.add_argument_group("from a checkpoint and lists (uses the data flags above: --dataset-dir, "
                             "--train-image-list, --test-image-list, --val-image-list)")
    g.add_argument("--resume", type=Path, default=None, help="checkpoint written by train.py")
    g.add_argument("--ood-image-list", type=Path, default=None, help="list whose every image is OOD")
    g.add_argument("--ood-dataset-dir", type=Path, default=None,
                   help="image folder of --ood-image-list; not given: the test image folder")
    g.add_argument("--ood-transforms", default="",
                   help=f"comma-separated far-OOD copies of the ID test images, each reported separately: "
                        f"{','.join(FAR_OOD)} (or all)")
    g = p.add_argument_group("scoring")
    g.add_argument("--method", default="knn", choices=METHODS, help="OOD score; larger = more unusual")
    g.add_argument("--k", type=int, default=50, help="knn: distance to the k-th nearest training embedding")
    g.add_argument("--knn-backend", default="torch", choices=KNN_BACKENDS,
                   help="knn search: exact chunked torch (CPU/CUDA), faiss flat (exact), or pytorch-ood's KNN")
    g.add_argument("--shrinkage", default="auto",
                   help="mahalanobis: covariance shrinkage in [0, 1] towards a scaled identity, or auto (Ledoit-Wolf)")
    g.add_argument("--prompt-template", default=DEFAULT_PROMPT, help="mcm: prompt per class name ({} = the name)")
    g.add_argument("--temperature", type=float, default=1.0, help="mcm: softmax temperature (Ming et al.: 1)")
    g.add_argument("--ood-classes", nargs="+", default=None, metavar="NAME",
                   help="label names whose queries are OOD (dropped from the training/validation side); not given: "
                        "the train.py --exclude-classes of the model's checkpoint (--resume, or the one named in "
                        "the training set's meta file)")
    g.add_argument("--accept", type=float, default=0.95, help="share of ID calibration rows the threshold accepts")
    g.add_argument("--val-fraction", type=float, default=0.2,
                   help="without validation embeddings: share of the training side held out for the threshold")
    g.add_argument("--seed", type=int, default=0, help="calibration split and noise seed")
    g.add_argument("--save-dir", type=Path, default=Path("results/ood"))
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs in --save-dir")
    return p


def check_args(args):
    """Flag problems, before anything is loaded, embedded or written."""
    if (args.resume is None) == (args.train_embeddings is None):
        raise ValueError("give exactly one of --resume CKPT (images are embedded) or --train-embeddings E.npy")
    if args.train_embeddings is not None:
        if args.embeddings is None:
            raise ValueError("--train-embeddings needs --embeddings Q.npy (the queries to score)")
        if args.ood_transforms:
            raise ValueError("--ood-transforms needs --resume (the test images are transformed, then embedded)")
        for flag in ("train_image_list", "test_image_list", "val_image_list", "ood_image_list"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} is for --resume; with saved embeddings give "
                                 f"--train-embeddings / --embeddings / --val-embeddings / --ood-embeddings")
    else:
        for flag in ("embeddings", "ood_embeddings", "val_embeddings"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} is for saved embeddings, not --resume; give image lists")
        if args.train_image_list is None or args.test_image_list is None:
            raise ValueError("--resume needs --train-image-list (the archive) and --test-image-list (the queries)")
        if args.dataset_dir is None:
            raise ValueError("--resume needs --dataset-dir (training images in DIR/train, test images in DIR/test)")
    args.ood_transforms = ",".join(parse_transforms(args.ood_transforms))
    if args.method == "mcm" and args.train_embeddings is not None and args.text_embeddings is None:
        raise ValueError("--method mcm needs --text-embeddings T.npy (one class-prompt embedding per class name)")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if not 0 < args.accept <= 1:
        raise ValueError(f"--accept must be in (0, 1], got {args.accept}")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if args.shrinkage != "auto":
        try:
            a = float(args.shrinkage)
        except ValueError:
            a = -1.0
        if not 0 <= a <= 1:
            raise ValueError(f"--shrinkage must be auto or a number in [0, 1], got {args.shrinkage}")
    if args.eval_batch_size < 1:
        raise ValueError(f"--eval-batch-size must be >= 1, got {args.eval_batch_size}")
    existing = [str(Path(args.save_dir) / n) for n in OUTPUTS if (Path(args.save_dir) / n).exists()]
    if existing and not args.overwrite:
        raise ValueError(f"{', '.join(existing)} already exist; choose another --save-dir or pass --overwrite")


def resolve_classes(names, class_names, flag="--ood-classes"):
    """Class names (or plain ids when no class names are known) -> sorted class ids; unknown names are an error."""
    ids = []
    for n in names or []:
        if class_names is not None and n in class_names:
            ids.append(class_names.index(n))
        elif class_names is None and n.isdigit():
            ids.append(int(n))
        else:
            known = ", ".join(class_names) if class_names is not None else "none (give class ids)"
            raise ValueError(f"{flag} {n}: not a class name of these embeddings; known: {known}")
    return sorted(set(ids))


def class_name(class_names, c):
    return class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)


@dataclass
class Plan:
    """What is ID, OOD, fitted and calibrated; derived from labels only, so it is checked before any embedding."""
    ood_ids: list
    id_labels: list | None
    train_keep: np.ndarray
    fit: np.ndarray
    cal: np.ndarray | None   # indices into the kept training rows; None when validation rows are given
    val_keep: np.ndarray | None
    truth: np.ndarray
    calibration: str
    notes: list


def make_plan(args, class_names, train, queries, val=None, n_text=None):
    notes = []
    ood_ids = resolve_classes(args.ood_classes, class_names)
    n_train = len(train.labels) if train.embeddings is None else len(train.embeddings)
    keep = np.arange(n_train)
    if ood_ids and train.labels is not None:
        keep = np.flatnonzero(~np.isin(train.labels, ood_ids))
        if len(keep) < n_train:
            notes.append(f"{n_train - len(keep)} training rows of --ood-classes "
                         f"{', '.join(class_name(class_names, c) for c in ood_ids)} dropped from the archive side")
    elif ood_ids:
        notes.append("no training labels: rows of --ood-classes cannot be dropped from the archive side")
    if len(keep) == 0:
        raise ValueError("no training rows left after dropping --ood-classes")
    if train.labels is not None:
        id_labels = sorted(set(train.labels[keep].tolist()))
    elif class_names is not None:
        id_labels = [c for c in range(len(class_names)) if c not in ood_ids]
    else:
        id_labels = None
    if args.method == "mahalanobis" and train.labels is None:
        raise ValueError("--method mahalanobis needs training labels (--train-labels, or the labels file beside "
                         "--train-embeddings)")
    if args.method == "mcm":
        if id_labels is None:
            raise ValueError("--method mcm needs training labels or class names to know the ID classes")
        if n_text is not None and n_text <= max(id_labels):
            raise ValueError(f"--text-embeddings has {n_text} rows but the class ids go up to {max(id_labels)}; "
                             f"give one row per class name, in class-index order")
    val_keep = None
    if val is not None:
        n_val = len(val.embeddings) if val.embeddings is not None else len(val.labels)
        val_keep = np.arange(n_val)
        if val.labels is not None and id_labels is not None:
            val_keep = np.flatnonzero(np.isin(val.labels, id_labels))
            if len(val_keep) < n_val:
                notes.append(f"{n_val - len(val_keep)} validation rows whose label is not a training label dropped")
        if len(val_keep) == 0:
            raise ValueError("no in-distribution validation rows left (their labels are not among the training labels)")
        fit, cal = np.arange(len(keep)), None
        calibration = f"{len(val_keep)} ID validation rows ({val.name})"
    elif args.method == "mcm":  # nothing is fitted: the whole training side can calibrate
        fit, cal = np.arange(len(keep)), np.arange(len(keep))
        calibration = f"all {len(keep)} ID training rows (mcm fits nothing on them)"
    else:
        lab = None if train.labels is None else train.labels[keep]
        pid = None if train.patient_ids is None else train.patient_ids[keep]
        fit, cal = calibration_split(len(keep), lab, pid, args.val_fraction, args.seed)
        calibration = (f"seeded {'patient-disjoint ' if pid is not None else ''}split of the training side: "
                       f"{len(cal)} of {len(keep)} rows held out (--val-fraction {args.val_fraction}, --seed "
                       f"{args.seed}); the detector is fitted on the other {len(fit)}")
        if pid is None:
            notes.append("no patient ids for the training side: the calibration split is per image, so a patient's "
                         "images may sit on both sides (a lower threshold, more flags)")
    if args.method == "knn" and args.k > len(fit):
        raise ValueError(f"--k {args.k} is larger than the archive the kNN score searches: {len(fit)} training rows"
                         + (f" ({len(cal)} of {len(keep)} are held out to calibrate the threshold; give "
                            f"--val-embeddings to keep all)" if cal is not None and args.method != "mcm" else "")
                         + f"; pass --k {len(fit)} or less")
    if queries.labels is not None:
        truth = split_truth(queries.labels, id_labels if id_labels is not None else
                            sorted(set(queries.labels.tolist()) - set(ood_ids)), ood_ids)
        other = sorted(set(queries.labels[truth == "other"].tolist()))
        if other:
            notes.append(f"{int((truth == 'other').sum())} queries have labels that are neither training labels nor "
                         f"--ood-classes ({', '.join(class_name(class_names, c) for c in other)}): scored and flagged, "
                         f"left out of the metrics; pass --ood-classes to count them as OOD")
        for c in ood_ids:
            if not (queries.labels == c).any():
                notes.append(f"no query has the --ood-classes label {class_name(class_names, c)}")
    else:
        truth = np.full(len(queries.embeddings), "ID", dtype=object)
        notes.append("no query labels: every --embeddings row counts as in-distribution")
    return Plan(ood_ids, id_labels, keep, fit, cal, val_keep, truth, calibration, notes)


# ----------------------------------------------------------------------------- inputs

@dataclass
class Inputs:
    train: EmbeddingSet
    queries: EmbeddingSet
    val: EmbeddingSet | None
    ood: list                      # EmbeddingSets whose every row is OOD
    far: dict                      # transform name -> (n_id_queries, D) embeddings of transformed ID queries
    class_names: list | None
    plan: Plan
    text: np.ndarray | None
    source: str


def _class_names(args, sets, notes):
    named = [(s.name, s.class_names) for s in sets if s is not None and s.class_names is not None]
    for src, names in named[1:]:
        if list(names) != list(named[0][1]):
            raise ValueError(f"class names differ: {named[0][0]} has {named[0][1]} but {src} has {names}; "
                             f"the label ids mean different things, extract both with the same --dataset")
    if named:
        return list(named[0][1])
    if args.dataset not in LABEL_MAPS:
        return None
    lm = LABEL_MAPS[args.dataset]
    names = sorted(lm, key=lm.get)
    top = max([int(s.labels.max()) for s in sets if s is not None and s.labels is not None] or [0])
    if top >= len(names):
        raise ValueError(f"no meta file with class names beside the embeddings, and the labels go up to {top} "
                         f"while --dataset {args.dataset} has {len(names)} classes; pass --dataset generic (class "
                         f"ids) or keep the meta files extract_embeddings.py wrote beside the embeddings")
    notes.append(f"no meta file with class names beside the embeddings: class names from --dataset {args.dataset}")
    return names


def _meta_file(es):
    return embeddings.sidecar_paths(es.path)["meta"] if es.path is not None else f"the meta of {es.name}"


def excluded_classes(es):
    """(class names the model of an embedding set was trained without, a sentence saying so and where it was
    read), or (None, why not) / (None, None) when no checkpoint is behind the set.

    train.py --exclude-classes is a property of the checkpoint: the set's meta field "exclude_classes" when it
    has one (extract_embeddings.py records it), else the training args stored in the checkpoint the meta names
    as the model's source (read, not built; for current meta only while the file's sha256 is the recorded one).
    """
    meta = es.meta or {}
    ckpt, sha = embeddings.source_checkpoint(meta)
    if "meta_version" not in meta and not meta.get("resume"):
        ckpt = None  # an older fused set's "checkpoint" is a fusion head: no train.py --exclude-classes to read
    if "exclude_classes" in meta:
        names = list(meta["exclude_classes"] or [])
        return names, (f"{f'the checkpoint {ckpt}' if ckpt else f'the model of {es.name}'} was trained with "
                       f"--exclude-classes {' '.join(names)} (recorded in {_meta_file(es)})")
    if not ckpt:
        return None, None  # no checkpoint behind these embeddings (a frozen or untrained model): nothing excluded
    unknown = (f"so the classes it was trained without (train.py --exclude-classes) are unknown; pass --ood-classes "
               f"if it excluded any")
    try:
        if sha is not None and embeddings.file_sha256(ckpt) != sha:
            return None, (f"the checkpoint {ckpt} named in {_meta_file(es)} has changed since the embeddings were "
                          f"written (its sha256 differs), {unknown}")
        stored = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("args") or {}
    except Exception as e:
        return None, f"the checkpoint {ckpt} named in {_meta_file(es)} cannot be read ({type(e).__name__}), {unknown}"
    names = list(stored.get("exclude_classes") or [])
    return names, f"the checkpoint {ckpt} was trained with --exclude-classes {' '.join(names)}"


def inputs_from_files(args):
    notes = []
    train = embeddings.load(args.train_embeddings, labels=args.train_labels, patient_ids=args.train_patient_ids,
                            required=(), flag="--train-embeddings")
    queries = embeddings.load(args.embeddings, labels=args.labels, image_ids=args.image_ids, required=(),
                              flag="--embeddings")
    val = (embeddings.load(args.val_embeddings, labels=args.val_labels, required=(), flag="--val-embeddings")
           if args.val_embeddings else None)
    ood = [embeddings.load(p, required=(), flag="--ood-embeddings") for p in args.ood_embeddings or []]
    text = None
    if args.method == "mcm":
        text = read_text_embeddings(args.text_embeddings)
        if text.ndim != 2:
            raise ValueError(f"--text-embeddings {args.text_embeddings}: expected (C, D), got shape {text.shape}")
    d = train.dim
    for flag, s in [("--embeddings", queries), ("--val-embeddings", val)] + [("--ood-embeddings", o) for o in ood]:
        if s is not None and s.dim != d:
            raise ValueError(f"{flag} {s.name} has {s.dim}-d rows but --train-embeddings {train.name} has {d}-d; "
                             f"both must come from the same model")
    if text is not None and text.shape[1] != d:
        raise ValueError(f"--text-embeddings has {text.shape[1]}-d rows but the image embeddings are {d}-d")
    for flag, s in [("--embeddings", queries), ("--train-embeddings", train)]:
        margs = s.meta.get("model_args") or {}
        if args.method == "mcm" and (margs.get("conceptclip_head") or margs.get("encoder_head")):
            raise ValueError(f"{flag} {s.name} comes from {s.meta.get('model_name')} with a trainable head "
                             f"(--conceptclip-head / --encoder-head): the head moves the image embeddings out of the "
                             f"text space, so zero-shot mcm does not apply")
    # the model behind each set (embeddings.model_identity: a checkpoint by its hash or path, else name + args);
    # sets whose meta names no model (hand-made arrays) are not compared
    models = {s.name: s.model_identity for s in [train, queries] + ood if s.meta.get("model_name") is not None}
    if len(set(models.values())) > 1:
        notes.append(f"the embeddings come from different models/checkpoints "
                     f"({'; '.join(f'{n}: {m}' for n, m in models.items())}); their spaces do not match")
    names = _class_names(args, [train, queries, val], notes)
    if args.ood_classes is None:  # as checkpoint mode: the classes the model never saw are the OOD classes
        excluded, where = excluded_classes(train)
        if excluded:
            args.ood_classes = excluded
            notes.append(f"--ood-classes not given: {where}, so those are the OOD classes")
        elif excluded is None and where:
            notes.append(where)
    plan = make_plan(args, names, train, queries, val, None if text is None else len(text))
    plan.notes[:0] = notes
    return Inputs(train, queries, val, ood, {}, names, plan, text, str(args.train_embeddings))


def _embed(model, ds, args, device, desc, indices=None):
    """Rows in list order (of `indices` when given): embeddings.embed_dataset, one process."""
    return embeddings.embed_dataset(model, ds, device, args.eval_batch_size, args.workers,
                                    amp_dtype=resolve_amp(args.amp, device), progress=True, desc=desc,
                                    indices=indices, distributed=False)


def _label_set(ds, list_file):
    """A list's labels, ids and class names before its images are embedded (embeddings filled in later)."""
    return EmbeddingSet(None, np.asarray(ds.labels, np.int64), np.array(ds.image_ids, dtype=str),
                        np.array(ds.patient_ids, dtype=str), list(ds.class_names), {}, Path(list_file))


def inputs_from_checkpoint(args):
    """Lists and files are checked, the plan is made (k, classes), and only then are images embedded."""
    from torchvision import transforms
    from model import get_transform, load_checkpoint
    device = get_device(args.device)
    resolve_amp(args.amp, device)  # --amp fp16 on a CPU fails here, before any work
    tr_dir, te_dir = train_image_dir(args.dataset_dir), test_image_dir(args.dataset_dir, args.test_dataset_dir)
    train_ds = ImageListDataset(args.train_image_list, tr_dir, args.dataset)
    names = list(train_ds.class_names)
    test_ds = ImageListDataset(args.test_image_list, te_dir, args.dataset, class_names=names)
    val_ds = (ImageListDataset(args.val_image_list, tr_dir, args.dataset, class_names=names)
              if args.val_image_list else None)
    ood_ds = (ImageListDataset(args.ood_image_list, args.ood_dataset_dir or te_dir, "generic")
              if args.ood_image_list else None)
    model, ckpt = load_checkpoint(args.resume, map_location=device)
    notes = []
    excluded = (ckpt.get("args") or {}).get("exclude_classes")
    if args.ood_classes is None and excluded:
        args.ood_classes = list(excluded)
        notes.append(f"--ood-classes not given: the checkpoint was trained with --exclude-classes "
                     f"{' '.join(excluded)}, so those are the OOD classes")
    text = None
    if args.method == "mcm":
        text = (read_text_embeddings(args.text_embeddings) if args.text_embeddings is not None
                else class_text_embeddings(model, names, args.prompt_template))
        if text.ndim != 2 or text.shape[1] != model.embedding_dim:
            raise ValueError(f"text embeddings of shape {text.shape} do not match the {model.embedding_dim}-d model")
    train = _label_set(train_ds, args.train_image_list)
    queries = _label_set(test_ds, args.test_image_list)
    val = _label_set(val_ds, args.val_image_list) if val_ds is not None else None
    plan = make_plan(args, names, train, queries, val, None if text is None else len(text))
    plan.notes[:0] = notes
    far_names = parse_transforms(args.ood_transforms)
    id_rows = np.flatnonzero(plan.truth == "ID")
    if far_names and len(id_rows) == 0:
        raise ValueError("--ood-transforms: no ID test image to transform")

    # the work: every image through the checkpoint's model with its own eval transform
    print(f"model {ckpt['model_name']} ({model.embedding_dim}-d) from {args.resume} on {device}")
    tf = get_transform(model)

    def eval_ds(lst, folder, dataset=args.dataset, transform=tf, cache=args.cache_dir):
        return ImageListDataset(lst, folder, dataset, transform=transform, check_files=False, cache_dir=cache,
                                class_names=names if dataset != "generic" else None)

    train.embeddings = np.zeros((len(train_ds), model.embedding_dim), np.float32)
    train.embeddings[plan.train_keep] = _embed(model, eval_ds(args.train_image_list, tr_dir), args, device, "archive",
                                               indices=plan.train_keep)
    queries.embeddings = _embed(model, eval_ds(args.test_image_list, te_dir), args, device, "queries")
    if val is not None:
        val.embeddings = _embed(model, eval_ds(args.val_image_list, tr_dir), args, device, "validation")
    ood = []
    if ood_ds is not None:
        o = _label_set(ood_ds, args.ood_image_list)
        o.embeddings = _embed(model, eval_ds(args.ood_image_list, args.ood_dataset_dir or te_dir, "generic"),
                              args, device, "ood list")
        ood.append(o)
    far = {}
    for name in far_names:  # no cache: the copy is made from the decoded image, before the model's transform
        ds = eval_ds(args.test_image_list, te_dir, transform=transforms.Compose([FarOOD(name, args.seed), tf]),
                     cache=None)
        far[name] = _embed(model, ds, args, device, name, indices=id_rows)
    return Inputs(train, queries, val, ood, far, names, plan, text, str(args.resume))


# ----------------------------------------------------------------------------- outputs

def _fmt(v):
    return "n/a" if v is None else f"{v:.4f}"


def _rate(flags):
    return None if len(flags) == 0 else float(np.mean(flags))


def plot(path, id_scores, ood_scores, far_scores, threshold, method):
    """Left: score histograms (ID, OOD, far-OOD sets) with the threshold; right: ROC curves (OOD positive)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pytorch_ood.metrics import functional as F
    sets = [("ID", id_scores), ("OOD", ood_scores)] + [(f"far-OOD: {n}", s) for n, s in far_scores.items()]
    # one colour per set, fixed before anything is drawn, so a set looks the same in both panels
    sets = [(n, np.asarray(s), f"C{i}") for i, (n, s) in enumerate(sets) if len(s)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    allv = np.concatenate([s for _, s, _ in sets])
    bins = np.linspace(allv.min(), allv.max() + 1e-12, 31)
    for name, s, colour in sets:
        far = name.startswith("far")
        a.hist(s, bins=bins, histtype="step" if far else "stepfilled", alpha=1.0 if far else 0.45, density=True,
               color=colour, label=f"{name} ({len(s)})")
    a.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.4g}")
    a.set_xlabel(f"{method} score (larger = more unusual)"), a.set_ylabel("density"), a.legend(fontsize=8)
    a.set_title(f"{method} scores per set; flagged = score > threshold (dashed)", fontsize=9)
    b.plot([0, 1], [0, 1], color="0.7", lw=1)
    drawn = False
    for name, s, colour in sets[1:]:
        if len(id_scores) == 0:
            break
        sc = torch.as_tensor(np.concatenate([id_scores, s]))
        lab = torch.as_tensor(np.r_[np.zeros(len(id_scores)), -np.ones(len(s))])
        fpr, tpr, _ = F.roc_curve(sc, lab)
        auc = float(F.auroc(sc, lab))
        b.plot(fpr.numpy(), tpr.numpy(), color=colour, label=f"{name}: AUROC {auc:.3f}")
        b.plot([np.mean(id_scores > threshold)], [np.mean(s > threshold)], "o", color=colour, mec="k", ms=5)
        drawn = True
    if drawn:
        b.legend(fontsize=8, loc="lower right")
    else:
        b.text(0.5, 0.5, "no ID or no OOD rows:\nROC n/a", ha="center", va="center")
    b.set_xlabel("ID flagged (false positive rate)"), b.set_ylabel("OOD flagged (true positive rate)")
    b.set_title("ROC, OOD positive; dots: the calibrated threshold", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)  # atomic; closes the figure


def plain_args(args):
    return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
            for k, v in vars(args).items()}


def run(args):
    check_args(args)
    print_args(args)
    inp = inputs_from_files(args) if args.resume is None else inputs_from_checkpoint(args)
    plan, names = inp.plan, inp.class_names
    save_dir = ensure_writable_dir(args.save_dir)  # created only now, after every input check
    for n in plan.notes:
        print(f"note: {n}")

    train = inp.train.take(plan.train_keep)
    fit = train.take(plan.fit)
    text = None if inp.text is None else inp.text[plan.id_labels]  # MCM's softmax runs over the ID classes only
    device = get_device(args.device)
    det = fit_detector(args.method, fit.embeddings, fit.labels, k=args.k, knn_backend=args.knn_backend,
                       shrinkage=args.shrinkage if args.shrinkage == "auto" else float(args.shrinkage), text=text,
                       temperature=args.temperature, chunk_size=args.chunk_size, device=device)
    cal = inp.val.take(plan.val_keep).embeddings if inp.val is not None else train.take(plan.cal).embeddings
    threshold = det.calibrate(det.score(cal), args.accept)
    id_names = [class_name(names, c) for c in plan.id_labels] if plan.id_labels is not None else None
    desc = {"knn": f"knn (k={args.k}, {args.knn_backend})", "mcm": f"mcm (T={args.temperature:g})",
            "mahalanobis": f"mahalanobis (shrinkage {det.info.get('shrinkage', 0):.4g})"}[args.method]
    print(f"{desc} on {len(fit.embeddings) if args.method != 'mcm' else len(text)} "
          f"{'training rows' if args.method != 'mcm' else 'class prompts'} (ID classes: "
          f"{', '.join(id_names) if id_names else 'unknown'}); threshold {threshold:.6g} accepts "
          f"{det.info['calibration_accepted']} of {len(cal)} ID calibration rows ({plan.calibration})")

    # one pass over every row to score: queries, then --ood-embeddings rows, then the far-OOD copies
    blocks = [inp.queries.embeddings] + [o.embeddings for o in inp.ood] + list(inp.far.values())
    scores_all = det.score(np.concatenate(blocks))
    nq, no = len(inp.queries.embeddings), sum(len(o.embeddings) for o in inp.ood)
    q_scores, o_scores = scores_all[:nq], scores_all[nq:nq + no]
    far_scores, pos = {}, nq + no
    for name, e in inp.far.items():
        far_scores[name], pos = scores_all[pos:pos + len(e)], pos + len(e)
    truth = np.concatenate([plan.truth, np.full(no, "OOD", dtype=object)])
    main_scores = np.concatenate([q_scores, o_scores])
    flags = det.flag(main_scores)
    is_id, is_ood = truth == "ID", truth == "OOD"
    evaluated = is_id | is_ood
    res_metrics = ood_metrics(main_scores[evaluated], is_ood[evaluated])
    note = None
    if res_metrics["AUROC"] is None:
        note = ("n/a: no OOD rows (give --ood-classes present among the query labels, or --ood-embeddings)"
                if not is_ood.any() else "n/a: no ID rows among the queries")
        print(f"note: metrics {note}; scores and flags are still written")

    far = {}
    id_scores = main_scores[is_id]
    for name, s in far_scores.items():
        m = ood_metrics(np.concatenate([id_scores, s]), np.r_[np.zeros(len(id_scores), bool), np.ones(len(s), bool)])
        far[name] = {"num": len(s), "flagged": _rate(det.flag(s)), "metrics": m}

    def per_class(labels, sc, fl, cnames):
        out = {}
        for c in sorted(set(labels.tolist())):
            sel = labels == c
            out[class_name(cnames, c)] = {"num": int(sel.sum()), "flagged": _rate(fl[sel]),
                                          "mean_score": float(sc[sel].mean())}
        return out

    n_ood_cls = int((plan.truth == "OOD").sum())
    counts = {"train_rows": len(inp.train.labels) if inp.train.labels is not None else len(inp.train.embeddings),
              "train_rows_used": len(train.embeddings), "fit_rows": det.info["num_fit"],
              "calibration_rows": len(cal), "queries": nq, "id": int(is_id.sum()), "ood": int(is_ood.sum()),
              "ood_from_classes": n_ood_cls, "ood_embeddings": no, "other": int((truth == "other").sum()),
              "flagged": int(flags.sum()), "flagged_id": int(flags[is_id].sum()),
              "flagged_ood": int(flags[is_ood].sum())}
    result = {
        "method": args.method, "k": args.k if args.method == "knn" else None,
        "knn_backend": args.knn_backend if args.method == "knn" else None,
        "shrinkage": det.info.get("shrinkage"), "temperature": args.temperature if args.method == "mcm" else None,
        "convention": CONVENTION, "metrics": res_metrics, "metrics_note": note,
        "threshold": {"value": threshold, "accept": args.accept, "calibration": plan.calibration,
                      "num_calibration": len(cal), "calibration_accepted": det.info["calibration_accepted"]},
        "at_threshold": {"id_accepted": None if not is_id.any() else 1 - float(flags[is_id].mean()),
                         "ood_flagged": _rate(flags[is_ood])},
        "counts": counts, "id_classes": id_names, "ood_classes": [class_name(names, c) for c in plan.ood_ids],
        "per_class": per_class(inp.queries.labels, q_scores, flags[:nq], names)
        if inp.queries.labels is not None else None,
        "far_ood": far, "far_ood_params": {"blur_sigma_fraction": BLUR_SIGMA, "noise_std_fraction": NOISE_STD}
        if far else None,
        "notes": plan.notes, "source": inp.source, "seed": args.seed, "args": plain_args(args), "git": git_revision(),
    }

    # table
    print(f"\n{nq} queries: ID {int(is_id[:nq].sum())}, OOD {n_ood_cls}"
          + (f" (--ood-classes {', '.join(result['ood_classes'])})" if plan.ood_ids else "")
          + f", other {counts['other']}; --ood-embeddings rows {no}")
    print(f"flagged (score > {threshold:.6g}): {counts['flagged']} of {len(flags)}; ID "
          f"{counts['flagged_id']}/{counts['id']}, OOD {counts['flagged_ood']}/{counts['ood']}")
    print(f"{'metric':<24}{'value':>8}")
    for k in METRIC_KEYS:
        print(f"{k:<24}{_fmt(res_metrics[k]):>8}")
    if far:
        print(f"\nfar-OOD copies of the {len(id_scores)} ID queries:\n{'transform':<10}{'AUROC':>8}{'FPR@95TPR':>11}"
              f"{'flagged':>9}")
        for name, v in far.items():
            print(f"{name:<10}{_fmt(v['metrics']['AUROC']):>8}{_fmt(v['metrics']['FPR@95TPR']):>11}"
                  f"{_fmt(v['flagged']):>9}")
    print(f"convention: {CONVENTION['positive_class']}; FPR@95TPR = {CONVENTION['FPR@95TPR']}")

    # files: scores, csv, figure, then ood.json last (its presence means a complete run)
    atomic_np_save(save_dir / "ood_scores.npy", main_scores)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "set", "image_id", "label", "truth", "score", "flagged"])

    def rows(set_name, es, sc, tr, offset=0):
        ids = es.image_ids if es.image_ids is not None else np.arange(len(sc)).astype(str)
        labs = es.labels
        for i in range(len(sc)):
            lab = "" if labs is None else class_name(es.class_names or names, int(labs[i]))
            w.writerow(["" if offset is None else offset + i, set_name, ids[i], lab, tr[i], f"{sc[i]:.6g}",
                        int(sc[i] > threshold)])

    rows("query", inp.queries, q_scores, plan.truth)
    off = nq
    for o in inp.ood:
        rows(f"ood:{Path(o.name).name}", o, main_scores[off:off + len(o.embeddings)],
             ["OOD"] * len(o.embeddings), off)
        off += len(o.embeddings)
    id_rows = np.flatnonzero(plan.truth == "ID")
    for name, s in far_scores.items():
        rows(f"far:{name}", inp.queries.take(id_rows), s, ["OOD"] * len(s), None)  # not in ood_scores.npy
    atomic_write_text(save_dir / "ood_scores.csv", buf.getvalue())
    plot(save_dir / "ood.png", id_scores, main_scores[is_ood], far_scores, threshold, args.method)
    save_json(result, save_dir / "ood.json")
    print(f"\nwrote {save_dir / 'ood.json'}, ood_scores.npy ({len(main_scores)} rows), ood_scores.csv, ood.png")
    return 0


def main(args):
    return run_main(run, args, "ood.py")


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
