"""Procedural chest-X-ray-like demo data in the COVIDx layout (no download, a few seconds).

    python data/make_demo_data.py --out data/demo
    python data/make_demo_data.py --out data/demo --num-patients 60 --images-per-patient 4 --size 128 --seed 1 --force

Writes OUT/train/*.png, OUT/test/*.png (8-bit grayscale), OUT/train_split.txt and OUT/test_split.txt
(`patient_id filename label source`), the three COVIDx classes: normal; pneumonia = one focal
consolidation; COVID-19 = bilateral peripheral patchy opacities. Each patient has its own anatomy
(body, lungs, heart, ribs, diaphragm) and pathology; a patient's images differ by a small shift,
rotation, scale, contrast and noise. Train and test lists are patient-disjoint. Same seed, same bytes.
The planted findings are written too, for scoring explanations (explain.py --mask-dir / --boxes):
OUT/masks/IMAGE_ID.png (255 = finding, 0 elsewhere; all zero for normal images) and OUT/finding_boxes.csv
(`image_id,x,y,w,h` in pixels, one row per connected finding region; normal images have no row).
The class is carried only by the planted finding: outside its mask a finding adds nothing, and anatomy, pose,
contrast and noise are drawn independently of the label. Check: --mask-findings writes the same set with every
finding masked out, and a model trained on that is at chance (bench/bench_explain_demo.py).
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("normal", "pneumonia", "COVID-19")
SOURCE = "demo"


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def _patient_params(rng, label):
    """Anatomy and pathology of one patient, in body coordinates (x right on the image, y down, both in [-1, 1])."""
    a = {
        "body_w": rng.uniform(0.80, 0.94), "body_h": rng.uniform(1.05, 1.2),
        "lung_x": rng.uniform(0.37, 0.42), "lung_y": rng.uniform(-0.06, 0.02),
        "lung_w": rng.uniform(0.22, 0.26), "lung_h": rng.uniform(0.60, 0.68),
        "lung_dark": rng.uniform(0.10, 0.20), "tissue": rng.uniform(0.40, 0.52),
        "dome": rng.uniform(0.06, 0.14), "dome_shift": rng.uniform(0.02, 0.08),
        "heart_x": rng.uniform(0.08, 0.14), "heart_y": rng.uniform(0.22, 0.30),
        "heart_w": rng.uniform(0.25, 0.31), "heart_h": rng.uniform(0.22, 0.27),
        "rib_gap": rng.uniform(0.13, 0.16), "rib_tilt": rng.uniform(0.35, 0.6), "rib_phase": rng.uniform(0, 1),
        "rib_bright": rng.uniform(0.05, 0.09),
        "label": label, "blobs": [],
    }
    # pathology blobs: (side, u, v, radius, intensity) with u, v in lung units (u > 0 = lateral)
    if label == 1:  # one focal consolidation: large, dense, in one lung
        side = rng.choice([-1, 1])
        u, v = rng.uniform(-0.35, 0.45), rng.uniform(-0.35, 0.45)
        r = rng.uniform(0.15, 0.21)
        a["blobs"].append((side, u, v, r, rng.uniform(0.5, 0.65)))
        for _ in range(3):  # lobulated edge
            a["blobs"].append((side, u + rng.normal(0, 0.25), v + rng.normal(0, 0.15), r * rng.uniform(0.5, 0.8),
                               rng.uniform(0.3, 0.45)))
    elif label == 2:  # bilateral, peripheral, lower-zone, patchy ground glass
        for side in (-1, 1):
            for _ in range(rng.integers(4, 8)):
                u, v = rng.uniform(0.4, 0.85), rng.uniform(-0.2, 0.75)
                a["blobs"].append((side, u, v, rng.uniform(0.07, 0.12), rng.uniform(0.25, 0.38)))
    return a


def _render(a, size, rng, return_finding=False):
    """One radiograph of patient `a` with per-image pose, contrast and noise drawn from rng.

    return_finding: also return the planted finding's mask (bool (size, size)): where the opacity adds at
    least FINDING_LEVEL of full scale inside the lungs (before gamma and noise), i.e. where it is visible. The
    opacity adds nothing elsewhere (its tail below that level is cut), so the mask holds the whole class cue.
    """
    shift = rng.uniform(-0.05, 0.05, size=2)
    angle = math.radians(rng.uniform(-4, 4))
    scale = rng.uniform(0.96, 1.04)
    c = (np.arange(size) + 0.5) / size * 2 - 1
    X, Y = np.meshgrid(c, c)
    # image -> body coordinates (inverse of rotate, scale, shift)
    Xs, Ys = (X - shift[0]) / scale, (Y - shift[1]) / scale
    x = math.cos(angle) * Xs + math.sin(angle) * Ys
    y = -math.sin(angle) * Xs + math.cos(angle) * Ys
    px = 2.0 / size / scale  # one pixel in body units: edges stay about a pixel soft at any size

    body = _sigmoid((1 - (np.abs(x / a["body_w"]) ** 3 + ((y - 0.15) / a["body_h"]) ** 4) ** 0.29) / (1.5 * px))
    shoulders = _sigmoid((y + 0.75 - 0.35 * (1 - (x / a["body_w"]) ** 2)) / (2 * px))
    img = 0.03 + a["tissue"] * body * np.maximum(shoulders, _sigmoid((0.14 - np.abs(x)) / px))

    lungs = np.zeros_like(x)
    below = np.zeros_like(x)  # under a hemidiaphragm: no ribs drawn there
    for side in (-1, 1):
        cx = side * a["lung_x"]
        u = (x - cx) / a["lung_w"] * side  # > 0 lateral
        v = (y - a["lung_y"]) / a["lung_h"]
        r = (np.abs(u) ** 2.5 + np.abs(v) ** 2.5) ** (1 / 2.5)
        dome_y = a["lung_y"] + a["lung_h"] * 0.85 - a["dome"] * (1 - u ** 2) + (a["dome_shift"] if side > 0 else 0)
        below = np.maximum(below, (y > dome_y) * (np.abs(u) < 1.2))
        apex = 1 - _sigmoid((u + 0.9 - 0.9 * v) * 3)  # medial-apical corner rounded off
        lungs += _sigmoid((1 - r) / (2 * px / a["lung_w"])) * _sigmoid((dome_y - y) / (1.5 * px)) * (1 - 0.6 * apex)
    lungs = np.clip(lungs, 0, 1)
    img = img * (1 - lungs) + a["lung_dark"] * lungs

    heart = _sigmoid((1 - np.hypot((x - a["heart_x"]) / a["heart_w"], (y - a["heart_y"]) / a["heart_h"])) / (3 * px))
    img += 0.38 * heart * lungs + 0.08 * heart
    img += 0.12 * _sigmoid((0.045 - np.abs(x)) / px) * body * (1 - 0.5 * heart)  # spine
    ribs = np.zeros_like(x)
    for side in (-1, 1):
        xl = np.abs(x) * (x * side > 0)
        for i in range(10):
            y0 = -0.75 + (i + a["rib_phase"] * 0.5) * a["rib_gap"]
            yr = y0 + a["rib_tilt"] * (xl - 0.1) ** 2 * 1.6 - 0.05
            ribs += np.exp(-((y - yr) / 0.022) ** 2) * (xl > 0.06) * (xl < a["lung_x"] + a["lung_w"] + 0.08)
    img += a["rib_bright"] * np.clip(ribs, 0, 1) * (0.4 + 0.6 * lungs) * body * (1 - below) * (1 - 0.7 * heart)
    clav = np.abs(y - (-0.62 + 0.12 * np.abs(x) - 0.05 * x ** 2 * 4))
    img += 0.15 * np.exp(-(clav / 0.03) ** 2) * (np.abs(x) > 0.08) * (np.abs(x) < 0.62) * body

    opac = np.zeros_like(x)
    for side, u, v, rad, strength in a["blobs"]:
        bx = side * (a["lung_x"] + u * a["lung_w"])
        by = a["lung_y"] + v * a["lung_h"]
        opac += strength * np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * rad ** 2))
    added = np.clip(opac, 0, 0.6) * lungs
    # the finding is ALL the pathology adds: its faint tail (below FINDING_LEVEL) is cut, so an image with the
    # finding's mask replaced by the same image rendered without pathology has no class cue left (issue 22)
    added = np.where(added >= FINDING_LEVEL, added, 0.0)
    img += added

    gamma = rng.uniform(0.85, 1.15)
    img = np.clip(img, 0, 1) ** gamma * rng.uniform(0.9, 1.05) + rng.uniform(-0.03, 0.03)
    img += rng.normal(0, 0.02, img.shape)
    img = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    if return_finding:
        return img, added >= FINDING_LEVEL
    return img


# A planted opacity counts as finding where it adds >= this (0..1 scale): ~20 grey levels, 4x the noise SD.
FINDING_LEVEL = 0.08


def finding_boxes(mask):
    """Boxes (x, y, w, h) in pixels, one per connected region of a finding mask (4-connectivity)."""
    from scipy import ndimage
    lab, _ = ndimage.label(mask)
    return [(s[1].start, s[0].start, s[1].stop - s[1].start, s[0].stop - s[0].start)
            for s in ndimage.find_objects(lab) if s is not None]


# Planted findings as vocabulary concepts (data/ontology/findings.tsv ids), one row per image.
CONCEPTS = ("opacity", "consolidation", "ground_glass_opacity", "right", "left", "bilateral", "upper_zone",
            "middle_zone", "lower_zone", "peripheral", "central", "focal", "multifocal")
MODIFIERS = CONCEPTS[3:]


def planted_findings(a):
    """Findings of patient `a` (from _patient_params) -> {concept: 1 or 0, or None = unknown/not applicable}.

    Pattern: pneumonia (label 1) = one focal consolidation, COVID-19 (label 2) = multifocal ground glass.
    Laterality from the blob sides: side -1 is drawn on the image left, which on a PA radiograph is the
    PATIENT'S RIGHT (side +1 = patient's left). Zone from the blob centre's v (lung units, y down, the lung
    spans v in [-1, 1]): upper v < -1/3, middle -1/3..1/3, lower v > 1/3. Distribution from u (u > 0 lateral):
    peripheral u > 1/3, central u < -1/3. A zone or distribution is 1 when a blob centre lies in it; for a
    pneumonia only the main blob counts (the others are its lobulated edge). Normal lungs: every pattern 0,
    every modifier None (a finding that is absent has no side or zone).
    """
    label = a["label"]
    out = dict.fromkeys(CONCEPTS, 0)
    if label == 0 or not a["blobs"]:
        out.update(dict.fromkeys(MODIFIERS, None))
        return out
    blobs = a["blobs"][:1] if label == 1 else a["blobs"]
    out["opacity"] = 1
    out["consolidation" if label == 1 else "ground_glass_opacity"] = 1
    sides = {int(b[0]) for b in blobs}
    out["right"], out["left"] = int(-1 in sides), int(1 in sides)
    out["bilateral"] = int(sides == {-1, 1})
    for _, u, v, _, _ in blobs:
        zone = "upper_zone" if v < -1 / 3 else "lower_zone" if v > 1 / 3 else "middle_zone"
        out[zone] = 1
        if u > 1 / 3:
            out["peripheral"] = 1
        elif u < -1 / 3:
            out["central"] = 1
    out["focal"], out["multifocal"] = int(len(blobs) == 1), int(len(blobs) > 1)
    return out


def write_concept_labels(path, seed, lines):
    """OUT/concept_labels.csv: image_id,CONCEPT,... (1/0/blank) for every image of the list lines."""
    rows = [",".join(("image_id",) + CONCEPTS)]
    for line in lines:
        pid, name, label = line.split()[:3]
        params = _patient_params(np.random.default_rng([seed, int(pid[len(SOURCE):])]), CLASSES.index(label))
        found = planted_findings(params)
        rows.append(",".join([Path(name).stem] + ["" if found[c] is None else str(found[c]) for c in CONCEPTS]))
    Path(path).write_text("\n".join(rows) + "\n")


def make_demo_data(out_dir, num_patients=36, images_per_patient=3, size=128, seed=0, test_fraction=0.25,
                   overwrite=False, mask_findings=False):
    """Generate the demo dataset; returns a summary dict. Refuses a non-empty folder unless overwrite.
    mask_findings: every finding masked out (its pixels taken from the same image rendered without pathology;
    lists, labels and masks unchanged): the leak check, on which a model must be at chance."""
    out = Path(out_dir)
    if num_patients < 2 * len(CLASSES):
        raise ValueError(f"--num-patients must be at least {2 * len(CLASSES)} (a train and a test patient per class)")
    if images_per_patient < 1 or size < 32:
        raise ValueError("--images-per-patient must be >= 1 and --size >= 32")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose another --out or pass --force to overwrite the demo files")
    rng = np.random.default_rng(seed)
    labels = np.arange(num_patients) % len(CLASSES)
    test = np.zeros(num_patients, dtype=bool)
    for c in range(len(CLASSES)):
        members = np.flatnonzero(labels == c)
        n_test = min(len(members) - 1, max(1, round(test_fraction * len(members))))
        test[rng.choice(members, n_test, replace=False)] = True
    lines = {"train": [], "test": []}
    boxes = ["image_id,x,y,w,h"]
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for old in (out / "masks").glob(f"{SOURCE}*.png"):
        old.unlink()
    for split in lines:
        (out / split).mkdir(parents=True, exist_ok=True)
        for old in (out / split).glob(f"{SOURCE}*.png"):  # only our own files (overwrite case)
            old.unlink()
    for i in range(num_patients):
        pid = f"{SOURCE}{i:04d}"
        params = _patient_params(np.random.default_rng([seed, i]), int(labels[i]))
        split = "test" if test[i] else "train"
        for j in range(images_per_patient):
            arr, finding = _render(params, size, np.random.default_rng([seed, i, j]), return_finding=True)
            if mask_findings:
                arr = np.where(finding, _render({**params, "blobs": []}, size, np.random.default_rng([seed, i, j])), arr)
            name = f"{pid}-{j}.png"
            Image.fromarray(arr, mode="L").save(out / split / name)
            Image.fromarray(finding.astype(np.uint8) * 255, mode="L").save(out / "masks" / name)
            boxes += [f"{Path(name).stem},{x},{y},{w},{h}" for x, y, w, h in finding_boxes(finding)]
            lines[split].append(f"{pid} {name} {CLASSES[labels[i]]} {SOURCE}")
    for split, fname in (("train", "train_split.txt"), ("test", "test_split.txt")):
        (out / fname).write_text("\n".join(lines[split]) + "\n")
    write_concept_labels(out / "concept_labels.csv", seed, lines["train"] + lines["test"])
    (out / "finding_boxes.csv").write_text("\n".join(boxes) + "\n")
    counts = {s: {c: sum(l.split()[2] == c for l in lines[s]) for c in CLASSES} for s in lines}
    return {
        "out_dir": out, "train_dir": out / "train", "test_dir": out / "test",
        "train_list": out / "train_split.txt", "test_list": out / "test_split.txt",
        "mask_dir": out / "masks", "boxes": out / "finding_boxes.csv",
        "num_train": len(lines["train"]), "num_test": len(lines["test"]), "class_counts": counts,
    }


def get_args_parser():
    parser = argparse.ArgumentParser(description="Generate procedural chest-X-ray-like demo data (COVIDx layout)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo")
    parser.add_argument("--num-patients", type=int, default=36)
    parser.add_argument("--images-per-patient", type=int, default=3)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.25, help="share of each class's patients in test")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out (replaces demo files)")
    parser.add_argument("--mask-findings", action="store_true",
                        help="mask every finding out (its pixels from the image rendered without pathology): a model "
                             "trained on this must be at chance, since nothing else carries the class")
    return parser


def main(args):
    try:
        info = make_demo_data(args.out, args.num_patients, args.images_per_patient, args.size, args.seed,
                              args.test_fraction, overwrite=args.force, mask_findings=args.mask_findings)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {info['num_train']} train and {info['num_test']} test images to {info['out_dir']}")
    for split, counts in info["class_counts"].items():
        print(f"  {split}: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    print(f"  lists: {info['train_list']}, {info['test_list']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
