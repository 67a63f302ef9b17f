"""Data loading speed: decode + transform images/s for one loader worker, with and without the resized-image cache.

    python bench/bench_data.py                       # 1024x1024 8-bit and 16-bit PNG at 384, ~1 min on 2 CPU cores
    python bench/bench_data.py --num-images 32 --img-size 384 --passes 3 --train

One worker = one process with torch.set_num_threads(1), as in a DataLoader worker; multiply by
--workers for a loader (while CPU cores last). Images are generated into a temporary folder:
demo-like radiographs rendered at 256 px and upscaled to --source-size, with noise, saved as 8-bit
PNG and as 12-bit values in 16-bit PNG. "cache fill" is the first pass with an empty cache (decode,
resize, write); "cache warm" the later passes (what every epoch after the first, and every later run,
costs). Prints a markdown table with the command, machine and date.
"""
import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))

import dataset  # noqa: E402
from make_demo_data import _patient_params, _render  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_images(folder, n, size, seed):
    """n radiograph-like images per bit depth; returns {kind: list_file}."""
    folder.mkdir(parents=True, exist_ok=True)
    lists = {"8-bit": [], "16-bit": []}
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        base = _render(_patient_params(rng, i % 3), 256, rng)
        big = np.asarray(Image.fromarray(base).resize((size, size), Image.BICUBIC), dtype=np.float64)
        big = np.clip(big + rng.normal(0, 2.0, big.shape), 0, 255)
        Image.fromarray(big.astype(np.uint8), mode="L").save(folder / f"img{i}_8.png")
        Image.fromarray((big * (4095 / 255)).astype(np.uint16)).save(folder / f"img{i}_16.png")
        label = ["normal", "pneumonia", "COVID-19"][i % 3]
        lists["8-bit"].append(f"p{i} img{i}_8.png {label}")
        lists["16-bit"].append(f"p{i} img{i}_16.png {label}")
    out = {}
    for kind, lines in lists.items():
        out[kind] = folder / f"list_{kind}.txt"
        out[kind].write_text("\n".join(lines) + "\n")
    return out


def run_pass(ds):
    t = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return time.perf_counter() - t


def main(args):
    torch.set_num_threads(1)  # one DataLoader worker
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lists = make_images(tmp / "img", args.num_images, args.source_size, args.seed)
        tf = dataset.build_transform(args.img_size, MEAN, STD, train=args.train)
        for kind, list_file in lists.items():
            src_bytes = sum(p.stat().st_size for p in (tmp / "img").glob(f"*_{kind.split('-')[0]}.png"))
            plain = dataset.ImageListDataset(list_file, tmp / "img", transform=tf)
            run_pass(plain)  # warm the OS file cache so both variants read from memory
            t_plain = sum(run_pass(plain) for _ in range(args.passes)) / args.passes
            cache_dir = tmp / f"cache_{kind}"
            cached = dataset.ImageListDataset(list_file, tmp / "img", transform=tf, cache_dir=cache_dir)
            t_fill = run_pass(cached)
            t_warm = sum(run_pass(cached) for _ in range(args.passes)) / args.passes
            cache_bytes = sum(p.stat().st_size for p in cache_dir.rglob("*.npy"))
            n = len(plain)
            rows.append((kind, n / t_plain, n / t_fill, n / t_warm, t_plain / t_warm,
                         src_bytes / n / 1024, cache_bytes / n / 1024))
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(f"command: `{cmd}`")
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} logical CPUs, "
          f"{platform.system()} {platform.release()}; Python {platform.python_version()}, torch {torch.__version__}, "
          f"Pillow {Image.__version__}, numpy {np.__version__}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"{args.num_images} images per row, {args.source_size}x{args.source_size} PNG -> "
          f"{'train' if args.train else 'eval'} transform at {args.img_size} (resize {int(1.125 * args.img_size)}), "
          f"1 worker (1 thread), mean of {args.passes} passes\n")
    print("| source PNG | no cache img/s | cache fill img/s | cache warm img/s | speed-up (warm) | source KiB/img | cache KiB/img |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind, plain, fill, warm, speed, src_kib, cache_kib in rows:
        print(f"| {kind} | {plain:.1f} | {fill:.1f} | {warm:.1f} | {speed:.1f}x | {src_kib:.0f} | {cache_kib:.0f} |")
    return 0


def get_args_parser():
    parser = argparse.ArgumentParser(description="decode + transform throughput with and without the image cache")
    parser.add_argument("--num-images", type=int, default=24)
    parser.add_argument("--source-size", type=int, default=1024)
    parser.add_argument("--img-size", type=int, default=384)
    parser.add_argument("--passes", type=int, default=2, help="timed passes per variant (after one warm-up)")
    parser.add_argument("--train", action="store_true", help="train transform (random flip) instead of eval")
    parser.add_argument("--seed", type=int, default=0)
    return parser


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
