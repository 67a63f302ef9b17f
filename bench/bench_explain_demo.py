"""The explain demo (issue 22): data whose classes live only in the planted finding, a small conv net
(model.py's `democnn`, 8 x 8 last map at 128 px) trained on the CPU, the leak check, and explain.py's evidence
per method, target and layer.

    python bench/bench_explain_demo.py --out /tmp/x22/bench   # all of it: ~35 min on 2 CPU cores shared with others
    python bench/bench_explain_demo.py --skip-leak-check --no-sanity --num-queries 4
    python bench/bench_explain_demo.py --configs gradcam:dot:-3+-1 layercam:cosine:-4

1. data/make_demo_data.py --out OUT/data --num-patients 240 --images-per-patient 2 --size 128 (and the same with
   --mask-findings in OUT/data_masked: every finding replaced by the image rendered without pathology).
2. train.py --model democnn on each (batch-all triplets from random init; the commands are printed).
3. Leak check: test R@1 and kNN (k = 5) class accuracy, same patient excluded, on the trained and the masked
   model: the masked one must be at chance (1/3).
4. explain.py --evaluate --mask-dir --sanity per config METHOD[:TARGET[:LAYERS]] (LAYERS joined by +, as
   explain.py --layers); the evidence block of each explain.json becomes one row of a markdown table.
Timings on a shared machine are noisy: compare configs within one run.
"""
import argparse
import datetime
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CONFIGS = ["gradcam:dot:-1", "gradcam:cosine:-1", "gradcam:dot:-3", "gradcam:cosine:-3", "layercam:dot:-3",
                   "simcam", "sbsm", "random"]
TRAIN = ["--model", "democnn", "--img-size", "128", "--embedding-dim", "64", "--mining", "batch_all", "-p", "3",
         "-k", "16", "--lr", "1e-3", "--backbone-lr-mult", "1", "--exclude-same-patient", "--val-fraction", "0.15",
         "--workers", "0", "--overwrite"]


def get_args_parser():
    p = argparse.ArgumentParser(description="explain demo: leak check, democnn training, evidence table",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "explain_demo_bench", help="work folder")
    p.add_argument("--epochs", type=int, default=8, help="democnn training epochs")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="METHOD[:TARGET[:LAYERS]]")
    p.add_argument("--num-queries", type=int, default=8, help="queries (seeded) per config")
    p.add_argument("--topk", type=int, default=3, help="results per query")
    p.add_argument("--road-percentiles", nargs="+", default=["20", "50", "80"], help="explain.py --road-percentiles")
    p.add_argument("--skip-leak-check", action="store_true", help="no masked data, no second training")
    p.add_argument("--no-sanity", action="store_true", help="no --sanity (faster)")
    p.add_argument("--device", default="cpu")
    return p


def run(cmd):
    print("$ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def data_and_model(args, name, masked):
    data = args.out / name
    if not (data / "test_split.txt").is_file():
        run([sys.executable, "data/make_demo_data.py", "--out", data, "--num-patients", "240", "--images-per-patient",
             "2", "--size", "128", "--force"] + (["--mask-findings"] if masked else []))
    save = args.out / f"ckpt_{name}"
    done = sorted(save.glob("*/*_best_ckpt.pth"))
    if done:  # a rerun reuses the trained model (delete OUT/ckpt_* to retrain)
        print(f"reusing {done[0]}")
        return data, done[0]
    run([sys.executable, "train.py", *TRAIN, "--dataset-dir", data, "--train-image-list", data / "train_split.txt",
         "--test-image-list", data / "test_split.txt", "--epochs", args.epochs, "--save-dir", save,
         "--device", args.device])
    return data, next(save.glob("*/*_best_ckpt.pth"))


def retrieval(ckpt, data, device):
    """Test R@1 and kNN (k = 5, metrics.majority_vote: ties to the nearest) class accuracy, same patient excluded."""
    import metrics
    from dataset import ImageListDataset
    from embeddings import embed_dataset
    from model import get_transform, load_checkpoint
    from utils import get_device
    dev = get_device(device)
    model, _ = load_checkpoint(ckpt, map_location=dev)
    ds = ImageListDataset(data / "test_split.txt", data / "test", transform=get_transform(model))
    emb = embed_dataset(model, ds, dev, 64, 0)
    r = metrics.rank(emb, ds.labels, k=5, exclude_self=True, full_ranking=False,
                     query_groups=np.array(ds.patient_ids))
    vote = metrics.majority_vote(np.asarray(ds.labels)[r.indices], 5)
    return {"R@1": float(r.relevant[:, 0].mean()), "knn5_accuracy": float((vote == np.asarray(ds.labels)).mean()),
            "chance": 1 / len(ds.class_names), "n": len(ds)}


def explain_row(args, ckpt, data, config):
    method, target, layers = (config.split(":") + [None, None])[:3]
    save = args.out / "explain" / config.replace(":", "_").replace("+", "_")
    cmd = [sys.executable, "explain.py", "--resume", ckpt, "--dataset-dir", data, "--test-image-list",
           data / "test_split.txt", "--exclude-same-patient", "--method", method, "--topk", args.topk,
           "--num-queries", args.num_queries, "--mask-dir", data / "masks", "--evaluate", "--steps", "16",
           "--road-percentiles", *args.road_percentiles, "--device", args.device, "--workers", "0",
           "--save-dir", save, "--overwrite"]
    cmd += ["--target", target] if target else []
    cmd += ["--layers", *layers.split("+")] if layers else []
    cmd += [] if args.no_sanity else ["--sanity"]
    run(cmd)
    res = json.loads((save / "explain.json").read_text())
    return {"config": config, "evidence": res["evidence"], "pairs_per_second": res["pairs_per_second"],
            "command": " ".join(shlex.quote(str(c)) for c in cmd[1:])}


def fmt(s):
    return "n/a" if s is None or s["mean"] is None else f"{s['mean']:.3f}" + (
        f" [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]" if s.get("ci95") else "")


def table(rows):
    keys = ["pointing_game", "mass_inside", "insertion_auc", "deletion_auc", "road_morf", "road_lerf", "road"]
    out = ["| config (method:target:layers) | grid | " + " | ".join(keys) + " | sanity Spearman (full rand.) | pairs/s |",
           "|---" * (len(keys) + 4) + "|"]
    for r in rows:
        ev = r["evidence"]
        cells = [fmt(ev["scores"][k]["method"]) + ("*" if ev["scores"][k]["verdict"] == "better than random" else "")
                 if k in ev["scores"] else "n/a" for k in keys]
        san = ev["sanity"]
        sp = "n/a" if san is None else fmt(san["steps"][-1]["spearman"]) + ("" if san["passed"] else " FAILS")
        out.append(f"| {r['config']} | {ev['map_grid']} | " + " | ".join(cells) +
                   f" | {sp} | {r['pairs_per_second']:.2f} |")
    if rows:  # the random baseline on the same pairs (any row has it)
        ev = rows[0]["evidence"]
        out.append("| random baseline (same pairs) | | " + " | ".join(
            fmt(ev["scores"][k]["random_baseline"]) if k in ev["scores"] else "n/a" for k in keys) + " | | |")
        u = ev["uniform_area_fraction"]
        out.append(f"\n* = paired 95% CI of (method - random) excludes 0 on the better side. "
                   f"Uniform map's mass inside (finding's area fraction): {fmt(u)}.")
    return "\n".join(out)


def main(args):
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"# explain demo bench, {datetime.date.today()}, {platform.node()}, "
          f"python bench/bench_explain_demo.py {' '.join(sys.argv[1:])}")
    report = {}
    data, ckpt = data_and_model(args, "data", masked=False)
    report["retrieval"] = retrieval(ckpt, data, args.device)
    print(f"trained democnn: {report['retrieval']}")
    if not args.skip_leak_check:
        mdata, mckpt = data_and_model(args, "data_masked", masked=True)
        report["retrieval_findings_masked"] = retrieval(mckpt, mdata, args.device)
        print(f"trained on findings masked out: {report['retrieval_findings_masked']}")
        (args.out / "bench.json").write_text(json.dumps(report, indent=1))
    rows = []
    for config in args.configs:
        rows.append(explain_row(args, ckpt, data, config))
        report["rows"] = rows
        (args.out / "bench.json").write_text(json.dumps(report, indent=1))
        print(table(rows), flush=True)
    print(f"\nwrote {args.out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
