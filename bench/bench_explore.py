"""explore.py budgets: folder size, build time and first paint in Chromium for --queries queries (default 1,000)
with top-10 and two maps per pair (query side and result side), leave-one-out, maps already written.

Inputs are generated in --work (kept for reruns): --queries grayscale PNGs of --image-size px, a clustered
embedding set (embeddings.py) naming them, one explain.py-style folder (explain.json + maps/*.npy of the
original image size, query and result side of every top-10 pair), probes.npz of 8 random concept directions.
Then `explore.py` is timed (build), the folder is measured (size), and the page is opened --paints times in
headless Chromium (/usr/bin/chromium via Playwright): first paint = the browser's first-contentful-paint entry.

    python bench/bench_explore.py                       # 1000 queries, 128 px images
    python bench/bench_explore.py --queries 200 --image-size 256

Prints a markdown table with the machine, the command and the date. Build time on a shared CPU is noisy.
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_inputs(work, n, size, k, seed=0):
    from PIL import Image
    import embeddings
    import metrics
    rng = np.random.default_rng(seed)
    imgs = work / "images"
    imgs.mkdir(parents=True, exist_ok=True)
    classes = ["normal", "pneumonia", "COVID-19"]
    labels = rng.integers(0, 3, n)
    lines = []
    yy, xx = np.mgrid[:size, :size] / size
    for i in range(n):
        pid, name = f"p{i // 2:05d}", f"img{i:05d}.png"
        lines.append(f"{pid} {name} {classes[labels[i]]}")
        if not (imgs / name).is_file():
            a = 120 + 60 * np.sin(6 * xx + i) * np.cos(4 * yy) + rng.normal(0, 20, (size, size))
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").save(imgs / name)
    (work / "list.txt").write_text("\n".join(lines) + "\n")
    emb = (rng.standard_normal((3, 64))[labels] + 1.5 * rng.standard_normal((n, 64))).astype(np.float32)
    meta = embeddings.make_meta(model_name="synthetic", embedding_dim=64, weights="synthetic",
                                list_file=work / "list.txt", image_dir=imgs, dataset="covid", class_names=classes)
    ids = np.array([f"img{i:05d}" for i in range(n)])
    pids = np.array([f"p{i // 2:05d}" for i in range(n)])
    s = embeddings.EmbeddingSet(emb, labels.astype(np.int64), ids, pids, classes, meta)
    embeddings.save(work / "emb.npy", s, overwrite=True)
    rk = metrics.rank(emb, labels, k=k, exclude_self=True, query_groups=pids, full_ranking=False)
    ex = work / "explain"
    (ex / "maps").mkdir(parents=True, exist_ok=True)
    pairs = []
    base = np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 8).astype(np.float32)
    for qi in range(n):
        for r, gi in enumerate(rk.indices[qi]):
            e = {"query_id": ids[qi], "rank": r + 1, "result_id": ids[gi], "similarity": float(rk.sims[qi, r])}
            for side in ("result", "query"):
                rel = f"maps/{ids[qi]}__{r + 1}_{ids[gi]}__{side}.npy"
                if not (ex / rel).is_file():
                    np.save(ex / rel, np.roll(base, (qi + r) % size, axis=1))
                e[f"{side}_map"] = rel
            pairs.append(e)
    sc = {"mean": 0.5, "ci95": [0.4, 0.6], "n": len(pairs)}
    (ex / "explain.json").write_text(json.dumps({
        "method": "gradcam", "pairs": pairs, "scores": {},
        "evidence": {"method": "gradcam", "num_pairs": len(pairs), "scores": {"pointing_game": {
            "higher_is_better": True, "method": sc, "random_baseline": sc, "difference": sc,
            "verdict": "not distinguishable from random"}}, "sanity": None}}))
    w = rng.standard_normal((8, 64))
    names = ["opacity", "consolidation", "ground_glass_opacity", "right", "left", "bilateral", "peripheral", "focal"]
    import concepts
    np.savez(work / "probes.npz", concepts=np.array(names), weights=w, bias=np.zeros(8),
             model=np.array(concepts.model_tag(meta)))


def first_paint(folder, runs):
    from playwright.sync_api import sync_playwright
    out = []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"), args=["--no-sandbox"])
        for _ in range(runs):
            pg = b.new_page(viewport={"width": 1400, "height": 1000})
            pg.goto((folder / "index.html").as_uri())
            pg.wait_for_function("window.EXPLORE_READY", timeout=30000)
            pg.wait_for_timeout(300)
            fcp = pg.evaluate("performance.getEntriesByName('first-contentful-paint')[0].startTime")
            out.append((fcp, pg.evaluate("window.EXPLORE_READY_MS")))
            pg.close()
        b.close()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--paints", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_explore"))
    a = ap.parse_args()
    work = a.work / f"q{a.queries}_s{a.image_size}"
    t = time.time()
    make_inputs(work, a.queries, a.image_size, a.topk)
    t_inputs = time.time() - t
    out = work / "page"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "explore.py"), "--embeddings", str(work / "emb.npy"), "--exclude-same-patient",
           "--explain", str(work / "explain"), "--probes", str(work / "probes.npz"), "--ood-reference",
           str(work / "emb.npy"), "--topk", str(a.topk), "--save-dir", str(out)]
    t = time.time()
    r0 = os.times()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    r1 = os.times()
    build = time.time() - t
    cpu = (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
    files = [f for f in out.rglob("*") if f.is_file()]
    mb = sum(f.stat().st_size for f in files) / 1e6
    data_mb = (out / "data.js").stat().st_size / 1e6
    paints = first_paint(out, a.paints)
    load = os.getloadavg()[0]
    print(f"# explore.py budgets, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} "
          f"at the end (shared when > 1); Chromium {subprocess.run(['/usr/bin/chromium', '--version'], capture_output=True, text=True).stdout.strip()}")
    print(f"command: python bench/bench_explore.py {shlex.join(sys.argv[1:])}; inputs generated in {t_inputs:.0f} s\n")
    print("| queries | top-k | maps (sprite PNGs) | files | folder MB (budget 100) | data.js MB | build s wall (budget 60) | "
          "build s CPU | first contentful paint ms (budget 1000) | page drawn ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    n_sprites = len(list((out / "maps").glob("*.png")))
    fcp, ready = np.array(paints).T
    print(f"| {a.queries} | {a.topk} | {2 * a.topk * a.queries} ({n_sprites}) | {len(files)} | {mb:.1f} | {data_mb:.1f} | "
          f"{build:.1f} | {cpu:.1f} | {np.median(fcp):.0f} (median of {len(fcp)}; max {fcp.max():.0f}) | "
          f"{np.median(ready):.0f} (max {ready.max():.0f}) |")


if __name__ == "__main__":
    main()
