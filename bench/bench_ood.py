"""OOD scoring speed and memory for a large archive (ood.py): chunked / faiss kNN against brute force.

Random clustered unit embeddings (an archive of --archive rows, --queries query rows). Each method runs in
its own process so its peak RSS is its own; "extra MB" = peak RSS minus the RSS once the inputs are loaded
(they are generated once per configuration and np.load-ed by each method's process).
  brute        the obvious way: the full (Q, N) float32 similarity matrix at once, np.partition per row
  torch        ood.knn_scores(backend="torch"): metrics.knn_search, one (chunk, N) product + top-k at a time
  faiss        ood.knn_scores(backend="faiss"): exact IndexFlatIP, exclusions/ties re-checked as metrics.py does
  pytorch-ood  ood.knn_scores(backend="pytorch-ood"): pytorch_ood.detector.KNN (scikit-learn NearestNeighbors)
  mahalanobis  ood.fit_mahalanobis (Ledoit-Wolf) + ood.mahalanobis_scores, fit included
Every kNN method's scores are compared with brute force (max abs difference).
--precision: pytorch-ood's Mahalanobis (float32 inverse of the scatter + 1e-6) against the same formula in
float64 when the archive is smaller than the width (N < D) and when it is not.

    python bench/bench_ood.py                                   # a100k_d128 a100k_d1024
    python bench/bench_ood.py --configs a100k_d128 --methods torch faiss
    python bench/bench_ood.py --precision

Prints a markdown table with the machine, the command and the date. Timings on a shared machine are
noisy: compare methods within one run.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"a100k_d128": (100_000, 128, 5000), "a100k_d1024": (100_000, 1024, 1000)}  # (archive, D, queries)
METHODS = ("brute", "torch", "faiss", "pytorch-ood", "mahalanobis")


def get_args_parser():
    p = argparse.ArgumentParser(description="Benchmark OOD scoring", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", action="store_true", help="only the Mahalanobis float32 precision check")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    return p


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_data(n, d, q, num_classes, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, d)).astype(np.float32)
    labels = rng.integers(0, num_classes, n)
    archive = centres[labels] + 1.5 * rng.normal(size=(n, d)).astype(np.float32)
    archive /= np.linalg.norm(archive, axis=1, keepdims=True)
    queries = centres[rng.integers(0, num_classes, q)] + 1.5 * rng.normal(size=(q, d)).astype(np.float32)
    queries[: q // 2] = rng.normal(size=(q // 2, d))  # half of them from nowhere near the archive
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return archive, labels, queries


def brute(archive, queries, k):
    sim = queries @ archive.T                                   # (Q, N) float32, all at once
    kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1]          # k-th largest cosine per row
    return np.sqrt(np.clip(2.0 - 2.0 * kth.astype(np.float64), 0, None))


def worker(args):
    import torch
    torch.set_num_threads(os.cpu_count())
    import ood
    archive, labels, queries = (np.load(Path(args.data_dir) / f"{n}.npy") for n in ("archive", "labels", "queries"))
    base = rss_mb()
    t0 = time.perf_counter()
    fit_s = None
    if args.worker == "brute":
        s = brute(archive, queries, args.k)
    elif args.worker == "mahalanobis":
        means, prec, _, a = ood.fit_mahalanobis(archive, labels, "auto")
        fit_s = time.perf_counter() - t0
        s = ood.mahalanobis_scores(queries, means, prec)
    else:
        s = ood.knn_scores(archive, queries, args.k, backend=args.worker)
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "fit_seconds": fit_s, "extra_mb": rss_mb() - base, "scores": s.tolist()}))


def precision_check():
    import torch
    from pytorch_ood.detector import Mahalanobis
    from scipy.stats import spearmanr
    rows = []
    for n, d in ((300, 1024), (5000, 1024)):
        rng = np.random.default_rng(0)
        y = rng.integers(0, 3, n)
        x = rng.normal(size=(3, d))[y] + 2 * rng.normal(size=(n, d))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        q = rng.normal(size=(200, d))
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        det = Mahalanobis(None).fit_features(torch.tensor(x, dtype=torch.float32), torch.tensor(y))
        s32 = det.predict_features(torch.tensor(q, dtype=torch.float32)).double().numpy()
        mu = np.stack([x[y == c].mean(0) for c in range(3)])
        cen = x - mu[y]
        p64 = np.linalg.inv(cen.T @ cen + 1e-6 * np.eye(d))
        s64 = np.min([0.5 * np.einsum("qd,de,qe->q", q - m, p64, q - m) for m in mu], 0)
        rel = np.abs(s32 - s64) / np.abs(s64)
        rows.append(f"| {n} | {d} | {np.linalg.cond(cen.T @ cen + 1e-6 * np.eye(d)):.3g} | {np.median(rel):.2g} | "
                    f"{rel.max():.2g} | {spearmanr(s32, s64)[0]:.4f} |")
    print("| archive N | D | cond(scatter + 1e-6 I) | median rel. error | max rel. error | Spearman rho |")
    print("|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


def main(args):
    if args.worker:
        worker(args)
        return 0
    print(f"command: python bench/bench_ood.py {shlex.join(sys.argv[1:])}")
    print(f"date: {datetime.date.today()}  machine: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.2f}")
    if args.precision:
        precision_check()
        return 0
    print("\n| archive | D | queries | method | seconds | queries/s | extra MB | max abs diff vs brute |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    import tempfile
    for cfg in args.configs:
        n, d, q = CONFIGS[cfg]
        ref = None
        tmp = tempfile.TemporaryDirectory()
        for name, a in zip(("archive", "labels", "queries"), make_data(n, d, q, args.num_classes, args.seed)):
            np.save(Path(tmp.name) / f"{name}.npy", a)
        for m in args.methods:
            out = subprocess.run([sys.executable, __file__, "--worker", m, "--config", cfg, "--k", str(args.k),
                                  "--data-dir", tmp.name], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"| {n} | {d} | {q} | {m} | failed: {out.stderr.strip().splitlines()[-1]} | | | |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            s = np.array(r["scores"])
            if m == "brute":
                ref = s
            diff = "(other score)" if m == "mahalanobis" else ("-" if ref is None or m == "brute"
                                                               else f"{np.abs(s - ref).max():.1e}")
            secs = f"{r['seconds']:.2f}" + (f" (fit {r['fit_seconds']:.2f})" if r["fit_seconds"] else "")
            print(f"| {n:,} | {d} | {q:,} | {m} | {secs} | {q / r['seconds']:,.0f} | "
                  f"{r['extra_mb']:,.0f} | {diff} |", flush=True)
        tmp.cleanup()
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
