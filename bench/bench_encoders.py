"""Benchmark the CXR foundation encoders (model.ENCODERS): extraction images/s and peak memory, each at its real
input size, through the toolkit's own path (the model's processor-derived transform + forward, embeddings.
embed_dataset), on generated 512 x 512 grayscale PNGs.

    python bench/bench_encoders.py                          # every encoder, CPU (or the GPU when present)
    python bench/bench_encoders.py --device cuda --images 256 --batch-size 32
    python bench/bench_encoders.py --encoders raddino xrv-densenet --images 32

The real architectures are built from their published configs with random weights (data/make_standin_encoders.py
--size real --no-weights, then --no-pretrained): the cost of a forward pass does not depend on the weight values,
and no download is needed. Each encoder runs in its own process, so the peak resident memory (ru_maxrss) is its
own: model + one batch + the data pipeline; on CUDA also torch.cuda.max_memory_allocated. One warm-up batch is
not timed. Prints one line per encoder and a Markdown table.
"""
import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))

# key -> (model name, extra model args)
ENCODERS = {
    "raddino": ("raddino", {}),
    "biomedclip": ("biomedclip", {}),
    "medsiglip": ("medsiglip", {}),
    "xrv-densenet": ("xrv", {"backbone": "densenet121-res224-all"}),
    "xrv-resnet": ("xrv", {"backbone": "resnet50-res512-all"}),
    "dinov2": ("dinov2", {}),
    "clip": ("clip", {}),
}


def make_images(folder, n, size=512):
    """n grayscale PNGs (size x size) with smooth structure, and a list file `pid filename label`."""
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    lines = []
    for i in range(n):
        a = 128 + 60 * np.sin(6 * x + rng.uniform(0, 6)) * np.cos(5 * y) + rng.normal(0, 8, (size, size))
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L").save(folder / f"img{i:04d}.png")
        lines.append(f"p{i} img{i:04d}.png normal")
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    return folder / "list.txt"


def run_one(key, folders, image_dir, list_file, device, batch_size, workers):
    """In this process: build, warm up, time one extraction of the whole list; a dict of the measurements."""
    import resource
    import torch
    import embeddings
    from dataset import ImageListDataset
    from model import build_model, get_transform
    name, extra = ENCODERS[key]
    margs = dict(extra, pretrained=False)
    if name != "xrv":
        margs["pretrained_weights"] = str(folders / name)
    dev = torch.device(device)
    t0 = time.perf_counter()
    model = build_model(name, **margs).eval().to(dev)
    build_s = time.perf_counter() - t0
    ds = ImageListDataset(list_file, image_dir, dataset="covid", transform=get_transform(model))
    x = torch.stack([ds[i][0] for i in range(min(batch_size, len(ds)))]).to(dev)
    with torch.inference_mode():
        model(x)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.inference_mode():
        emb = embeddings.embed_dataset(model, ds, dev, batch_size=batch_size, workers=workers)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    out = {"encoder": key, "input": int(model.data_config["img_size"]), "channels": int(model.data_config["channels"]),
           "dim": int(emb.shape[1]), "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
           "image_params_M": round(sum(p.numel() for n, p in model.net.named_parameters()
                                       if model._is_image_param(n)) / 1e6, 1),
           "images": len(ds), "seconds": round(sec, 2), "images_per_s": round(len(ds) / sec, 2),
           "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 2),
           "build_s": round(build_s, 1), "device": device, "batch_size": batch_size}
    if dev.type == "cuda":
        out["peak_cuda_GB"] = round(torch.cuda.max_memory_allocated() / 1024 ** 3, 2)
    return out


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    p.add_argument("--images", type=int, default=16, help="images extracted per encoder (after one warm-up batch)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--output", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)      # internal: run one encoder in this process
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def main(args):
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.one:
        w = args.work
        print(json.dumps(run_one(args.one, w / "encoders", w / "images", w / "images" / "list.txt", device,
                                 args.batch_size, args.workers)))
        return 0
    from make_standin_encoders import make_standins
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        make_standins(w / "encoders", size="real", weights=False)
        make_images(w / "images", args.images)
        for key in args.encoders:
            cmd = [sys.executable, __file__, "--one", key, "--work", str(w), "--device", device,
                   "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{key}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    cpu = platform.processor() or platform.machine()
    print(f"\n{platform.node()} ({cpu}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"device {device}, batch {args.batch_size}, {args.images} images of 512 x 512 px")
    cuda = any("peak_cuda_GB" in r for r in rows)
    print("| encoder | input | ch | dim | params (image tower) M | images/s | peak RSS GB |"
          + (" peak CUDA GB |" if cuda else ""))
    print("| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if cuda else ""))
    for r in rows:
        print(f"| {r['encoder']} | {r['input']} | {r['channels']} | {r['dim']} | {r['params_M']} "
              f"({r['image_params_M']}) | {r['images_per_s']} | {r['peak_rss_GB']} |"
              + (f" {r.get('peak_cuda_GB', '')} |" if cuda else ""))
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1))
    return 0 if len(rows) == len(args.encoders) else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
