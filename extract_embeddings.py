"""Extract L2-normalised embeddings of every image of a list, in list order, for test_backbone.py / test.py.

Writes, for `--output DIR/X.npy`:
    X.npy              float32 (N, D), unit rows, row i = line i of the list (whatever the batch size / ranks)
    X_labels.npy       int64 (N,)
    X_image_ids.npy    (N,) str, unique: filename stems, or paths when stems repeat (dataset.list_image_ids)
    X_patient_ids.npy  (N,) str
    X_meta.json        model name and arguments, checkpoint, list, class names, git revision
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

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from dataset import ImageListDataset, get_data_parser, resolve_class_names, test_image_dir
from model import (build_model, compute_embeddings, get_model_parser, get_transform, load_checkpoint, model_args_from_cli,
                   read_checkpoint)
from utils import (all_gather_object, atomic_np_save, check_writable_dir, cleanup_distributed, ensure_writable_dir,
                   get_device, get_local_rank, get_rank, get_world_size, git_revision, init_distributed,
                   is_main_process, print_args, save_json, set_seed)

DEFAULT_MODEL = "hybrid_convnext_vit"


def get_args_parser():
    p = argparse.ArgumentParser(description="Extract embeddings of a list of images",
                                parents=[get_model_parser(), get_data_parser(
                                    lists=("test",), test_help="list of the images to embed (images in the test folder)")],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # None = "not given": with --resume the model comes from the checkpoint, and a given --model is checked.
    p.set_defaults(model=None)
    g = p.add_argument_group("extraction")
    g.add_argument("--resume", default=None, help="trained checkpoint; the model is rebuilt from it")
    g.add_argument("--output", required=True,
                   help="X.npy (a file; folders are --save-dir elsewhere); labels/ids/meta are written beside it")
    g.add_argument("--batch-size", "--eval-batch-size", dest="batch_size", type=int, default=32,
                   help="images per batch")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds torch/numpy before the model is built: random-init weights repeat exactly")
    g.add_argument("--device", default=None, help="cuda, cuda:1 or cpu; not given: cuda when available")
    g.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (faster; rows differ by ~1e-3)")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p


def output_paths(output):
    out = Path(output)
    if out.suffix != ".npy":
        raise ValueError(f"--output {out}: must end in .npy (e.g. embeddings/convnext.npy)")
    stem = out.with_suffix("")
    return {"embeddings": out, "labels": Path(f"{stem}_labels.npy"), "image_ids": Path(f"{stem}_image_ids.npy"),
            "patient_ids": Path(f"{stem}_patient_ids.npy"), "meta": Path(f"{stem}_meta.json")}


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


@torch.inference_mode()
def main(args):
    distributed = init_distributed()
    rank, world = get_rank(), get_world_size()
    paths = output_paths(args.output)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not args.overwrite:
        raise ValueError(f"output files already exist: {', '.join(existing)}; choose another --output or pass "
                         f"--overwrite")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.test_image_list is None:
        raise ValueError("--test-image-list LIST is required (one image per line: patient_id filename label)")
    if args.dataset_dir is None and args.test_dataset_dir is None:
        raise ValueError("give the image folder: --dataset-dir DIR (images in DIR/test or DIR) or --test-dataset-dir")
    if args.resume is not None and not Path(args.resume).is_file():
        raise ValueError(f"--resume {args.resume}: file not found; give a checkpoint written by train.py")
    # read now, before anything is printed or made: read_checkpoint refuses a train_fusion.py head in one line.
    # Generic lists take the class ids the checkpoint was trained with, so its embeddings and labels agree.
    stored = read_checkpoint(args.resume).get("class_names") if args.resume else None
    check_writable_dir(paths["embeddings"].parent, "--output")  # created only after the model is built
    device = get_device(args.device)
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
    ensure_writable_dir(paths["embeddings"].parent, "--output")
    ds = ImageListDataset(args.test_image_list, image_dir, dataset=args.dataset, transform=transform,
                          class_names=names, check_files=False, cache_dir=args.cache_dir)
    n = len(ds)
    shard = list(range(rank, n, world))  # strided: every rank gets a similar mix, no padding or duplicates
    loader = DataLoader(Subset(ds, shard), batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    if is_main_process():
        print(f"{source}: {model.embedding_dim}-d embeddings of {n} images from {args.test_image_list} "
              f"({image_dir}) on {device}" + (f", {world} ranks" if distributed else ""))
    t0 = time.time()
    amp_dtype = torch.bfloat16 if args.amp and device.type == "cuda" else None  # --amp: bf16 on CUDA only
    idx, emb = compute_embeddings(model, loader, device, amp_dtype=amp_dtype, progress=is_main_process(),
                                  desc="extracting")
    parts = all_gather_object((idx, emb))
    if is_main_process():
        embeddings = np.zeros((n, model.embedding_dim), np.float32)
        seen = np.zeros(n, bool)
        for i, e in parts:
            embeddings[i] = e
            seen[i] = True
        assert seen.all(), f"{int((~seen).sum())} rows were not extracted by any rank"
        # Unit rows in float32 (the model normalises in float32 already; this removes bf16/rounding drift).
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        atomic_np_save(paths["labels"], ds.labels.astype(np.int64))
        atomic_np_save(paths["image_ids"], np.array(ds.image_ids, dtype=str))
        atomic_np_save(paths["patient_ids"], np.array(ds.patient_ids, dtype=str))
        atomic_np_save(paths["embeddings"], embeddings)
        meta = {"model_name": model.model_name, "model_args": model.model_args,
                "embedding_dim": int(model.embedding_dim), "resume": args.resume,
                "image_list": str(args.test_image_list), "image_dir": str(image_dir), "dataset": args.dataset,
                "class_names": list(ds.class_names), "num_images": n, "world_size": world, "seed": args.seed,
                "git": git_revision()}
        save_json(meta, paths["meta"])
        dt = time.time() - t0
        print(f"{n} images in {dt:.1f} s ({n / max(dt, 1e-9):.1f} images/s); wrote {paths['embeddings']} "
              f"{embeddings.shape} and its _labels/_image_ids/_patient_ids/_meta files")
    cleanup_distributed()
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main(get_args_parser().parse_args()))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
