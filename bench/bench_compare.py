"""Benchmark test_backbone.py's computation at N = 10,000: time and peak memory (issue 6, section 2).

Two random class-structured embedding sets of the same images (D = 1024 and 768, unit rows), leave-one-out:
both models' top-k, AP@k, R@1 and full-ranking AP, overlap@k, Spearman rho over full rows, linear, z-score and
reciprocal rank fusion for three alphas, held-out alpha; then test_backbone.main end to end (files, histogram,
5 query plots drawn as blanks). Each configuration runs in a fresh process so its peak RSS is its own.
Also times a per-query scipy.stats.spearmanr loop on a few rows, extrapolated to N, for comparison.

    python bench/bench_compare.py                       # N = 10,000, chunk sizes 256 512 1024
    python bench/bench_compare.py --n 2000 --chunk-sizes 512 --threads 2
Target: under 60 s on 2 CPU cores.
"""
import argparse
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_sets(n, d1, d2, num_classes, seed):
    """Class centres plus noise; model 2 shares model 1's noise in part, so the two agree partly."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    noise = rng.standard_normal((n, max(d1, d2))).astype(np.float32)
    e1 = rng.standard_normal((num_classes, d1)).astype(np.float32)[labels] * 0.12 + noise[:, :d1]
    e2 = (rng.standard_normal((num_classes, d2)).astype(np.float32)[labels] * 0.12
          + noise[:, :d2] + 0.7 * rng.standard_normal((n, d2)).astype(np.float32))
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 /= np.linalg.norm(e2, axis=1, keepdims=True)
    return e1, e2, labels


def rss_mb():
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def current_rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def worker(cfg, queue):
    import torch
    torch.set_num_threads(cfg["threads"])
    import test_backbone as tb
    e1, e2, labels = make_sets(cfg["n"], cfg["d1"], cfg["d2"], cfg["classes"], cfg["seed"])
    base = current_rss_mb()  # interpreter, torch and the two embedding sets
    t0, c0 = time.perf_counter(), time.process_time()
    r = tb.compare_embeddings(e1, e2, labels, k=5, alphas=(0.3, 0.5, 0.7), chunk_size=cfg["chunk"], progress=False)
    compute_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    res = {"compute_s": compute_s, "cpu_s": cpu_s, "peak_rss_mb": rss_mb(), "above_inputs_mb": rss_mb() - base, "base_mb": base,
           "map1": float(r["ap1"].mean()), "map2": float(r["ap2"].mean()),
           "overlap": float(r["overlap"].mean()), "rho": float(np.nanmean(r["rho"]))}
    if cfg["end_to_end"]:
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            import embeddings as E
            ids, names = np.array([f"i{i}" for i in range(len(labels))]), [str(c) for c in range(int(labels.max()) + 1)]
            for name, e in (("m1", e1), ("m2", e2)):  # hand-made sets, written as every tool writes one
                E.save(d / f"{name}.npy", E.EmbeddingSet(e.astype(np.float32), labels.astype(np.int64), ids,
                                                         None, names, E.make_meta(model_name=name)))
            args = tb.get_args_parser().parse_args(
                ["--model1-embeddings", str(d / "m1.npy"), "--model2-embeddings", str(d / "m2.npy"),
                 "--save-dir", str(d / "out"), "--chunk-size", str(cfg["chunk"])])
            import contextlib, io
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                tb.main(args)
            res["main_s"] = time.perf_counter() - t0
            res["peak_rss_mb"] = rss_mb()
    queue.put(res)


def spearman_loop_estimate(n, rows, seed):
    """Seconds for a per-query scipy.stats.spearmanr loop (the straightforward way), extrapolated to n rows."""
    import scipy.stats
    e1, e2, _ = make_sets(n, 1024, 768, 3, seed)
    t0 = time.perf_counter()
    for q in range(rows):
        keep = np.arange(n) != q
        scipy.stats.spearmanr((e1 @ e1[q])[keep], (e2 @ e2[q])[keep])
    return (time.perf_counter() - t0) / rows * n


def main(args):
    import torch
    print(f"# bench_compare: {platform.processor() or platform.machine()}, {mp.cpu_count()} CPUs visible, "
          f"torch {torch.__version__}, numpy {np.__version__}, threads {args.threads}; "
          f"N = {args.n}, D = {args.d1} / {args.d2}, {args.classes} classes, k = 5, alphas 0.3 0.5 0.7; "
          f"load average at start {os.getloadavg()[0]:.1f} (other processes share the cores: compare CPU seconds)")
    ctx = mp.get_context("spawn")
    rows = []
    for chunk in args.chunk_sizes:
        cfg = dict(n=args.n, d1=args.d1, d2=args.d2, classes=args.classes, seed=args.seed, chunk=chunk,
                   threads=args.threads, end_to_end=chunk == args.chunk_sizes[0] or args.all_end_to_end)
        q = ctx.Queue()
        p = ctx.Process(target=worker, args=(cfg, q))
        p.start()
        res = q.get()
        p.join()
        rows.append((chunk, res))
    print(f"\nRSS before the computation (interpreter, torch, inputs): {rows[0][1]['base_mb']:.0f} MB")
    print("\n| chunk | computation, wall (s) | computation, CPU (s) | test_backbone.main (s) | peak RSS (MB) |"
          " peak above inputs (MB) | mAP@5 m1 / m2 | overlap@5 | rho |")
    print("|---|---|---|---|---|---|---|---|---|")
    for chunk, r in rows:
        main_s = f"{r['main_s']:.1f}" if "main_s" in r else "-"
        print(f"| {chunk} | {r['compute_s']:.1f} | {r['cpu_s']:.1f} | {main_s} | {r['peak_rss_mb']:.0f} | {r['above_inputs_mb']:.0f} "
              f"| {r['map1']:.3f} / {r['map2']:.3f} | {r['overlap']:.2f} | {r['rho']:.3f} |")
    if args.loop_rows:
        est = spearman_loop_estimate(args.n, args.loop_rows, args.seed)
        print(f"\nper-query scipy.stats.spearmanr loop (similarity rows included), timed on {args.loop_rows} rows: "
              f"~{est:.0f} s for N = {args.n} (Spearman alone; the vectorised path above does everything)")
    default = [r for c, r in rows if c == 512] or [r for _, r in rows]
    target = "met" if all(r["compute_s"] < 60 for r in default) else "NOT met"
    print(f"target (< 60 s on 2 CPU cores, default --chunk-size 512): {target}; load average at end "
          f"{os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Benchmark test_backbone.py's computation")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--d1", type=int, default=1024)
    p.add_argument("--d2", type=int, default=768)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loop-rows", type=int, default=100, help="rows of the per-query loop to time (0: skip)")
    p.add_argument("--all-end-to-end", action="store_true", help="run test_backbone.main for every chunk size")
    raise SystemExit(main(p.parse_args()))
