"""explain.py on the demo: faithfulness and localisation per method against the random baseline, speed, and the
cost of Grad-CAM for one pair against one forward + backward pass of its two images.

Needs the demo checkpoint and data (python train.py --demo). Each method runs explain.main on the same seeded
queries (their top-k, same-patient excluded) with --evaluate and --mask-dir data/demo/masks:

    python bench/bench_explain.py
    python bench/bench_explain.py --methods gradcam sbsm random --num-queries 6 --device cpu
    python bench/bench_explain.py --cost-only              # just the Grad-CAM cost ratio

Prints a markdown table with the machine, the command and the date; --output writes the numbers as JSON.
Timings on a shared machine are noisy: compare methods within one run.
"""
import argparse
import datetime
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import explain as E  # noqa: E402
from utils import get_device  # noqa: E402

DEMO_RUN = "covid_hybrid_convnext_vit_embed_128_seed_0"
DEFAULT_CKPT = ROOT / "checkpoints" / "demo" / DEMO_RUN / f"{DEMO_RUN}_best_ckpt.pth"


def get_args_parser():
    p = argparse.ArgumentParser(description="explain.py benchmark on the demo",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--resume", type=Path, default=DEFAULT_CKPT, help="checkpoint (default: train.py --demo's)")
    p.add_argument("--dataset-dir", type=Path, default=ROOT / "data" / "demo", help="demo data folder")
    p.add_argument("--methods", nargs="+", default=["gradcam", "gradcam++", "xgradcam", "layercam", "sbsm", "simcam",
                                                    "random"], choices=E.METHODS, help="methods to score")
    p.add_argument("--num-queries", type=int, default=27, help="queries (seeded) per method (27 = every demo test image)")
    p.add_argument("--topk", type=int, default=5, help="results per query")
    p.add_argument("--steps", type=int, default=16, help="insertion/deletion curve steps")
    p.add_argument("--road-percentiles", nargs="+", default=["20", "50", "80"], help="explain.py --road-percentiles")
    p.add_argument("--target", default="dot", choices=["dot", "cosine"], help="explain.py --target (CAM methods)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats of the Grad-CAM cost measurement")
    p.add_argument("--cost-only", action="store_true", help="only the Grad-CAM cost against forward + backward")
    p.add_argument("--seed", type=int, default=0, help="query draw and baseline seed")
    p.add_argument("--output", type=Path, default=None, help="write the numbers as JSON here")
    return p


def gradcam_cost(ckpt, data_dir, device, repeats):
    """Median seconds of (a) Grad-CAM of one pair, both sides (explain.cam_maps on the 2 images with their
    targets), (b) one forward + backward of the same 2 images (sum of the embeddings), after warm-up."""
    from dataset import ImageListDataset, test_image_dir
    from model import explain_layers, get_transform, load_checkpoint
    model, _ = load_checkpoint(ckpt, map_location=device)
    ds = ImageListDataset(data_dir / "test_split.txt", test_image_dir(data_dir), transform=get_transform(model))
    x = torch.stack([ds[0][0], ds[len(ds) // 2][0]]).to(device)
    with torch.no_grad():
        e = model(x)
    refs = e.flip(0)  # image 0 toward image 1, image 1 toward image 0: the two sides of the pair
    spec = explain_layers(model)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def fwd_bwd():
        model.zero_grad()
        model(x.detach().requires_grad_(False)).sum().backward()

    def cam():
        E.cam_maps(model, spec, "gradcam", x, refs)

    out = {}
    for name, fn in (("forward_backward", fwd_bwd), ("gradcam_pair", cam)):
        fn()
        times = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        out[name] = float(np.median(times))
    out["ratio"] = out["gradcam_pair"] / out["forward_backward"]
    return out


def main(args):
    device = get_device(args.device)
    if not args.resume.is_file() or not (args.dataset_dir / "masks").is_dir():
        print(f"error: need the demo checkpoint {args.resume} and {args.dataset_dir}/masks: run python train.py --demo "
              "(data/make_demo_data.py writes the masks)", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows, raw = [], {"methods": {}}
    if not args.cost_only:
        for method in args.methods:
            with tempfile.TemporaryDirectory() as tmp:
                ea = E.get_args_parser().parse_args([
                    "--resume", str(args.resume), "--dataset-dir", str(args.dataset_dir),
                    "--test-image-list", str(args.dataset_dir / "test_split.txt"), "--exclude-same-patient",
                    "--method", method, "--topk", str(args.topk), "--num-queries", str(args.num_queries),
                    "--evaluate", "--steps", str(args.steps), "--mask-dir", str(args.dataset_dir / "masks"),
                    "--device", str(device), "--workers", "0", "--seed", str(args.seed), "--save-dir", tmp,
                    "--road-percentiles", *args.road_percentiles, "--target", args.target])
                rc = E.main(ea)
                if rc != 0:
                    raw["methods"][method] = {"error": "not supported by this model (see the message above)"}
                    rows.append(f"| {method} | n/a (not supported by this model) | | | | | | |")
                    continue
                res = json.loads((Path(tmp) / "explain.json").read_text())
            sc = res["scores"]
            raw["methods"][method] = {"scores": sc, "pairs_per_second": res["pairs_per_second"],
                                      "num_pairs": res["num_pairs"]}

            def cell(key):
                a, b = sc[key][method]["mean"], sc[key]["random_baseline"]["mean"]
                ci = sc[key][method]["ci95"]
                return f"{a:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] / {b:.3f}"
            rows.append(f"| {method} | {cell('pointing_game')} | {cell('mass_inside')} | "
                        f"{sc['uniform_area_fraction']['mean']:.3f} | {cell('insertion_auc')} | "
                        f"{cell('deletion_auc')} | {cell('road')} | {res['pairs_per_second']:.2f} |")
            raw["num_pairs"], raw["pairs_scored_for_localisation"] = res["num_pairs"], sc["pointing_game"][method]["n"]
    cost = gradcam_cost(args.resume, args.dataset_dir, device, args.repeats)
    raw["gradcam_cost"] = cost
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(f"\nmachine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, device {device}; torch {torch.__version__}")
    print(f"command: {cmd}\ndate: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n")
    if rows:
        print(f"{raw.get('num_pairs')} pairs ({args.num_queries} queries x top {args.topk}, same patient excluded); "
              f"localisation on the {raw.get('pairs_scored_for_localisation')} whose result has a finding. "
              "Each cell: method mean [95% CI] / random baseline mean.\n")
        print("| method | pointing game | mass inside | uniform (area) | insertion AUC | deletion AUC | ROAD | pairs/s |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
    print(f"\nGrad-CAM of one pair (both sides, 2 images): {1000 * cost['gradcam_pair']:.1f} ms; one forward + "
          f"backward of the 2 images: {1000 * cost['forward_backward']:.1f} ms; ratio {cost['ratio']:.2f}x "
          f"(median of {args.repeats})")
    if args.output:
        args.output.write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
