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

From saved embeddings (the files extract_embeddings.py writes):
    python test.py --embeddings emb/convnext.npy --labels emb/convnext_labels.npy \
        --image-ids emb/convnext_image_ids.npy --patient-ids emb/convnext_patient_ids.npy --save-dir results/convnext

With an OOD warning per query (ood.py's kNN score against the archive's saved embeddings, flag at 95% ID):
    python test.py --resume CKPT --dataset-dir DIR --test-image-list test.txt --ood-reference emb/train.npy --ood-k 50

Evaluation is single-process (one matrix product per chunk of queries); under torchrun use
train.py's built-in test evaluation instead. Definitions and the tie rule: metrics.py docstring.
Writes SAVE_DIR/results.json, embeddings.npz, confusion_matrix.png and retrieval_examples.png
(when images are available); an existing results.json is kept unless --overwrite.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import metrics
import ood
from dataset import LABEL_MAPS, ImageListDataset, get_data_parser, load_image, test_image_dir, train_image_dir
from utils import atomic_write_text, ensure_writable_dir, get_device, git_revision, print_args, save_json


def get_args_parser():
    p = argparse.ArgumentParser(description="Retrieval evaluation", parents=[get_data_parser()])
    g = p.add_argument_group("from a checkpoint")
    g.add_argument("--resume", type=Path, default=None, help="checkpoint written by train.py")
    g.add_argument("--model", default=None, help="if given, must match the checkpoint's model")
    g.add_argument("--embedding-dim", type=int, default=None, help="if given, must match the checkpoint")
    g.add_argument("--eval-batch-size", type=int, default=32)
    g.add_argument("--gallery-image-list", type=Path, default=None,
                   help="search the test queries against these images instead of leave-one-out")
    g.add_argument("--gallery-dataset-dir", type=Path, default=None,
                   help="gallery image folder (default: the training folder of --dataset-dir)")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    g.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA for extraction")
    g = p.add_argument_group("from saved embeddings")
    g.add_argument("--embeddings", type=Path, default=None, help="(N, D) .npy")
    g.add_argument("--labels", type=Path, default=None, help="(N,) int .npy")
    g.add_argument("--image-ids", type=Path, default=None, help="(N,) .npy of image ids (optional)")
    g.add_argument("--patient-ids", type=Path, default=None, help="(N,) .npy of patient ids (optional)")
    g.add_argument("--gallery-embeddings", type=Path, default=None)
    g.add_argument("--gallery-labels", type=Path, default=None)
    g.add_argument("--gallery-image-ids", type=Path, default=None)
    g.add_argument("--gallery-patient-ids", type=Path, default=None)
    g = p.add_argument_group("evaluation")
    g.add_argument("--exclude-same-patient", action="store_true",
                   help="remove gallery images of the query's own patient (needs patient ids)")
    g.add_argument("--k-values", type=int, nargs="+", default=[1, 5, 10])
    g.add_argument("--vote-k", type=int, nargs="+", default=list(metrics.DEFAULT_VOTE_K),
                   help="majority-vote k values (those above the gallery size are skipped)")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (0: none)")
    g.add_argument("--seed", type=int, default=0, help="bootstrap and example-query seed")
    g.add_argument("--knn-backend", default="torch", choices=["torch", "faiss"],
                   help="top-k search; full-ranking mAP always uses the exact chunked pass")
    g.add_argument("--faiss-index", default="flat", choices=["flat", "ivf", "hnsw"],
                   help="flat = exact; ivf/hnsw are approximate and report their recall@k against exact")
    g.add_argument("--chunk-size", type=int, default=None, help="query rows per similarity chunk")
    g.add_argument("--num-examples", type=int, default=5, help="queries drawn in retrieval_examples.png")
    g.add_argument("--save-dir", type=Path, default=Path("./results"))
    g.add_argument("--overwrite", action="store_true", help="replace an existing results.json")
    g = p.add_argument_group("out-of-distribution warning (ood.py)")
    g.add_argument("--ood-reference", type=Path, default=None,
                   help="archive embeddings TRAIN_EMB.npy (extract_embeddings.py layout): each query gets an OOD "
                        "score (larger = more unusual) and a flag at a threshold that accepts 95%% of a seeded "
                        "held-out part of the archive; written to query_ood.csv and results.json")
    g.add_argument("--ood-method", default="knn", choices=["knn", "mahalanobis"], help="OOD score (ood.py)")
    g.add_argument("--ood-k", type=int, default=50, help="knn OOD score: distance to the k-th archive neighbour")
    return p


# --------------------------------------------------------------------------- inputs

def _load_npy(path, flag, n=None, what="entries"):
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {path}: file not found")
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{flag} {path}: not a readable .npy file ({type(e).__name__}: {e})") from e
    if n is not None and len(a) != n:
        raise ValueError(f"{flag} {path} has {len(a)} {what} but the embeddings have {n} rows; "
                         f"both must come from the same extraction")
    return a


def check_args(args):
    """Every flag problem is reported before any model is built or file is written."""
    if (args.resume is None) == (args.embeddings is None):
        raise ValueError("give exactly one of --resume CKPT (images are embedded) or --embeddings E.npy")
    if args.embeddings is not None:
        if args.labels is None:
            raise ValueError("--embeddings needs --labels L.npy")
        if (args.gallery_embeddings is None) != (args.gallery_labels is None):
            raise ValueError("--gallery-embeddings and --gallery-labels go together")
        if args.exclude_same_patient and args.patient_ids is None:
            raise ValueError("--exclude-same-patient needs --patient-ids P.npy")
        if args.exclude_same_patient and args.gallery_embeddings is not None and args.gallery_patient_ids is None:
            raise ValueError("--exclude-same-patient with a gallery needs --gallery-patient-ids")
    else:
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
    results = Path(args.save_dir) / "results.json"
    if results.exists() and not args.overwrite:
        raise ValueError(f"{results} already exists; choose another --save-dir or pass --overwrite to replace it")


def embeddings_from_checkpoint(args):
    from model import compute_embeddings, get_transform, load_checkpoint
    device = get_device(args.device)
    query_dir = test_image_dir(args.dataset_dir or args.test_dataset_dir, args.test_dataset_dir)
    gallery_dir = args.gallery_dataset_dir or (train_image_dir(args.dataset_dir) if args.dataset_dir else None)

    def datasets(transform, check_files):
        q = ImageListDataset(args.test_image_list, query_dir, dataset=args.dataset, transform=transform,
                             check_files=check_files, cache_dir=args.cache_dir if transform else None)
        g = None
        if args.gallery_image_list is not None:
            g = ImageListDataset(args.gallery_image_list, gallery_dir, dataset=args.dataset, transform=transform,
                                 class_names=q.class_names, check_files=check_files,
                                 cache_dir=args.cache_dir if transform else None)
        return q, g

    # lists, image files and k are checked before the model is built or any image embedded
    query_ds, gallery_ds = datasets(None, True)
    g = gallery_ds or query_ds
    cand, _ = metrics.candidate_counts(query_ds.labels, None if gallery_ds is None else g.labels,
                                       query_ds.patient_ids, g.patient_ids, args.exclude_same_patient)
    metrics.check_k(args.k_values, cand)
    model, ckpt = load_checkpoint(args.resume, map_location=device, expected_model=args.model,
                                  expected_embedding_dim=args.embedding_dim)
    print(f"model {ckpt['model_name']} ({model.embedding_dim}-d) from {args.resume}"
          + (f", epoch {ckpt['epoch']}" if "epoch" in ckpt else ""))
    # the model's own eval transform: the same as validation in train.py and extract_embeddings.py
    query_ds, gallery_ds = datasets(get_transform(model), False)
    amp_dtype = torch.bfloat16 if args.amp and device.type == "cuda" else None  # --amp: bf16 on CUDA only
    sets = []
    for ds in [query_ds] + ([gallery_ds] if gallery_ds is not None else []):
        loader = torch.utils.data.DataLoader(ds, batch_size=args.eval_batch_size, shuffle=False,
                                             num_workers=args.workers, pin_memory=device.type == "cuda")
        idx, emb = compute_embeddings(model, loader, device, amp_dtype=amp_dtype,
                                      progress=sys.stderr.isatty())
        rows = np.empty_like(emb)
        rows[idx] = emb
        sets.append({"embeddings": rows,
                     "labels": ds.labels, "image_ids": np.array(ds.image_ids),
                     "patient_ids": np.array(ds.patient_ids), "paths": ds.paths})
    return sets[0], (sets[1] if len(sets) > 1 else None), query_ds.class_names


def embeddings_from_files(args):
    def one(emb, lab, ids, pids, prefix):
        e = _load_npy(emb, f"--{prefix}embeddings")
        if e.ndim != 2:
            raise ValueError(f"--{prefix}embeddings {emb}: expected a 2-D (N, D) array, got shape {e.shape}")
        n = len(e)
        return {"embeddings": e,
                "labels": _load_npy(lab, f"--{prefix}labels", n, "labels"),
                "image_ids": _load_npy(ids, f"--{prefix}image-ids", n, "ids") if ids else None,
                "patient_ids": _load_npy(pids, f"--{prefix}patient-ids", n, "ids") if pids else None,
                "paths": None}
    query = one(args.embeddings, args.labels, args.image_ids, args.patient_ids, "")
    gallery = None
    if args.gallery_embeddings is not None:
        gallery = one(args.gallery_embeddings, args.gallery_labels, args.gallery_image_ids,
                      args.gallery_patient_ids, "gallery-")
    names = None
    if args.dataset in LABEL_MAPS:
        lm = LABEL_MAPS[args.dataset]
        names = sorted(lm, key=lm.get)
    return query, gallery, names


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
    if res["vote"]:
        print(f"\n{'vote@k':<8}{'acc':>8}{'P_macro':>9}{'R_macro':>9}{'F1_macro':>9}{'F1_wtd':>9}")
        for k, v in res["vote"].items():
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_examples(ranking, query, gallery, names, num, seed, path, k=5, ood_flags=None):
    """A few seeded queries with their top-k; green frame = relevant, red = not; OOD-flagged queries say so."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rng = np.random.default_rng(seed)
    qs = np.sort(rng.choice(len(query["labels"]), size=min(num, len(query["labels"])), replace=False))
    k = min(k, ranking.indices.shape[1])
    fig, axes = plt.subplots(len(qs), k + 1, figsize=(2 * (k + 1), 2.3 * len(qs)), squeeze=False)

    def show(ax, p, title, color):
        ax.imshow(load_image(p).convert("L"), cmap="gray")
        ax.set_title(title, fontsize=8, color=color)
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_edgecolor(color)
            s.set_linewidth(3)

    name = lambda c: names[c] if names is not None and c < len(names) else str(c)  # noqa: E731
    for row, qi in zip(axes, qs):
        flagged = ood_flags is not None and ood_flags[qi]
        show(row[0], query["paths"][qi], f"query: {name(query['labels'][qi])}" + ("\nOOD: unlike the archive"
             if flagged else ""), "darkorange" if flagged else "black")
        for j in range(k):
            gi = ranking.indices[qi, j]
            rel = bool(ranking.relevant[qi, j])
            show(row[j + 1], gallery["paths"][gi], f"{j + 1}: {name(gallery['labels'][gi])} "
                 f"{ranking.sims[qi, j]:.3f}", "green" if rel else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args):
    check_args(args)
    ood_ref = None
    if args.ood_reference is not None:  # fitted and checked before any image is embedded
        ood_ref = ood.load_reference(args.ood_reference, args.ood_method, args.ood_k, seed=args.seed,
                                     expected_dim=ood.checkpoint_embedding_dim(args.resume) if args.resume else None)
    save_dir = ensure_writable_dir(args.save_dir)
    print_args(args)
    if args.resume is not None:
        query, gallery, names = embeddings_from_checkpoint(args)
    else:
        query, gallery, names = embeddings_from_files(args)
    ood_flags = None
    if ood_ref is not None:
        ood_scores, ood_flags = ood.score_queries(ood_ref, query["embeddings"])
        ood_summary, ood_csv = ood.query_report(ood_ref, ood_scores, ood_flags, query["image_ids"], query["labels"])
        print(f"OOD warning: {ood_summary['num_flagged']} of {len(ood_flags)} queries are unlike the archive "
              f"({args.ood_method} score > {ood_ref.threshold:.4g}; {ood_ref.info['calibration']}); per query: "
              f"{save_dir / 'query_ood.csv'}")
    loo = gallery is None
    gal = query if loo else gallery
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
            print(f"warning: {shared} query image ids also appear in the gallery; those matches are trivial")
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
    if ood_ref is not None:
        res["ood"] = ood_summary
    res["source"] = str(args.resume if args.resume is not None else args.embeddings)
    res["git_revision"] = git_revision()
    print_table(res, sorted(set(args.k_values)))

    np.savez(save_dir / "embeddings.npz", embeddings=np.asarray(query["embeddings"], np.float32),
             labels=np.asarray(query["labels"]),
             image_ids=query["image_ids"] if query["image_ids"] is not None else np.arange(len(query["labels"])),
             **({} if query["patient_ids"] is None else {"patient_ids": query["patient_ids"]}),
             **({} if loo else {"gallery_embeddings": np.asarray(gal["embeddings"], np.float32),
                                "gallery_labels": np.asarray(gal["labels"])}))
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
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one readable line, no traceback
        print(f"test.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
