"""Benchmark embedding extraction: images/s of the paper models at 384 px for a few batch sizes (issue 6, section 5).

Model forward passes under torch.inference_mode on random (B, 3, 384, 384) batches, random weights
(pretrained=False: no download; speed does not depend on the weight values), after one warm-up batch; then one
end-to-end extract_embeddings.py run (decode + transform + forward + write) on generated 384 px demo images
with the fastest batch size of the first model, to show the data pipeline is not the bottleneck.

    python bench/bench_extract.py                                   # CPU (or the GPU when present)
    python bench/bench_extract.py --device cuda --batch-sizes 8 16 32 64 --batches 10 --amp
    python bench/bench_extract.py --models conceptclip --conceptclip-path /models/ConceptCLIP   # the real tower

Models: convnextv2 (ConvNeXtV2-B + MXA, 1024-d), hybrid (the paper's ConvNeXtV2-B + ViT-B/16 hybrid, 1024-d),
siglip-b (timm vit_base_patch16_siglip_384: an architecture proxy for the ConceptCLIP image tower, which needs
its remote code and weights), siglip-l (vit_large_patch16_siglip_384, a larger proxy), conceptclip (the real
tower; needs --conceptclip-path to a local copy).
"""
import argparse
import contextlib
import io
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))

from model import build_model  # noqa: E402

MODELS = {
    "convnextv2": dict(name="convnextv2"),
    "hybrid": dict(name="hybrid_convnext_vit"),
    "siglip-b": dict(name="timm", backbone="vit_base_patch16_siglip_384", use_mxa=False),
    "siglip-l": dict(name="timm", backbone="vit_large_patch16_siglip_384", use_mxa=False),
    "conceptclip": dict(name="conceptclip"),
}


def make(key, img_size, conceptclip_path):
    spec = dict(MODELS[key])
    name = spec.pop("name")
    if name == "conceptclip":
        if not conceptclip_path:
            raise ValueError("--models conceptclip needs --conceptclip-path DIR (a local copy of ConceptCLIP)")
        return build_model(name, conceptclip_path=conceptclip_path, pretrained=True)
    return build_model(name, pretrained=False, img_size=img_size, **spec)


@torch.inference_mode()
def throughput(model, batch, batches, device, amp):
    size = model.data_config["img_size"]
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        model(x)  # warm-up: allocation, kernel selection
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(batches):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * batches / (time.perf_counter() - t0)


def end_to_end(key, batch, device, img_size, num_images, workers):
    """One extract_embeddings.py run on generated images; returns images/s as the script measures it."""
    import extract_embeddings as ee
    from make_demo_data import make_demo_data
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        make_demo_data(d / "demo", num_patients=max(6, 2 * num_images), images_per_patient=1, size=img_size,
                       seed=0, test_fraction=0.5)
        spec = dict(MODELS[key])
        flags = ["--model", spec.pop("name"), "--no-pretrained", "--img-size", str(img_size)]
        if "backbone" in spec:
            flags += ["--backbone", spec["backbone"], "--no-mxa"]
        args = ee.get_args_parser().parse_args(
            flags + ["--dataset-dir", str(d / "demo"), "--test-image-list", str(d / "demo" / "test_split.txt"),
                     "--output", str(d / "e.npy"), "--batch-size", str(batch), "--workers", str(workers),
                     "--device", str(device)])
        n = sum(1 for line in (d / "demo" / "test_split.txt").read_text().splitlines() if line.strip())
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ee.main(args)
        return n, n / (time.perf_counter() - t0)


def main(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    print(f"# bench_extract: {platform.machine()} {gpu}, torch {torch.__version__}, device {device}, "
          f"{torch.get_num_threads()} threads, {args.img_size} px, {'bf16 autocast' if args.amp else 'fp32'}, "
          f"{args.batches} timed batches after 1 warm-up")
    print("\n| model | params (M) | batch | images/s | ms/image |")
    print("|---|---|---|---|---|")
    best = {}
    for key in args.models:
        model = make(key, args.img_size, args.conceptclip_path).eval().to(device)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for b in args.batch_sizes:
            ips = throughput(model, b, args.batches, device, args.amp and device.type == "cuda")
            best[key] = max(best.get(key, (0, 0)), (ips, b))
            print(f"| {key} | {params:.0f} | {b} | {ips:.2f} | {1000 / ips:.0f} |", flush=True)
        del model
    print("\nbest batch size: " + ", ".join(f"{k} {b} ({ips:.2f} images/s)" for k, (ips, b) in best.items()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak:.0f} MB")
    if args.end_to_end and args.models[0] != "conceptclip":
        key = args.models[0]
        ips_fwd, b = best[key]
        n, ips = end_to_end(key, b, device, args.img_size, args.end_to_end, args.workers)
        print(f"extract_embeddings.py end to end, {key}, batch {b}, {n} generated {args.img_size} px PNGs, "
              f"{args.workers} workers: {ips:.2f} images/s (forward alone {ips_fwd:.2f}; the difference is start-up, "
              f"decode, transform and writing)")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Benchmark embedding extraction speed")
    p.add_argument("--models", nargs="+", default=["convnextv2", "hybrid", "siglip-b"], choices=sorted(MODELS))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--batches", type=int, default=1, help="timed batches per batch size")
    p.add_argument("--img-size", type=int, default=384)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--conceptclip-path", default=None)
    p.add_argument("--end-to-end", type=int, default=4, help="images for the extract_embeddings.py run (0: skip)")
    p.add_argument("--workers", type=int, default=2)
    raise SystemExit(main(p.parse_args()))
