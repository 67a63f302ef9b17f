"""Evaluate image retrieval: R@K, mP@K, mAP, mAP@K, MAP@R, majority vote, per class, bootstrap CIs.

From a trained checkpoint (the model is rebuilt from it; its own eval transform is used):
    python test.py --resume checkpoints/RUN/RUN_best_ckpt.pth \
        --dataset covid --dataset-dir data/covidx --test-image-list data/covidx/test_COVIDx4.txt
    # CPU only
    CUDA_VISIBLE_DEVICES="" python test.py --resume CKPT --dataset-dir data/demo \
        --test-image-list data/demo/test_split.txt --device cpu --workers 2
    # test queries against the training archive, other images of the same patient removed
    python test.py --resume CKPT --dataset-dir DIR --test-image-list test.txt \
        --gallery-image-list train.txt --exclude-same-patient

From saved embedding sets (embeddings.py: what extract_embeddings.py, and test.py --resume, write; the labels,
image and patient ids and meta beside X.npy are found by default, --labels etc. override them):
    python test.py --embeddings emb/convnext.npy --save-dir results/convnext
    # queries against a separately extracted gallery: labels are matched by class NAME (each set's meta)
    python test.py --embeddings emb/test.npy --gallery-embeddings emb/train.npy --exclude-same-patient
    # the same numbers again from the sets a --resume run wrote
    python test.py --embeddings results/RUN/embeddings.npy [--gallery-embeddings results/RUN/gallery_embeddings.npy]

With an OOD warning per query (ood.py's kNN score against the archive's saved embeddings, flag at 95% ID):
    python test.py --resume CKPT --dataset-dir DIR --test-image-list test.txt --ood-reference emb/train.npy --ood-k 50

Evaluation is single-process (one matrix product per chunk of queries); under torchrun use
train.py's built-in test evaluation instead. Definitions and the tie rule: metrics.py docstring.
Writes SAVE_DIR/results.json, per_query.npz, confusion_matrix.png and retrieval_examples.png (when images are
available); with --resume also the embedding sets it evaluated: SAVE_DIR/embeddings.npy (the queries) and, with
--gallery-image-list, SAVE_DIR/gallery_embeddings.npy, which every tool reads (results.json "embedding_sets" names
the sets of the run). An existing results.json or set is kept unless --overwrite.
"""
import argparse
from pathlib import Path

import numpy as np

import embeddings
import metrics
import ood
from dataset import (LABEL_MAPS, ImageListDataset, get_data_parser, get_gallery_parser, load_image, resolve_class_names,
                     test_image_dir, train_image_dir)
from utils import (HelpFormatter, atomic_write_text, check_writable_dir, ensure_writable_dir, get_device,
                   get_runtime_parser, git_revision, print_args, resolve_amp, run_main, save_figure, save_json, set_seed)

QUERY_SET, GALLERY_SET = "embeddings.npy", "gallery_embeddings.npy"  # the sets a --resume run writes into --save-dir


def get_args_parser():
    p = argparse.ArgumentParser(description="Retrieval evaluation",
                                parents=[get_data_parser(lists=("test",), test_help="query list (images in the test "
                                                         "folder); leave-one-out unless --gallery-image-list"),
                                         get_gallery_parser(), get_runtime_parser(), ood.get_ood_warning_parser()],
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("from a checkpoint (the gallery and runtime flags apply)")
    g.add_argument("--resume", type=Path, default=None, help="checkpoint written by train.py")
    g.add_argument("--model", default=None, help="if given, must match the checkpoint's model")
    g.add_argument("--embedding-dim", type=int, default=None, help="if given, must match the checkpoint")
    g = p.add_argument_group("from saved embedding sets (embeddings.py; the files beside X.npy are found by name)")
    g.add_argument("--embeddings", type=Path, default=None, help="X.npy, the (N, D) embeddings of the queries")
    g.add_argument("--labels", type=Path, default=None, help="(N,) int .npy; not given: the labels file of X.npy")
    g.add_argument("--image-ids", type=Path, default=None,
                   help="(N,) .npy of image ids; not given: the image ids file of X.npy")
    g.add_argument("--patient-ids", type=Path, default=None,
                   help="(N,) .npy of patient ids; not given: the patient ids file of X.npy")
    g.add_argument("--class-names", nargs="+", default=None,
                   help="names of label ids 0, 1, ... for arrays without a meta file (--dataset is not used for "
                        "saved embeddings); not given: the ids themselves")
    g.add_argument("--gallery-embeddings", type=Path, default=None,
                   help="G.npy (M, D) searched instead of leave-one-out; the files beside it are found likewise")
    g.add_argument("--gallery-labels", type=Path, default=None, help="(M,) int .npy; not given: G's labels file")
    g.add_argument("--gallery-image-ids", type=Path, default=None, help="(M,) .npy; not given: G's image ids file")
    g.add_argument("--gallery-patient-ids", type=Path, default=None,
                   help="(M,) .npy; not given: G's patient ids file")
    g = p.add_argument_group("evaluation")
    g.add_argument("--exclude-same-patient", action="store_true",
                   help="remove gallery images of the query's own patient (needs patient ids)")
    g.add_argument("--k-values", type=int, nargs="+", default=[1, 5, 10], help="K of R@K, mP@K and mAP@K")
    g.add_argument("--vote-k", type=int, nargs="+", default=list(metrics.DEFAULT_VOTE_K),
                   help="majority-vote k values (a k that a query's class cannot win, 2R < k, is skipped: n/a)")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (0: none)")
    g.add_argument("--seed", type=int, default=0, help="bootstrap and example-query seed")
    g.add_argument("--knn-backend", default="torch", choices=["torch", "faiss"],
                   help="top-k search; full-ranking mAP always uses the exact chunked pass")
    g.add_argument("--faiss-index", default="flat", choices=["flat", "ivf", "hnsw"],
                   help="flat = exact; ivf/hnsw are approximate and report their recall@k against exact")
    g.add_argument("--num-examples", type=int, default=6,
                   help="queries drawn in retrieval_examples.png (failures first, then successes)")
    g.add_argument("--hierarchy", default=None,
                   help="class tree ('child parent' lines, root parent '-', leaves = class names) for AHD@k, MS@k, "
                        "hP@k (None: data/ontology/covidx_hierarchy.txt for --dataset covid; 'none': skip)")
    g.add_argument("--hierarchy-distance", default="lca-height", choices=metrics.HIERARCHY_DISTANCES,
                   help="h(a, b) of AHD/MS/hP: the height of the lowest common ancestor (Bertinetto et al. 2020) "
                        "or half the tree path between the classes; they differ on unbalanced trees (metrics.py)")
    g.add_argument("--save-dir", type=Path, default=Path("./results"), help="output folder")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing results.json (and the embedding sets of a --resume run)")
    g.add_argument("--compare-with", type=Path, nargs="+", default=None, metavar="RUN",
                   help="earlier test.py runs (their --save-dir, or the per_query.npz in it) on the same queries: "
                        "paired difference of AP and R@1 with a bootstrap 95%% CI (--bootstrap) and a permutation "
                        "p-value (--permutations), patients resampled together when patient ids are known")
    g.add_argument("--permutations", type=int, default=1000, help="sign-flip permutations of --compare-with")
    return p


# --------------------------------------------------------------------------- inputs

def saved_file(args, prefix, key):
    """--{prefix}{key} (e.g. --gallery-labels) if given, else the set's own file beside --{prefix}embeddings when
    it exists, else None."""
    given = getattr(args, prefix + key)
    if given is not None:
        return given
    own = embeddings.sidecar_paths(getattr(args, prefix + "embeddings"))[key]
    return own if own.is_file() else None


def check_args(args):
    """Every flag problem is reported before any model is built or file is written."""
    if (args.resume is None) == (args.embeddings is None):
        raise ValueError("give exactly one of --resume CKPT (images are embedded) or --embeddings E.npy")
    if args.embeddings is not None:
        if saved_file(args, "", "labels") is None:
            raise ValueError(f"--embeddings {args.embeddings}: no labels; "
                             f"{embeddings.sidecar_paths(args.embeddings)['labels']} does not exist, pass --labels L.npy")
        for key in ("labels", "image_ids", "patient_ids"):
            if getattr(args, f"gallery_{key}") is not None and args.gallery_embeddings is None:
                raise ValueError(f"--gallery-{key.replace('_', '-')} needs --gallery-embeddings")
        if args.gallery_embeddings is not None and saved_file(args, "gallery_", "labels") is None:
            raise ValueError(f"--gallery-embeddings {args.gallery_embeddings}: no labels; "
                             f"{embeddings.sidecar_paths(args.gallery_embeddings)['labels']} does not exist, pass "
                             f"--gallery-labels")
        if args.exclude_same_patient and saved_file(args, "", "patient_ids") is None:
            raise ValueError("--exclude-same-patient needs patient ids: --patient-ids P.npy (or the set's patient "
                             "ids file beside the embeddings)")
        if (args.exclude_same_patient and args.gallery_embeddings is not None
                and saved_file(args, "gallery_", "patient_ids") is None):
            raise ValueError("--exclude-same-patient with a gallery needs --gallery-patient-ids")
    else:
        if not Path(args.resume).is_file():
            raise ValueError(f"--resume {args.resume}: file not found; give a checkpoint written by train.py")
        if args.test_image_list is None:
            raise ValueError("--resume needs --test-image-list (and --dataset-dir or --test-dataset-dir)")
        if args.dataset_dir is None and args.test_dataset_dir is None:
            raise ValueError("--resume needs --dataset-dir or --test-dataset-dir to find the test images")
        if args.gallery_image_list is not None and args.gallery_dataset_dir is None and args.dataset_dir is None:
            raise ValueError("--gallery-image-list needs --gallery-dataset-dir or --dataset-dir")
    if any(k < 1 for k in args.k_values):
        raise ValueError(f"--k-values must be >= 1, got {args.k_values}")
    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.permutations < 0:
        raise ValueError(f"--permutations must be >= 0, got {args.permutations}")
    hierarchy_file(args, check=True)
    for run in args.compare_with or ():
        read_per_query(run)  # a missing or foreign file stops the run before any work
    results = Path(args.save_dir) / "results.json"
    if results.exists() and not args.overwrite:
        raise ValueError(f"{results} already exists; choose another --save-dir or pass --overwrite to replace it")
    check_writable_dir(args.save_dir)
    for path in output_sets(args).values():  # the sets a --resume run writes: refused now, not after the work
        embeddings.check_output(path, args.overwrite, "--save-dir")


def output_sets(args):
    """{"queries": SAVE_DIR/embeddings.npy[, "gallery": SAVE_DIR/gallery_embeddings.npy]}: the embedding sets a
    --resume run writes; none from saved embeddings (the input sets are the run's sets)."""
    if args.resume is None:
        return {}
    out = {"queries": Path(args.save_dir) / QUERY_SET}
    if args.gallery_image_list is not None:
        out["gallery"] = Path(args.save_dir) / GALLERY_SET
    return out


def read_per_query(run):
    """The per_query.npz of an earlier test.py run (its folder or the file): {ap, r1, image_ids[, patient_ids]}."""
    path = Path(run) / "per_query.npz" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise ValueError(f"--compare-with {run}: no per_query.npz there (test.py writes it into its --save-dir)")
    try:
        with np.load(path, allow_pickle=False) as z:
            got = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"--compare-with {path}: not a readable .npz file ({e})") from e
    if not {"ap", "r1", "image_ids"} <= set(got):
        raise ValueError(f"--compare-with {path}: expected the arrays ap, r1 and image_ids of test.py, got {sorted(got)}")
    got["path"] = path
    return got


def paired_with_runs(args, ranking, query):
    """Paired differences (this run minus each earlier run) of per-query AP and R@1, matched by image id."""
    ids = np.asarray(query["image_ids"] if query["image_ids"] is not None else np.arange(len(query["labels"]))).astype(str)
    this = {"ap": np.asarray(ranking.ap, np.float64), "r1": ranking.relevant[:, 0].astype(np.float64)}
    groups = None if query["patient_ids"] is None else np.asarray(query["patient_ids"]).astype(str)
    out = []
    for run in args.compare_with:
        other = read_per_query(run)
        oid = other["image_ids"].astype(str)
        if len(oid) != len(ids) or set(oid) != set(ids) or len(set(ids)) != len(ids):
            raise ValueError(f"--compare-with {other['path']}: its {len(oid)} queries are not the {len(ids)} queries of "
                             f"this run (image ids differ); compare runs on the same query list")
        pos = {v: i for i, v in enumerate(oid)}
        order = np.array([pos[v] for v in ids])
        row = {"run": str(other["path"])}
        for key, name in (("ap", "AP"), ("r1", "R@1")):
            a, b = this[key], np.asarray(other[key], np.float64)[order]
            keep = np.isfinite(a) & np.isfinite(b)  # queries without any relevant image have no AP
            cmp = metrics.paired_comparison({"this": a[keep], "other": b[keep]},
                                            None if groups is None else groups[keep], n_boot=args.bootstrap,
                                            n_perm=args.permutations, seed=args.seed)[0]
            row[name] = {"diff": cmp["diff"], "ci": cmp["ci"], "p": cmp["p"], "significant": cmp["significant"],
                         "num_queries": int(keep.sum())}
        out.append(row)
        print(f"paired vs {other['path']} (this - that, {row['AP']['num_queries']} queries"
              + (", patients resampled together" if groups is not None else "") + "): "
              + "  ".join(f"{n} {row[n]['diff']:+.4f} [{row[n]['ci'][0]:+.4f}, {row[n]['ci'][1]:+.4f}] "
                          f"p={row[n]['p']:.4f}{' *' if row[n]['significant'] else ''}" for n in ("AP", "R@1")))
    return out


def hierarchy_file(args, check=False):
    """--hierarchy, else the shipped tree of --dataset (covid), else None; check: parse it (structure errors)."""
    path = args.hierarchy if args.hierarchy is not None else metrics.DEFAULT_HIERARCHIES.get(args.dataset)
    if path is None or str(path).lower() == "none":
        return None
    if check:
        if not Path(path).is_file():
            raise ValueError(f"--hierarchy {path}: file not found (a file of 'child parent' lines)")
        metrics.parse_hierarchy(Path(path).read_text(encoding="utf-8"), str(path))
        if args.resume is not None and args.dataset in LABEL_MAPS:  # names known now: check the leaves first
            load_hierarchy(args, path, sorted(LABEL_MAPS[args.dataset], key=LABEL_MAPS[args.dataset].get))
    return Path(path)


def class_names_origin(args):
    """Where this run's class names come from and how to change them (said when a hierarchy does not fit)."""
    if args.resume is not None:
        return (f"the class names are the labels of the lists (--dataset generic) and the checkpoint's"
                if args.dataset == "generic" else f"the class names are the --dataset {args.dataset} label map")
    meta = embeddings.sidecar_paths(args.embeddings)["meta"]
    if embeddings.load(args.embeddings, labels=saved_file(args, "", "labels"), required=()).class_names is not None:
        return f"the class names come from {meta}"
    if args.class_names:
        return "the class names come from --class-names"
    # arrays without a meta file: --dataset's label map is not applied to saved embeddings
    return (f"{meta} does not exist, so the class names are the label ids (--dataset is not used for saved "
            f"embeddings); pass --class-names with one name per label id, in id order")


def load_hierarchy(args, path, names):
    """metrics.load_hierarchy with --hierarchy-distance; a tree that does not fit says where the names came from."""
    try:
        return metrics.load_hierarchy(path, names, args.hierarchy_distance)
    except ValueError as e:
        raise ValueError(f"{e}; {class_names_origin(args)}") from e


def hierarchy_for(args, names, query, gal):
    """The class tree of --hierarchy (an error when it does not fit) or the --dataset default (skipped with a
    note when it does not fit), with h by --hierarchy-distance; None without one."""
    hpath = hierarchy_file(args)
    if hpath is None:
        return None
    try:
        return load_hierarchy(args, hpath, metrics.hierarchy_class_names(names, query["labels"], gal["labels"]))
    except ValueError as e:
        if args.hierarchy is not None:
            raise
        print(f"note: the default hierarchy {hpath} does not fit these classes ({e}); AHD/MS/hP skipped")
        return None


def as_inputs(s, paths=None):
    """The dict the evaluation below reads, from an EmbeddingSet (paths: image files, for the example figure)."""
    return {"embeddings": s.embeddings, "labels": s.labels, "image_ids": s.image_ids, "patient_ids": s.patient_ids,
            "paths": paths}


def embeddings_from_checkpoint(args, model, ckpt):
    """(query, gallery or None, class names, {"queries": EmbeddingSet[, "gallery": ...]} to save)."""
    from model import get_transform
    device = get_device(args.device)
    query_dir = test_image_dir(args.dataset_dir or args.test_dataset_dir, args.test_dataset_dir)
    gallery_dir = args.gallery_dataset_dir or (train_image_dir(args.dataset_dir) if args.dataset_dir else None)

    # generic lists: the class ids the model was trained with
    stored = ckpt.get("class_names") if args.dataset == "generic" else None
    names, extra = resolve_class_names(args.dataset, args.test_image_list, [args.gallery_image_list],
                                       given=stored if args.dataset == "generic" else None)
    if extra and stored:
        print(f"note: classes {extra} of the lists were not in the training list of {args.resume}")

    def datasets(transform, check_files):
        q = ImageListDataset(args.test_image_list, query_dir, dataset=args.dataset, transform=transform,
                             class_names=names, check_files=check_files, cache_dir=args.cache_dir if transform else None)
        g = None
        if args.gallery_image_list is not None:
            g = ImageListDataset(args.gallery_image_list, gallery_dir, dataset=args.dataset, transform=transform,
                                 class_names=names, check_files=check_files,
                                 cache_dir=args.cache_dir if transform else None)
        return q, g

    # lists, image files, image ids (unique: the sets written below are matched by id) and k are checked
    # before any image is embedded
    query_ds, gallery_ds = datasets(None, True)
    for ds in (query_ds, gallery_ds):
        if ds is not None:
            ds.check_unique_ids()
    g = gallery_ds or query_ds
    cand, _ = metrics.candidate_counts(query_ds.labels, None if gallery_ds is None else g.labels,
                                       query_ds.patient_ids, g.patient_ids, args.exclude_same_patient)
    metrics.check_k(args.k_values, cand)
    # the model's own eval transform: the same as validation in train.py and extract_embeddings.py
    query_ds, gallery_ds = datasets(get_transform(model), False)
    amp_dtype = resolve_amp(args.amp, device)  # --amp alone: bf16 on CUDA, off on CPU
    # train.py --exclude-classes travels with the sets (ood.py reads it), as extract_embeddings.py records it
    excluded = list((ckpt.get("args") or {}).get("exclude_classes") or [])
    sets, inputs = {}, []
    for key, ds, folder in (("queries", query_ds, query_dir), ("gallery", gallery_ds, gallery_dir)):
        if ds is None:
            continue
        # rows in list order, one process (test.py evaluates on one process)
        rows = embeddings.embed_dataset(model, ds, device, args.eval_batch_size, args.workers, amp_dtype=amp_dtype,
                                        progress=True, desc=f"embedding {ds.list_file.name}", distributed=False)
        meta = embeddings.make_meta(model=model, checkpoint=args.resume, list_file=ds.list_file, image_dir=folder,
                                    dataset=args.dataset, class_names=ds.class_names, seed=args.seed,
                                    exclude_classes=excluded)
        sets[key] = embeddings.EmbeddingSet.from_dataset(rows, ds, meta)
        inputs.append(as_inputs(sets[key], ds.paths))
    return inputs[0], (inputs[1] if len(inputs) > 1 else None), query_ds.class_names, sets


def embeddings_from_files(args):
    """(query, gallery or None, class names) from --embeddings [--gallery-embeddings], each checked by
    embeddings.load; a gallery's labels are put into the queries' class numbering by class name."""
    query = embeddings.load(args.embeddings, labels=args.labels, image_ids=args.image_ids,
                            patient_ids=args.patient_ids, required=("labels",), flag="--embeddings")
    # class identity travels with the files (the meta file): ids are matched by name, never assumed equal
    names = query.class_names
    if names is not None and args.class_names is not None and list(args.class_names) != names:
        raise ValueError(f"--class-names {args.class_names} differ from "
                         f"{embeddings.sidecar_paths(args.embeddings)['meta']} ({names}); drop the flag")
    q, gallery = as_inputs(query), None
    if args.gallery_embeddings is not None:
        gal = embeddings.load(args.gallery_embeddings, labels=args.gallery_labels, image_ids=args.gallery_image_ids,
                              patient_ids=args.gallery_patient_ids, required=("labels",), flag="--gallery-embeddings")
        names, q["labels"], gal_labels = embeddings.common_classes(query, gal)
        gallery = dict(as_inputs(gal), labels=gal_labels)
    if names is None:
        # hand-made arrays: the ids are the names unless --class-names says otherwise
        top = int(max(q["labels"].max(), -1 if gallery is None else gallery["labels"].max()))
        names = list(args.class_names) if args.class_names else [str(i) for i in range(top + 1)]
        if top >= len(names) or min(q["labels"].min(), 0 if gallery is None else gallery["labels"].min()) < 0:
            raise ValueError(f"label ids 0..{top} do not fit --class-names {names}; give one name per id")
    return q, gallery, names


# --------------------------------------------------------------------------- outputs

def print_table(res, k_values):
    ci = res.get("ci95", {})
    rows = [f"R@{k}" for k in k_values] + [f"mP@{k}" for k in k_values] + ["mAP"] + \
           [f"mAP@{k}" for k in k_values if k > 1] + ["MAP@R"]
    print(f"\n{res['protocol']}, {res['num_queries']} queries, gallery {res['num_gallery']}, "
          f"same-patient excluded: {res['exclude_same_patient']}")
    print(f"{'metric':<8}{'value':>9}   95% CI")
    for r in rows:
        v = res.get(r)
        lo_hi = f"[{ci[r][0]:.4f}, {ci[r][1]:.4f}]" if r in ci else ""
        print(f"{r:<8}{'n/a' if v is None else f'{v:.4f}':>9}   {lo_hi}")
    if "hierarchy" in res:
        hr = res["hierarchy"]
        print(f"hierarchy {hr['file']} (h = {hr['distance']}, H = {hr['H']:g}; lower AHD/MS, higher hP is better)")
        for r in [f"{m}@{k}" for m in ("AHD", "MS", "hP") for k in k_values]:
            v = res.get(r)
            lo_hi = f"[{ci[r][0]:.4f}, {ci[r][1]:.4f}]" if ci.get(r) else ""
            print(f"{r:<8}{'n/a' if v is None else f'{v:.4f}':>9}   {lo_hi}")
    if res["vote"] or res["vote_k_without_majority"]:
        print(f"\n{'vote@k':<8}{'acc':>8}{'P_macro':>9}{'R_macro':>9}{'F1_macro':>9}{'F1_wtd':>9}")
        for k in sorted(set(res["vote"]) | set(res["vote_k_without_majority"]), key=int):
            v = res["vote"].get(k)
            if v is None:  # a class cannot win this vote (metrics.vote_short_classes)
                print(f"{k:<8}{'n/a':>8}   (a class has fewer than {int(k) / 2:g} gallery images per query)")
                continue
            print(f"{k:<8}{v['accuracy']:>8.4f}{v['precision_macro']:>9.4f}{v['recall_macro']:>9.4f}"
                  f"{v['f1_macro']:>9.4f}{v['f1_weighted']:>9.4f}")
    print("\nper class:")
    for n, v in res["per_class"].items():
        m = "n/a" if v["mAP"] is None else f"{v['mAP']:.4f}"
        print(f"  {n:<12} R@1 {v['R@1']:.4f}  mAP {m}  ({v['num_queries']} queries)")


def plot_confusion(cm, names, k, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 1.2 * len(names) + 2))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted (majority vote)")
    ax.set_ylabel("true")
    ax.set_title(f"majority vote of the top {k}")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def example_queries(ranking, num, seed):
    """Seeded example queries: failures (top-1 not relevant) first, up to half, then successes.

    Random draws alone show only successes on an easy set; a reader needs to see what goes wrong.
    Returns (query indices, is_failure flags).
    """
    rng = np.random.default_rng(seed)
    miss = np.flatnonzero(~ranking.relevant[:, 0])
    hit = np.flatnonzero(ranking.relevant[:, 0])
    n_miss = min(len(miss), max(num // 2, num - len(hit)))
    qs = list(rng.permutation(miss)[:n_miss]) + list(rng.permutation(hit)[:num - n_miss])
    return np.array(qs, dtype=np.int64), np.array([i < n_miss for i in range(len(qs))])


def plural(n, one, many=None):
    """'1 failure', '2 failures'."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def plot_examples(ranking, query, gallery, names, num, seed, path, k=5, ood_flags=None):
    """Example queries with their top-k, failures first; titles give image and patient ids.
    Green frame = relevant (same label), red = not; OOD-flagged queries say so."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    qs, failed = example_queries(ranking, min(num, len(query["labels"])), seed)
    if not len(qs):
        return
    k = min(k, ranking.indices.shape[1])
    fig, axes = plt.subplots(len(qs), k + 1, figsize=(2.1 * (k + 1), 2.9 * len(qs) + 0.4), squeeze=False)

    def show(ax, p, title, color):
        ax.imshow(load_image(p).convert("L"), cmap="gray")
        ax.set_title(title, fontsize=7, color=color)
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_edgecolor(color)
            s.set_linewidth(3)

    name = lambda c: names[c] if names is not None and c < len(names) else str(c)  # noqa: E731
    short = lambda t: t if len(t) <= 20 else f"{t[:9]}~{t[-9:]}"  # noqa: E731 (UUID-like ids fit a panel)
    ident = lambda s, i: f"{short(str(s['image_ids'][i]))}\npatient {short(str(s['patient_ids'][i]))}"  # noqa: E731
    for row, qi, bad in zip(axes, qs, failed):
        flagged = ood_flags is not None and ood_flags[qi]
        show(row[0], query["paths"][qi], f"{'FAILURE' if bad else 'success'} query: {name(query['labels'][qi])}\n"
             f"{ident(query, qi)}" + ("\nOOD: unlike the archive" if flagged else ""),
             "darkorange" if flagged else "black")
        for j in range(k):
            gi = ranking.indices[qi, j]
            rel = bool(ranking.relevant[qi, j])
            show(row[j + 1], gallery["paths"][gi], f"{j + 1}: {name(gallery['labels'][gi])} "
                 f"{ranking.sims[qi, j]:.3f}\n{ident(gallery, gi)}", "green" if rel else "red")
    fig.suptitle(f"{plural(int(failed.sum()), 'failure')} (top-1 of another class) and "
                 f"{plural(int((~failed).sum()), 'success', 'successes')}, seed {seed}; "
                 f"green = same class as the query, red = not", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def load_model(args):
    """The checkpoint's model, before anything else reads the checkpoint: load_checkpoint refuses a file
    of a kind test.py cannot use (e.g. a train_fusion.py head) with a one-line model.CheckpointError."""
    from model import load_checkpoint
    model, ckpt = load_checkpoint(args.resume, map_location=get_device(args.device), expected_model=args.model,
                                  expected_embedding_dim=args.embedding_dim)
    print(f"model {ckpt['model_name']} ({model.embedding_dim}-d) from {args.resume}"
          + (f", epoch {ckpt['epoch']}" if "epoch" in ckpt else ""))
    return model, ckpt


def run(args):
    check_args(args)
    model = ckpt = None
    if args.resume is not None:
        model, ckpt = load_model(args)
    ood_ref = None
    if args.ood_reference is not None:  # fitted and checked before any image is embedded
        ood_ref = ood.load_reference(args.ood_reference, args.ood_method, args.ood_k, seed=args.seed,
                                     expected_dim=model.embedding_dim if model is not None else None)
    print_args(args)
    set_seed(args.seed)
    if args.resume is not None:
        query, gallery, names, sets = embeddings_from_checkpoint(args, model, ckpt)
    else:
        (query, gallery, names), sets = embeddings_from_files(args), {}
    loo = gallery is None
    gal = query if loo else gallery
    hier = hierarchy_for(args, names, query, gal)  # before the search: a tree that does not fit stops the run
    ood_flags = None
    if ood_ref is not None:
        ood_scores, ood_flags = ood.score_queries(ood_ref, query["embeddings"])
        ood_summary, ood_csv = ood.query_report(ood_ref, ood_scores, ood_flags, query["image_ids"], query["labels"],
                                                class_names=names)
        print(f"OOD warning: {ood_summary['num_flagged']} of {len(ood_flags)} queries are unlike the archive "
              f"({args.ood_method} score > {ood_ref.threshold:.4g}; {ood_ref.info['calibration']}); per query: "
              f"{Path(args.save_dir) / 'query_ood.csv'}")
    qp, gp = query["patient_ids"], gal["patient_ids"]
    if qp is not None and gp is not None:
        qp, gp = qp.astype(str), gp.astype(str)
        counts = {}
        for pid in gp:
            counts[pid] = counts.get(pid, 0) + 1
        n_same = sum((counts.get(pid, 0) - (1 if loo else 0)) > 0 for pid in qp)
        if n_same and not args.exclude_same_patient:
            print(f"note: {n_same} of {len(qp)} queries have another image of the same patient in the gallery; "
                  f"such matches inflate the scores: rerun with --exclude-same-patient to remove them")
        elif args.exclude_same_patient:
            print(f"excluding same-patient gallery images ({n_same} of {len(qp)} queries have some)")
    if not loo and query["image_ids"] is not None and gal["image_ids"] is not None:
        shared = len(set(query["image_ids"].astype(str)) & set(gal["image_ids"].astype(str)))
        if shared:
            print(f"warning: {shared} query image ids also appear in the gallery; those matches are trivial "
                  f"(audit_data.py finds copies under other names too)")
    with_groups = qp is not None and gp is not None
    res, ranking = metrics.evaluate(
        query["embeddings"], query["labels"], None if loo else gal["embeddings"], None if loo else gal["labels"],
        k_values=args.k_values, vote_k=args.vote_k,
        query_groups=qp if with_groups else None, gallery_groups=None if loo or not with_groups else gp,
        exclude_same_group=args.exclude_same_patient, class_names=names, bootstrap=args.bootstrap,
        seed=args.seed, chunk_size=args.chunk_size, backend=args.knn_backend, device=get_device(args.device),
        faiss_index=args.faiss_index, return_ranking=True)
    if res["queries_without_relevant"]:
        print(f"note: {res['queries_without_relevant']} queries have no relevant image in the gallery; "
              f"they are left out of mAP and MAP@R and score 0 in R@K, mP@K, mAP@K")
    if args.knn_backend == "faiss" and args.faiss_index != "flat":
        exact = metrics.rank(query["embeddings"], query["labels"], None if loo else gal["embeddings"],
                             None if loo else gal["labels"], k=ranking.indices.shape[1], exclude_self=loo,
                             query_groups=qp if args.exclude_same_patient else None,
                             gallery_groups=(None if loo else gp) if args.exclude_same_patient else None,
                             full_ranking=False, chunk_size=args.chunk_size)
        k = min(10, ranking.indices.shape[1])
        hit = [len(set(a[:k]) & set(b[:k])) for a, b in zip(ranking.indices, exact.indices)]
        res[f"faiss_recall@{k}"] = float(np.mean(hit) / k)
        print(f"faiss {args.faiss_index}: recall@{k} against exact search {res[f'faiss_recall@{k}']:.4f}")
    short = res["vote_k_without_majority"]
    if short:
        print(f"warning: vote@k for k = {[int(k) for k in short]} not computed (n/a): classes with fewer than k/2 "
              f"gallery images per query (after exclusions) lose such a vote even when all their images rank "
              f"first; at k = {max(short, key=int)}: "
              + ", ".join(f"{c!r} {r}" for c, r in short[max(short, key=int)].items()))
    if hier is not None:  # AHD@k, MS@k, hP@k on the same top-k (tie rule, exclusions) as every other metric
        hres = metrics.hierarchical_metrics(ranking.indices, query["labels"], gal["labels"], hier,
                                            k_values=args.k_values, bootstrap=args.bootstrap, seed=args.seed)
        res["ci95"].update(hres.pop("ci95"))
        res.update(hres)
    if ood_ref is not None:
        res["ood"] = ood_summary
    if args.compare_with:
        res["paired"] = paired_with_runs(args, ranking, query)
    res["source"] = str(args.resume if args.resume is not None else args.embeddings)
    # the sets whose rows these numbers come from: written by this run (--resume) or read (--embeddings)
    used = output_sets(args) if args.resume is not None else {"queries": args.embeddings,
                                                               "gallery": args.gallery_embeddings}
    res["embedding_sets"] = {k: None if used.get(k) is None else str(used[k]) for k in ("queries", "gallery")}
    res["git_revision"] = git_revision()
    print_table(res, sorted(set(args.k_values)))

    save_dir = ensure_writable_dir(args.save_dir)  # created only now: a failed run leaves no empty folder
    # the images embedded from the checkpoint, as embedding sets every tool reads (test.py --embeddings, ood.py ...)
    for key, path in output_sets(args).items():
        embeddings.save(path, sets[key], overwrite=args.overwrite, flag="--save-dir")
    # per-query scores, for paired comparisons of two runs on the same queries (metrics.paired_comparison)
    np.savez(save_dir / "per_query.npz", ap=ranking.ap, r1=ranking.relevant[:, 0].astype(np.float64),
             image_ids=query["image_ids"] if query["image_ids"] is not None else np.arange(len(query["labels"])),
             **({} if query["patient_ids"] is None else {"patient_ids": query["patient_ids"]}))
    if res["vote"]:
        vk = "5" if "5" in res["vote"] else next(iter(res["vote"]))
        cm_names = list(res["vote"][vk]["per_class"])
        plot_confusion(res["vote"][vk]["confusion_matrix"], cm_names, vk, save_dir / "confusion_matrix.png")
    if query["paths"] is not None and args.num_examples > 0:
        plot_examples(ranking, query, gal, names, args.num_examples, args.seed, save_dir / "retrieval_examples.png",
                      ood_flags=ood_flags)
    if ood_ref is not None:
        atomic_write_text(save_dir / "query_ood.csv", ood_csv)
    save_json(res, save_dir / "results.json")  # last, so its presence means a complete run
    print(f"\nwrote {save_dir / 'results.json'}")
    return 0


def main(args):
    return run_main(run, args, "test.py")


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
