"""Learn a small fusion head on two or more frozen embedding sets of the same images, and apply it.

Train (inputs written by extract_embeddings.py for the TRAINING list; rows matched by image id, so the files
may be ordered differently; the checkpoint is chosen on a patient-disjoint validation split of these images,
never on the test list):
  python train_fusion.py --embeddings emb/train_convnext.npy emb/train_conceptclip.npy --head mlp \
      --save-dir checkpoints/fusion --epochs 30
Apply to the test list's embeddings of the same models (same order of --embeddings as in training: the
checkpoint records each input's model (embeddings.model_identity of its meta), and an input in another input's
place is refused; a set whose meta names no model is accepted with a warning); writes fused.npy as an embedding
set (embeddings.save: labels, image and patient ids, meta with the head's checkpoint and sha256 and the inputs),
so test.py and test_backbone.py (--learned-embeddings) read it unchanged (--output belongs to --apply; training
refuses it):
  python train_fusion.py --apply checkpoints/fusion/RUN/RUN_best_ckpt.pth \
      --embeddings emb/convnext.npy emb/conceptclip.npy --output emb/fused.npy
The head trains on --device (not given: CUDA when available; it is small, --device cpu is quick too) and is
applied on the CPU.
Heads: concat (Linear over the normalised concatenation), mlp (Linear-LayerNorm-ReLU-Linear), gated (per-image
softmax weights over the inputs' normalised, projected embeddings); model "fusion" of model.py's registry.
Training: the toolkit's P x K sampler (dataset.PKSampler) and triplet loss (losses.TripletLoss), Adam.
Outputs in --save-dir/RUN, RUN = fusion_{head}_embed_{dim}_seed_{seed}: args.json, log.jsonl,
RUN_last_ckpt.pth, RUN_best_ckpt.pth (best validation mAP@10), in train.py's checkpoint format. A validation
split where some image has no same-class image of another patient is warned about before training (those
images score AP 0), and so is a validation mAP@10 that stays 0 (then "best" is just the last epoch).
"""
import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import dataset
import embeddings
import losses
import metrics
import model as M
import utils

SELECTION_METRIC = "mAP@10"


def get_args_parser():
    p = argparse.ArgumentParser(description="Train or apply a fusion head on frozen embeddings",
                                formatter_class=utils.HelpFormatter,
                                parents=[utils.get_runtime_parser(flags=("device",))])
    p.add_argument("--embeddings", nargs="+", required=True,
                   help="two or more N x D_i .npy files of the same images (extract_embeddings.py layout)")
    p.add_argument("--head", choices=M.FUSION_HEADS, default="mlp", help="fusion head (training)")
    p.add_argument("--embedding-dim", type=int, default=128, help="output width of the head")
    p.add_argument("--save-dir", type=Path, default=Path("checkpoints/fusion"), help="folder of the run folder")
    p.add_argument("--epochs", type=int, default=30, help="training epochs")
    p.add_argument("-p", "--labels-per-batch", dest="p", type=int, default=None,
                   help="classes per batch; None = all classes, at most 8")
    p.add_argument("-k", "--samples-per-label", dest="k", type=int, default=16, help="images per class per batch")
    p.add_argument("--margin", type=float, default=0.2, help="triplet margin")
    p.add_argument("--mining", choices=("batch_hard", "batch_all", "semihard"), default="batch_hard",
                   help="triplet mining (losses.py)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="Adam weight decay")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="fraction of the training images (whole patients) held out to choose the epoch")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the sampler and the head's init")
    p.add_argument("--apply", type=Path, default=None, metavar="CKPT",
                   help="apply this fusion checkpoint to --embeddings and write --output")
    p.add_argument("--output", type=Path, default=None,
                   help="fused .npy written by --apply (with --apply only: training writes into --save-dir/RUN)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder / --output files")
    return p


# ----------------------------------------------------------------------------- inputs

def read_sets(paths):
    """The embedding sets (embeddings.load: each file checked), the others in the FIRST one's image order and class
    numbering (embeddings.align: matched by image id and class name). Errors before any work: a single set, a
    file given twice, missing labels (first set) or image ids, different images, NaN rows, disagreeing labels."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise ValueError(f"--embeddings: give two or more embedding sets to fuse, got {len(paths)} ({paths[0]})")
    if len(set(paths)) != len(paths):
        raise ValueError(f"--embeddings lists the same file twice: {[str(p) for p in paths]}")
    sets = [embeddings.load(p, required=("labels", "image_ids") if i == 0 else ("image_ids",), flag="--embeddings")
            for i, p in enumerate(paths)]
    first, out = sets[0], [sets[0]]
    for s in sets[1:]:
        if s.n != first.n or set(s.image_ids) != set(first.image_ids):
            # plain str: numpy 2 prints np.str_ elements of a list as np.str_('...')
            only0 = [str(v) for v in sorted(set(first.image_ids) - set(s.image_ids))[:3]]
            only1 = [str(v) for v in sorted(set(s.image_ids) - set(first.image_ids))[:3]]
            raise ValueError(f"{first.path} ({first.n} rows) and {s.path} ({s.n} rows) are not of the same images "
                             f"(only in the first: {only0}, only in the second: {only1}); extract both from "
                             f"the same image list")
        if s.labels is None and s.class_names is None:  # nothing of its classes to match
            s = replace(s, class_names=first.class_names)
        out.append(embeddings.align(first, s))
    return out


def load_sets(paths):
    """The embedding sets with rows in the FIRST file's order, matched by image id (read_sets).

    Returns (list of float32 (N, D_i) arrays, labels, image_ids, patient_ids or None, class_names or None).
    """
    sets = read_sets(paths)
    first = sets[0]
    return [s.embeddings for s in sets], first.labels, first.image_ids, first.patient_ids, first.class_names


def input_identity(s):
    """What produced an embedding set: file name, model name, embeddings.model_identity of its meta (a checkpoint
    by its sha256, or by its path in older meta; else name + arguments) and the checkpoint path, for messages.

    model_name and identity are None when the meta does not say (no meta file, or one without a model): identity
    unknown. Plain strings, so the list lives in a weights_only checkpoint.
    """
    meta = s.meta
    named = isinstance(meta.get("model_name"), str)
    ckpt, _ = embeddings.source_checkpoint(meta)
    return {"file": s.path.name, "model_name": meta.get("model_name") if named else None,
            "identity": s.model_identity if named else None, "checkpoint": None if ckpt is None else str(ckpt)}


def _identity_key(ident):
    """Comparable identity (None when unknown); the file name is left out: train and test sets differ in it.
    Checkpoints written before issue 20 stored model_name, model_args and checkpoint instead of identity: the same
    string is rebuilt from them (embeddings.model_identity of an older meta)."""
    if not ident or ident.get("model_name") is None:
        return None
    if "identity" in ident:
        return ident["identity"]
    return embeddings.model_identity({"model_name": ident["model_name"], "model_args": ident.get("model_args"),
                                      "checkpoint": ident.get("checkpoint")})


def _describe(ident):
    what = ident["model_name"] + (f" from {ident['checkpoint']}" if ident.get("checkpoint") else "")
    return f"{ident['file']} ({what})"


def check_input_order(trained, given, ckpt_path):
    """ValueError when an input sits where the head saw another model's embeddings in training (a swap of
    equal-width inputs passes the width check and fuses nonsense); a list of warnings when it cannot tell."""
    if not trained:
        return [f"--apply {ckpt_path} records no input models (written before train_fusion.py stored them): the "
                f"order of --embeddings cannot be checked; give them in the training order"]
    old, new = [_identity_key(t) for t in trained], [_identity_key(g) for g in given]
    for i, key in enumerate(new):
        if key is not None and key != old[i] and key in old:
            j = old.index(key)
            raise ValueError(f"--embeddings are in another order than in training: input {i + 1} "
                             f"{_describe(given[i])} is the model of training input {j + 1} "
                             f"{_describe(trained[j])}; --apply {ckpt_path} expects "
                             f"{', '.join(t['model_name'] or t['file'] for t in trained)} in this order")
    warnings = []
    for i, (o, n) in enumerate(zip(old, new)):
        if n is None:
            warnings.append(f"input {i + 1} ({given[i]['file']}): its meta file names no model, so its position "
                            f"cannot be checked; it must hold the embeddings of training input {i + 1}'s model "
                            f"({_describe(trained[i]) if o is not None else trained[i]['file']})")
        elif o is None:
            warnings.append(f"input {i + 1} ({given[i]['file']}): the meta file of training input {i + 1} "
                            f"({trained[i]['file']}) named no model, so its position cannot be checked")
        elif o != n:
            warnings.append(f"input {i + 1} {_describe(given[i])} is not the model the head was trained on there "
                            f"({_describe(trained[i])}); the fused embeddings mean something only for the same "
                            f"models")
    return warnings


def fuse_input(sets):
    return np.concatenate(sets, axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- training

@torch.no_grad()
def embed(head, x, device, batch=8192):
    head.eval()
    return torch.cat([head(torch.from_numpy(x[i:i + batch]).to(device)).cpu() for i in range(0, len(x), batch)]).numpy()


def validation_map(head, x, labels, patient_ids, device):
    """Leave-one-out mAP@10 on the validation images (metrics.knn_search and map_at_k: the toolkit's tie rule;
    other images of the query's patient excluded), without the vote metrics evaluate() adds."""
    cand, _ = metrics.candidate_counts(labels, query_groups=patient_ids, exclude_same_group=patient_ids is not None)
    k = max(1, min(10, int(cand.min())))  # a tiny validation split (the demo) cannot fill a top-10
    _, idx = metrics.knn_search(embed(head, x, device), None, k, exclude_self=True, query_groups=patient_ids)
    return float(metrics.map_at_k(labels[idx] == labels[:, None], k).mean())


def validation_warning(labels, patient_ids):
    """None, or what is wrong with a validation split whose mAP@10 cannot choose an epoch: a query with no
    other image of its class (from another patient) scores AP 0 whatever the head does."""
    groups = patient_ids is not None
    _, rel = metrics.candidate_counts(labels, query_groups=patient_ids, exclude_same_group=groups)
    hopeless = int((rel == 0).sum())
    if hopeless == 0:
        return None
    whose = "image of their class from another patient" if groups else "other image of their class"
    what = (f"val {SELECTION_METRIC} is 0 in every epoch and cannot choose one (the last epoch becomes 'best')"
            if hopeless == len(labels) else
            f"they count as AP 0, so val {SELECTION_METRIC} is at most {1 - hopeless / len(labels):.4f}")
    return (f"{hopeless} of {len(labels)} validation images have no {whose} in the validation split: {what}; "
            f"give more images (at least two patients per class in validation) or a larger --val-fraction")


def train(args):
    if args.output is not None:
        raise ValueError(f"--output {args.output} is written by --apply only; training writes its checkpoints "
                         f"into --save-dir/RUN: drop --output, then apply the best checkpoint with "
                         f"--apply CKPT --embeddings ... --output {args.output}")
    loaded = read_sets(args.embeddings)
    sets, labels, ids = [s.embeddings for s in loaded], loaded[0].labels, loaded[0].image_ids
    pids, names = loaded[0].patient_ids, loaded[0].class_names
    identities = [input_identity(s) for s in loaded]
    if args.epochs < 1 or args.k < 1 or args.embedding_dim < 1:
        raise ValueError("--epochs, -k and --embedding-dim must be >= 1")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction {args.val_fraction}: must lie in (0, 1) (selection needs validation)")
    groups = pids if pids is not None else ids  # no patient ids: each image its own patient
    tr, va = dataset.patient_split(groups, labels, args.val_fraction, args.seed)
    val_warning = validation_warning(labels[va], None if pids is None else pids[va])
    if val_warning:
        print(f"warning: {val_warning}", file=sys.stderr)
    n_cls = len(np.unique(labels[tr]))
    p = args.p if args.p is not None else min(n_cls, 8)
    sampler = dataset.PKSampler(labels[tr], p, args.k, seed=args.seed)
    dims = [s.shape[1] for s in sets]
    stem = f"fusion_{args.head}_embed_{args.embedding_dim}_seed_{args.seed}"
    utils.check_writable_dir(args.save_dir)
    run_dir = Path(args.save_dir) / stem
    if run_dir.exists() and any(run_dir.iterdir()) and not args.overwrite:
        raise ValueError(f"{run_dir} already holds a run; choose another --save-dir or pass --overwrite")
    device = utils.get_device(args.device)

    utils.set_seed(args.seed)
    head = M.build_model("fusion", backbone=M.fusion_spec(args.head, dims), embedding_dim=args.embedding_dim,
                         pretrained=False).to(device)
    x = fuse_input(sets)
    xt, yt = torch.from_numpy(x[tr]).to(device), torch.from_numpy(labels[tr]).to(device)
    criterion = losses.TripletLoss(args.margin, args.mining)
    opt = torch.optim.Adam(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    run_dir.mkdir(parents=True, exist_ok=True)
    plain = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    utils.save_json(dict(plain, input_dims=dims, input_models=identities, train_images=len(tr), val_images=len(va),
                         val_warning=val_warning), run_dir / "args.json")
    log = run_dir / "log.jsonl"
    log.write_text("")
    print(f"{len(ids)} images: {len(tr)} train / {len(va)} validation (patient-disjoint); inputs {dims} -> "
          f"{args.head} head, {args.embedding_dim}-d; P x K = {p} x {args.k}, {len(sampler)} batches/epoch")
    best, best_epoch, history = -1.0, None, []
    t_start = time.time()
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        sampler.set_epoch(epoch)
        head.train()
        total, nb = 0.0, 0
        for batch in sampler:
            b = torch.as_tensor(batch, device=device)
            loss = criterion(head(xt[b]), yt[b])
            loss = loss[0] if isinstance(loss, tuple) else loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, nb = total + float(loss.detach()), nb + 1
        val = validation_map(head, x[va], labels[va], None if pids is None else pids[va], device)
        row = {"epoch": epoch, "loss": total / max(nb, 1), f"val_{SELECTION_METRIC}": val, "time_s": time.time() - t0}
        improved = val >= best  # ties go to the later epoch, as train.py
        if improved:
            best, best_epoch = val, epoch
        history.append(row)
        state = M.make_checkpoint(head, optimizer=opt.state_dict(), epoch=epoch, best_metric=best,
                                  best_epoch=best_epoch, selection_metric=f"val {SELECTION_METRIC}", args=plain,
                                  history=history, class_names=names, fusion_inputs=[str(p) for p in args.embeddings],
                                  fusion_input_models=identities)
        utils.atomic_torch_save(state, run_dir / f"{stem}_last_ckpt.pth")
        if improved:
            utils.atomic_torch_save(state, run_dir / f"{stem}_best_ckpt.pth")
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"epoch {epoch}/{args.epochs}  loss {row['loss']:.4f}  val {SELECTION_METRIC} {val:.4f}"
              + ("  *best*" if improved else ""), flush=True)
    print(f"trained in {time.time() - t_start:.1f} s; best val {SELECTION_METRIC} {best:.4f} at epoch {best_epoch}: "
          f"{run_dir / (stem + '_best_ckpt.pth')}")
    if best <= 0:
        print(f"warning: val {SELECTION_METRIC} stayed 0.0000 in all {args.epochs} epochs, so it chose nothing: the "
              f"'best' checkpoint is the last epoch. "
              + (val_warning or "No validation image found a same-class image in its top 10: check the labels, "
                                "train longer or raise --lr."), file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- apply

def load_fusion_checkpoint(path):
    """(fusion head, checkpoint dict); another kind of checkpoint (train.py's image models) is one line."""
    try:
        return M.load_checkpoint(path, kind="fusion")
    except M.CheckpointError as e:
        raise ValueError(f"--apply: {e}") from e


def apply(args):
    if args.output is None:
        raise ValueError("--apply needs --output fused.npy")
    embeddings.check_output(args.output, args.overwrite, "--output")
    head, ckpt = load_fusion_checkpoint(args.apply)
    loaded = read_sets(args.embeddings)
    dims = [s.dim for s in loaded]
    if dims != head.input_dims:
        raise ValueError(f"--apply {args.apply} was trained on inputs of widths {head.input_dims}, --embeddings "
                         f"give {dims}; pass the same models' embeddings in the same order")
    identities = [input_identity(s) for s in loaded]
    for w in check_input_order(ckpt.get("fusion_input_models"), identities, args.apply):
        print(f"warning: {w}", file=sys.stderr)
    fused = embed(head, fuse_input([s.embeddings for s in loaded]), torch.device("cpu")).astype(np.float32)
    first = loaded[0]
    meta = embeddings.make_meta(model=head, checkpoint=args.apply, class_names=first.class_names, seed=args.seed,
                                epoch=ckpt.get("epoch"), inputs=[str(p) for p in args.embeddings],
                                input_models=identities)
    out = embeddings.save(args.output, replace(first, embeddings=fused, meta=meta), overwrite=args.overwrite,
                          flag="--output")
    print(f"wrote {out.path} {fused.shape}, an embedding set of {Path(args.apply).name}")
    return 0


def run(args):
    return apply(args) if args.apply is not None else train(args)


def main(args):
    return utils.run_main(run, args, "train_fusion.py")  # bad input: one line, exit code 2


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
