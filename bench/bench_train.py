"""Speed and memory of one training step (forward, batch-hard triplet loss, backward, Adam) of the paper
hybrid (ConvNeXtV2-B + ViT-B/16 at 384 px, 1024-d) under fp32, bf16 autocast, channels_last and gradient
checkpointing, each alone and combined (+ torch.compile on CUDA). Random init, random images: no download.

Each configuration runs in its own process so its peak memory is its own: on CUDA
torch.cuda.max_memory_allocated, on CPU the process peak RSS (ru_maxrss, model and Adam state included).
On CUDA it also reports model FLOPs utilisation: FLOPs of one step counted by torch.utils.flop_counter,
divided by the step time and the GPU's dense bf16 peak (--peak-tflops, or a table of known GPUs).

    python bench/bench_train.py                           # CUDA: batch 16, all configurations
    python bench/bench_train.py --device cpu --batch-size 4 --steps 1 --configs fp32 bf16 bf16+cl+ckpt
    python bench/bench_train.py --model-args '{"convnext_backbone": "convnextv2_atto", ...}'  # other model
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {  # name -> (autocast bf16, channels_last, grad checkpointing, compile)
    "fp32": (False, False, False, False),
    "bf16": (True, False, False, False),
    "channels_last": (False, True, False, False),
    "grad_ckpt": (False, False, True, False),
    "bf16+cl": (True, True, False, False),
    "bf16+ckpt": (True, False, True, False),
    "bf16+cl+ckpt": (True, True, True, False),
    "bf16+compile": (True, False, False, True),
}
PAPER_HYBRID = dict(embedding_dim=1024, img_size=384, pretrained=False, convnext_backbone="convnextv2_base",
                    vit_backbone="vit_base_patch16_384")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0}  # dense, no sparsity


def get_args_parser():
    p = argparse.ArgumentParser(description="Benchmark one training step of the paper hybrid")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 on CUDA, 4 on CPU (2 classes x k)")
    p.add_argument("--steps", type=int, default=None, help="timed steps after one warm-up (default 10 CUDA, 2 CPU)")
    p.add_argument("--configs", nargs="+", default=None, choices=sorted(CONFIGS),
                   help="default: all (compile only on CUDA)")
    p.add_argument("--model-args", default=json.dumps(PAPER_HYBRID), help="JSON model_args of hybrid_convnext_vit")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak for MFU")
    p.add_argument("--json-out", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: run one configuration
    return p


def run_one(args, name):
    import model as M
    from losses import triplet_loss

    bf16, cl, ckpt, comp = CONFIGS[name]
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = M.build_model("hybrid_convnext_vit", **json.loads(args.model_args)).to(device).train()
    if ckpt:
        model.set_grad_checkpointing(True)
    if cl:
        model.to(memory_format=torch.channels_last)
    fwd = torch.compile(model) if comp else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    size = model.data_config["img_size"]
    x = torch.randn(args.batch_size, 3, size, size, device=device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.arange(args.batch_size, device=device) % 2  # 2 classes: every anchor has positives and negatives

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            emb = fwd(x)
        loss, _ = triplet_loss(emb.float(), y, 0.2, "batch_hard")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step()  # warm-up: allocator, Adam state, compilation
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    row = dict(config=name, device=str(device), batch_size=args.batch_size, step_s=round(dt, 4),
               img_per_s=round(args.batch_size / dt, 2))
    if device.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        with FlopCounterMode(display=False) as fc:  # count on the eager module: same math as compiled
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                emb = model(x)
            triplet_loss(emb.float(), y, 0.2, "batch_hard")[0].backward()
        opt.zero_grad(set_to_none=True)
        flops = fc.get_total_flops()
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items()
                                         if k in torch.cuda.get_device_name()), None)
        row["tflops_per_step"] = round(flops / 1e12, 3)
        row["mfu"] = round(flops / dt / (peak * 1e12), 4) if peak else None
    else:
        row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return row


def main(args):
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (16 if cuda else 4)
    args.steps = args.steps or (10 if cuda else 2)
    if args.one:
        print(json.dumps(run_one(args, args.one)))
        return 0
    configs = args.configs or [c for c in CONFIGS if cuda or not CONFIGS[c][3]]
    rows = []
    print(f"device {args.device}  batch {args.batch_size}  steps {args.steps}  torch {torch.__version__}"
          + (f"  {torch.cuda.get_device_name()}" if cuda else ""))
    for name in configs:
        cmd = [sys.executable, __file__, "--one", name, "--device", args.device, "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--model-args", args.model_args]
        if args.peak_tflops:
            cmd += ["--peak-tflops", str(args.peak_tflops)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            rows.append(dict(config=name, error=out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"))
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        mem = r.get("peak_mem_gb", r.get("peak_rss_gb"))
        print(f"{name:<14} " + (f"error: {r['error']}" if "error" in r else
              f"{r['img_per_s']:>8.2f} img/s  {r['step_s']:>8.3f} s/step  peak {mem:.2f} GB"
              + (f"  MFU {r['mfu']:.1%}" if r.get("mfu") is not None else "")), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
