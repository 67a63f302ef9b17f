"""Extract L2-normalised embeddings of every image of a list, in list order, as an embedding set (embeddings.py).

`--output DIR/X.npy` writes the set X: X.npy (float32 (N, D), unit rows, row i = line i of the list, whatever
the batch size or number of ranks) with its labels (int64), image ids (unique: filename stems, or paths when
stems repeat, dataset.list_image_ids), patient ids and meta (embeddings.make_meta: model name and arguments,
its source = checkpoint path + sha256 or weights id, list, image folder, class names, seed, git revision, and
the checkpoint's training --exclude-classes) beside it. Every later tool reads it with embeddings.load.
Existing outputs are never replaced unless --overwrite is given.

Commands:
  # trained checkpoint (the model is rebuilt from the file; no architecture flags needed), single GPU
  python extract_embeddings.py --resume checkpoints/convnext_best_ckpt.pth --dataset-dir data/COVIDx \
      --test-image-list data/COVIDx/test_COVIDx4.txt --output embeddings/convnext.npy
  # frozen ConceptCLIP (no training needed)
  python extract_embeddings.py --model conceptclip --conceptclip-path /models/ConceptCLIP \
      --dataset-dir data/COVIDx --test-image-list data/COVIDx/test_COVIDx4.txt --output embeddings/conceptclip.npy
  # N GPUs: each rank embeds every N-th image, rank 0 writes the merged arrays (same rows as one process)
  torchrun --standalone --nproc_per_node=4 extract_embeddings.py --resume ... --output ...
  # CPU
  python extract_embeddings.py --device cpu ...   (or CUDA_VISIBLE_DEVICES="")
"""
import argparse
import sys
import time
from pathlib import Path

import torch

import embeddings
from dataset import ImageListDataset, get_data_parser, resolve_class_names, test_image_dir
from model import (build_model, check_weights, get_model_parser, get_transform, load_checkpoint, model_args_from_cli,
                   read_checkpoint)
from utils import (HelpFormatter, cleanup_distributed, ensure_writable_dir, get_device, get_local_rank, get_runtime_parser,
                   get_world_size, init_distributed, is_main_process, print_args, resolve_amp, run_main, set_seed)

DEFAULT_MODEL = "hybrid_convnext_vit"


def get_args_parser():
    p = argparse.ArgumentParser(description="Extract embeddings of a list of images",
                                parents=[get_model_parser(), get_data_parser(
                                    lists=("test",), test_help="list of the images to embed (images in the test folder)"),
                                         get_runtime_parser(flags=("device", "amp", "eval_batch_size"))],
                                formatter_class=HelpFormatter)
    # None = "not given": with --resume the model comes from the checkpoint, and a given --model is checked.
    p.set_defaults(model=None)
    g = p.add_argument_group("extraction")
    g.add_argument("--resume", default=None, help="trained checkpoint; the model is rebuilt from it")
    g.add_argument("--output", required=True,
                   help="X.npy (a file; folders are --save-dir elsewhere); labels/ids/meta are written beside it")
    # the older name of --eval-batch-size (runtime group); SUPPRESS: the runtime flag's default stands
    g.add_argument("--batch-size", dest="eval_batch_size", type=int, default=argparse.SUPPRESS,
                   help="the same as --eval-batch-size")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds torch/numpy before the model is built: random-init weights repeat exactly")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p


def _untrained_parts(model):
    """Names of the parameter groups that start from random numbers in a model built without --resume."""
    parts = []
    if not model.model_args.get("pretrained", True):
        parts.append("the backbone (--no-pretrained: random weights)")
    pretrained = {id(p) for m in model.pretrained_modules() for p in m.parameters()}
    new = [n for n, p in model.named_parameters() if id(p) not in pretrained]
    if new:
        count = sum(p.numel() for p in model.parameters() if id(p) not in pretrained)
        tops = sorted({n.split(".")[0] for n in new})
        parts.append(f"{count:,} new parameters ({', '.join(tops)}) that only training sets")
    return parts


def build(args, device):
    """The model (from --resume or from the model flags), its eval transform, and a description."""
    if args.resume:
        model, ckpt = load_checkpoint(args.resume, map_location="cpu", expected_model=args.model,
                                      expected_embedding_dim=args.embedding_dim)
        if hasattr(model, "micro_batch"):
            model.micro_batch = args.conceptclip_batch_size  # an extraction-time choice, not an architecture
        source = f"checkpoint {args.resume} (epoch {ckpt.get('epoch', '?')})"
    else:
        if args.model is None:
            args.model = DEFAULT_MODEL
        name, model_args = model_args_from_cli(args)
        model = build_model(name, **model_args)
        source = f"--model {name}, no checkpoint"
        untrained = _untrained_parts(model)
        if untrained and is_main_process():
            bar = "!" * 100
            print(f"\n{bar}\nWARNING: --model {name} without --resume: {'; and '.join(untrained)}.\n"
                  f"These embeddings come from an UNTRAINED model. Pass --resume CHECKPOINT for a trained one.\n"
                  f"{bar}\n", file=sys.stderr, flush=True)
    model.eval().to(device)
    return model, get_transform(model, train=False), source


def training_excluded_classes(ckpt):
    """train.py --exclude-classes of a checkpoint (its stored args; [] without them): recorded in the set's meta,
    so ood.py knows which classes the model never saw without reading the checkpoint again."""
    return list((ckpt.get("args") or {}).get("exclude_classes") or [])


@torch.inference_mode()
def run(args):
    distributed = init_distributed()
    world = get_world_size()
    out = embeddings.check_output(args.output, args.overwrite, "--output")  # before any work
    if args.eval_batch_size < 1:
        raise ValueError(f"--eval-batch-size must be >= 1, got {args.eval_batch_size}")
    if args.test_image_list is None:
        raise ValueError("--test-image-list LIST is required (one image per line: patient_id filename label)")
    if args.dataset_dir is None and args.test_dataset_dir is None:
        raise ValueError("give the image folder: --dataset-dir DIR (images in DIR/test or DIR) or --test-dataset-dir")
    if args.resume is not None and not Path(args.resume).is_file():
        raise ValueError(f"--resume {args.resume}: file not found; give a checkpoint written by train.py")
    # read now, before anything is printed or made: read_checkpoint refuses a train_fusion.py head in one line.
    # Generic lists take the class ids the checkpoint was trained with, so its embeddings and labels agree.
    ckpt = read_checkpoint(args.resume) if args.resume else None
    stored = ckpt.get("class_names") if ckpt is not None else None
    excluded = training_excluded_classes(ckpt) if ckpt is not None else None
    del ckpt  # load_checkpoint reads the weights again when the model is built
    if args.resume is None:  # weights missing offline: one line naming the model and its flags, before any work
        if args.model is None:
            args.model = DEFAULT_MODEL
        check_weights(*model_args_from_cli(args))
    device = get_device(args.device)
    amp_dtype = resolve_amp(args.amp, device)  # --amp alone: bf16 on CUDA, off on CPU
    if is_main_process():
        print_args(args)  # after the cheap checks: a wrong path is reported at once, not after a dump
    if distributed and device.type == "cuda":
        device = torch.device("cuda", get_local_rank())

    image_dir = test_image_dir(args.dataset_dir, args.test_dataset_dir)
    names, _ = resolve_class_names(args.dataset, args.test_image_list,
                                   given=stored if args.dataset == "generic" else None)
    # The list (and the images on disk) are checked before any model is built or image embedded; every
    # later tool matches rows by image id, so two files with one id are refused here.
    ImageListDataset(args.test_image_list, image_dir, dataset=args.dataset, class_names=names).check_unique_ids()
    set_seed(args.seed)  # an untrained (random-init) model gives the same embeddings run after run
    model, transform, source = build(args, device)
    ensure_writable_dir(out.parent, "--output")
    ds = ImageListDataset(args.test_image_list, image_dir, dataset=args.dataset, transform=transform,
                          class_names=names, check_files=False, cache_dir=args.cache_dir)
    n = len(ds)
    if is_main_process():
        print(f"{source}: {model.embedding_dim}-d embeddings of {n} images from {args.test_image_list} "
              f"({image_dir}) on {device}" + (f", {world} ranks" if distributed else ""))
    t0 = time.time()
    # rows in list order; under torchrun every rank embeds every world-th image and all get the gathered rows.
    # Unit rows in float32 (the model normalises in float32 already; this removes bf16/rounding drift).
    rows = embeddings.embed_dataset(model, ds, device, args.eval_batch_size, args.workers, amp_dtype=amp_dtype,
                                    progress=True, desc="extracting", normalize=True)
    if is_main_process():
        extra = {} if excluded is None else {"exclude_classes": excluded}
        meta = embeddings.make_meta(model=model, checkpoint=args.resume, list_file=args.test_image_list,
                                    image_dir=image_dir, dataset=args.dataset, class_names=ds.class_names,
                                    seed=args.seed, world_size=world, **extra)
        s = embeddings.save(out, embeddings.EmbeddingSet.from_dataset(rows, ds, meta), overwrite=args.overwrite)
        dt = time.time() - t0
        print(f"{n} images in {dt:.1f} s ({n / max(dt, 1e-9):.1f} images/s); wrote the embedding set {s.path} "
              f"{s.embeddings.shape} (labels, image and patient ids, meta beside it)")
    cleanup_distributed(sync=True)
    return 0


def main(args):
    return run_main(run, args, "extract_embeddings.py")


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
