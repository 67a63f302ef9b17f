"""Concept profiles: which findings of the vocabulary (data/ontology/) an embedding shows, and why a result matched.

Linear concept probes on frozen embeddings (one scikit-learn logistic regression per concept, patient-grouped
cross-validated AUROC), concept profiles from saved probes or zero-shot from ConceptCLIP (image-text logits of a
prompt pair, plus 27 x 27 token concept maps) or from an encoder with a text tower (BiomedCLIP, MedSigLIP,
CLIP; probabilities only), and explanations of a query's top-k results in words.

    # 1. probes from embeddings (extract_embeddings.py output) and a concept-label CSV (image_id,CONCEPT,... 1/0/blank)
    python concepts.py probe --embeddings emb/demo.npy --concept-labels data/demo/concept_labels.csv --save-dir probes/demo
    #    CheXpert / ChestX-ray14 label files are read directly (mapped to the vocabulary):
    python concepts.py probe --embeddings emb/chexpert.npy --concept-labels CheXpert-v1.0/train.csv --save-dir probes/cx
    # 2. each image's concept probabilities, from the probes ...
    python concepts.py profile --probes probes/demo/probes.npz --embeddings emb/demo.npy --output profiles/demo.csv
    #    ... or zero-shot from ConceptCLIP, with the token-level concept maps (N, K, 27, 27)
    python concepts.py profile --conceptclip-path /models/ConceptCLIP --dataset-dir data/demo \
        --test-image-list data/demo/test_split.txt --output profiles/cc.csv --maps profiles/cc_maps.npz
    #    ... or zero-shot from an encoder with a text tower (biomedclip, medsiglip, clip; docs/models.md)
    python concepts.py profile --model biomedclip --pretrained-weights /models/BiomedCLIP --dataset-dir data/demo \
        --test-image-list data/demo/test_split.txt --output profiles/bmc.csv
    # 3. a query's top-k results explained: shared findings, findings of one side only, codes, span share
    python concepts.py explain --embeddings emb/demo.npy --probes probes/demo/probes.npz --query demo0003-0 demo0007-1 \
        --k 5 --exclude-same-patient --save-dir explain/demo
    CPU: add --device cpu (only the zero-shot paths use the device; --eval-batch-size images per forward pass).

Embedding sets are read by embeddings.load: X.npy with its image ids file beside it (patient ids, labels and meta
when present), as extract_embeddings.py writes them.
Writes: probe -> SAVE_DIR/probes.npz (concepts, weights (K, D), bias (K,), model, embedding_dim) and
SAVE_DIR/probes.json ({"concepts": {NAME: {"auroc", "n_pos", "n_neg", "folds", "folds_used", "folds_dropped",
"n_scored", "split_seed", "note"}}, ...}); profile -> OUTPUT (image_id,CONCEPT,... probabilities) [and --maps NPZ];
explain -> SAVE_DIR/explain_{query}.json and .md for each --query.
Nothing is overwritten without --overwrite.
"""
import argparse
from pathlib import Path

import numpy as np

import embeddings
import metrics
from ontology import LABEL_FORMATS, VOCAB_DIR, load_vocabulary, read_concept_labels, write_concept_csv
from utils import (HelpFormatter, _atomic_replace, atomic_write_text, ensure_writable_dir, get_device,
                   get_runtime_parser, git_revision, run_main, save_json)

PROMPT_POS = "a chest radiograph showing {}"
PROMPT_NEG = "a chest radiograph with no {}"


# --------------------------------------------------------------------------- inputs

NO_META = "unknown (no meta file beside the embeddings)"


def load_set(path):
    """An embedding set with image ids (concept labels, profiles and queries are matched to rows by id), checked by
    embeddings.load: lengths, NaN/inf rows, repeated ids, labels and class names. Patient ids, labels, meta: optional."""
    es = embeddings.load(path, required=(), flag="--embeddings")
    if es.image_ids is None:
        raise ValueError(f"{embeddings.sidecar_paths(path)['image_ids']} not found: concept labels are matched to "
                         f"embeddings by image id (extract_embeddings.py writes it beside the embeddings)")
    return es


def model_tag(meta):
    """The embedding model as one string: embeddings.model_identity (a checkpoint by its sha256, or by its path in
    older meta files; else model name and arguments), so probes of one model are not applied to another's sets."""
    tag = embeddings.model_identity(meta)
    return NO_META if tag is None else tag


def legacy_model_tag(meta):
    """The tag probes.npz files written before issue 20 carry: 'NAME (CHECKPOINT)'. Only a checkpoint path names
    one model (without one, two fusion heads shared a tag), so it is accepted for an older meta with "resume" only."""
    if not meta or "meta_version" in meta or not meta.get("resume"):
        return None
    return f"{meta.get('model_name', '?')} ({meta['resume']})"


def match_labels(image_ids, labels):
    """Align label rows to embedding rows by image id -> ((N, K) values with NaN where unlabelled, notes)."""
    pos = {iid: i for i, iid in enumerate(image_ids)}
    rows = np.array([pos.get(i, -1) for i in labels.image_ids])
    notes = []
    missing = labels.image_ids[rows < 0]
    if len(missing) == len(rows):
        raise ValueError(f"{labels.source}: none of its {len(rows)} image ids is in the embeddings (first: "
                         f"{[str(m) for m in missing[:3]]}, embeddings: {[str(i) for i in image_ids[:3]]}); label and embed the same images "
                         f"(embedding ids are filename stems, or the last three path parts when stems repeat)")
    if len(missing):
        notes.append(f"{len(missing)} labelled images are not in the embeddings and are ignored "
                     f"(first: {', '.join(missing[:5])})")
    vals = np.full((len(image_ids), len(labels.concepts)), np.nan)
    vals[rows[rows >= 0]] = labels.values[rows >= 0]
    unl = len(image_ids) - int((rows >= 0).sum())
    if unl:
        notes.append(f"{unl} of {len(image_ids)} embedded images have no label row (unknown for every concept)")
    return vals, notes


# --------------------------------------------------------------------------- probes

SPLIT_TRIES = 10  # shuffle seeds tried for a split whose every training part holds both classes


def cv_splits(y, groups, k, seed):
    """Patient-grouped stratified folds in which every training part holds both classes -> (splits, seed used).

    StratifiedGroupKFold can put all images of one class in one fold (few patients, patients with both values);
    that fold's model could not be fitted. Seeds seed, seed + 1, ... are tried (SPLIT_TRIES); when none works,
    the last split is returned and cv_auroc drops the fold that cannot be fitted.
    """
    from sklearn.model_selection import StratifiedGroupKFold
    for s in range(seed, seed + SPLIT_TRIES):
        splits = list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=s).split(y, y, groups))
        if all(len(np.unique(y[tr])) == 2 for tr, _ in splits):
            break
    return splits, s


def cv_auroc(x, y, splits, C=1.0):
    """AUROC of the pooled out-of-fold probabilities -> (auroc or None, folds used, folds dropped, rows scored).

    Only comparable scores are pooled: each fold's logistic-regression probability of its held-out rows. A fold
    whose training part holds one class has no model; it is dropped and its rows are not scored (a constant
    stand-in pooled with other folds' scores would make the AUROC depend on an arbitrary number). Its held-out
    part then holds every image of the missing class, so the rows left hold one class: no AUROC (None).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    oof = np.full(len(y), np.nan)
    used = dropped = 0
    for tr, te in splits:
        if len(np.unique(y[tr])) < 2:
            dropped += 1
            continue
        m = LogisticRegression(C=C, class_weight="balanced", max_iter=2000).fit(x[tr], y[tr])
        oof[te] = m.predict_proba(x[te])[:, list(m.classes_).index(1)]
        used += 1
    scored = np.isfinite(oof)
    auroc = float(roc_auc_score(y[scored], oof[scored])) if len(np.unique(y[scored])) == 2 else None
    return auroc, used, dropped, int(scored.sum())


def fit_probes(emb, values, concepts, groups, folds=5, C=1.0, seed=0):
    """One logistic regression per concept on the known rows; AUROC from patient-grouped CV predictions.

    emb (N, D); values (N, K) 1/0/NaN; groups (N,) patient (or image) ids. Returns (results dict per concept,
    weights (K', D), bias (K',), ids of the K' concepts that got a probe). The CV AUROC pools the out-of-fold
    probabilities of StratifiedGroupKFold(min(folds, groups per class)) (cv_splits, cv_auroc); each result
    records the folds, the folds used and dropped, the rows scored and the split's seed. A concept with one
    value, or fewer than two patients of each value, gets no probe and a note.
    """
    from sklearn.linear_model import LogisticRegression
    results, weights, bias, kept = {}, [], [], []
    groups = np.asarray(groups).astype(str)
    for j, cid in enumerate(concepts):
        known = np.isfinite(values[:, j])
        y = values[known, j].astype(int)
        n_pos, n_neg = int(y.sum()), int((1 - y).sum())
        res = {"auroc": None, "n_pos": n_pos, "n_neg": n_neg, "folds": 0, "folds_used": 0, "folds_dropped": 0,
               "n_scored": 0, "split_seed": None, "note": ""}
        results[cid] = res
        if n_pos == 0 or n_neg == 0:
            res["note"] = f"only one value (n_pos={n_pos}, n_neg={n_neg}): no probe"
            continue
        x, g = emb[known], groups[known]
        k = min(folds, len(np.unique(g[y == 1])), len(np.unique(g[y == 0])))
        if k < 2:
            res["note"] = (f"fewer than two patients with each value (n_pos={n_pos}, n_neg={n_neg}): "
                           f"no cross-validation, no probe")
            continue
        splits, res["split_seed"] = cv_splits(y, g, k, seed)
        res["auroc"], res["folds_used"], res["folds_dropped"], res["n_scored"] = cv_auroc(x, y, splits, C)
        res["folds"] = int(k)
        if res["split_seed"] != seed and not res["folds_dropped"]:
            res["note"] = (f"the split of seed {seed} left a training part with one class; "
                           f"folds of seed {res['split_seed']}")
        if res["folds_dropped"]:
            res["note"] = (f"{res['folds_dropped']} of {k} folds dropped (a training part with one class in "
                           f"{SPLIT_TRIES} split seeds); " + ("no cross-validated AUROC" if res["auroc"] is None
                                                             else f"AUROC of {res['n_scored']} rows"))
        m = LogisticRegression(C=C, class_weight="balanced", max_iter=2000).fit(x, y)
        weights.append(m.coef_[0])
        bias.append(m.intercept_[0])
        kept.append(cid)
    d = emb.shape[1]
    return (results, np.array(weights, np.float32).reshape(-1, d), np.array(bias, np.float32), kept)


def probe_profile(emb, weights, bias):
    """(N, K) concept probabilities sigmoid(e . w + b) of linear probes."""
    z = np.asarray(emb, np.float64) @ np.asarray(weights, np.float64).T + np.asarray(bias, np.float64)
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def load_probes(path):
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--probes {path}: file not found (written by concepts.py probe)")
    z = np.load(path, allow_pickle=False)
    for key in ("concepts", "weights", "bias", "model"):
        if key not in z:
            raise ValueError(f"--probes {path}: no '{key}' array; not a probes.npz of concepts.py probe")
    return {"concepts": [str(c) for c in z["concepts"]], "weights": z["weights"], "bias": z["bias"],
            "model": str(z["model"])}


def check_same_model(probes, es, probes_path):
    d = probes["weights"].shape[1]
    if es.dim != d:
        raise ValueError(f"--probes {probes_path} were fitted on {d}-d embeddings but {es.name} is {es.dim}-d; "
                         f"use embeddings of the model the probes were fitted on")
    tag = model_tag(es.meta)
    if es.meta and probes["model"] not in (tag, legacy_model_tag(es.meta)):
        raise ValueError(f"--probes {probes_path} were fitted on embeddings of {probes['model']}, but "
                         f"{es.name} comes from {tag}; fit probes on this model's embeddings")


# --------------------------------------------------------------------------- span share

def span_parts(query, results, directions):
    """(cosines (M,), the part of each cosine inside the span of the directions (M,)); see span_share."""
    q = np.asarray(query, np.float64)
    r = np.atleast_2d(np.asarray(results, np.float64))
    q = q / np.linalg.norm(q)
    r = r / np.linalg.norm(r, axis=1, keepdims=True)
    w = np.atleast_2d(np.asarray(directions, np.float64))
    u, s, _ = np.linalg.svd(w.T, full_matrices=False)   # (D, K): an orthonormal basis of the span
    basis = u[:, s > s.max() * 1e-10] if s.size and s.max() > 0 else u[:, :0]
    return r @ q, (r @ basis) @ (basis.T @ q)


def span_share(query, results, directions):
    """Share of each cosine q . r that the span of the concept directions (rows of ``directions``) holds, in [0, 1].

    With P the orthogonal projection onto span(directions), q . r = a + b with a = (Pq) . (Pr) (in the span) and
    b = ((I-P)q) . ((I-P)r) (the rest of the embedding). The share is |a| / (|a| + |b|): 1 for vectors inside the
    span, 0 when either is orthogonal to it, a / (q . r) when a and b have one sign. The plain ratio a / (q . r)
    is not used: it leaves [0, 1] when a and b have opposite signs and explodes as the cosine nears 0 (a table
    printed -6.62). q (D,) and r (M, D) are L2-normalised here; NaN where a = b = 0.
    """
    cos, inside = span_parts(query, results, directions)
    outside = np.abs(cos - inside)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.abs(inside) + outside > 1e-12, np.abs(inside) / (np.abs(inside) + outside), np.nan)


# --------------------------------------------------------------------------- ConceptCLIP zero-shot

def concept_text_embeddings(encode_text, vocab, concept_ids):
    """(K, D) unit text embeddings of the positive and of the negative prompt of each concept.

    A concept's embedding is the mean of the unit embeddings of its prompts, one per term (name and synonyms):
    positive "a chest radiograph showing X", negative "a chest radiograph with no X". `encode_text(prompts)
    -> (T, D)` is the model's text tower (model.py's encoders with a text tower have it; for ConceptCLIP,
    conceptclip_text_encoder).
    """
    import torch
    import torch.nn.functional as F

    def one(template, cid):
        out = torch.as_tensor(encode_text([template.format(t) for t in vocab.prompt_terms(cid)]))
        return F.normalize(F.normalize(out.float(), dim=-1).mean(0), dim=0)

    with torch.no_grad():
        return (torch.stack([one(PROMPT_POS, c) for c in concept_ids]),
                torch.stack([one(PROMPT_NEG, c) for c in concept_ids]))


def conceptclip_text_encoder(clip, processor, device):
    """encode_text(prompts) -> (T, D) of the ConceptCLIP remote model: ``processor(text=[...])["input_ids"]`` and
    ``clip.encode_text(input_ids)`` (or a tuple, first item)."""
    def encode(prompts):
        tok = processor(text=prompts, padding=True, truncation=True, return_tensors="pt")
        out = clip.encode_text(tok["input_ids"].to(device))
        return out[0] if isinstance(out, (tuple, list)) else out
    return encode


def pair_probability(image, pos, neg, scale):
    """sigmoid(scale * (cos(image, pos) - cos(image, neg))): the softmax over one concept's prompt pair of
    scale * cosine, as CLIP-style zero-shot classification. image (B, D) and pos, neg (K, D) unit rows."""
    import torch
    return torch.sigmoid(scale * (image @ pos.T - image @ neg.T))


def conceptclip_concepts(clip, images, pos, neg, device):
    """Zero-shot concept probabilities (B, K) and token concept maps (B, K, g, g) of a ConceptCLIP-like model.

    Image side (as the toolkit's ConceptCLIP wrapper reads it): ``encode_image(pixel values) -> (pooled (B, D),
    tokens (B, N, D))`` with N = g x g patch tokens (27 x 27 at 384 px; SigLIP has no class token, so none is
    dropped); ``logit_scale`` is the log of the temperature, as in CLIP/SigLIP. Probability = softmax over the
    prompt pair of scale * cosine = sigmoid(scale * (cos_pos - cos_neg)). Map = tokens . unit positive text
    embedding (no gradients). images (B, 3, S, S) already transformed; pos, neg (K, D) from
    concept_text_embeddings.
    """
    import torch
    import torch.nn.functional as F
    with torch.no_grad():
        pooled, tokens = clip.encode_image(images.to(device))
        pooled = F.normalize(pooled.float(), dim=-1)                               # (B, D)
        if tokens.shape[-1] != pos.shape[-1]:
            raise ValueError(f"ConceptCLIP token features are {tokens.shape[-1]}-d but text features "
                             f"{pos.shape[-1]}-d; no token concept map is possible")
        prob = pair_probability(pooled, pos, neg, clip.logit_scale.float().exp())  # (B, K)
        n = tokens.shape[1]
        g = int(round(n ** 0.5))
        if g * g != n:
            raise ValueError(f"ConceptCLIP gives {n} image tokens, not a square grid; cannot draw concept maps")
        maps = (tokens.float() @ pos.T).permute(0, 2, 1).reshape(len(images), pos.shape[0], g, g)
    return prob.cpu().numpy(), maps.cpu().numpy()


def conceptclip_profile(args, vocab, concept_ids):
    """Profile of every image of --test-image-list with ConceptCLIP (model.py's wrapper loads it)."""
    import torch
    from transformers import AutoProcessor
    from dataset import ImageListDataset, test_image_dir
    from model import build_model, get_transform
    image_dir = test_image_dir(args.dataset_dir, args.test_dataset_dir)
    ImageListDataset(args.test_image_list, image_dir, dataset=args.dataset)      # list and files checked first
    wrapper = build_model("conceptclip", conceptclip_path=args.conceptclip_path).eval()
    processor = AutoProcessor.from_pretrained(str(args.conceptclip_path), trust_remote_code=True)
    device = get_device(args.device)
    clip = wrapper.clip.to(device).eval()
    ds = ImageListDataset(args.test_image_list, image_dir, dataset=args.dataset, transform=get_transform(wrapper),
                          check_files=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.eval_batch_size, shuffle=False, num_workers=args.workers)
    pos, neg = concept_text_embeddings(conceptclip_text_encoder(clip, processor, device), vocab,
                                       concept_ids)  # once, not per batch
    probs, maps = [], []
    for images, _, _ in loader:
        p, m = conceptclip_concepts(clip, images, pos, neg, device)
        probs.append(p)
        maps.append(m)
    return np.array(ds.image_ids), np.concatenate(probs), np.concatenate(maps)


def encoder_profile(args, vocab, concept_ids):
    """Zero-shot profile of every image of --test-image-list with a model.py encoder that has a text tower
    (--model biomedclip / medsiglip / clip): image embeddings as extract_embeddings.py writes them (unit, no
    head), the prompt pairs through the model's own text tower, its own logit scale."""
    import torch
    from dataset import ImageListDataset, test_image_dir
    from embeddings import embed_dataset
    from model import MODELS, build_model, check_weights, get_transform
    cls = MODELS.get(args.model)
    if cls is None or not getattr(cls, "has_text_tower", False):
        known = sorted(n for n, c in MODELS.items() if getattr(c, "has_text_tower", False))
        raise ValueError(f"--model {args.model}: no text tower for zero-shot concepts; choose one of {known} "
                         f"(or --conceptclip-path, or --probes with --embeddings)")
    image_dir = test_image_dir(args.dataset_dir, args.test_dataset_dir)
    ImageListDataset(args.test_image_list, image_dir, dataset=args.dataset)      # list and files checked first
    margs = {"pretrained_weights": args.pretrained_weights, "pretrained": True}
    check_weights(args.model, margs)
    device = get_device(args.device)
    wrapper = build_model(args.model, **margs).eval().to(device)
    ds = ImageListDataset(args.test_image_list, image_dir, dataset=args.dataset, transform=get_transform(wrapper),
                          check_files=False)
    images = torch.from_numpy(embed_dataset(wrapper, ds, device, batch_size=args.eval_batch_size,
                                            workers=args.workers, normalize=True)).to(device)
    pos, neg = concept_text_embeddings(wrapper.encode_text, vocab, concept_ids)  # no_grad inside
    prob = pair_probability(images, pos.to(device), neg.to(device), wrapper.logit_scale())
    return np.array(ds.image_ids), prob.cpu().numpy()


# --------------------------------------------------------------------------- explanations

def _shown(vocab, concepts, row, thr):
    """{finding id: [modifier names]} of one image: values >= thr; modifiers are image-level."""
    on = [c for c, v in zip(concepts, row) if np.isfinite(v) and v >= thr]
    mods = [c for c in on if vocab.kind(c) == "modifier"]
    if "bilateral" in mods:  # bilateral says right and left already
        mods = [m for m in mods if m not in ("right", "left")]
    return {c: mods for c in on if vocab.kind(c) != "modifier"}, mods


def _with_codes(vocab, cid):
    code = vocab.code_text(cid)
    return f"{vocab.name(cid)} ({code})" if code else vocab.name(cid)


def _mods(vocab, mods):
    return ", ".join(vocab.name(m) for m in mods)


def explain_pair(vocab, concepts, qrow, rrow, thr):
    """Shared findings and findings of one side only, with laterality/zone/... where known."""
    qf, qm = _shown(vocab, concepts, qrow, thr)
    rf, rm = _shown(vocab, concepts, rrow, thr)
    # a finding whose descendant is also shown is implied by it; list the most specific ones
    def specific(f):
        return [c for c in f if not any(c in vocab.ancestors(o) for o in f if o != c)]
    qs, rs = specific(qf), specific(rf)
    shared = [c for c in qs if c in rs]
    return {"shared": [{"concept": c, "name": vocab.name(c), "codes": vocab.code_text(c),
                        "query_modifiers": [vocab.name(m) for m in qm],
                        "result_modifiers": [vocab.name(m) for m in rm]} for c in shared],
            "query_only": [{"concept": c, "name": vocab.name(c), "codes": vocab.code_text(c),
                            "modifiers": [vocab.name(m) for m in qm]} for c in qs if c not in rs],
            "result_only": [{"concept": c, "name": vocab.name(c), "codes": vocab.code_text(c),
                             "modifiers": [vocab.name(m) for m in rm]} for c in rs if c not in qs]}


def summary_sentence(vocab, rank, rid, cos, pair, share, inside=None):
    def part(items, key):
        out = []
        for it in items:
            mods = it[key] if isinstance(key, str) else it["query_modifiers"]
            out.append(_with_codes(vocab, it["concept"]) + (f" [{', '.join(mods)}]" if mods else ""))
        return "; ".join(out)
    s = f"Result {rank} ({rid}, cosine {cos:.3f})"
    s += (f" shares {part(pair['shared'], None)} with the query" if pair["shared"] else " shares no finding of the "
          "vocabulary with the query")
    if pair["query_only"]:
        s += f"; only the query shows {part(pair['query_only'], 'modifiers')}"
    if pair["result_only"]:
        s += f"; only the result shows {part(pair['result_only'], 'modifiers')}"
    if share is not None and inside is not None and inside * (cos - inside) >= 0:
        s += f"; {100 * share:.0f}% of the cosine lies in the span of the concept directions"
    elif share is not None and inside is not None:  # parts of opposite sign: a percentage of the cosine says little
        s += (f"; the span of the concept directions contributes {inside:+.3f} to the cosine and the rest of the "
              f"embedding {cos - inside:+.3f} (the span holds {100 * share:.0f}% of the two parts' sizes)")
    return s + "."


# --------------------------------------------------------------------------- CLI

def get_args_parser():
    fmt = HelpFormatter
    p = argparse.ArgumentParser(description="Concept probes, profiles and explanations", formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--vocabulary", type=Path, default=VOCAB_DIR, help="folder holding findings.tsv")
    common.add_argument("--seed", type=int, default=0, help="seed of the CV folds (recorded in the outputs)")
    common.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    q = sub.add_parser("probe", parents=[common], formatter_class=fmt, help="fit linear concept probes")
    q.add_argument("--embeddings", type=Path, required=True, help="embedding set X.npy with its image ids beside it")
    q.add_argument("--concept-labels", type=Path, required=True,
                   help="image_id,CONCEPT,... CSV (1/0/blank), a CheXpert or a ChestX-ray14 label file")
    q.add_argument("--label-format", default="auto", choices=LABEL_FORMATS, help="format of --concept-labels")
    q.add_argument("--chexpert-uncertain", default="unknown", choices=["unknown", "positive", "negative"],
                   help="what CheXpert's -1 (uncertain) becomes")
    q.add_argument("--folds", type=int, default=5, help="patient-grouped CV folds (fewer when few patients)")
    q.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regressions")
    q.add_argument("--save-dir", type=Path, required=True, help="writes probes.npz and probes.json here")

    f = sub.add_parser("profile", parents=[common, get_runtime_parser(flags=("device", "eval_batch_size"))],
                       formatter_class=fmt, help="concept probabilities per image")
    f.add_argument("--probes", type=Path, default=None, help="probes.npz of concepts.py probe")
    f.add_argument("--embeddings", type=Path, default=None, help="embeddings to profile (with --probes)")
    f.add_argument("--conceptclip-path", default=None, help="zero-shot with ConceptCLIP (HF id or folder)")
    f.add_argument("--model", default=None,
                   help="zero-shot with a model.py encoder that has a text tower: biomedclip, medsiglip, clip")
    f.add_argument("--pretrained-weights", default=None,
                   help="with --model: its local folder or hub id (default: the official id, docs/models.md)")
    f.add_argument("--concepts", nargs="+", default=None,
                   help="concepts for zero-shot; not given: every finding, disease and modifier")
    f.add_argument("--dataset", default="covid", help="label map of the image list (zero-shot paths)")
    f.add_argument("--dataset-dir", type=Path, default=None, help="image root (zero-shot paths)")
    f.add_argument("--test-dataset-dir", type=Path, default=None, help="test image folder (zero-shot paths)")
    f.add_argument("--test-image-list", type=Path, default=None, help="images to profile (zero-shot paths)")
    f.add_argument("--batch-size", dest="eval_batch_size", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="older name of --eval-batch-size (images per ConceptCLIP forward pass)")
    f.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    f.add_argument("--maps", type=Path, default=None, help="ConceptCLIP token concept maps (N, K, g, g) to this .npz")
    f.add_argument("--output", type=Path, required=True, help="image_id,CONCEPT,... probabilities (CSV)")

    e = sub.add_parser("explain", parents=[common], formatter_class=fmt, help="explain a query's top-k results")
    e.add_argument("--embeddings", type=Path, required=True, help="the gallery (leave-one-out: query included)")
    e.add_argument("--probes", type=Path, default=None, help="probes.npz: profiles and the span share")
    e.add_argument("--profile", type=Path, default=None,
                   help="instead of --probes: a profile or label CSV (image_id,CONCEPT,...)")
    e.add_argument("--query", nargs="+", required=True,
                   help="image ids of the queries (or row numbers); one explain_{query}.json/.md each")
    e.add_argument("--k", type=int, default=5, help="results to explain")
    e.add_argument("--threshold", type=float, default=0.5, help="a concept is shown at probability >= this")
    e.add_argument("--exclude-same-patient", action="store_true", help="drop the query's other images")
    e.add_argument("--save-dir", type=Path, required=True, help="writes explain_{query}.json and .md here")
    return p


def _refuse_existing(paths, overwrite):
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise ValueError(f"{', '.join(existing)} already exist(s); choose another output or pass --overwrite")


def run_probe(args, vocab):
    if args.folds < 2:
        raise ValueError(f"--folds must be >= 2, got {args.folds}")
    out_npz, out_json = args.save_dir / "probes.npz", args.save_dir / "probes.json"
    _refuse_existing([out_npz, out_json], args.overwrite)
    es = load_set(args.embeddings)
    labels = read_concept_labels(args.concept_labels, vocab, args.label_format, args.chexpert_uncertain)
    values, notes = match_labels(es.image_ids, labels)
    groups = es.patient_ids if es.patient_ids is not None else es.image_ids
    for n in notes + ([] if es.patient_ids is not None else
                      [f"no patient ids beside the embeddings ({embeddings.sidecar_paths(es.path)['patient_ids']} "
                       f"not found): folds are grouped by image id"]):
        print(f"note: {n}")
    emb = es.embeddings / np.linalg.norm(es.embeddings, axis=1, keepdims=True)
    results, w, b, kept = fit_probes(emb, values, labels.concepts, groups, args.folds, args.C, args.seed)
    ensure_writable_dir(args.save_dir)
    tag = model_tag(es.meta)
    _atomic_replace(out_npz, lambda fh: np.savez(fh, concepts=np.array(kept), weights=w, bias=b, model=np.array(tag),
                                                 embedding_dim=np.array(emb.shape[1])))
    for cid, r in results.items():
        r["name"], r["codes"] = vocab.name(cid), vocab.code_text(cid)
    save_json({"concepts": results, "model": tag, "embeddings": str(args.embeddings),
               "concept_labels": str(args.concept_labels), "folds": args.folds, "C": args.C, "seed": args.seed,
               "grouped_by": "patient" if es.patient_ids is not None else "image", "notes": notes,
               "git_revision": git_revision()}, out_json)
    print(f"\nprobes on {emb.shape[0]} embeddings of {tag}, {emb.shape[1]}-d")
    print(f"{'concept':<24}{'AUROC':>7}{'n_pos':>7}{'n_neg':>7}{'folds':>7}  note")
    for cid, r in results.items():
        auc = "n/a" if r["auroc"] is None else f"{r['auroc']:.3f}"
        folds = f"{r['folds_used']}/{r['folds']}" if r["folds"] else "-"  # folds used / folds made
        print(f"{cid:<24}{auc:>7}{r['n_pos']:>7}{r['n_neg']:>7}{folds:>7}  {r['note']}")
    print(f"\nwrote {out_npz} ({len(kept)} probes) and {out_json}")
    return 0


def run_profile(args, vocab):
    if sum(x is not None for x in (args.probes, args.conceptclip_path, args.model)) != 1:
        raise ValueError("give exactly one of --probes P.npz (with --embeddings), --conceptclip-path DIR or "
                         "--model NAME (an encoder with a text tower: biomedclip, medsiglip, clip)")
    if args.pretrained_weights is not None and args.model is None:
        raise ValueError("--pretrained-weights goes with --model (zero-shot with a model.py encoder)")
    if args.eval_batch_size < 1:
        raise ValueError(f"--eval-batch-size must be >= 1, got {args.eval_batch_size}")
    outs = [args.output] + ([args.maps] if args.maps else [])
    _refuse_existing(outs, args.overwrite)
    if args.probes is not None:
        if args.embeddings is None:
            raise ValueError("--probes needs --embeddings X.npy (the images to profile)")
        if args.maps is not None:
            raise ValueError("--maps needs --conceptclip-path: linear probes on pooled embeddings have no map")
        probes = load_probes(args.probes)
        es = load_set(args.embeddings)
        check_same_model(probes, es, args.probes)
        ids, concepts = es.image_ids, probes["concepts"]
        prob = probe_profile(es.embeddings / np.linalg.norm(es.embeddings, axis=1, keepdims=True),
                             probes["weights"], probes["bias"])
        source = f"probes {args.probes}"
    else:
        flag = "--conceptclip-path" if args.model is None else "--model"
        if args.model is not None and args.maps is not None:
            raise ValueError("--maps needs --conceptclip-path: the token concept maps are ConceptCLIP's (its image "
                             "tokens live in the text space); --model gives the probabilities only")
        if args.test_image_list is None or (args.dataset_dir is None and args.test_dataset_dir is None):
            raise ValueError(f"{flag} needs --test-image-list and --dataset-dir (or --test-dataset-dir)")
        names = args.concepts or [c for c, v in vocab.concepts.items() if v.kind != "group"]
        concepts = []
        for n in names:
            if vocab.resolve(n) is None:
                raise ValueError(f"--concepts: {n!r} is not a concept of {args.vocabulary / 'findings.tsv'}")
            concepts.append(vocab.resolve(n))
        if args.model is not None:
            ids, prob = encoder_profile(args, vocab, concepts)
            source = f"{args.model} zero-shot {args.pretrained_weights or 'official weights'}"
        else:
            ids, prob, maps = conceptclip_profile(args, vocab, concepts)
            source = f"ConceptCLIP zero-shot {args.conceptclip_path}"
        if args.maps is not None:
            ensure_writable_dir(Path(args.maps).parent, "--maps")
            _atomic_replace(args.maps, lambda fh: np.savez(fh, maps=maps.astype(np.float32), image_ids=ids,
                                                           concepts=np.array(concepts)))
    ensure_writable_dir(Path(args.output).parent, "--output")
    atomic_write_text(args.output, write_concept_csv(args.output, ids, concepts, prob))
    print(f"{source}: {len(ids)} images x {len(concepts)} concepts -> {args.output}"
          + (f" (+ maps {args.maps})" if args.maps else ""))
    mean = prob.mean(axis=0)
    for c, m in sorted(zip(concepts, mean), key=lambda t: -t[1])[:10]:
        print(f"  {c:<24} mean probability {m:.3f}")
    return 0


def query_rows(queries, ids, flag_file):
    """Row of each --query (an image id, else a row number); a repeated query is an error."""
    rows = []
    for q in queries:
        hits = np.flatnonzero(ids == q)
        if len(hits) == 0 and not (q.isdigit() and int(q) < len(ids)):
            raise ValueError(f"--query {q!r} is not an image id of {flag_file} (first ids: {', '.join(ids[:3])}) "
                             f"nor a row number below {len(ids)}")
        r = int(hits[0]) if len(hits) else int(q)
        if r in rows:
            raise ValueError(f"--query {q!r} names image {ids[r]!r} again; give each query once")
        rows.append(r)
    return rows


def explain_query(args, vocab, es, emb, qi, concepts, values, directions):
    """(explain json dict, markdown lines) of one query's top-k results."""
    ids = es.image_ids
    exclude = np.zeros(len(ids), bool)
    exclude[qi] = True  # leave-one-out: the query itself, by index
    if args.exclude_same_patient:
        exclude |= es.patient_ids == es.patient_ids[qi]
    # the same top-k (and tie rule: equal similarities by gallery index) as metrics.rank
    top = metrics.topk_from_similarity((emb @ emb[qi])[None, :], args.k, exclude_mask=exclude[None, :])[0]
    cos = emb[top] @ emb[qi]
    shares = insides = None
    if directions is not None and len(directions):
        shares, insides = span_share(emb[qi], emb[top], directions), span_parts(emb[qi], emb[top], directions)[1]
    lab_names = es.class_names
    label = (lambda i: (lab_names[es.labels[i]] if lab_names else str(es.labels[i]))
             if es.labels is not None else None)
    qf, qm = _shown(vocab, concepts, values[qi], args.threshold)
    out = {"query": {"image_id": str(ids[qi]), "label": label(qi),
                     "findings": [vocab.name(c) for c in qf], "modifiers": [vocab.name(m) for m in qm]},
           "k": args.k, "threshold": args.threshold, "tie_rule": metrics.TIE_RULE,
           "exclude_same_patient": bool(args.exclude_same_patient), "model": model_tag(es.meta), "seed": args.seed,
           "concept_source": str(args.probes or args.profile), "results": []}
    md = [f"# Query {ids[qi]}" + (f" ({label(qi)})" if label(qi) else ""), "",
          f"Findings (probability >= {args.threshold}): " + (", ".join(out["query"]["findings"]) or "none")
          + (f"; modifiers: {', '.join(out['query']['modifiers'])}" if qm else ""), "",
          "| rank | image | label | cosine | shared | query only | result only | span share | in span / rest |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for j, (gi, c) in enumerate(zip(top, cos), 1):
        pair = explain_pair(vocab, concepts, values[qi], values[gi], args.threshold)
        share = None if shares is None or not np.isfinite(shares[j - 1]) else float(shares[j - 1])
        inside = None if insides is None else float(insides[j - 1])
        sent = summary_sentence(vocab, j, str(ids[gi]), float(c), pair, share, inside)
        out["results"].append({"rank": j, "image_id": str(ids[gi]), "label": label(gi), "cosine": float(c),
                               **pair, "span_share": share, "cosine_in_span": inside,
                               "cosine_outside_span": None if inside is None else float(c) - inside,
                               "summary": sent})
        cell = lambda items: ", ".join(it["name"] for it in items) or "-"  # noqa: E731
        md.append(f"| {j} | {ids[gi]} | {label(gi) or ''} | {c:.3f} | {cell(pair['shared'])} | "
                  f"{cell(pair['query_only'])} | {cell(pair['result_only'])} | "
                  f"{'-' if share is None else f'{share:.2f}'} | "
                  f"{'-' if inside is None else f'{inside:+.3f} / {c - inside:+.3f}'} |")
    md += ["", *[f"{res['rank']}. {res['summary']}" for res in out["results"]], ""]
    if shares is not None:
        md += ["Span share = |in span| / (|in span| + |rest|) of the cosine's two parts (concepts.span_share).", ""]
    return out, md


def run_explain(args, vocab):
    if (args.probes is None) == (args.profile is None):
        raise ValueError("give exactly one of --probes P.npz or --profile CSV (the findings of every image)")
    es = load_set(args.embeddings)
    ids = es.image_ids
    rows = query_rows(args.query, ids, args.embeddings)
    outs = {qi: (args.save_dir / f"explain_{str(ids[qi]).replace('/', '_')}.json",
                 args.save_dir / f"explain_{str(ids[qi]).replace('/', '_')}.md") for qi in rows}
    _refuse_existing([p for pair in outs.values() for p in pair], args.overwrite)
    if args.exclude_same_patient and es.patient_ids is None:
        raise ValueError(f"--exclude-same-patient needs {embeddings.sidecar_paths(es.path)['patient_ids']} (the "
                         f"patient ids beside the embeddings)")
    emb = es.embeddings / np.linalg.norm(es.embeddings, axis=1, keepdims=True)
    directions = None
    if args.probes is not None:
        probes = load_probes(args.probes)
        check_same_model(probes, es, args.probes)
        concepts, values = probes["concepts"], probe_profile(emb, probes["weights"], probes["bias"])
        directions = probes["weights"]
    else:
        lab = read_concept_labels(args.profile, vocab)
        values, notes = match_labels(ids, lab)
        concepts = lab.concepts
        for n in notes:
            print(f"note: {n}")
    ensure_writable_dir(args.save_dir)
    for qi in rows:
        out, md = explain_query(args, vocab, es, emb, qi, concepts, values, directions)
        out_json, out_md = outs[qi]
        save_json(out, out_json)
        atomic_write_text(out_md, "\n".join(md))
        print("\n".join(md))
        print(f"wrote {out_json} and {out_md}\n")
    return 0


def run(args):
    vocab = load_vocabulary(args.vocabulary)
    return {"probe": run_probe, "profile": run_profile, "explain": run_explain}[args.command](args, vocab)


def main(args):
    return run_main(run, args, "concepts.py")


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
