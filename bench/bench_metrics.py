"""Retrieval evaluation speed and memory (issue 6, section 1): toolkit vs floor vs older code.

Random class-structured unit embeddings (D = 1024). For every configuration, each method runs in
its own process so that its peak RSS is its own:
  floor       one similarity matrix product + one np.sort of every row's values (chunked like the
              toolkit): the unavoidable work of full-ranking mAP
  toolkit     metrics.evaluate (R@1/5/10, mP@K, mAP, mAP@5/10, MAP@R; no vote, no bootstrap)
  numpy_loop  the older scripts' way: similarity chunk, then np.argsort of each row in a Python loop
              (timed on the first --loop-max-queries queries and extrapolated to all when fewer)
  pml         pytorch-metric-learning's AccuracyCalculator (if installed): precision_at_1,
              mean_average_precision_at_r, and with k=None (N <= --pml-max-n) full-ranking
              mean_average_precision
  toolkit_faiss  metrics.evaluate with backend="faiss" (exact IndexFlatIP): must give equal numbers
The "faiss" configuration times exact, IVF and HNSW inner-product search on a large gallery and
reports recall@10 of the approximate indexes against exact search.

    python bench/bench_metrics.py                                    # loo1k loo10k loo50k q10k_g200k
    python bench/bench_metrics.py --configs loo1k loo10k             # quick (~1 min on 2 cores)
    python bench/bench_metrics.py --configs faiss --faiss-gallery 1000000 --faiss-queries 1000
    python bench/bench_metrics.py --configs faiss --faiss-indexes flat ivf --faiss-nlist 1024 --faiss-nprobe 8 32 128
    (--faiss-nprobe / --faiss-ef-search: search one built index with several settings)

Prints a markdown table with the machine, the command and the date. Timings on a shared machine
are noisy: compare methods within one run (the floor is timed in the same run).
"""
import argparse
import datetime
import importlib.util
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

CONFIGS = {  # name: (queries, gallery or None for leave-one-out)
    "loo1k": (1000, None),
    "loo10k": (10000, None),
    "loo50k": (50000, None),
    "q10k_g200k": (10000, 200000),
}
METHODS = ("floor", "toolkit", "toolkit_faiss", "numpy_loop", "pml")
AGREE_KEYS = ("R@1", "mAP", "MAP@R")


def get_args_parser():
    p = argparse.ArgumentParser(description="Benchmark retrieval metrics")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS) + ["faiss"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loop-max-queries", type=int, default=2000,
                   help="numpy_loop: time this many queries and extrapolate")
    p.add_argument("--pml-max-n", type=int, default=10000,
                   help="pml with k=None (full mAP) only up to this many gallery images; above, k=max_bin_count")
    p.add_argument("--pml-skip-above", type=int, default=20000,
                   help="skip pml when the gallery is larger (its kNN table needs N x max-class-size memory)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each method this many times (fresh process each) and keep the fastest")
    p.add_argument("--faiss-gallery", type=int, default=1000000)
    p.add_argument("--faiss-queries", type=int, default=1000)
    p.add_argument("--faiss-indexes", nargs="+", default=["flat", "ivf", "hnsw"], choices=["flat", "ivf", "hnsw"])
    p.add_argument("--faiss-nlist", type=int, default=None,
                   help="IVF lists (default: metrics.build_faiss_index's 4 sqrt(N); k-means cost grows with it)")
    p.add_argument("--faiss-nprobe", type=int, nargs="+", default=[16], help="IVF nprobe values to search with")
    p.add_argument("--faiss-ef-search", type=int, nargs="+", default=[128], help="HNSW efSearch values")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    return p


# --------------------------------------------------------------------------- data

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_embeddings(n, d, num_classes, seed, offset=0):
    """Unit rows = class centre + noise (signal about 0.2 of the noise norm), written in place in
    blocks so generating them never needs more memory than the result."""
    rng = np.random.default_rng([seed, offset])
    centres = np.random.default_rng([seed, 999]).standard_normal((num_classes, d), dtype=np.float32)
    labels = rng.integers(0, num_classes, n)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 8192):
        e = min(n, s + 8192)
        blk = rng.standard_normal((e - s, d), dtype=np.float32)
        blk += 0.2 * centres[labels[s:e]]
        blk /= np.linalg.norm(blk, axis=1, keepdims=True)
        x[s:e] = blk
    return x, labels


def load_config(args):
    nq, ng = CONFIGS[args.config]
    q, ql = make_embeddings(nq, args.dim, args.num_classes, args.seed)
    if ng is None:
        return q, ql, None, None
    g, gl = make_embeddings(ng, args.dim, args.num_classes, args.seed, offset=1)
    return q, ql, g, gl


# --------------------------------------------------------------------------- methods (worker side)

def run_floor(q, ql, g, gl, args):
    import torch
    import metrics
    gal = torch.from_numpy(q if g is None else g)
    qt = torch.from_numpy(q)
    chunk = max(1, metrics.CHUNK_ELEMENTS // gal.shape[0])
    for s in range(0, len(qt), chunk):
        sim = (qt[s:s + chunk] @ gal.T).numpy()
        np.sort(sim, axis=1)
    return {}


def run_toolkit(q, ql, g, gl, args, backend="torch"):
    import metrics
    res, r = metrics.evaluate(q, ql, g, gl, k_values=(1, 5, 10), vote_k=(), backend=backend, return_ranking=True)
    out = {k: res[k] for k in ("R@1", "R@10", "mAP", "mAP@10", "MAP@R")}
    n = min(len(q), args.loop_max_queries)
    has = r.num_relevant[:n] > 0
    out["subset"] = {"R@1": float(r.relevant[:n, 0].mean()), "mAP": float(r.ap[:n][has].mean()),
                     "MAP@R": float(r.map_at_r[:n][has].mean())}
    return out


def run_numpy_loop(q, ql, g, gl, args):
    """Older scripts: a similarity chunk, then a Python loop that argsorts each row."""
    import torch
    loo = g is None
    gal, glab = (q, ql) if loo else (g, gl)
    n = min(len(q), args.loop_max_queries)
    chunk = 1000
    ap, r1, mapr = [], [], []
    t0 = time.perf_counter()
    for s in range(0, n, chunk):
        sim = (torch.from_numpy(q[s:min(n, s + chunk)]) @ torch.from_numpy(gal).T).numpy()
        for i, row in enumerate(sim):
            if loo:
                row[s + i] = -np.inf
            order = np.argsort(-row, kind="stable")
            if loo:
                order = order[:-1]  # the excluded self sorts last
            rel = glab[order] == ql[s + i]
            hits = np.cumsum(rel)
            prec = hits / np.arange(1, len(rel) + 1)
            nrel = hits[-1]
            r1.append(float(rel[0]))
            if nrel:
                ap.append(float((prec * rel).sum() / nrel))
                mapr.append(float((prec[:nrel] * rel[:nrel]).sum() / nrel))
    elapsed = time.perf_counter() - t0
    return {"subset": {"R@1": float(np.mean(r1)), "mAP": float(np.mean(ap)), "MAP@R": float(np.mean(mapr))},
            "timed_queries": n, "extrapolated_s": elapsed * len(q) / n}


def run_pml(q, ql, g, gl, args):
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    ng = len(q) if g is None else len(g)
    full = ng <= args.pml_max_n
    include = ("precision_at_1", "mean_average_precision_at_r") + (("mean_average_precision",) if full else ())
    calc = AccuracyCalculator(include=include, k=None if full else "max_bin_count", device=torch.device("cpu"))
    if g is None:
        res = calc.get_accuracy(torch.from_numpy(q), torch.from_numpy(ql))
    else:
        res = calc.get_accuracy(torch.from_numpy(q), torch.from_numpy(ql), torch.from_numpy(g), torch.from_numpy(gl))
    out = {"R@1": res["precision_at_1"], "MAP@R": res["mean_average_precision_at_r"]}
    if full:
        out["mAP"] = res["mean_average_precision"]
    return out


def worker(args):
    import torch
    q, ql, g, gl = load_config(args)
    base = rss_mb()
    torch.from_numpy(q[:2]) @ torch.from_numpy(q[:2]).T  # thread pool start-up outside the timing
    t0 = time.perf_counter()
    if args.worker == "floor":
        out = run_floor(q, ql, g, gl, args)
    elif args.worker == "toolkit":
        out = run_toolkit(q, ql, g, gl, args)
    elif args.worker == "toolkit_faiss":
        out = run_toolkit(q, ql, g, gl, args, backend="faiss")
    elif args.worker == "numpy_loop":
        out = run_numpy_loop(q, ql, g, gl, args)
    else:
        out = run_pml(q, ql, g, gl, args)
    out["time_s"] = out.pop("extrapolated_s", time.perf_counter() - t0)
    out["peak_rss_mb"] = peak_rss_mb()
    out["data_rss_mb"] = base
    print("RESULT " + json.dumps(out))


def faiss_bench(args):
    import faiss
    import metrics
    g, _ = make_embeddings(args.faiss_gallery, args.dim, args.num_classes, args.seed, offset=2)
    q, _ = make_embeddings(args.faiss_queries, args.dim, args.num_classes, args.seed, offset=3)
    rows, exact = [], None
    for kind in ["flat"] + [k for k in args.faiss_indexes if k != "flat"]:
        t0 = time.perf_counter()
        index = metrics.build_faiss_index(g, kind, nlist=args.faiss_nlist)
        build = time.perf_counter() - t0
        settings = {"ivf": [("nprobe", v) for v in args.faiss_nprobe],
                    "hnsw": [("efSearch", v) for v in args.faiss_ef_search]}.get(kind, [(None, None)])
        for param, value in settings:
            if param == "nprobe":
                index.nprobe = value
            elif param == "efSearch":
                index.hnsw.efSearch = value
            t0 = time.perf_counter()
            _, idx = index.search(q, 10)
            search = time.perf_counter() - t0
            if kind == "flat":
                exact = idx
                t0 = time.perf_counter()
                _, tidx = metrics.knn_search(q, g, 10)
                torch_s = time.perf_counter() - t0
                rows.append(f"| torch exact (metrics.knn_search) | 0 | {torch_s:.2f} | "
                            f"{(tidx == exact).mean():.4f} (vs faiss flat) |")
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, exact)])
            name = f"faiss {kind}" + (f" (nlist {index.nlist}, nprobe {value})" if param == "nprobe" else "") \
                + (f" (M {index.hnsw.nb_neighbors(1)}, efSearch {value})" if param == "efSearch" else "")
            rows.append(f"| {name} | {build:.1f} | {search:.2f} | {recall:.4f} |")
            print(rows[-1], flush=True)
        del index
    print(f"\nfaiss: {args.faiss_queries} queries, gallery {args.faiss_gallery:,} x {args.dim}, "
          f"{faiss.omp_get_max_threads()} threads\n")
    print("| index | build s | search s | recall@10 vs exact |\n|---|---|---|---|")
    print("\n".join(rows))


# --------------------------------------------------------------------------- driver

def main(args):
    if args.worker:
        worker(args)
        return 0
    import torch
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}")
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"date: {datetime.date.today().isoformat()}\n")
    table = ["| config | method | time s | x floor | peak RSS MB | beyond data MB | R@1 | mAP | MAP@R | agrees |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for config in [c for c in args.configs if c != "faiss"]:
        results = {}
        nq, ng = CONFIGS[config]
        for method in args.methods:
            if method == "pml" and (ng or nq) > args.pml_skip_above:
                continue
            if method == "pml" and importlib.util.find_spec("pytorch_metric_learning") is None:
                print("pml: not installed (pip install --no-deps pytorch-metric-learning), skipped")
                continue
            cmd = [sys.executable, __file__, "--worker", method, "--config", config, "--dim", str(args.dim),
                   "--num-classes", str(args.num_classes), "--seed", str(args.seed),
                   "--loop-max-queries", str(args.loop_max_queries), "--pml-max-n", str(args.pml_max_n)]
            for _ in range(args.repeats):
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                    print(f"{config} {method}: failed ({tail[0]})")
                    break
                r = json.loads(line[0][7:])
                if method not in results or r["time_s"] < results[method]["time_s"]:
                    results[method] = r
            print(f"{config} {method}: {results[method]['time_s']:.2f} s", flush=True)
        floor = results.get("floor", {}).get("time_s")
        ref = results.get("toolkit", {})
        for method, r in results.items():
            vals = {k: r.get(k, r.get("subset", {}).get(k) if method == "numpy_loop" else None) for k in AGREE_KEYS}
            agree = ""
            if method == "numpy_loop" and "subset" in ref:
                diffs = [abs(ref["subset"][k] - r["subset"][k]) for k in AGREE_KEYS]
                agree = f"{all(d < 1e-6 for d in diffs)} (max diff {max(diffs):.1e})"
                agree += f" (first {r['timed_queries']} queries)" if r["timed_queries"] < nq else ""
            elif method in ("pml", "toolkit_faiss") and ref:
                diffs = [abs(ref[k] - r[k]) for k in AGREE_KEYS if r.get(k) is not None]
                agree = f"{all(d < 1e-6 for d in diffs)} (max diff {max(diffs):.1e})"
            fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
            xfloor = f"{r['time_s'] / floor:.2f}" if floor else ""
            name = method + (" (extrapolated)" if method == "numpy_loop" and r["timed_queries"] < nq else "")
            table.append(f"| {config} | {name} | {r['time_s']:.2f} | {xfloor} | {r['peak_rss_mb']:.0f} | "
                         f"{r['peak_rss_mb'] - r['data_rss_mb']:.0f} | {fmt(vals['R@1'])} | {fmt(vals['mAP'])} | "
                         f"{fmt(vals['MAP@R'])} | {agree} |")
        if "toolkit" in results and "numpy_loop" in results:
            print(f"{config}: toolkit {results['numpy_loop']['time_s'] / results['toolkit']['time_s']:.1f}x "
                  f"faster than the per-query argsort loop")
    print()
    print("\n".join(table))
    if "faiss" in args.configs:
        faiss_bench(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
