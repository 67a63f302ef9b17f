"""Train an embedding model for chest X-ray retrieval: P x K batches, triplet loss with online mining.

Demo (generates data/demo when absent, trains a tiny hybrid on the CPU in a few minutes, then prints
R@1/R@5/mAP on the demo test list before and after training):
    python train.py --demo

Single GPU (the paper: hybrid ConvNeXtV2 + ViT at 384 px, batch-hard triplets, margin 0.2, Adam):
    python train.py --model hybrid_convnext_vit --dataset covid --dataset-dir /data/covidx \
        --train-image-list /data/covidx/train_split.txt --test-image-list /data/covidx/test_COVIDx4.txt \
        -p 3 -k 16 --epochs 30 --amp
    (--amp alone = bf16 autocast on CUDA; without it training runs in fp32, the default since issue 20)

N GPUs (every rank draws its own P x K batches; rank 0 alone validates and saves):
    torchrun --standalone --nproc_per_node=4 train.py ...same flags...

CPU (slow: tiny backbones and small images):
    python train.py --device cpu --model hybrid_convnext_vit --convnext-backbone convnextv2_atto \
        --vit-backbone vit_tiny_patch16_224 --img-size 96 --no-pretrained ...

Resume an interrupted run (same command plus):  --resume checkpoints/RUN/RUN_last_ckpt.pth
    Ctrl-C prints that exact command. A resumed run must keep every flag that changes the optimisation
    (--lr, --weight-decay, --backbone-lr-mult, --margin, --mining, -p, -k, --accum-steps, ...): a change is
    refused, naming the flag and both values. --epochs may grow: the cosine schedule is then rebuilt for the
    new horizon from the restored epoch (lr(e) = lr * 0.5 * (1 + cos(pi * e / epochs))), and the log says so.

Outputs go to --save-dir/RUN with RUN = {dataset}_{model}_embed_{dim}_seed_{seed}: args.json, log.jsonl
(one JSON line per epoch), RUN_last_ckpt.pth (every epoch), RUN_best_ckpt.pth (best validation mAP; model
weights only, no optimizer state: a third of the size, for test.py / extract_embeddings.py, not for --resume),
RUN_epoch_{E}_ckpt.pth (every --save-freq epochs), training_curves.png, results.json (test list, best
checkpoint). An existing run folder is never overwritten unless --resume or --overwrite is given.
"""
import argparse
import contextlib
import importlib.util
import json
import math
import resource
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
import dataset as ds
import model as M
import utils
from embeddings import embed_dataset
from losses import MINING, TripletLoss
from metrics import candidate_counts, evaluate as retrieval_evaluate

REPO = Path(__file__).resolve().parent
OUTPUTS = ("args.json", "log.jsonl", "training_curves.png", "results.json")
# Flags that change what is optimised or how: a resumed run must keep them (args key -> flag).
OPTIMISATION_FLAGS = {
    "lr": "--lr", "weight_decay": "--weight-decay", "backbone_lr_mult": "--backbone-lr-mult", "margin": "--margin",
    "mining": "--mining", "labels_per_batch": "-p/--labels-per-batch", "samples_per_label": "-k/--samples-per-label",
    "accum_steps": "--accum-steps", "clip_grad": "--clip-grad", "iters_per_epoch": "--iters-per-epoch",
    "rand_resize": "--rand-resize", "amp": "--amp", "seed": "--seed", "dataset": "--dataset",
    "val_fraction": "--val-fraction", "exclude_same_patient": "--exclude-same-patient",
}
SELECTION_METRIC = "mAP"  # validation mAP (full ranking, leave-one-out, self excluded) picks the best checkpoint
# Weight sources are not architecture: a resumed model is rebuilt without them (its weights come from the file).
WEIGHT_KEYS = ("pretrained", "pretrained_weights", "convnext_weights", "vit_weights")
# What only --resume needs. The _last_ and _epoch_E_ files keep it; the _best_ file, used for testing and
# extraction, leaves it out (Adam's two moments are twice the weights: 108 MB -> 36 MB for the demo's hybrid).
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "rng_states")
# --demo: a tiny hybrid at 64 px from random init on the generated demo data; explicit flags still win.
# Batch-all mining: from random init batch-hard collapses to the margin (loss ~0.2 with every triplet active;
# test mAP 0.44 -> 0.67 measured) and semi-hard overfits the 72 images unevenly across seeds, while batch-all
# gave test mAP 0.47 -> 1.00, 0.46 -> 0.97, 0.42 -> 0.88 (R@1 to 1.0) for seeds 0, 1, 2. The paper's batch-hard
# is meant for pretrained backbones. Random backbones also get the full lr (mult 1).
DEMO = dict(model="hybrid_convnext_vit", convnext_backbone="convnextv2_atto", vit_backbone="vit_tiny_patch16_224",
            img_size=64, embedding_dim=128, pretrained=False, labels_per_batch=3, samples_per_label=8,
            epochs=8, iters_per_epoch=5, lr=3e-4, backbone_lr_mult=1.0, mining="batch_all", workers=0,
            exclude_same_patient=True, val_fraction=0.25,
            save_dir=Path("checkpoints/demo"), dataset_dir=REPO / "data" / "demo")


def get_args_parser():
    parser = argparse.ArgumentParser(description="Train a retrieval embedding with P x K triplet batches", add_help=True,
                                     parents=[M.get_model_parser(), ds.get_data_parser(),
                                              utils.get_runtime_parser(flags=("device", "amp", "eval_batch_size"))],
                                     formatter_class=utils.HelpFormatter)
    g = parser.add_argument_group("training")
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="patient-disjoint share of the training list used for validation (without --val-image-list)")
    g.add_argument("-p", "--labels-per-batch", type=int, default=3, help="P: distinct classes per batch")
    g.add_argument("-k", "--samples-per-label", type=int, default=None,
                   help="K: images per class per batch (16 unless --batch-size sets it)")
    g.add_argument("--batch-size", type=int, default=None, help="alternative to -k: k = batch_size / p")
    g.add_argument("--epochs", type=int, default=30, help="training epochs (cosine lr schedule over them)")
    g.add_argument("--iters-per-epoch", type=int, default=None,
                   help="optimizer steps per epoch (default: ceil(N / (p*k*world_size*accum_steps)))")
    g.add_argument("--lr", type=float, default=1e-4, help="lr of new layers (MXA, fusion, projection heads)")
    g.add_argument("--backbone-lr-mult", type=float, default=0.1, help="pretrained backbones train at lr * this")
    g.add_argument("--weight-decay", type=float, default=0.0, help="Adam L2 weight decay")
    g.add_argument("--margin", type=float, default=0.2, help="triplet loss margin")
    g.add_argument("--mining", choices=MINING, default="batch_hard", help="triplet mining within a P x K batch")
    g.add_argument("--rand-resize", action="store_true", help="RandomResizedCrop instead of CenterCrop in training")
    g.add_argument("--eval-freq", type=int, default=1, help="validate every N epochs (and after the last)")
    g.add_argument("--exclude-same-patient", action="store_true",
                   help="validation and test retrieval drop gallery images of the query's own patient "
                        "(as test.py --exclude-same-patient); without it they count as matches")
    g.add_argument("--exclude-classes", nargs="+", default=None, metavar="NAME",
                   help="drop these classes from training and validation (their test images stay), e.g. "
                        "COVID-19 for the X-MIR anomaly protocol; -p must not exceed the classes left")
    g.add_argument("--save-freq", type=int, default=10, help="keep an _epoch_E_ checkpoint every N epochs")
    g.add_argument("--save-dir", type=Path, default=Path("checkpoints"), help="parent folder of the run folder")
    g.add_argument("--overwrite", action="store_true", help="reuse an existing run folder (its files are replaced)")
    g.add_argument("--resume", type=Path, default=None, help="a _last_ (or _epoch_E_) checkpoint to continue from")
    g.add_argument("--seed", type=int, default=0, help="seeds sampling, augmentation, init and the val split")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convs on GPUs)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    g.add_argument("--accum-steps", type=int, default=1, help="P x K batches per optimizer step")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (the plain module is saved)")
    g.add_argument("--clip-grad", type=float, default=5.0, help="max gradient norm; 0 disables clipping")
    g.add_argument("--demo", action="store_true",
                   help="generate data/demo if absent and train a tiny model on it; implies --overwrite of its run "
                        "folder (checkpoints/demo/...) and prints test metrics before vs after training")
    return parser


# ----------------------------------------------------------------------------- set-up and checks

def parse_args(argv=None):
    """Parse the command line; with --demo the DEMO values become the defaults (explicit flags still win)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.demo:
        parser.set_defaults(**DEMO)
        args = parser.parse_args(argv)
    # the command line as typed, for the resume hint after Ctrl-C (not an argument: kept out of args.json)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    # whether --amp was typed: a resume without it keeps the run's own value (an older run's default was auto)
    parser.set_defaults(amp=None)
    args._amp_given = parser.parse_args(argv).amp is not None
    return args


def prepare_demo(args):
    """Demo: list files inside --dataset-dir, data generated there when absent, its run folder reused."""
    root = Path(args.dataset_dir)
    if args.train_image_list is None:
        args.train_image_list = root / "train_split.txt"
    if args.test_image_list is None:
        args.test_image_list = root / "test_split.txt"
    args.overwrite = True
    if utils.is_main_process() and not args.train_image_list.is_file():
        spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "data" / "make_demo_data.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        print(f"generating demo data in {root}")
        mod.make_demo_data(root)
    utils.barrier()


def resolve_batch(args):
    """Fill args.samples_per_label from -k or --batch-size; a conflict or a remainder is an error."""
    p, k, bs = args.labels_per_batch, args.samples_per_label, args.batch_size
    if bs is not None:
        if bs % p:
            raise ValueError(f"--batch-size {bs} is not divisible by -p/--labels-per-batch {p}")
        if k is not None and k * p != bs:
            raise ValueError(f"--batch-size {bs} conflicts with -p {p} -k {k} (p*k = {p * k}); give one of them")
        k = bs // p
    args.samples_per_label = 16 if k is None else k
    if args.samples_per_label < 2:
        raise ValueError(f"-k/--samples-per-label must be >= 2 to form positive pairs, got {args.samples_per_label}")
    for flag, v in (("--epochs", args.epochs), ("--accum-steps", args.accum_steps), ("--eval-freq", args.eval_freq),
                    ("--save-freq", args.save_freq)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")


def read_resume(path):
    """Load a training checkpoint (weights_only); clear errors for missing, truncated or foreign files."""
    try:
        ckpt = M.read_checkpoint(path)
    except M.CheckpointError as e:
        raise ValueError(f"--resume: {e}") from e
    missing = [k for k in (*RESUME_KEYS, "epoch", "args") if k not in ckpt]
    if missing and "epoch" in ckpt and "args" in ckpt:  # a train.py _best_ file: weights without optimizer state
        last = Path(path).with_name(Path(path).name.replace("_best_ckpt", "_last_ckpt"))
        hint = f"--resume {last}" if last != Path(path) and last.is_file() else "its run's _last_ or _epoch_E_ file"
        raise ValueError(f"--resume {path}: a _best_ checkpoint keeps the model weights only (no optimizer state), "
                         f"so it cannot continue training exactly; resume from {hint}, or start a new run to "
                         f"fine-tune from these weights")
    if missing:
        raise ValueError(f"--resume {path}: a model-only checkpoint (no {', '.join(missing)}); it cannot resume "
                         f"training (to fine-tune from its weights, start a new run instead)")
    return ckpt


def check_same_model(path, ckpt, model):
    """The resumed checkpoint must hold the architecture the command line builds."""
    arch = lambda d: {k: v for k, v in d.items() if k not in WEIGHT_KEYS}
    stored, built = arch(ckpt["model_args"]), arch(model.model_args)
    if ckpt["model_name"] != model.model_name or stored != built:
        diff = {k: (stored.get(k), built.get(k)) for k in sorted(set(stored) | set(built)) if stored.get(k) != built.get(k)}
        raise ValueError(f"--resume {path}: the checkpoint holds model {ckpt['model_name']!r} but --model is "
                         f"{model.model_name!r}; differing arguments (checkpoint, command line): {diff}. "
                         f"Resume with the command that started the run")


def param_groups(model, lr, backbone_lr_mult, weight_decay):
    """Adam groups by module: parameters of model.pretrained_modules() at lr * mult, every other one at lr."""
    backbone_ids = {id(p) for m in model.pretrained_modules() for p in m.parameters()}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [dict(name="backbone", params=[p for _, p in trainable if id(p) in backbone_ids],
                   lr=lr * backbone_lr_mult, weight_decay=weight_decay),
              dict(name="new", params=[p for _, p in trainable if id(p) not in backbone_ids],
                   lr=lr, weight_decay=weight_decay)]
    return [g for g in groups if g["params"]]


def plain_args(args):
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}


def keep_run_amp(ckpt, args):
    """A resume without --amp on its command line continues with the run's own --amp: a run started when the
    default was auto is not refused because the default is now off."""
    if not getattr(args, "_amp_given", True) and "amp" in ckpt["args"]:
        args.amp = ckpt["args"]["amp"]


def check_resume_args(path, ckpt, args):
    """Refuse a resume that changes the optimisation: the run would silently mix two recipes."""
    stored, now = ckpt["args"], plain_args(args)
    changed = [f"{flag} {stored[k]!r} (checkpoint) vs {now[k]!r} (now)"
               for k, flag in OPTIMISATION_FLAGS.items() if k in stored and stored[k] != now.get(k)]
    if changed:
        raise ValueError(f"--resume {path}: these flags differ from the run being resumed: {'; '.join(changed)}. "
                         f"Resume with the run's own values, or start a new run (another --save-dir or --seed) "
                         f"to train with the new ones")


def check_epochs_left(path, ckpt, args):
    done = int(ckpt["epoch"])
    if args.epochs <= done:
        raise ValueError(f"--resume {path}: the checkpoint has already trained {done} epochs and --epochs is "
                         f"{args.epochs}; nothing is left to train. Pass --epochs N > {done} to train longer "
                         f"(the cosine schedule is rebuilt for the new horizon), or use test.py to evaluate it")


def check_trainable(model, args):
    """A run with nothing to optimise is refused before any folder is made."""
    if any(p.requires_grad for p in model.parameters()):
        return
    raise ValueError(f"--model {model.model_name} with --freeze-backbone has no trainable parameters (the optimizer "
                     f"would get an empty parameter list). Add a trainable head: --embedding-dim D (a projection; "
                     f"with --model conceptclip also --conceptclip-head), keep the MXA block (drop --no-mxa; "
                     f"conv backbones), or drop --freeze-backbone. To embed images with the frozen model as it "
                     f"is, use extract_embeddings.py")


def resume_command(args, checkpoint):
    """The exact command that continues this run from `checkpoint`."""
    argv, out, skip = list(getattr(args, "_argv", [])), [], False
    for a in argv:  # drop an earlier --resume X / --resume=X
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if not a.startswith("--resume="):
            out.append(a)
    prefix = "torchrun ... train.py" if utils.is_dist() else "python train.py"
    return f"{prefix} {shlex.join(out + ['--resume', str(checkpoint)])}"


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------- evaluation

def evaluate(model, dataset, device, args, amp_dtype, desc="embedding"):
    """Leave-one-out retrieval on one dataset (every image a query, self excluded; relevant = same label).

    Rank 0 alone calls it under torchrun (the others wait at the barrier), so it embeds every image itself."""
    emb = embed_dataset(model, dataset, device, args.eval_batch_size, args.workers, amp_dtype=amp_dtype,
                        progress=True, desc=desc, channels_last=args.channels_last, distributed=False)
    cand, _ = candidate_counts(dataset.labels, query_groups=dataset.patient_ids,
                               exclude_same_group=args.exclude_same_patient)
    k_values = [k for k in (1, 5, 10) if k <= cand.min()] or [1]  # tiny validation splits have < 10 neighbours
    return retrieval_evaluate(emb, dataset.labels, k_values=k_values, query_groups=dataset.patient_ids,
                              exclude_same_group=args.exclude_same_patient, class_names=dataset.class_names)


def fmt(value):
    """A metric for printing; None (no query had a relevant image) reads n/a."""
    return "n/a" if value is None else f"{value:.4f}"


def print_table(before, after, keys=("R@1", "R@5", "mAP")):
    print(f"\n{'metric':<8}{'before':>10}{'after':>10}")
    for k in keys:
        if k in before and k in after:
            print(f"{k:<8}{fmt(before[k]):>10}{fmt(after[k]):>10}")


def plot_curves(history, path, best_epoch=None, title=""):
    """Loss and active-triplet fraction; validation R@1/mAP with the selected (best) epoch marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(ep, [h["loss"] for h in history], "o-", label="triplet loss")
    a.plot(ep, [h["active_fraction"] for h in history], "s--", label="active triplet fraction")
    a.set(xlabel="epoch", ylabel="loss / fraction of triplets", title="training")
    a.legend(), a.grid(alpha=.3)
    val = [h for h in history if "val_mAP" in h]
    for key in ("val_R@1", "val_mAP"):
        b.plot([h["epoch"] for h in val], [h[key] for h in val], "o-", label=key, clip_on=False)
    if best_epoch is not None:
        b.axvline(best_epoch, color="green", linestyle=":", label=f"selected: epoch {best_epoch}")
        row = next((h for h in val if h["epoch"] == best_epoch), None)
        if row is not None:
            b.plot([best_epoch], [row[f"val_{SELECTION_METRIC}"]], "*", color="green", markersize=14)
    # a little room above 1.0 so a saturated curve stays visible instead of running along the frame
    b.set(xlabel="epoch", ylabel="validation metric (fraction)", title=f"validation (selection: val {SELECTION_METRIC})",
          ylim=(-0.02, 1.05))
    b.legend(), b.grid(alpha=.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    utils.save_figure(fig, path, dpi=100)


# ----------------------------------------------------------------------------- training

def train_one_epoch(fwd_model, model, loader, criterion, optimizer, scaler, device, args, amp_dtype, epoch, steps):
    model.train()
    ddp_module = getattr(fwd_model, "_orig_mod", fwd_model)  # under torch.compile the DDP wrapper is inside
    ddp = isinstance(ddp_module, torch.nn.parallel.DistributedDataParallel)
    params = [p for p in model.parameters() if p.requires_grad]
    it = iter(loader)
    tot_loss = tot_frac = 0.0
    n_img, t0 = 0, time.time()
    # a bar on a terminal, a line every 30 s otherwise: a slow epoch is never silent
    bar = utils.Progress(range(steps), desc=f"epoch {epoch}", unit="steps", enabled=utils.is_main_process())
    for step in bar:
        for micro in range(args.accum_steps):
            images, labels, _ = next(it)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            # DDP all-reduces gradients only on the last micro-batch of an accumulation
            sync = ddp_module.no_sync() if ddp and micro < args.accum_steps - 1 else contextlib.nullcontext()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    emb = fwd_model(images)
                loss, frac = criterion(emb.float(), labels)
                scaler.scale(loss / args.accum_steps).backward()
            tot_loss += loss.item()
            tot_frac += frac.item()
            n_img += len(images)
        if args.clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        n = step + 1
        bar.set_postfix(loss=f"{tot_loss / (n * args.accum_steps):.4f}", active=f"{tot_frac / (n * args.accum_steps):.3f}",
                        lr=f"{optimizer.param_groups[-1]['lr']:.2e}",
                        img_s=f"{n_img * utils.get_world_size() / (time.time() - t0):.1f}")
    n_batches = steps * args.accum_steps
    # mean over ranks so the logged loss describes the whole global batch
    stats = torch.tensor([tot_loss / n_batches, tot_frac / n_batches], dtype=torch.float64)
    if utils.is_dist():
        stats = torch.tensor(np.mean(utils.all_gather_object(stats.tolist()), 0))
    secs = time.time() - t0
    return dict(loss=float(stats[0]), active_fraction=float(stats[1]), train_time_s=secs,
                img_per_s=n_img * utils.get_world_size() / secs)


def epoch_seed(seed, epoch, rank):
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def main(args):
    code = None
    try:
        code = utils.run_main(set_up_and_fit, args, "train.py")  # bad input: one line, exit 2
        return code
    finally:
        utils.cleanup_distributed(sync=code == 0)


def set_up_and_fit(args):
    run = setup(args)
    try:
        return fit(args, *run)
    except KeyboardInterrupt:
        # one line a person can act on instead of a traceback: where the last checkpoint is, how to go on
        run_dir, stem = run[-2], run[-1]
        last = run_dir / f"{stem}_last_ckpt.pth"
        if utils.is_main_process():
            if last.is_file():
                done = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
                print(f"\ninterrupted; the last checkpoint is {last} (epoch {done} done). Continue with:\n"
                      f"  {resume_command(args, last)}", file=sys.stderr)
            else:
                print(f"\ninterrupted before the first epoch ended: no checkpoint yet in {run_dir}. Start again with "
                      f"the same command plus --overwrite", file=sys.stderr)
        return 130


def drop_classes(dataset, names, labels_per_batch=None):
    """The dataset without the images of classes `names` (--exclude-classes); -p is checked against what is left."""
    unknown = [n for n in names if n not in dataset.class_names]
    if unknown:
        raise ValueError(f"--exclude-classes {' '.join(unknown)}: not a class of --dataset {dataset.dataset} "
                         f"(classes: {', '.join(dataset.class_names)})")
    drop = [dataset.class_names.index(n) for n in names]
    keep = np.flatnonzero(~np.isin(dataset.labels, drop))
    if len(keep) == 0:
        raise ValueError(f"--exclude-classes {' '.join(names)} leaves no image of {dataset.list_file}")
    left = sorted({dataset.class_names[c] for c in dataset.labels[keep]})
    if labels_per_batch is not None and len(left) < max(2, labels_per_batch):
        need = ("triplets need at least 2 classes" if len(left) < 2 else
                f"-p/--labels-per-batch {labels_per_batch} is larger than that: pass -p {len(left)}")
        raise ValueError(f"--exclude-classes {' '.join(names)} leaves {len(left)} classes in {dataset.list_file} "
                         f"({', '.join(left)}); {need}")
    return dataset.subset(keep)


def excluded_counts(dataset, names):
    """{class name: images of it} in `dataset`, for the --exclude-classes line."""
    return {n: int(np.sum(dataset.labels == dataset.class_names.index(n))) if n in dataset.class_names else 0
            for n in names}


def excluded_line(counts, test_set):
    """One line saying which classes --exclude-classes removed and how many images each part lost."""
    parts = [f"{part} " + ", ".join(f"{n} {c}" for n, c in by_class.items()) for part, by_class in counts.items()]
    kept = ""
    if test_set is not None:
        names = list(next(iter(counts.values())))
        n = sum(int(np.sum(test_set.labels == test_set.class_names.index(c))) for c in names
                if c in test_set.class_names)
        kept = f"; the test list keeps its {n} images of them (unseen classes at test time)"
    return f"--exclude-classes {' '.join(next(iter(counts.values())))}: images left out of training: " \
           f"{'; '.join(parts)}{kept}"


def setup(args):
    """Every check that can fail on bad input, before anything is written or trained."""
    if args.resume is not None and not Path(args.resume).is_file():  # the cheapest check first
        raise ValueError(f"--resume {args.resume}: file not found; give a _last_ or _epoch_E_ checkpoint of the run")
    distributed = utils.init_distributed()
    if args.demo:
        prepare_demo(args)
    resolve_batch(args)
    if args.train_image_list is None or args.dataset_dir is None:
        raise ValueError("--train-image-list and --dataset-dir are required (or run the demo: python train.py --demo)")
    device = utils.get_device(args.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", utils.get_local_rank())
    utils.check_writable_dir(args.save_dir)
    ckpt = read_resume(args.resume) if args.resume else None
    if ckpt is not None:
        keep_run_amp(ckpt, args)
        check_resume_args(args.resume, ckpt, args)
    amp_dtype = utils.resolve_amp(args.amp, device)
    utils.set_seed(args.seed)

    name, model_args = M.model_args_from_cli(args)
    build_args = dict(model_args)
    if ckpt is not None:  # the weights come from the checkpoint: never download or read backbone files again
        build_args.update({k: (False if k == "pretrained" else None) for k in WEIGHT_KEYS if k in build_args})
    M.check_weights(name, build_args)  # offline without the weights: one line naming the flags, before any build
    model = M.build_model(name, **build_args)
    if ckpt is not None:
        check_same_model(args.resume, ckpt, model)
        check_epochs_left(args.resume, ckpt, args)
        model.model_args = dict(ckpt["model_args"])  # keep the provenance the run was started with
    check_trainable(model, args)

    # data: train (+ patient-disjoint val split or val list), test. One class order for all lists: the
    # training list's (generic: sorted names, then names only val/test use), stored in the checkpoint.
    tr_dir = ds.train_image_dir(args.dataset_dir)
    train_tf = M.get_transform(model, train=True, rand_resize=args.rand_resize)
    eval_tf = M.get_transform(model, train=False)
    classes, extra = ds.resolve_class_names(args.dataset, args.train_image_list,
                                            [args.val_image_list, args.test_image_list],
                                            given=ckpt.get("class_names") if ckpt is not None else None)
    if extra and utils.is_main_process():
        print(f"note: classes {extra} are in the validation/test lists but not in the training list; they get "
              f"ids {len(classes) - len(extra)}..{len(classes) - 1}")
    train_set = ds.ImageListDataset(args.train_image_list, tr_dir, args.dataset, transform=train_tf,
                                    class_names=classes, cache_dir=args.cache_dir)
    val_set = None
    if args.val_image_list is not None:
        val_set = ds.ImageListDataset(args.val_image_list, tr_dir, args.dataset, transform=eval_tf, class_names=classes)
        if utils.is_main_process():
            ds.overlap_warning(train_set, val_set, "train", "val")
    elif args.val_fraction > 0:
        tr_idx, va_idx = ds.patient_split(train_set.patient_ids, train_set.labels, args.val_fraction, args.seed)
        val_set = ds.ImageListDataset(args.train_image_list, tr_dir, args.dataset, transform=eval_tf,
                                      class_names=classes, check_files=False).subset(va_idx)
        train_set = train_set.subset(tr_idx)
    if args.exclude_classes:  # after the split, so validation patients are the same with and without it
        counts = {"train": excluded_counts(train_set, args.exclude_classes)}
        train_set = drop_classes(train_set, args.exclude_classes, args.labels_per_batch)
        if val_set is not None:
            counts["validation"] = excluded_counts(val_set, args.exclude_classes)
            val_set = drop_classes(val_set, args.exclude_classes)
        args._excluded = counts  # printed when the run starts (fit); --exclude-classes itself is in args.json
    test_set = None
    if args.test_image_list is not None:
        test_set = ds.ImageListDataset(args.test_image_list, ds.test_image_dir(args.dataset_dir, args.test_dataset_dir),
                                       args.dataset, transform=eval_tf, class_names=classes)
        if utils.is_main_process():
            ds.overlap_warning(train_set, test_set, "train", "test")
    steps = args.iters_per_epoch or math.ceil(len(train_set) / (args.labels_per_batch * args.samples_per_label
                                                                  * utils.get_world_size() * args.accum_steps))
    sampler = ds.PKSampler(train_set.labels, args.labels_per_batch, args.samples_per_label,
                           num_batches=steps * args.accum_steps, seed=args.seed, rank=utils.get_rank(),
                           world_size=utils.get_world_size())

    # outputs: one folder per run, never clobbered by accident; created in fit(), after every check
    stem = f"{args.dataset}_{name}_embed_{model.embedding_dim}_seed_{args.seed}"
    run_dir = Path(args.save_dir) / stem
    # every rank checks (same files, same answer): an error on rank 0 alone would leave the others waiting
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (args.resume or args.overwrite):
        raise ValueError(f"run folder {run_dir} already holds a run; pass --resume {run_dir / (stem + '_last_ckpt.pth')} "
                         f"to continue it, --overwrite to replace it, or another --save-dir/--seed")
    utils.barrier()
    return device, amp_dtype, model, ckpt, train_set, val_set, test_set, sampler, steps, run_dir, stem


def reconcile_best(run_dir, stem, ckpt, history):
    """On resume, make RUN_best_ckpt.pth the best checkpoint of the resumed history, not a later run's.

    Resuming from an _epoch_E_ file into a folder whose _best_ file came from an epoch after E (an abandoned
    continuation) would otherwise test that stale file at the end. The stale file is kept under another name.
    Returns (best_metric, best_epoch) to continue the selection with.
    """
    best, best_epoch, epoch = ckpt["best_metric"], ckpt["best_epoch"], int(ckpt["epoch"])
    path = run_dir / f"{stem}_best_ckpt.pth"
    on_disk = torch.load(path, map_location="cpu", weights_only=True)["epoch"] if path.is_file() else None
    if on_disk is not None and on_disk == best_epoch:
        return best, best_epoch
    if on_disk is not None:
        stale = run_dir / f"{stem}_stale_best_epoch_{on_disk}_ckpt.pth"
        path.replace(stale)
        print(f"note: {path.name} held epoch {on_disk}, not the best epoch ({best_epoch}) of the history resumed "
              f"from epoch {epoch}; kept as {stale.name}")
    if best_epoch is None:
        return best, best_epoch
    source = ckpt if best_epoch == epoch else None
    epoch_file = run_dir / f"{stem}_epoch_{best_epoch}_ckpt.pth"
    if source is None and epoch_file.is_file():
        source = torch.load(epoch_file, map_location="cpu", weights_only=True)
        source = source if source.get("epoch") == best_epoch else None
    if source is None:
        # the best weights of this history are on no file any more: selection restarts at the resumed epoch
        row = next((h for h in history if h["epoch"] == epoch), {})
        best = row.get(f"val_{SELECTION_METRIC}", -1.0)
        best_epoch = epoch if f"val_{SELECTION_METRIC}" in row else None
        print(f"warning: the weights of epoch {ckpt['best_epoch']} (best val {SELECTION_METRIC} of the resumed "
              f"history) are in no file of {run_dir}; model selection restarts from epoch {epoch}")
        source = ckpt if best_epoch is not None else None
    if source is not None:
        utils.atomic_torch_save(model_only(dict(source, best_metric=best, best_epoch=best_epoch)), path)
    return best, best_epoch


def model_only(state):
    """A checkpoint without what only --resume needs (RESUME_KEYS): what the _best_ file keeps."""
    return {k: v for k, v in state.items() if k not in RESUME_KEYS}


def fit(args, device, amp_dtype, model, ckpt, train_set, val_set, test_set, sampler, steps, run_dir, stem):
    main_proc = utils.is_main_process()
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        if args.overwrite and ckpt is None:  # a stale _best_ of the old run must not be tested as ours
            for old in [*run_dir.glob(f"{stem}_*_ckpt.pth"), *(run_dir / n for n in OUTPUTS)]:
                old.unlink(missing_ok=True)
        utils.print_args(args)
        utils.save_json(dict(plain_args(args), git=utils.git_revision()), run_dir / "args.json")
        print(f"train {len(train_set)} images ({len(set(train_set.patient_ids))} patients), "
              f"val {len(val_set) if val_set is not None else 0}, test {len(test_set) if test_set is not None else 0}; "
              f"{steps} steps/epoch of {args.accum_steps} x {args.labels_per_batch}x{args.samples_per_label} "
              f"images x {utils.get_world_size()} ranks; run folder {run_dir}")
        if getattr(args, "_excluded", None):
            print(excluded_line(args._excluded, test_set))
    model.to(device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    groups = param_groups(model, args.lr, args.backbone_lr_mult, args.weight_decay)
    optimizer = torch.optim.Adam(groups, lr=args.lr, weight_decay=args.weight_decay)
    epochs = args.epochs
    lr_factor = lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs))  # noqa: E731 (cosine over --epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = TripletLoss(args.margin, args.mining)

    start_epoch, best, best_epoch, history, before = 1, -1.0, None, [], None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        # The optimizer holds the lr the OLD horizon gave for the next epoch (0 when that run had finished).
        # Recompute it from the restored step on the current --epochs: the same number when the horizon is
        # unchanged (so resume stays exact), the rebuilt schedule's when --epochs grew.
        for g, base in zip(optimizer.param_groups, scheduler.base_lrs):
            g["lr"] = base * lr_factor(scheduler.last_epoch)
        scaler.load_state_dict(ckpt["scaler"])
        utils.set_rng_states(ckpt["rng_states"])
        start_epoch, best, best_epoch = ckpt["epoch"] + 1, ckpt["best_metric"], ckpt["best_epoch"]
        history, before = list(ckpt.get("history", [])), ckpt.get("before_training")
        if main_proc:
            print(f"resumed from {args.resume} (epoch {ckpt['epoch']}, best val {SELECTION_METRIC} {best:.4f}"
                  f"{'' if best_epoch is None else f' at epoch {best_epoch}'})")
            old_epochs = ckpt["args"].get("epochs")
            if old_epochs is not None and old_epochs != args.epochs:
                print(f"--epochs changed from {old_epochs} to {args.epochs}: the cosine schedule is rebuilt for "
                      f"{args.epochs} epochs from epoch {start_epoch} (lr now {optimizer.param_groups[-1]['lr']:.3g})")
            best, best_epoch = reconcile_best(run_dir, stem, ckpt, history)
    if main_proc:  # log.jsonl is rebuilt from the checkpoint's history: lines of a lost epoch are dropped
        utils.atomic_write_text(run_dir / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    if args.demo and before is None and test_set is not None and main_proc:
        before = evaluate(model, test_set, device, args, amp_dtype, desc="untrained model on the test list")
        print(f"untrained model on the test list: R@1 {fmt(before['R@1'])}  mAP {fmt(before['mAP'])}")

    fwd_model = model
    if utils.is_dist():
        fwd_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=has_unused_parameters(model, device))
    if args.compile:
        fwd_model = torch.compile(fwd_model)

    ckpt_path = lambda tag: run_dir / f"{stem}_{tag}_ckpt.pth"  # noqa: E731
    for epoch in range(start_epoch, args.epochs + 1):
        # all randomness of an epoch (sampler, augmentation, worker seeds) derives from (seed, epoch, rank),
        # so a resumed run repeats exactly what an uninterrupted one would have done
        s = epoch_seed(args.seed, epoch, utils.get_rank())
        utils.set_seed(s)
        sampler.set_epoch(epoch)
        loader = DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers,
                            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(s))
        t0 = time.time()
        stats = train_one_epoch(fwd_model, model, loader, criterion, optimizer, scaler, device, args, amp_dtype,
                                epoch, steps)
        lr = optimizer.param_groups[-1]["lr"]
        scheduler.step()
        row = dict(epoch=epoch, **stats, lr=lr)
        if main_proc and val_set is not None and (epoch % args.eval_freq == 0 or epoch == args.epochs):
            val = evaluate(model, val_set, device, args, amp_dtype, desc=f"epoch {epoch} validation")
            row.update({f"val_{k}": float(val[k]) for k in ("R@1", "R@5", "R@10", "mAP", "mAP@10") if val.get(k) is not None})
        row.update(time_s=time.time() - t0, peak_mem_mb=peak_memory_mb(device))
        if main_proc:
            # ties go to the later epoch: small validation sets saturate (mAP 1.0) while training still helps
            improved = row.get(f"val_{SELECTION_METRIC}", -1.0) >= max(best, 0.0)
            if improved:
                best, best_epoch = row[f"val_{SELECTION_METRIC}"], epoch
            history.append(row)
            state = M.make_checkpoint(
                model, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(), epoch=epoch, best_metric=best, best_epoch=best_epoch,
                selection_metric=f"val {SELECTION_METRIC}", args=plain_args(args), rng_states=utils.get_rng_states(),
                history=history, before_training=before, class_names=list(train_set.class_names))
            utils.atomic_torch_save(state, ckpt_path("last"))
            if improved:
                utils.atomic_torch_save(model_only(state), ckpt_path("best"))
            if epoch % args.save_freq == 0:
                utils.atomic_torch_save(state, ckpt_path(f"epoch_{epoch}"))
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            plot_curves(history, run_dir / "training_curves.png", best_epoch, title=stem)
            val_txt = "".join(f"  {k} {row[k]:.4f}" for k in ("val_R@1", "val_mAP") if k in row)
            print(f"epoch {epoch}/{args.epochs}  loss {row['loss']:.4f}  active {row['active_fraction']:.3f}  "
                  f"lr {lr:.2e}{val_txt}  {row['img_per_s']:.1f} img/s  {row['time_s']:.0f}s"
                  + ("  *best*" if improved else ""), flush=True)
        utils.barrier()

    if main_proc and test_set is not None:
        # the test list is used once, at the end, with the checkpoint chosen on validation in THIS history
        chosen = ckpt_path("best") if best_epoch is not None else ckpt_path("last")
        final = torch.load(chosen, map_location="cpu", weights_only=True)
        expected = best_epoch if best_epoch is not None else args.epochs
        if final["epoch"] != expected:
            raise RuntimeError(f"{chosen} holds epoch {final['epoch']} but this run's selected epoch is {expected}; "
                               f"refusing to test another run's weights")
        model.load_state_dict(final["model"])
        how = (f"best val {SELECTION_METRIC} {best:.4f} of epochs 1-{args.epochs}" if best_epoch is not None
               else "last epoch: no validation")
        print(f"testing {chosen} (epoch {final['epoch']}, {how})")
        res = evaluate(model, test_set, device, args, amp_dtype, desc="test")
        out = dict(checkpoint=chosen.name, epoch=final["epoch"], selection=f"val {SELECTION_METRIC}",
                   test_image_list=str(args.test_image_list), **res)
        if before is not None:
            out["before_training"] = before
        utils.save_json(out, run_dir / "results.json")
        print(f"test ({chosen.name}, epoch {final['epoch']}): " + "  ".join(
            f"{k} {fmt(res[k])}" for k in ("R@1", "R@5", "R@10", "mAP", "mAP@10") if k in res))
        if before is not None:
            print_table(before, res)
    utils.barrier()
    return 0


def has_unused_parameters(model, device):
    """DDP's find_unused_parameters costs a graph walk each step: probe once whether it is needed."""
    size = model.data_config["img_size"]
    x = torch.randn(2, model.data_config.get("channels", 3), size, size, device=device)  # xrv: 1 channel
    model.eval()  # eval: no BatchNorm statistics updated by the probe
    model(x).sum().backward()
    model.train()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    if unused and utils.is_main_process():
        warnings.warn(f"{len(unused)} trainable parameters get no gradient (e.g. {unused[:3]}); "
                      f"DDP runs with find_unused_parameters=True")
    return bool(unused)


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
