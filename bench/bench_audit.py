"""audit_data.py: the pHash threshold's trade-off (--calibrate) and the audit's time at 10k / 100k images.

--calibrate: planted copies (resize to half, JPEG q70, brightness x1.2, 1% and 3% crop per side, 2 degree rotation) of
  demo-generator images (data/make_demo_data.py, 256 px) and of hand-made radiograph-like images
  (radiograph_like below: random body, lungs, ribs, blobs, a marker; more varied than the demo's template),
  against the distances of distinct images (other patients). For each threshold t: the share of copies
  missed (distance > t, false negatives) and the share of distinct pairs paired (distance <= t, false positives).
--timing: hashing throughput measured on --sample real-size PNGs (1024 px, decode + SHA-256 + pHash, one
  process) and extrapolated to 10k / 100k images; candidate search (mih, faiss, brute) measured on 10k and 100k
  synthetic hashes (random, plus 1% planted near-copies), each method checked against brute force at 10k.

    python bench/bench_audit.py --calibrate
    python bench/bench_audit.py --timing
Prints markdown tables with the machine, the command and the date.
"""
import argparse
import datetime
import io
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))

import audit_data  # noqa: E402

COPY_KINDS = ("resize", "jpeg", "brightness", "crop1", "crop3", "rotation")


def plant_copy(img, kind):
    """A copy of a grayscale PIL image as a re-export would make it (the kinds of COPY_KINDS)."""
    w, h = img.size
    if kind == "resize":
        return img.resize((w // 2, h // 2), Image.BILINEAR)
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=70)
        return Image.open(io.BytesIO(buf.getvalue())).convert("L")
    if kind == "brightness":
        return img.point(lambda v: min(255, int(v * 1.2)))
    if kind in ("crop1", "crop3"):  # 1% / 3% off every side
        c = round(int(kind[-1]) / 100 * w)
        return img.crop((c, c, w - c, h - c))
    if kind == "rotation":
        return img.rotate(2, resample=Image.BILINEAR)
    raise ValueError(f"unknown copy kind {kind!r}; choose one of {COPY_KINDS}")


def radiograph_like(rng, size=256):
    """A hand-made radiograph-like 8-bit image: body, two dark lungs, ribs, heart, random opacities, a marker.

    Position, size and exposure vary per image, as they do between real patients and machines."""
    img = Image.new("L", (size, size), int(rng.integers(0, 30)))
    d = ImageDraw.Draw(img)
    s = size
    cx, cy = s * rng.uniform(0.4, 0.6), s * rng.uniform(0.45, 0.6)
    bw, bh = s * rng.uniform(0.3, 0.48), s * rng.uniform(0.4, 0.55)
    d.ellipse([cx - bw, cy - bh, cx + bw, cy + bh], fill=int(rng.integers(130, 200)))
    for side in (-1, 1):
        lx = cx + side * bw * rng.uniform(0.35, 0.55)
        lw, lh = bw * rng.uniform(0.28, 0.42), bh * rng.uniform(0.5, 0.75)
        ly = cy - bh * rng.uniform(0.05, 0.3)
        d.ellipse([lx - lw, ly - lh, lx + lw, ly + lh], fill=int(rng.integers(30, 80)))
    gap, tilt = s * rng.uniform(0.04, 0.08), rng.uniform(-0.4, 0.4)
    for k in range(int(rng.integers(6, 11))):
        y = cy - bh * 0.8 + k * gap
        d.line([cx - bw, y + tilt * bw, cx + bw, y - tilt * bw], fill=int(rng.integers(120, 170)),
               width=max(1, s // 80))
    hx, hy = cx + s * rng.uniform(-0.05, 0.1), cy + bh * rng.uniform(0.1, 0.35)
    hr = s * rng.uniform(0.1, 0.16)
    d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=int(rng.integers(150, 210)))
    for _ in range(int(rng.integers(0, 6))):
        x, y, r = rng.uniform(0.15, 0.85) * s, rng.uniform(0.2, 0.8) * s, s * rng.uniform(0.03, 0.1)
        d.ellipse([x - r, y - r, x + r, y + r], fill=int(rng.integers(90, 180)))
    mx, my = rng.uniform(0.02, 0.85) * s, rng.choice([0.03, 0.88]) * s
    d.rectangle([mx, my, mx + s * 0.1, my + s * 0.06], fill=255)
    img = img.filter(ImageFilter.GaussianBlur(s / 128))
    noise = rng.normal(0, rng.uniform(2, 8), (s, s))
    return Image.fromarray(np.clip(np.asarray(img, np.float64) + noise, 0, 255).astype(np.uint8), "L")


def demo_images(n_patients, size=256, per_patient=2, seed=0):
    """Images of the demo generator (its own patient and pose draws): (images, patient index of each)."""
    from make_demo_data import CLASSES, _patient_params, _render
    imgs, pids = [], []
    for i in range(n_patients):
        params = _patient_params(np.random.default_rng([seed, i]), i % len(CLASSES))
        for j in range(per_patient):
            imgs.append(Image.fromarray(_render(params, size, np.random.default_rng([seed, i, j])), "L"))
            pids.append(i)
    return imgs, np.array(pids)


def distances(imgs, pids):
    """(copy distances per kind, distinct-patient pair distances, same-patient other-image distances)."""
    h = np.array([audit_data.phash64(im) for im in imgs], np.uint64)
    first = np.unique(pids, return_index=True)[1]
    copies = {k: np.array([audit_data.hamming(h[i], audit_data.phash64(plant_copy(imgs[i], k))) for i in first])
              for k in COPY_KINDS}
    i, j = np.triu_indices(len(h), 1)
    d = audit_data.hamming(h[i], h[j])
    return copies, d[pids[i] != pids[j]], d[pids[i] == pids[j]]


def calibrate(thresholds):
    sets = {"demo generator (256 px, 100 patients x 2)": demo_images(100),
            "hand-made radiograph-like (256 px, 200 images)":
                ([radiograph_like(np.random.default_rng([7, k])) for k in range(200)], np.arange(200))}
    for name, (imgs, pids) in sets.items():
        copies, distinct, same = distances(imgs, pids)
        allc = np.concatenate(list(copies.values()))
        print(f"\n{name}: {len(allc)} planted copies, {len(distinct)} distinct-patient pairs"
              + (f", {len(same)} same-patient pairs" if len(same) else ""))
        print("copy distance (bits) max per kind: " + ", ".join(f"{k} {v.max()}" for k, v in copies.items())
              + f"; distinct pairs: min {distinct.min()}, 1st percentile {np.percentile(distinct, 1):.0f}")
        print("\n| threshold t | copies missed (FN) | " + " | ".join(f"{k} missed" for k in COPY_KINDS)
              + " | distinct pairs paired (FP) |" + (" same-patient pairs paired |" if len(same) else ""))
        print("|---:|---:|" + "---:|" * len(COPY_KINDS) + "---:|" + ("---:|" if len(same) else ""))
        for t in thresholds:
            per = " | ".join(f"{(v > t).mean():.0%}" for v in copies.values())
            extra = f" {(same <= t).mean():.1%} |" if len(same) else ""
            print(f"| {t} | {(allc > t).mean():.1%} | {per} | {(distinct <= t).mean():.2%} "
                  f"({(distinct <= t).sum()}) |{extra}")


def timing(sample, sizes, t):
    rng = np.random.default_rng(0)
    if sample:
        hashing_throughput(rng, sample)
    search_table(rng, sizes, t)


def hashing_throughput(rng, sample):
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for k in range(sample):
            p = Path(tmp) / f"img{k}.png"
            radiograph_like(rng, 1024).save(p)
            paths.append(p)
        t0 = time.perf_counter()
        audit_data.hash_files(paths, workers=1)
        dt = (time.perf_counter() - t0) / sample
    print(f"\nhashing (decode 1024 px 8-bit PNG + SHA-256 + pHash, 1 process), measured on {sample} images: "
          f"{1 / dt:.1f} images/s; extrapolated: 10k images {1e4 * dt / 60:.1f} min, 100k {1e5 * dt / 60:.1f} min")


def search_table(rng, sizes, t):
    print("\n| hashes | threshold | method | seconds | pairs found | equals brute force |")
    print("|---:|---:|---|---:|---:|---|")
    for n in sizes:
        h = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
        planted = rng.choice(n, n // 100, replace=False)  # 1% near-copies of other entries: 0-10 bits flipped
        for p in planted:
            flips = rng.choice(64, int(rng.integers(0, 11)), replace=False)
            h[p] = h[(p + 1) % n] ^ np.uint64(sum(1 << int(b) for b in flips))
        found = {}
        for method in ("brute", "faiss", "mih"):
            if method == "brute" and n > 20_000:
                print(f"| {n:,} | {t} | brute | not run ({n * (n - 1) // 2:.1e} pairs) | | |")
                continue
            t0 = time.perf_counter()
            found[method] = audit_data.HASH_SEARCH[method](h, None, threshold=t)
            dt = time.perf_counter() - t0
            ref = "brute" if "brute" in found else "faiss"
            same = "reference" if method == ref else (
                f"{'yes' if all(np.array_equal(x, y) for x, y in zip(found[ref], found[method])) else 'NO'} (vs {ref})")
            name = f"mih ({audit_data.mih_blocks(t, n)} blocks)" if method == "mih" else method
            print(f"| {n:,} | {t} | {name} | {dt:.2f} | {len(found[method][0]):,} | {same} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--calibrate", action="store_true", help="pHash threshold trade-off on planted copies")
    p.add_argument("--timing", action="store_true", help="hashing throughput and candidate search time")
    p.add_argument("--thresholds", type=int, nargs="+", default=[2, 4, 6, 8, 10, 12, 14], help="thresholds (bits)")
    p.add_argument("--sample", type=int, default=100, help="images hashed for the throughput estimate")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="synthetic hash set sizes")
    p.add_argument("--search-thresholds", type=int, nargs="+", default=[audit_data.DEFAULT_PHASH_THRESHOLD, 12],
                   help="thresholds (bits) of the candidate-search timing")
    p.add_argument("--seed", type=int, default=0, help="recorded; the data are drawn from fixed seeds")
    args = p.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {platform.system()}, "
          f"python {platform.python_version()}"
          f"; date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"command: python bench/bench_audit.py {shlex.join(sys.argv[1:])}")
    if args.calibrate or not args.timing:
        calibrate(args.thresholds)
    if args.timing or not args.calibrate:
        for t in args.search_thresholds:
            timing(args.sample if t == args.search_thresholds[0] else 0, args.sizes, t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
