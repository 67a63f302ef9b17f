"""Compare backbones from saved embeddings: which retrieves best, and do they differ enough that fusing them helps?

N-way mode (any number of sets, issue 21): --embeddings NAME=PATH NAME=PATH ... (PATH = an embedding set's X.npy;
its labels, ids and meta found by embeddings.load). All sets are matched to the first by image id and class name
(embeddings.align; another order is fine), and a set of other images (other ids, another count) is refused before
any work naming both sets. Leave-one-out over all images (self excluded by index; --exclude-same-patient drops the
query's patient too), it prints and writes to --save-dir:
  * per model: P@k for --k-values (precision at k as in Denner et al. 2025 = share of the top k with the query's
    label; the same number as the toolkit's mP@k, so it is computed once, by metrics.precision_at_k), R@k, mAP@k,
    mAP, MAP@R (metrics.rank, metrics.py definitions), each with a 95% bootstrap CI over queries;
  * mean overlap@k and mean Spearman rho for every pair (compare_embeddings, as the two-model mode), printed as
    matrices and drawn as labelled heatmaps with the value in each cell: overlap_matrix.png, spearman_matrix.png;
  * every pair of models: paired difference of AP@k over all queries, bootstrap 95% CI and sign-flip p
    (metrics.paired_comparison; whole patients resampled when patient ids exist), p corrected by Holm's
    step-down over the pairs (--correction holm|bonferroni|none);
  * held-out fusion: for every pair, alpha chosen on a seeded half of the queries (heldout_alpha, the same half
    for every pair) and scored on the other half; reciprocal rank fusion over ALL sets (score = sum over sets of
    1/(--rrf-k + rank), rrf_k 60 as Cormack et al. 2009); an optional --learned-embeddings set (train_fusion.py
    --apply of any subset); each fusion against the better of its inputs on the held-out half, Holm-corrected
    over the fusions;
  * results.json (everything above) and nway_per_query.npz (per-query scores, model x query arrays).
  python test_backbone.py --embeddings hybrid=emb/hybrid.npy raddino=emb/raddino.npy biomedclip=emb/biomedclip.npy \
      xrv=emb/xrv.npy --exclude-same-patient --save-dir results/nway
  # learned fusion of any subset: train_fusion.py takes two or more sets (training list), --apply on the test sets
  python train_fusion.py --embeddings emb/train_raddino.npy emb/train_biomedclip.npy emb/train_xrv.npy --head mlp \
      --save-dir checkpoints/fusion
  python train_fusion.py --apply checkpoints/fusion/RUN/RUN_best_ckpt.pth \
      --embeddings emb/raddino.npy emb/biomedclip.npy emb/xrv.npy --output emb/fused.npy
  python test_backbone.py --embeddings ... --learned-embeddings emb/fused.npy --learned-name "mlp(3 models)"

Two-model mode (--model1-embeddings / --model2-embeddings, unchanged):
Reads two embedding sets of the same images (as written by extract_embeddings.py, through embeddings.load; rows
matched by image id and classes by name, so the files may be ordered differently; the dimensions may differ)
and reports, leave-one-out over all images (each image is a query against all others,
self excluded by index; relevant = same label):
  * per backbone: mAP@k, R@1 and mAP (metrics.rank: its definitions and tie rule);
  * overlap@k: how many of the two top-k lists are shared per query; mean, and the fraction of queries with
    overlap <= floor(k/2); overlap_histogram.png;
  * Spearman rho per query between the two similarity rows over all other images (self excluded; ties get
    average ranks, as scipy.stats.spearmanr); mean and std;
  * late fusion on cosine similarities: alpha * sim1 + (1 - alpha) * sim2 for each alpha, z-score fusion
    (each similarity row standardised over the other images first, then the same alphas), reciprocal rank
    fusion (score = 1/(60 + rank1) + 1/(60 + rank2), Cormack et al. 2009), and alpha chosen on a seeded
    random half of the queries and evaluated on the other half (choosing alpha on the test queries
    overstates the gain);
  * query_{idx}_comparison.png for a low-, a medium- and a high-overlap query, then random ones.
Writes backbone_comparison_results.{npz,json} in --save-dir and prints a summary table and one verdict line
from the held-out rows and their paired 95% CIs, never from the all-query table (optimistic): fusion looks
beneficial when mean overlap < 0.6 k, rho < 0.6 and the best held-out fusion beats the better model with a CI
above 0; not beneficial when mean overlap > 0.8 k and rho > 0.8, or when no fusion beats the better model on
the held-out queries (for k = 5 the overlap thresholds are 3.0 and 4.0). Models are named by --model1-name /
--model2-name, else by the model and backbone in each set's meta file, else by the file name.

Commands (CPU only; under a minute at N = 10,000 on 2 cores, see bench/bench_compare.py):
  python test_backbone.py --model1-embeddings emb/convnext.npy --model2-embeddings emb/conceptclip.npy \
      --model1-name ConvNeXtV2 --model2-name ConceptCLIP --image-dir data/COVIDx/test
Labels, image ids and patient ids default to the files written beside each set (embeddings.py);
--labels/--image-ids/--patient-ids replace model 1's. --chunk-size not given: 512 query rows per block of the
comparison, metrics.rank's own default for each model's ranking (the numbers do not depend on it).
With --exclude-same-patient, other images of the query's patient are also removed from the top-k lists, the
metrics and the fusions; Spearman rho and the RRF ranks stay over all other images (rows of one length).
"""
import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import dataset
import embeddings
import metrics
from utils import HelpFormatter, ensure_writable_dir, get_runtime_parser, print_args, run_main, save_figure, save_json

RRF_K = 60  # the constant of reciprocal rank fusion (Cormack, Clarke & Buettcher, SIGIR 2009)
DEFAULT_CLASS_NAMES = dataset.class_names("covid")  # normal, pneumonia, COVID-19 for labels 0, 1, 2
RESULT_FILES = ("backbone_comparison_results.npz", "backbone_comparison_results.json", "overlap_histogram.png")
CHUNK_ROWS = 512  # query rows per block of the comparison's own similarity rows (--chunk-size not given)


def get_args_parser():
    p = argparse.ArgumentParser(description="Compare two or more backbones from saved embeddings", add_help=True,
                                formatter_class=HelpFormatter, parents=[get_runtime_parser(flags=("chunk_size",))])
    p.add_argument("--embeddings", nargs="+", default=None, metavar="NAME=PATH",
                   help="N-way mode: any number (>= 2) of embedding sets of the same images, each NAME=X.npy "
                        "(NAME labels its rows; files beside X.npy found by embeddings.load); replaces "
                        "--model1-embeddings / --model2-embeddings")
    p.add_argument("--model1-embeddings", "--convnext-embeddings", dest="model1_embeddings", default=None,
                   help="two-model mode: N x D1 .npy of model 1 (old name --convnext-embeddings)")
    p.add_argument("--model2-embeddings", "--conceptclip-embeddings", dest="model2_embeddings", default=None,
                   help="two-model mode: N x D2 .npy of model 2, the same images (matched by id; old name "
                        "--conceptclip-embeddings)")
    p.add_argument("--model1-name", default=None,
                   help="name of model 1 in the table, json and figures; None: the model (and backbone) in "
                        "meta file beside the set, else the file name")
    p.add_argument("--model2-name", default=None, help="name of model 2; None: as for model 1")
    p.add_argument("--labels", default=None, help="N int labels (.npy); None: the labels file beside model 1")
    p.add_argument("--image-ids", default=None,
                   help="N image ids (.npy) of model 1's rows; None: the ids file beside each set")
    p.add_argument("--patient-ids", default=None,
                   help="N patient ids (.npy); None: the patient ids file beside model 1")
    p.add_argument("--image-dir", default=None,
                   help="folder of the images, for the query visualisations (checked before any work)")
    p.add_argument("--image-list", default=None,
                   help="optional list file (patient_id filename label ...) mapping image ids to file names")
    p.add_argument("--save-dir", "--output-dir", dest="save_dir", default="./results/backbone_comparison",
                   help="folder for the results and figures (--output-dir is accepted too)")
    p.add_argument("--k", type=int, default=5, help="length of the top-k lists (mAP@k, overlap@k)")
    p.add_argument("--visualize-samples", type=int, default=5, help="number of query_{idx}_comparison.png (0: none)")
    p.add_argument("--fusion-alphas", type=float, nargs="+", default=[0.3, 0.5, 0.7],
                   help="weights of model 1 in alpha * sim1 + (1 - alpha) * sim2")
    p.add_argument("--class-names", nargs="+", default=None,
                   help="names of labels 0, 1, ...; None: the meta file beside model 1, else normal pneumonia COVID-19")
    p.add_argument("--exclude-same-patient", action="store_true",
                   help="also remove other images of the query's patient from the gallery")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the held-out split, the visualised queries, the bootstrap and the permutations")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --save-dir")
    p.add_argument("--learned-embeddings", "--fused-embeddings", dest="learned_embeddings", default=None,
                   help="N x D .npy of the same images from a learned fusion head (train_fusion.py --apply); "
                        "adds its row and its paired comparisons")
    p.add_argument("--learned-name", default="Learned fusion", help="name of the --learned-embeddings row")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="paired bootstrap resamples for the 95%% CI of each difference (0: no CI)")
    p.add_argument("--permutations", type=int, default=1000,
                   help="sign flips of the paired permutation test (0: no p-value)")
    p.add_argument("--hierarchy", default=None,
                   help="class tree ('child parent' lines, leaves = class names) for AHD@k, MS@k, hP@k per model, "
                        "e.g. data/ontology/covidx_hierarchy.txt; None: not computed")
    p.add_argument("--k-values", type=int, nargs="+", default=[1, 5, 10],
                   help="N-way mode: the k of P@k (Denner et al. 2025) and R@k in the per-model table")
    p.add_argument("--correction", choices=("holm", "bonferroni", "none"), default="holm",
                   help="N-way mode: multiple-comparison correction of the paired p-values, within each family "
                        "(model pairs; fusions against their better input)")
    p.add_argument("--rrf-k", type=int, default=RRF_K,
                   help="constant of reciprocal rank fusion, score = sum over models of 1/(rrf_k + rank) "
                        "(Cormack et al. 2009)")
    p.add_argument("--hierarchy-distance", default="lca-height", choices=metrics.HIERARCHY_DISTANCES,
                   help="h(a, b) of AHD/MS/hP: the height of the lowest common ancestor (Bertinetto et al. 2020) "
                        "or half the tree path between the classes; they differ on unbalanced trees (metrics.py)")
    return p


# ----------------------------------------------------------------------------- loading and checks

def _normalise(emb, path):
    """Unit float32 rows (metrics.as_embeddings: non-finite or all-zero rows refused, naming the file); a note
    when the file's rows were not unit length."""
    e = metrics.as_embeddings(emb, f"embeddings {path}").numpy()
    norms = np.linalg.norm(np.asarray(emb, dtype=np.float32), axis=1)
    if np.abs(norms - 1).max() > 1e-3:
        print(f"note: {path} rows are not unit length (norms {norms.min():.3g}..{norms.max():.3g}); re-normalised")
    return e


def load_sets(args):
    """Both sets through embeddings.load (each file checked: lengths, dtypes, NaN/inf rows, repeated ids, labels,
    class names), model 2 matched to model 1 by image id and its classes by name (embeddings.align); all before
    any work. Returns (set 1, set 2 in set 1's image order and class numbering).

    --labels / --image-ids / --patient-ids replace model 1's files. A set without image ids is matched by
    position (its rows must then be in the other's order): it takes the other set's ids, or 0..N-1.
    """
    s1 = embeddings.load(args.model1_embeddings, labels=args.labels, image_ids=args.image_ids,
                         patient_ids=args.patient_ids, required=(), flag="--model1-embeddings")
    s2 = embeddings.load(args.model2_embeddings, required=(), flag="--model2-embeddings")
    if s1.n != s2.n:
        raise ValueError(f"the embedding files hold different numbers of images: {s1.path} has {s1.n} rows, "
                         f"{s2.path} has {s2.n} rows; extract both from the same image list")
    files = embeddings.sidecar_paths(s1.path)
    if s1.labels is None:
        raise ValueError(f"labels file {files['labels']} not found; pass --labels L.npy (N integer labels)")
    if s1.patient_ids is None and args.exclude_same_patient:
        raise ValueError(f"patient ids file {files['patient_ids']} not found; --exclude-same-patient needs "
                         f"--patient-ids P.npy")
    s1, s2 = align_to_first([s1, s2])
    args._class_names_from_meta = s1.class_names
    return s1, s2


def align_to_first(sets, names=None):
    """Every set in the first's image order and class numbering (embeddings.align: rows by image id, classes by
    name). A set without image ids takes the first ids found (else 0..N-1), so it is matched by position; a set
    with neither labels nor class names takes the first's class names. names given: an align error says which
    two NAMEs (--embeddings) it is about."""
    ids = next((s.image_ids for s in sets if s.image_ids is not None), np.arange(sets[0].n).astype(str))
    first, *rest = (s if s.image_ids is not None else replace(s, image_ids=ids) for s in sets)
    out = [first]
    for i, s in enumerate(rest, 1):
        if s.labels is None and s.class_names is None:  # nothing of this set's classes to match
            s = replace(s, class_names=first.class_names)
        try:
            out.append(embeddings.align(first, s))
        except ValueError as e:  # align names both files; say which NAMEs they are
            if names is None:
                raise
            raise ValueError(f"--embeddings {names[i]} vs {names[0]}: {e}") from e
    return out


def load_inputs(args):
    """Load and check everything before any work; return (e1, e2, labels, image_ids, patient_ids), unit rows."""
    s1, s2 = load_sets(args)
    return _normalise(s1.embeddings, s1.path), _normalise(s2.embeddings, s2.path), s1.labels, s1.image_ids, \
        s1.patient_ids


def model_label(path, meta=None):
    """What produced an embedding set, for tables and figures: the model and its backbone(s) from the set's meta
    (extract_embeddings.py writes them), e.g. 'convnextv2 (convnextv2_atto)'; else the file name without .npy.
    meta: the loaded set's meta (read from the file when not given)."""
    info = embeddings.load(path, required=()).meta if meta is None else meta
    name = info.get("model_name")
    if not isinstance(name, str) or not name:
        return Path(path).stem
    margs = info.get("model_args") if isinstance(info.get("model_args"), dict) else {}
    backbones = [str(v) for k, v in sorted(margs.items()) if k.endswith("backbone") and isinstance(v, str) and v]
    return f"{name} ({' + '.join(backbones)})" if backbones else name


def model_names(args, metas=(None, None)):
    """(name 1, name 2): --model1-name/--model2-name, else model_label of each file (metas: the loaded sets'); two
    equal labels (two checkpoints of one model) get their file names added, so that rows and pairs stay distinct."""
    paths = (args.model1_embeddings, args.model2_embeddings)
    given = (args.model1_name, args.model2_name)
    names = [g if g else model_label(p, m) for g, p, m in zip(given, paths, metas)]
    if names[0] == names[1]:
        if given[0] and given[1]:
            raise ValueError(f"--model1-name and --model2-name are both {names[0]!r}; give two different names")
        names = [g if g else f"{n} [{Path(p).stem}]" for g, n, p in zip(given, names, paths)]
        if names[0] == names[1]:
            names = [f"{n} #{i}" for i, n in enumerate(names, 1)]
    if args.learned_embeddings and args.learned_name in names:
        raise ValueError(f"--learned-name {args.learned_name!r} is also a model's name; give another")
    return tuple(names)


def check_images(args, image_ids):
    """--image-dir must be a folder holding at least one of the images (a typo would only give blank panels)."""
    if args.image_list is not None and not Path(args.image_list).is_file():
        raise ValueError(f"--image-list {args.image_list}: file not found")
    if args.image_dir is None:
        return None
    if not Path(args.image_dir).is_dir():
        raise ValueError(f"--image-dir {args.image_dir}: not a folder; give the folder of the images "
                         f"(e.g. data/COVIDx/test) or leave the flag out")
    find = _image_finder(args.image_dir, args.image_list)
    if args.visualize_samples > 0 and not any(find(str(i)) is not None for i in image_ids):
        raise ValueError(f"--image-dir {args.image_dir}: none of the {len(image_ids)} images (e.g. "
                         f"{image_ids[0]}.png) is there" + ("" if args.image_list else
                         "; give the images' own folder, or --image-list to map ids to file names"))
    return find


def load_learned(args, s1):
    """The learned-fusion embeddings (train_fusion.py --apply) of set 1's images, in its image order (matched by
    id; a file without ids by position), unit rows. Only its rows are used: labels and classes are set 1's."""
    s = embeddings.load(args.learned_embeddings, required=(), flag="--learned-embeddings")
    if s.n != s1.n:
        raise ValueError(f"--learned-embeddings {s.path}: shape {s.embeddings.shape}, expected {s1.n} rows like "
                         f"the model files")
    if s.image_ids is not None:
        s = embeddings.take_ids(s, s1.image_ids, s1.name)
    return _normalise(s.embeddings, s.path)


def _ranking(e, labels, k, patient_ids, chunk_size, full_ranking):
    """metrics.rank leave-one-out (self by index and, given patient ids, the query's patient excluded; the tie
    rule of metrics.py) on rows used as they are: unit rows from _normalise, the same rows this script's
    fusions multiply, so each model's own lists and a fusion at alpha 1 rank identical similarities."""
    t = torch.from_numpy(np.ascontiguousarray(e, dtype=np.float32))
    return metrics.rank(t, np.asarray(labels, dtype=np.int64), k=k, query_groups=patient_ids,
                        full_ranking=full_ranking, chunk_size=chunk_size, _checked=True)


def single_model_scores(e, labels, k, patient_ids=None, chunk_size=None):
    """Leave-one-out AP@k and R@1 per query of one embedding set (self and, given patient ids, the query's
    patient excluded), through metrics.rank, as compare_embeddings does for each model."""
    r = _ranking(e, labels, k, patient_ids, chunk_size, full_ranking=False)
    return metrics.map_at_k(r.relevant, k), metrics.recall_at_k(r.relevant, 1)


def print_paired(pairs, key, num_queries, grouped):
    """The paired differences (a - b) with their CI and p; '*' where the 95% CI excludes 0."""
    if not pairs:
        return
    w = max(len(f"{x['a']} - {x['b']}") for x in pairs) + 2
    print(f"\npaired differences of {key} on the same {num_queries} held-out queries (bootstrap 95% CI and "
          f"permutation p over {'patients' if grouped else 'queries'}; * = CI excludes 0)")
    for x in pairs:
        lo, hi = x["ci"]
        p = "n/a" if x["p"] is None or np.isnan(x["p"]) else f"{x['p']:.4f}"  # --permutations 0: no p
        print(f"{x['a'] + ' - ' + x['b']:<{w}}{x['diff']:+9.4f}  [{lo:+.4f}, {hi:+.4f}]  p={p}"
              + ("  *" if x["significant"] else ""))


def check_args(args, n, labels, patient_ids=None):
    if args.bootstrap < 0 or args.permutations < 0:
        raise ValueError(f"--bootstrap {args.bootstrap} / --permutations {args.permutations}: must be >= 0")
    if args.k < 1 or args.k > n - 1:
        raise ValueError(f"--k {args.k}: must be between 1 and N - 1 = {n - 1} (the gallery of every query)")
    if args.exclude_same_patient:
        cand, _ = metrics.candidate_counts(labels, query_groups=patient_ids, exclude_same_group=True)
        if args.k > cand.min():
            raise ValueError(f"--k {args.k} with --exclude-same-patient: query {int(np.argmin(cand))} has only "
                             f"{int(cand.min())} images of other patients; use a smaller --k")
    if args.rrf_k < 1:
        raise ValueError(f"--rrf-k {args.rrf_k}: must be >= 1 (60 in Cormack et al. 2009)")
    bad = [a for a in args.fusion_alphas if not 0.0 <= a <= 1.0]
    if bad:
        raise ValueError(f"--fusion-alphas {bad}: each alpha must lie in [0, 1]")
    names = args.class_names
    if names is None:  # written by extract_embeddings.py (aligned across the two files by load_sets)
        names = getattr(args, "_class_names_from_meta", None)
    names = names or DEFAULT_CLASS_NAMES
    if labels.min() < 0 or labels.max() >= len(names):
        raise ValueError(f"labels range {labels.min()}..{labels.max()} but there are {len(names)} class names "
                         f"({names}); pass --class-names with one name per label")
    return names


# ----------------------------------------------------------------------------- computation

def descending_ranks(s):
    """Ranks of each row of `s` (c, n), 1 = most similar; ties get their average rank (scipy's "average").

    One argsort per row plus a few linear passes; about 4x faster than scipy.stats.rankdata(axis=1).
    """
    c, n = s.shape
    order = np.argsort(-s, axis=1)
    v = np.take_along_axis(s, order, axis=1)
    tie = v[:, 1:] == v[:, :-1]
    if not tie.any():
        ranked = np.broadcast_to(np.arange(1, n + 1, dtype=np.float64), (c, n))
    else:
        # A run of equal values spans [start, end] in sorted position; each member gets (start + end)/2 + 1.
        idx = np.arange(n)
        edge = np.ones((c, 1), dtype=bool)
        start = np.maximum.accumulate(np.where(np.concatenate([edge, ~tie], 1), idx, 0), axis=1)
        end = np.where(np.concatenate([~tie, edge], 1), idx, n - 1)
        end = np.minimum.accumulate(end[:, ::-1], axis=1)[:, ::-1]
        ranked = (start + end) / 2.0 + 1.0
    ranks = np.empty((c, n), dtype=np.float64)
    np.put_along_axis(ranks, order, ranked, axis=1)
    return ranks


def rowwise_pearson(a, b):
    """Pearson correlation of each row of a with the same row of b (float64); NaN for a constant row."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(1) / den


def rrf_scores(*ranks, k=RRF_K):
    """Reciprocal rank fusion of any number of rank arrays (1 = best): sum of 1/(k + rank)."""
    return sum(1.0 / (k + r) for r in ranks)


def _fast_ranks(s):
    """Descending ranks (1 = most similar) of each row of s (c, n) as int32, and which rows hold equal values.

    Ordinal ranks from one argsort; they equal the average ranks wherever a row has no ties.
    """
    c, n = s.shape
    ranks = np.empty((c, n), np.int32)
    np.put_along_axis(ranks, np.argsort(s, axis=1), np.arange(n, 0, -1, dtype=np.int32)[None, :], axis=1)
    v = np.sort(s, axis=1)  # values only: several times cheaper than the argsort
    return ranks, (v[:, 1:] == v[:, :-1]).any(1)


def _ranks_with_ties(s):
    """(ordinal int32 ranks (c, n), indices of the rows holding ties, their average ranks (float64)): the
    cheap ranks everywhere, scipy's average ranks only where a row has equal values."""
    ranks, tied_rows = _fast_ranks(s)
    tied = np.flatnonzero(tied_rows)
    return ranks, tied, descending_ranks(s[tied]) if len(tied) else None


def rrf_ranks(s):
    """Float32 descending ranks of each row of s (c, n) for RRF: average ranks on tied rows (as scipy)."""
    ranks, tied, avg = _ranks_with_ties(s)
    out = ranks.astype(np.float32)
    if len(tied):
        out[tied] = avg
    return out


def _spearman_and_rrf(s1, s2, self_col, rrf_k=RRF_K):
    """Per row: Spearman rho of s1 and s2 over all columns but self_col, and RRF scores (c, n) float32.

    Self is set to -inf so it ranks last in both rows: the other n - 1 images get ranks 1..n-1, exactly their
    ranks with self removed, and self adds d = 0 to sum d^2. Rows without ties use rho = 1 - 6 sum d^2 /
    (m (m^2 - 1)), m = n - 1 (exact in integers); rows with ties get average ranks and the Pearson correlation
    of the ranks, as scipy.stats.spearmanr.
    """
    c, n = s1.shape
    ar = np.arange(c)
    s1, s2 = s1.copy(), s2.copy()
    s1[ar, self_col] = s2[ar, self_col] = -np.inf
    (r1, t1, a1), (r2, t2, a2) = _ranks_with_ties(s1), _ranks_with_ties(s2)
    d = (r1 - r2).astype(np.int64)
    m = n - 1
    rho = 1.0 - 6.0 * np.einsum("ij,ij->i", d, d) / (m * (m * m - 1.0))
    f1, f2 = r1.astype(np.float32), r2.astype(np.float32)
    if len(t1):
        f1[t1] = a1
    if len(t2):
        f2[t2] = a2
    tied = np.union1d(t1, t2)  # a row tied in one model needs average ranks in both for rho
    if len(tied):
        keep = np.ones((len(tied), n), bool)
        keep[np.arange(len(tied)), self_col[tied]] = False
        rho[tied] = rowwise_pearson(f1[tied][keep].reshape(-1, m).astype(np.float64),
                                    f2[tied][keep].reshape(-1, m).astype(np.float64))
    return rho, rrf_scores(f1, f2, k=rrf_k)


def zscore_rows(s, self_col):
    """Standardise each row of s (c, n) over the other images (column self_col[i] left out of mean and std),
    so that the two models' similarity scales become comparable. Row sums minus the self entry: no mask pass."""
    n = s.shape[1]
    diag = s[np.arange(len(s)), self_col].astype(np.float64)
    mean = (s.sum(1, dtype=np.float64) - diag) / (n - 1)
    var = (np.einsum("ij,ij->i", s, s, dtype=np.float64) - diag * diag) / (n - 1) - mean * mean
    std = np.sqrt(np.maximum(var, 1e-24))
    return (s - mean[:, None].astype(np.float32)) / std[:, None].astype(np.float32)


def patient_codes(patient_ids):
    """Integer codes of patient ids (N,), or None without them."""
    if patient_ids is None:
        return None
    return np.unique(np.asarray(patient_ids).astype(str), return_inverse=True)[1].reshape(-1)


def exclusion_mask(rows, n, pid):
    """(c, n) bool: each query row's own image (by index) and, given patient codes, its patient's images."""
    exclude = np.zeros((len(rows), n), bool)
    exclude[np.arange(len(rows)), rows] = True
    if pid is not None:
        exclude |= pid[rows][:, None] == pid[None, :]
    return exclude


def compare_embeddings(e1, e2, labels, k=5, alphas=(0.3, 0.5, 0.7), patient_ids=None, chunk_size=None,
                       progress=True, rankings=None, rrf_k=RRF_K):
    """All pairwise quantities, chunked over query rows so memory grows with chunk_size x N, never N x N.

    e1 (N, D1), e2 (N, D2): float32 unit rows of the same images; labels (N,) int; patient_ids given ->
    same-patient images are excluded from the retrieval lists too. Returns per-query arrays: top-k indices of
    each model, AP@k / R@1 / full-ranking AP of each model (metrics.rank), overlap@k, Spearman rho, and AP@k of
    every fusion (linear and z-score per alpha, RRF; metrics.topk_from_similarity on the fused rows). One tie
    rule throughout (metrics.py). chunk_size None: CHUNK_ROWS rows here, metrics.rank's own default there.
    rankings: the two models' full metrics.rank results at any k >= k, computed once by the caller (the N-way
    mode compares each model with several others); None: ranked here.
    """
    n = len(labels)
    t1, t2 = torch.from_numpy(np.ascontiguousarray(e1)), torch.from_numpy(np.ascontiguousarray(e2))
    lab = np.asarray(labels, dtype=np.int64)
    pid = patient_codes(patient_ids)
    na = len(alphas)
    out = {"rho": np.empty(n), "fusion": np.empty((na, n)), "zscore": np.empty((na, n)), "rrf": np.empty(n)}
    rankings = rankings or [_ranking(e, lab, k, patient_ids, chunk_size, full_ranking=True) for e in (e1, e2)]
    for key, r in zip(("1", "2"), rankings):  # each model alone: metrics.rank (top-k of a longer list = top-k)
        out["top" + key], out["fullap" + key] = r.indices[:, :k], r.ap
        out["ap" + key], out["r1_" + key] = metrics.map_at_k(r.relevant, k), metrics.recall_at_k(r.relevant, 1)
    step = chunk_size or CHUNK_ROWS
    for r0 in tqdm(range(0, n, step), desc="comparing", unit="chunk", disable=not progress):
        rows = np.arange(r0, min(n, r0 + step))
        sl = slice(r0, r0 + len(rows))
        with torch.no_grad():
            s1, s2 = (t1[rows] @ t1.T).numpy(), (t2[rows] @ t2.T).numpy()  # (c, n) cosine similarities
        exclude = exclusion_mask(rows, n, pid)
        relevant = lab[rows][:, None] == lab[None, :]

        def topk_rel(sim):
            idx = metrics.topk_from_similarity(sim, k, exclude_mask=exclude)
            return idx, np.take_along_axis(relevant, idx, axis=1)

        # Spearman and RRF ranks are over all other images (self excluded), whatever the patient exclusion.
        out["rho"][sl], rrf = _spearman_and_rrf(s1, s2, rows, rrf_k)
        out["rrf"][sl] = metrics.map_at_k(topk_rel(rrf)[1], k)
        z1, z2 = zscore_rows(s1, rows), zscore_rows(s2, rows)
        for a, alpha in enumerate(alphas):
            out["fusion"][a, sl] = metrics.map_at_k(topk_rel(alpha * s1 + (1 - alpha) * s2)[1], k)
            out["zscore"][a, sl] = metrics.map_at_k(topk_rel(alpha * z1 + (1 - alpha) * z2)[1], k)
    top1, top2 = out["top1"], out["top2"]
    out["overlap"] = (top1[:, :, None] == top2[:, None, :]).any(2).sum(1)
    return out


def heldout_split(n, seed):
    """(select, evaluate): a seeded random half of the n queries and the other half, each sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def heldout_alpha(fusion_aps, alphas, seed):
    """Choose alpha on a seeded random half of the queries, report its mAP@k on the other half.

    fusion_aps: (num_alphas, N) per-query AP@k. Ties between alphas go to the first in `alphas`.
    Returns (alpha, map_on_eval_half, select_indices, eval_indices).
    """
    select, evaluate = heldout_split(fusion_aps.shape[1], seed)
    best = int(np.argmax(fusion_aps[:, select].mean(1)))
    return float(alphas[best]), float(fusion_aps[best, evaluate].mean()), select, evaluate


def interpret(mean_overlap, rho, k, heldout, pairs, models, fusions, num_queries, bootstrap):
    """The verdict line, from the held-out rows only: every method scored on the same held-out queries (alpha
    chosen on the other half) and the paired 95% CI of the best fusion minus the better model. The all-query
    table picks alpha on the test queries themselves (optimistic) and is not used.

    heldout: {row name: mAP@k on the held-out queries}; pairs: metrics.paired_comparison of those rows;
    models: the two model rows; fusions: the fusion rows (held-out alpha, RRF, a learned head).
    Beneficial: the backbones retrieve different images (mean overlap@k < 0.6 k, rho < 0.6) and the best fusion
    beats the better model with a CI above 0. Not beneficial: they retrieve nearly the same images (> 0.8 k,
    rho > 0.8), or no fusion beats the better model on the held-out queries. Otherwise: mixed evidence.
    """
    low, high = 0.6 * k, 0.8 * k
    better = max(models, key=lambda m: heldout[m])
    best = max(fusions, key=lambda f: heldout[f])
    pair = next(p for p in pairs if {p["a"], p["b"]} == {best, better})
    sign = 1.0 if pair["a"] == best else -1.0  # the pair may be stored as model - fusion
    diff, lo, hi = sign * pair["diff"], *sorted(sign * c for c in pair["ci"])
    basis = (f"held-out rows ({num_queries} queries): best fusion {best} {heldout[best]:.4f} vs the better model "
             f"{better} {heldout[better]:.4f}, difference {diff:+.4f}"
             + (f" (paired 95% CI [{lo:+.4f}, {hi:+.4f}])" if bootstrap > 0 else " (no CI: --bootstrap 0)"))
    pair_stats = f"mean overlap@{k} {mean_overlap:.2f}, rho {rho:.2f}"
    if mean_overlap > high and rho > 0.8:
        return (f"Fusion is not beneficial: the backbones retrieve nearly the same images ({pair_stats}; "
                f"> {high:g} and > 0.8); {basis}.")
    if diff <= 0:
        return f"Fusion is not beneficial here: no fusion beats the better model on the {basis}; {pair_stats}."
    if bootstrap > 0 and lo > 0 and mean_overlap < low and rho < 0.6:
        return (f"Fusion looks beneficial: the backbones retrieve different images ({pair_stats}; < {low:g} and "
                f"< 0.6) and on the {basis}, the CI is above 0.")
    why = ("the CI includes 0" if bootstrap > 0 and lo <= 0 else "there is no CI" if bootstrap <= 0 else
           f"the backbones are not clearly diverse ({pair_stats})")
    return f"Mixed evidence: {why}; {basis}; {pair_stats}."


# ----------------------------------------------------------------------------- plots

def plot_overlap_histogram(overlaps, k, names, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    counts = np.bincount(overlaps, minlength=k + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(np.arange(k + 1), counts / max(len(overlaps), 1), color="steelblue")
    ax.axvline(overlaps.mean(), color="k", linestyle="--", label=f"mean {overlaps.mean():.2f}")
    ax.set(xlabel=f"shared images in the two top-{k} lists", ylabel="fraction of queries", xticks=range(k + 1),
           title=f"Top-{k} overlap: {names[0]} vs {names[1]} ({len(overlaps)} queries)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def choose_queries(overlaps, num, seed):
    """A low-, a medium- and a high-overlap query (seeded among equals), then random distinct ones.

    Returns [(query index, case)] with case "low overlap", "medium overlap", "high overlap" or "random"."""
    rng = np.random.default_rng(seed)
    picks, cases = [], []
    for target, case in ((overlaps.min(), "low overlap"), (np.median(overlaps), "medium overlap"),
                         (overlaps.max(), "high overlap")):
        dist = np.abs(overlaps - target)
        cands = [i for i in np.flatnonzero(dist == dist.min()) if i not in picks]
        if cands and len(picks) < num:
            picks.append(int(rng.choice(cands)))
            cases.append(case)
    rest = [int(i) for i in rng.permutation(len(overlaps)) if i not in picks][: max(num - len(picks), 0)]
    return list(zip(picks, cases)) + [(i, "random") for i in rest]


def _image_finder(image_dir, image_list):
    """image id -> path or None: {id}.png/.jpg/.jpeg under image_dir, or the list's file name."""
    names = {}
    if image_list:
        for line in Path(image_list).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and not parts[0].startswith("#"):
                names[Path(parts[1]).stem] = parts[1]

    def find(image_id):
        if image_dir is None:
            return None
        cands = [names[image_id]] if image_id in names else []
        cands += [f"{image_id}{ext}" for ext in (".png", ".jpg", ".jpeg")]
        for c in cands:
            if (Path(image_dir) / c).is_file():
                return Path(image_dir) / c
        return None
    return find


def _short(text, width=20):
    """Long ids (UUID-like) as 'first 9~last 9' so that a panel title fits its panel."""
    text = str(text)
    return text if len(text) <= width else f"{text[:9]}~{text[-9:]}"


def plot_query(q, e1, e2, top1, top2, labels, image_ids, class_names, names, find, k, overlap, path, case=""):
    """The query, then one row per model with its top k. Frame: green = same class as the query, red = not;
    a blue 'both' tag marks a result that is in both models' top-k lists. Model names label the rows (wrapped),
    long ids are shortened, so no title runs past its panel or the figure."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def show(ax, i, title, colour, both=False):
        p = find(str(image_ids[i]))
        if p is not None:
            try:
                ax.imshow(dataset.load_image(p).convert("L"), cmap="gray")
            except Exception as e:  # a broken file must not stop the report; say so in the panel
                ax.text(0.5, 0.5, f"unreadable\n{_short(p.name)}\n{type(e).__name__}", ha="center", va="center",
                        fontsize=7, transform=ax.transAxes)
        else:
            ax.set_facecolor("0.85")
            ax.text(0.5, 0.5, f"image not found\n{_short(image_ids[i])}", ha="center", va="center", fontsize=7,
                    transform=ax.transAxes)
        if both:
            ax.text(0.04, 0.96, "both", ha="left", va="top", fontsize=8, color="white", fontweight="bold",
                    transform=ax.transAxes, bbox={"boxstyle": "round,pad=0.2", "facecolor": "royalblue",
                                                  "edgecolor": "none"})
        ax.set_title(title, color=colour, fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
        for s in ax.spines.values():
            s.set_edgecolor(colour), s.set_linewidth(3)

    width = 2.3 * max(k, 3)
    fig, axes = plt.subplots(3, k, figsize=(width, 7.6), squeeze=False)
    for ax in axes[0, 1:]:
        ax.axis("off")
    show(axes[0, 0], q, f"query {q}: {class_names[labels[q]]}\n{_short(image_ids[q])}", "black")
    title = (f"{case} case: query {q} ({image_ids[q]}), {overlap} of {k} shared; {names[0]} vs {names[1]}" if case
             else f"query {q} ({image_ids[q]}): {names[0]} vs {names[1]}")
    fig.suptitle("\n".join(textwrap.wrap(title, int(width * 9))), fontsize=10)
    legend = (f"{overlap} of the two top-{k} lists shared\nframe green: same class as the query, red: not\n"
              f"blue 'both' tag: in both lists")
    if k > 1:
        # left out of tight_layout: it spans several empty panels, and counted it would shrink every image
        axes[0, 1].text(0, 0.5, legend, fontsize=9, va="center", transform=axes[0, 1].transAxes).set_in_layout(False)
    shared = set(top1[q].tolist()) & set(top2[q].tolist())
    for r, (emb, top, name) in enumerate(((e1, top1, names[0]), (e2, top2, names[1])), start=1):
        sims = emb[top[q]] @ emb[q]
        for j, g in enumerate(top[q]):
            ok = labels[g] == labels[q]
            show(axes[r, j], g, f"#{j + 1}: {_short(image_ids[g])}\n{class_names[labels[g]]} {sims[j]:.4f}",
                 "green" if ok else "red", both=int(g) in shared)
        parts = name.replace(" (", "\n(").replace(" + ", "\n+ ").split("\n")  # model, then each backbone
        axes[r, 0].set_ylabel("\n".join(w for p in parts for w in textwrap.wrap(p, 26)), fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


# ----------------------------------------------------------------------------- N-way mode (--embeddings NAME=PATH ...)

NWAY_RESULT_FILES = ("results.json", "nway_per_query.npz", "overlap_matrix.png", "spearman_matrix.png")
TWO_MODEL_ONLY = ("model1_name", "model2_name", "image_dir", "image_list", "hierarchy")  # not in the N-way mode


def parse_named_sets(items):
    """[(name, path)] from NAME=PATH strings; ValueError before any work on a missing '=', an empty part, a name
    or a file given twice, or fewer than two sets."""
    pairs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--embeddings {item!r}: expected NAME=PATH (e.g. raddino=emb/raddino.npy)")
        pairs.append((name.strip(), path.strip()))
    names = [n for n, _ in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--embeddings: the name(s) {dup} are given twice ({' '.join(items)}); give each set its "
                         f"own NAME")
    files = [str(Path(p).resolve()) for _, p in pairs]
    twice = sorted({p for p, f in zip((p for _, p in pairs), files) if files.count(f) > 1})
    if twice:
        raise ValueError(f"--embeddings: the file(s) {twice} are given twice; each set is one model")
    if len(pairs) < 2:
        raise ValueError(f"--embeddings: give two or more NAME=PATH sets to compare, got {len(pairs)}")
    return pairs


def load_named_sets(args):
    """Every set through embeddings.load (each checked), then all in the FIRST set's image order and class
    numbering (embeddings.align: rows matched by image id, classes by name); all before any work. A set from
    another image list (other ids or another count) is refused naming both sets. --labels / --image-ids /
    --patient-ids replace the first set's files. Returns (names, [EmbeddingSet])."""
    pairs = parse_named_sets(args.embeddings)
    sets = [embeddings.load(p, required=(), flag=f"--embeddings {n}=",
                            **({"labels": args.labels, "image_ids": args.image_ids, "patient_ids": args.patient_ids}
                               if i == 0 else {})) for i, (n, p) in enumerate(pairs)]
    first, (name0, _) = sets[0], pairs[0]
    files = embeddings.sidecar_paths(first.path)
    if first.labels is None:
        raise ValueError(f"labels file {files['labels']} not found (set {name0}); pass --labels L.npy")
    if first.patient_ids is None and args.exclude_same_patient:
        raise ValueError(f"patient ids file {files['patient_ids']} not found (set {name0}); --exclude-same-patient "
                         f"needs --patient-ids P.npy")
    names = [n for n, _ in pairs]
    for name, s in zip(names, sets):
        if s.n != first.n:
            raise ValueError(f"--embeddings {name} ({s.path}, {s.n} images) and {name0} ({first.path}, {first.n} "
                             f"images) are not of the same image list; extract every set from the same list")
    out = align_to_first(sets, names)
    args._class_names_from_meta = out[0].class_names
    return names, out


def adjust_pvalues(p, method="holm"):
    """Family-wise corrected p-values (in the input order): Bonferroni min(1, m p); Holm's step-down
    (Holm 1979): sort ascending, p_(i) * (m - i + 1), running maximum, capped at 1. NaN (no test) stays NaN
    and does not count in m."""
    p = np.asarray(p, dtype=np.float64)
    out = p.copy()
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if method == "none" or m == 0:
        return out
    if method == "bonferroni":
        out[ok] = np.minimum(1.0, p[ok] * m)
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    stepped = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    out[order] = np.minimum(1.0, stepped)
    return out


def per_model_scores(ranking, k, k_values):
    """Per-query scores of one model from its metrics.rank result (metrics.py definitions, nothing recomputed
    here): P@k for each k (= the toolkit's mP@k), R@k, AP@k (mAP@k), full-ranking AP and MAP@R (NaN for a query
    without a relevant image)."""
    rel = ranking.relevant
    out = {f"P@{j}": metrics.precision_at_k(rel, j) for j in k_values}
    out.update({f"R@{j}": metrics.recall_at_k(rel, j) for j in k_values if j > 1})  # R@1 = P@1
    out[f"mAP@{k}"] = metrics.map_at_k(rel, k)
    out["mAP"], out["MAP@R"] = ranking.ap, ranking.map_at_r
    return out


def summarise(scores, n_boot, seed):
    """{metric: {"mean", "ci95"}}: mean over the queries where it is defined, percentile bootstrap over those
    queries (metrics.bootstrap_ci; None without --bootstrap or without any defined query)."""
    out = {}
    for key, v in scores.items():
        v = v[~np.isnan(v)]
        out[key] = {"mean": float(v.mean()) if len(v) else None,
                    "ci95": metrics.bootstrap_ci(v, n_boot, seed) if len(v) else None}
    return out


def rrf_all(es, labels, k, patient_ids=None, chunk_size=None, rrf_k=RRF_K):
    """Per-query AP@k of reciprocal rank fusion over every set: score = sum_m 1/(rrf_k + rank_m), each rank over
    all other images (self last, average ranks on ties), as the two-model RRF; the query's patient removed from
    the fused top-k when patient_ids are given. Chunked over query rows: memory c x N per set."""
    n = len(labels)
    lab = np.asarray(labels, dtype=np.int64)
    pid = patient_codes(patient_ids)
    ts = [torch.from_numpy(np.ascontiguousarray(e)) for e in es]
    out = np.empty(n)
    step = chunk_size or CHUNK_ROWS
    for r0 in range(0, n, step):
        rows = np.arange(r0, min(n, r0 + step))
        ar = np.arange(len(rows))
        fused = np.zeros((len(rows), n), np.float32)
        for t in ts:
            with torch.no_grad():
                s = (t[rows] @ t.T).numpy()
            s[ar, rows] = -np.inf  # self ranks last in every set
            fused += rrf_scores(rrf_ranks(s), k=rrf_k)
        idx = metrics.topk_from_similarity(fused, k, exclude_mask=exclusion_mask(rows, n, pid))
        out[rows] = metrics.map_at_k(lab[idx] == lab[rows][:, None], k)
    return out


def compare_all(es, names, labels, k, kmax, alphas, patient_ids, chunk_size, rrf_k):
    """Each model ranked once (metrics.rank at kmax), then every pair through compare_embeddings (overlap@k,
    Spearman, the fusions at each alpha), and RRF over all sets. Returns (rankings, {(i, j): pair dict}, rrf)."""
    lab = np.asarray(labels, dtype=np.int64)
    rankings = [_ranking(e, lab, kmax, patient_ids, chunk_size, full_ranking=True) for e in es]
    pairs = {}
    for i in range(len(es)):
        for j in range(i + 1, len(es)):
            pairs[i, j] = compare_embeddings(es[i], es[j], lab, k, alphas, patient_ids, chunk_size, progress=False,
                                             rankings=(rankings[i], rankings[j]), rrf_k=rrf_k)
            print(f"  pair {names[i]} / {names[j]} done")
    return rankings, pairs, rrf_all(es, lab, k, patient_ids, chunk_size, rrf_k)


def pair_matrix(pairs, n_models, key, diagonal):
    """Symmetric (M, M) matrix of the mean of pairs[i, j][key] (NaN rows left out); `diagonal` on the diagonal."""
    m = np.full((n_models, n_models), float(diagonal))
    for (i, j), r in pairs.items():
        v = np.asarray(r[key], dtype=np.float64)
        m[i, j] = m[j, i] = float(np.nanmean(v)) if np.isfinite(v).any() else np.nan
    return m


def plot_matrix(mat, names, title, path, fmt="{:.2f}", vmin=None, vmax=None):
    """A labelled heatmap with the number written in each cell (white on dark cells)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    m = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * m + 3, 1.0 * m + 2))
    im = ax.imshow(mat, cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(m), names, rotation=35, ha="right")
    ax.set_yticks(range(m), names)
    for i in range(m):
        for j in range(m):
            v = mat[i, j]
            dark = np.isfinite(v) and im.norm(v) < 0.6  # viridis is dark below about 60% of its range
            ax.text(j, i, "n/a" if not np.isfinite(v) else fmt.format(v), ha="center", va="center",
                    color="white" if dark else "black", fontsize=9)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def print_model_table(names, summaries, columns, note):
    """One row of means per model, the 95% CI under it."""
    w = max(len(n) for n in names + ["Model"]) + 2
    print(f"\n{note}")
    print(f"{'Model':<{w}}|" + "".join(f"{c:>12}" for c in columns))
    print("-" * (w + 1 + 12 * len(columns)))
    for name, s in zip(names, summaries):
        vals = [s[c]["mean"] for c in columns]
        cis = [s[c]["ci95"] for c in columns]
        print(f"{name:<{w}}|" + "".join(f"{'n/a' if v is None else f'{v:.4f}':>12}" for v in vals))
        if any(ci is not None for ci in cis):
            print(f"{'':<{w}}|" + "".join(f"{'' if ci is None else f'[{ci[0]:.2f},{ci[1]:.2f}]':>12}" for ci in cis))


def print_matrix(mat, names, title, fmt):
    w = max(len(n) for n in names) + 2
    print(f"\n{title}")
    print(f"{'':<{w}}" + "".join(f"{n[:10]:>11}" for n in names))
    for name, row in zip(names, mat):
        print(f"{name:<{w}}" + "".join(f"{'n/a' if not np.isfinite(v) else fmt.format(v):>11}" for v in row))


def print_tests(tests, key, title, correction):
    """Paired differences with CI, p and the corrected p; '*' where the corrected p < 0.05."""
    if not tests:
        return
    w = max(len(f"{x['a']} - {x['b']}") for x in tests) + 2
    print(f"\n{title}")
    print(f"{'':<{w}}{'diff ' + key:>14}  {'95% CI':>18}  {'p':>7}  {'p_' + correction:>13}")
    for x in tests:
        p, pa = ("n/a" if v is None or not np.isfinite(v) else f"{v:.4f}" for v in (x["p"], x["p_adjusted"]))
        print(f"{x['a'] + ' - ' + x['b']:<{w}}{x['diff']:>+14.4f}  [{x['ci'][0]:+.4f}, {x['ci'][1]:+.4f}]  {p:>7}  "
              f"{pa:>13}" + ("  *" if x["significant_adjusted"] else ""))


def with_adjusted(tests, correction):
    """Each test dict with p_adjusted (the family's correction) and significant_adjusted (p_adjusted < 0.05)."""
    adj = adjust_pvalues([np.nan if t["p"] is None else t["p"] for t in tests], correction)
    return [dict(t, p=None if t["p"] is None or not np.isfinite(t["p"]) else float(t["p"]),  # JSON has no NaN
                 p_adjusted=None if not np.isfinite(a) else float(a),
                 significant_adjusted=bool(np.isfinite(a) and a < 0.05)) for t, a in zip(tests, adj)]


def run_nway(args):
    """--embeddings NAME=PATH ...: every check before any work, then the per-model table, the pair matrices,
    the paired tests, the fusions on held-out queries, results.json and the heatmaps."""
    given = [f"--{f.replace('_', '-')}" for f in TWO_MODEL_ONLY if getattr(args, f) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: two-model flags; the N-way mode (--embeddings) names each set by "
                         f"its NAME and draws no query figures or hierarchy metrics: drop them")
    print_args(args)
    names, sets = load_named_sets(args)
    es = [_normalise(s.embeddings, s.path) for s in sets]
    first = sets[0]
    labels, image_ids, patient_ids = first.labels, first.image_ids, first.patient_ids
    n, k = len(labels), args.k
    class_names = check_args(args, n, labels, patient_ids)
    k_values = sorted(set(args.k_values))
    kmax = max(k_values + [k])
    groups_excl = patient_ids if args.exclude_same_patient else None
    cand, _ = metrics.candidate_counts(labels, query_groups=groups_excl, exclude_same_group=groups_excl is not None)
    if k_values[0] < 1 or kmax > cand.min():
        raise ValueError(f"--k-values {args.k_values} / --k {k}: each must be between 1 and {int(cand.min())} "
                         f"(the fewest images a query can retrieve here); pass smaller --k-values")
    if args.learned_embeddings and args.learned_name in names:
        raise ValueError(f"--learned-name {args.learned_name!r} is also a set's NAME; give another")
    e_learned = load_learned(args, first) if args.learned_embeddings else None
    save_dir = ensure_writable_dir(args.save_dir, "--save-dir")
    existing = [str(save_dir / f) for f in NWAY_RESULT_FILES if (save_dir / f).exists()]
    if existing and not args.overwrite:
        raise ValueError(f"--save-dir {save_dir} already holds results ({', '.join(existing)}); "
                         f"choose another --save-dir or pass --overwrite")
    alphas = [float(a) for a in args.fusion_alphas]
    print(f"{n} queries, leave-one-out; {len(names)} sets: "
          + ", ".join(f"{nm} D={e.shape[1]}" for nm, e in zip(names, es)) + f"; k={k}"
          + (", excluding same-patient images" if args.exclude_same_patient else ""))

    t0 = time.time()
    rankings, pairs, rrf = compare_all(es, names, labels, k, kmax, alphas, groups_excl, args.chunk_size, args.rrf_k)
    per_query = [per_model_scores(r, k, k_values) for r in rankings]
    summaries = [summarise(s, args.bootstrap, args.seed) for s in per_query]
    print(f"computed in {time.time() - t0:.1f} s")
    key = f"mAP@{k}"

    # 1. per-model table, all queries
    columns = [f"P@{j}" for j in k_values] + [f"R@{j}" for j in k_values if j > 1] + [key, "mAP", "MAP@R"]
    note = (f"all {n} queries; P@k as in Denner et al. 2025 = share of the top k with the query's label = the "
            f"toolkit's mP@k (P@1 = R@1); mAP@k, mAP (full ranking), MAP@R as in metrics.py; under each row the "
            + (f"95% bootstrap CI over queries ({args.bootstrap} resamples)" if args.bootstrap
               else "no CI (--bootstrap 0)"))
    print_model_table(names, summaries, columns, note)
    # 2. pair matrices
    overlap, rho = pair_matrix(pairs, len(names), "overlap", k), pair_matrix(pairs, len(names), "rho", 1.0)
    print_matrix(overlap, names, f"mean overlap@{k} (images shared by the two top-{k} lists; diagonal = {k})", "{:.2f}")
    print_matrix(rho, names, "mean Spearman rho of the two similarity rows over all other images", "{:.3f}")
    # 3. paired tests of the models, all queries: AP@k per query; whole patients resampled when ids exist
    groups = patient_ids
    model_tests = with_adjusted(metrics.paired_comparison(
        {nm: s[key] for nm, s in zip(names, per_query)}, groups, args.bootstrap, args.permutations, args.seed),
        args.correction)
    unit = "patients" if groups is not None else "queries"
    print_tests(model_tests, key, f"paired differences of {key}, all {n} queries (bootstrap 95% CI and sign-flip p "
                f"over {unit}; {args.correction} correction over the {len(model_tests)} pairs; * = corrected p < 0.05)",
                args.correction)
    # 4. fusions on held-out queries: alpha chosen on a seeded half (the same half for every pair), scored on the
    #    other; each fusion against the better of its inputs there, RRF over all against the best model there
    select, evaluate = heldout_split(n, args.seed)
    g_eval = None if groups is None else groups[evaluate]
    heldout = {nm: s[key][evaluate] for nm, s in zip(names, per_query)}
    best_model = max(names, key=lambda m: heldout[m].mean())  # before any fusion row joins `heldout`
    fusion_rows, fusion_tests = [], []
    for (i, j), r in pairs.items():
        alpha, h_map, _, _ = heldout_alpha(r["fusion"], alphas, args.seed)
        row = f"{names[i]}+{names[j]} a={alpha:g}"
        heldout[row] = r["fusion"][alphas.index(alpha)][evaluate]
        better = max((names[i], names[j]), key=lambda m: heldout[m].mean())
        fusion_rows.append({"models": [names[i], names[j]], "alpha": alpha, "name": row, key: float(h_map),
                            "better_input": better})
    rrf_name = f"RRF all (k={args.rrf_k})"
    heldout[rrf_name] = rrf[evaluate]
    fusion_rows.append({"models": list(names), "name": rrf_name, key: float(rrf[evaluate].mean()),
                        "better_input": best_model})
    if e_learned is not None:
        learned = single_model_scores(e_learned, labels, k, groups_excl, args.chunk_size)
        heldout[args.learned_name] = learned[0][evaluate]
        fusion_rows.append({"models": "see the set's meta (train_fusion.py --apply)", "name": args.learned_name,
                            key: float(learned[0][evaluate].mean()),
                            "better_input": best_model})
    for f in fusion_rows:
        fusion_tests += metrics.paired_comparison({f["name"]: heldout[f["name"]], f["better_input"]:
                                                   heldout[f["better_input"]]}, g_eval, args.bootstrap,
                                                  args.permutations, args.seed)
    fusion_tests = with_adjusted(fusion_tests, args.correction)
    w = max(len(m) for m in heldout) + 2
    print(f"\nheld-out: fusion alphas chosen on {len(select)} queries; every row below on the other {len(evaluate)}")
    print(f"{'Method':<{w}}| {key:>8}")
    print("-" * (w + 11))
    for m, v in heldout.items():
        print(f"{m:<{w}}| {v.mean():>8.4f}")
    print_tests(fusion_tests, key, f"each fusion minus the better of its inputs on these {len(evaluate)} queries "
                f"(over {unit}; {args.correction} correction over the {len(fusion_tests)} fusions; * = corrected "
                f"p < 0.05)", args.correction)

    per_pair = [{"a": names[i], "b": names[j], "mean_overlap": float(overlap[i, j]),
                 "pct_low_overlap": float((r["overlap"] <= k // 2).mean()), "mean_spearman": float(rho[i, j]),
                 "std_spearman": float(np.nanstd(r["rho"])),
                 "fusion_all_queries": [{"alpha": a, key: float(m)} for a, m in zip(alphas, r["fusion"].mean(1))]}
                for (i, j), r in pairs.items()]
    save_json({
        "mode": "n-way", "k": k, "k_values": k_values, "num_queries": n,
        "exclude_same_patient": bool(args.exclude_same_patient), "class_names": list(class_names),
        "precision_note": "P@k (Denner et al. 2025) = share of the top k with the query's label = metrics.py mP@k; "
                          "P@1 = R@1",
        "models": [{"name": nm, "file": str(s.path), "dim": int(e.shape[1]), "model": model_label(s.path, s.meta),
                    "metrics": sm} for nm, s, e, sm in zip(names, sets, es, summaries)],
        "overlap_matrix": {"names": names, "values": overlap.tolist()},
        "spearman_matrix": {"names": names, "values": [[None if not np.isfinite(v) else float(v) for v in row]
                                                       for row in rho]},
        "pairs": per_pair,
        "paired_models": {"metric": key, "queries": n, "resampled": unit, "correction": args.correction,
                          "bootstrap": args.bootstrap, "permutations": args.permutations, "seed": args.seed,
                          "tests": model_tests},
        "rrf": {"k": args.rrf_k, "sets": names, key: float(rrf.mean())},
        "heldout": {"selection_queries": len(select), "queries": len(evaluate), "fusion_alphas": alphas,
                    key: {m: float(v.mean()) for m, v in heldout.items()}, "fusions": fusion_rows,
                    "correction": args.correction, "tests": fusion_tests},
    }, save_dir / NWAY_RESULT_FILES[0])
    np.savez(save_dir / NWAY_RESULT_FILES[1], names=np.array(names), image_ids=image_ids,
             heldout_eval_indices=evaluate, rrf_ap=rrf,
             pair_names=np.array([[names[i], names[j]] for i, j in pairs]),
             pair_overlap=np.stack([r["overlap"] for r in pairs.values()]),
             pair_rho=np.stack([r["rho"] for r in pairs.values()]),
             **{f"model_{m}": np.stack([s[m] for s in per_query]) for m in per_query[0]})  # (models, queries)
    plot_matrix(overlap, names, f"mean overlap@{k} of the top-{k} lists ({n} queries)",
                save_dir / NWAY_RESULT_FILES[2], vmin=0, vmax=k)
    plot_matrix(rho, names, f"mean Spearman rho of the similarity rows ({n} queries)",
                save_dir / NWAY_RESULT_FILES[3], fmt="{:.3f}", vmin=-1, vmax=1)
    print(f"\nresults in {save_dir}/: {', '.join(NWAY_RESULT_FILES)}")
    return 0


def run(args):
    """The N-way mode with --embeddings, else the two-model mode (both of its flags needed)."""
    if args.embeddings:
        if args.model1_embeddings or args.model2_embeddings:
            raise ValueError("--embeddings (N-way) replaces --model1-embeddings / --model2-embeddings; give one form")
        return run_nway(args)
    if not (args.model1_embeddings and args.model2_embeddings):
        raise ValueError("give --embeddings NAME=PATH NAME=PATH ... (any number of sets) or both "
                         "--model1-embeddings and --model2-embeddings")
    return run_pair(args)


# ----------------------------------------------------------------------------- main

def run_pair(args):
    print_args(args)
    s1, s2 = load_sets(args)
    e1, e2 = _normalise(s1.embeddings, s1.path), _normalise(s2.embeddings, s2.path)
    labels, image_ids, patient_ids = s1.labels, s1.image_ids, s1.patient_ids
    n, k = len(labels), args.k
    class_names = check_args(args, n, labels, patient_ids)
    e_learned = load_learned(args, s1) if args.learned_embeddings else None
    hierarchy = (metrics.load_hierarchy(args.hierarchy, class_names, args.hierarchy_distance)
                 if args.hierarchy else None)
    names = model_names(args, (s1.meta, s2.meta))
    find = check_images(args, image_ids)
    save_dir = ensure_writable_dir(args.save_dir, "--save-dir")
    existing = [str(save_dir / f) for f in RESULT_FILES if (save_dir / f).exists()]
    if existing and not args.overwrite:
        raise ValueError(f"--save-dir {save_dir} already holds results ({', '.join(existing)}); "
                         f"choose another --save-dir or pass --overwrite")
    alphas = [float(a) for a in args.fusion_alphas]
    print(f"{n} queries, leave-one-out; {names[0]} D={e1.shape[1]}, {names[1]} D={e2.shape[1]}, k={k}"
          + (", excluding same-patient images" if args.exclude_same_patient else ""))

    t0 = time.time()
    r = compare_embeddings(e1, e2, labels, k, alphas, patient_ids if args.exclude_same_patient else None,
                           args.chunk_size, rrf_k=args.rrf_k)
    map1, map2 = float(r["ap1"].mean()), float(r["ap2"].mean())
    # full-ranking mAP over the queries that have a relevant image; None (printed "n/a") when none has one
    full1, full2 = (float(np.nanmean(a)) if (~np.isnan(a)).any() else None for a in (r["fullap1"], r["fullap2"]))
    no_rel = int(np.isnan(r["fullap1"]).sum())
    rho = r["rho"]
    if np.isnan(rho).any():
        print(f"note: {int(np.isnan(rho).sum())} queries have a constant similarity row; rho is undefined there "
              f"and left out of the mean")
    mean_rho, std_rho = float(np.nanmean(rho)), float(np.nanstd(rho))
    overlaps = r["overlap"]
    mean_overlap = float(overlaps.mean())
    pct_low = float((overlaps <= k // 2).mean())
    fusion_maps = r["fusion"].mean(1)
    zscore_maps = r["zscore"].mean(1)
    rrf_map = float(r["rrf"].mean())
    h_alpha, h_map, _, evaluate = heldout_alpha(r["fusion"], alphas, args.seed)
    print(f"computed in {time.time() - t0:.1f} s")

    key = f"mAP@{k}"
    # 1. per-model rows, all N queries
    rows = [(names[0], map1, r["r1_1"].mean(), full1), (names[1], map2, r["r1_2"].mean(), full2)]
    learned = None
    if args.learned_embeddings:
        learned = single_model_scores(e_learned, labels, k, patient_ids if args.exclude_same_patient else None,
                                      args.chunk_size)
        rows.append((args.learned_name, float(learned[0].mean()), learned[1].mean(), "-"))  # top-k only
    w = max(len(x[0]) for x in rows + [(f"Z-score fusion alpha={alphas[0]:g}",)] + [(f"RRF (k={args.rrf_k})",)]) + 2
    print(f"\nall {n} queries (fusion alphas here are not chosen on separate queries: optimistic)")
    print(f"{'Model':<{w}}| {key:>8} | {'R@1':>8} | {'mAP':>8}")
    print("-" * (w + 33))
    for name, m, r1, full in rows:
        full_text = full if isinstance(full, str) else "n/a" if full is None else f"{full:.4f}"
        print(f"{name:<{w}}| {m:>8.4f} | {r1:>8.4f} | {full_text:>8}")
    for a, m in zip(alphas, fusion_maps):
        print(f"{f'Fusion alpha={a:g}':<{w}}| {m:>8.4f} | {'-':>8} | {'-':>8}")
    for a, m in zip(alphas, zscore_maps):
        print(f"{f'Z-score fusion alpha={a:g}':<{w}}| {m:>8.4f} | {'-':>8} | {'-':>8}")
    print(f"{f'RRF (k={args.rrf_k})':<{w}}| {rrf_map:>8.4f} | {'-':>8} | {'-':>8}")
    if no_rel:
        print(f"({no_rel} queries without any relevant image left out of mAP)")
    # 2. pair statistics: one value per pair of models, not per model
    print(f"\npair {names[0]} / {names[1]}: Mean Overlap@{k} {mean_overlap:.2f}, {100 * pct_low:.1f}% of queries "
          f"share <= {k // 2} of their top-{k}; Spearman rho {mean_rho:.3f} (std {std_rho:.3f})")
    # 3. held-out: alpha chosen on one half, every method scored on the other half, the same queries
    fusions = [f"Held-out alpha={h_alpha:g}", f"RRF (k={args.rrf_k})"] + ([args.learned_name] if learned else [])
    scores = {names[0]: r["ap1"][evaluate], names[1]: r["ap2"][evaluate],
              fusions[0]: r["fusion"][alphas.index(h_alpha)][evaluate], fusions[1]: r["rrf"][evaluate]}
    if learned is not None:
        scores[args.learned_name] = learned[0][evaluate]
    groups = patient_ids[evaluate] if patient_ids is not None else None
    pairs = metrics.paired_comparison(scores, groups, args.bootstrap, args.permutations, args.seed)
    print(f"\nheld-out: alpha chosen on {n - len(evaluate)} queries; every row below on the other {len(evaluate)}")
    print(f"{'Method':<{w}}| {key:>8}")
    print("-" * (w + 11))
    for name, v in scores.items():
        print(f"{name:<{w}}| {v.mean():>8.4f}")
    print_paired(pairs, key, len(evaluate), groups is not None)
    hier = {}
    if hierarchy is not None:  # on each model's top-k lists (metrics.py tie rule and exclusions)
        for key, name in (("top1", names[0]), ("top2", names[1])):
            h = metrics.hierarchical_metrics(r[key], labels, None, hierarchy, k_values=(k,))
            hier[key] = {m: h[f"{m}@{k}"] for m in ("AHD", "MS", "hP")}
            print(f"{name}: AHD@{k} {h[f'AHD@{k}']:.4f}  MS@{k} "
                  + ("n/a" if h[f"MS@{k}"] is None else f"{h[f'MS@{k}']:.4f}") + f"  hP@{k} {h[f'hP@{k}']:.4f}"
                  + f"  (hierarchy {args.hierarchy}, h = {hierarchy.distance_name}, H = {hierarchy.H:g})")
    verdict = interpret(mean_overlap, mean_rho, k, {m: float(v.mean()) for m, v in scores.items()}, pairs, names,
                        fusions, len(evaluate), args.bootstrap)
    print(verdict)

    np.savez(save_dir / RESULT_FILES[0], model1_name=names[0], model2_name=names[1], model1_map=map1,
             model2_map=map2, overlaps=overlaps, mean_overlap=mean_overlap, correlations=rho,
             mean_spearman=mean_rho, std_spearman=std_rho, fusion_alphas=np.array(alphas),
             fusion_maps=fusion_maps, aps_model1=r["ap1"], aps_model2=r["ap2"], r1_model1=r["r1_1"],
             r1_model2=r["r1_2"], aps_rrf=r["rrf"], aps_fusion=r["fusion"], heldout_eval_indices=evaluate,
             **({} if learned is None else {"aps_learned": learned[0], "r1_learned": learned[1]}))
    save_json({
        "k": k, "num_queries": n,
        "model1": {"name": names[0], key: map1, "R@1": float(r["r1_1"].mean()), "mAP": full1,
                   **{f"{m}@{k}": v for m, v in hier.get("top1", {}).items()}},
        "model2": {"name": names[1], key: map2, "R@1": float(r["r1_2"].mean()), "mAP": full2,
                   **{f"{m}@{k}": v for m, v in hier.get("top2", {}).items()}},
        "mean_overlap": mean_overlap, "pct_low_overlap": pct_low,
        "mean_spearman": mean_rho, "std_spearman": std_rho,
        "fusion": [{"alpha": a, key: float(m)} for a, m in zip(alphas, fusion_maps)],
        "fusion_zscore": [{"alpha": a, key: float(m)} for a, m in zip(alphas, zscore_maps)],
        "rrf": {key: rrf_map},
        "heldout": {"alpha": h_alpha, key: h_map},
        **({} if learned is None else {"learned": {"name": args.learned_name, key: float(learned[0].mean()),
                                                   "R@1": float(learned[1].mean())}}),
        "paired": {"queries": len(evaluate), "resampled": "patients" if groups is not None else "queries",
                   "bootstrap": args.bootstrap, "permutations": args.permutations, "seed": args.seed,
                   key: {name: float(v.mean()) for name, v in scores.items()}, "pairs": pairs},
        **({} if hierarchy is None else {"hierarchy": {"file": hierarchy.source, "distance": hierarchy.distance_name,
                                                       "H": hierarchy.H}}),
        "verdict": verdict,
    }, save_dir / RESULT_FILES[1])
    plot_overlap_histogram(overlaps, k, names, save_dir / RESULT_FILES[2])

    if args.visualize_samples > 0:
        find = find or _image_finder(None, None)
        missing = sum(find(str(i)) is None for i in image_ids[:50])
        if args.image_dir is None or missing:
            print(f"note: images not found for {missing} of the first {min(n, 50)} ids"
                  + ("" if args.image_dir else " (no --image-dir)") + "; they are drawn as labelled blanks")
        for q, case in choose_queries(overlaps, min(args.visualize_samples, n), args.seed):
            plot_query(q, e1, e2, r["top1"], r["top2"], labels, image_ids, class_names, names, find, k,
                       int(overlaps[q]), save_dir / f"query_{q}_comparison.png", case)
            print(f"query_{q}_comparison.png: {case} case, image {image_ids[q]}, overlap {int(overlaps[q])} of {k}")
    print(f"\nresults in {save_dir}/: {', '.join(RESULT_FILES)}"
          + (", query_*_comparison.png" if args.visualize_samples > 0 else ""))
    return 0


def main(args):
    return run_main(run, args, "test_backbone.py")  # bad input: one line, exit code 2


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
