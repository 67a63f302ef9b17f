"""Data audit before training: leaks between image lists that inflate retrieval numbers.

Checks every pair of lists (train, val, test, gallery) and, within the test list:
  patients        the same patient id on both sides (within the test list: not a leak, not reported)
  same_file       the same file name on both sides
  same_stem       file names equal but for case and extension (x.png, X.jpeg): one image exported twice
  identical_bytes byte-identical image files (SHA-256 of the file), whatever their names
  phash           near-duplicates: Hamming distance of 64-bit perceptual hashes (imagehash.phash) <= --phash-threshold
  cosine          near-duplicates: embedding cosine >= --cosine-threshold AND 1 - cos <= --cosine-calibration (0.1)
                  x the median 1 - cos from an image to its nearest image of another patient (the smaller list's
                  images; a metric-learning embedding pulls a class together, so the threshold alone calls
                  different patients of one class copies); each image's --cosine-k nearest, searched from both
                  lists (with --resume CKPT, or --embeddings-dir EMB, which also works with --no-images)
pHash pairs are images that look alike: copies, or different films that look alike (one template or protocol).
Pairs within the test list are reported when the two images carry different patient ids (same-patient pairs are
removed by --exclude-same-patient already). Hash candidates are found by multi-index hashing (--hash-search mih:
the 64 bits split into m blocks; a pair within distance t agrees within t // m bits on at least one block),
with the block count of least expected work (mih_blocks: 3 blocks at t <= 8 and 100k hashes, 4 at t = 10),
never all pairs; `brute` and `faiss` (IndexBinaryFlat, exact) are the references it is tested against.

Commands:
    python audit_data.py --dataset-dir data/demo --train-image-list data/demo/train_split.txt \\
        --test-image-list data/demo/test_split.txt --save-dir results/audit_demo
    # with a checkpoint's embeddings, a gallery list and a cleaned test list
    python audit_data.py --dataset-dir DIR --train-image-list train.txt --val-image-list val.txt \\
        --test-image-list test.txt --gallery-image-list g.txt --resume checkpoints/RUN/RUN_best_ckpt.pth \\
        --phash-threshold 8 --cosine-threshold 0.98 --write-clean-list test_clean.txt --save-dir results/audit
    # saved embeddings: EMB/train.npy, EMB/test.npy, ... one per list, written by extract_embeddings.py
    python audit_data.py ... --embeddings-dir emb --save-dir results/audit
    # lists only (no images on this machine): patients and file names
    python audit_data.py --no-images --train-image-list ../shared/data/covidx/train_split.txt \\
        --test-image-list ../shared/data/covidx/test_COVIDx4.txt --save-dir results/audit_covidx
    # CPU only for --resume
    CUDA_VISIBLE_DEVICES="" python audit_data.py --resume CKPT ... --device cpu

Writes SAVE_DIR/audit.json (arguments, thresholds, counts per check and list pair, shared patient ids, skipped
images, the cosine calibration), near_duplicates.csv (one row per pair and method, with a note on what a
pHash or cosine match means) and closest_pairs.png (the pairs that remove test images, methods taking turns,
"N of M shown"); nothing is replaced without --overwrite, and no file the run reads is ever the clean list. When
the cosine check calls more than --max-cosine-share (10%) of a list copies the run warns, and the clean list is
not written (exit 1) unless --max-cosine-share 1. Missing images stop the run before any work (the list and
the first paths are named); unreadable images are listed, skipped, and counted in audit.json.
"""
import argparse
import csv
import hashlib
import io
import itertools
import math
import os
import sys
from pathlib import Path

import numpy as np

import embeddings
from dataset import (ImageListDataset, get_data_parser, get_gallery_parser, load_image, test_image_dir,
                     train_image_dir)
from utils import (HelpFormatter, atomic_write_text, check_writable_dir, ensure_writable_dir, get_runtime_parser,
                   git_revision, print_args, run_main, save_figure, save_json, set_seed)

LISTS = ("train", "val", "test", "gallery")  # audit order; pairs (a, b) with a before b
TRAIN_SIDE = ("train", "val", "gallery")      # a test image with a copy here is an easy match
OUTPUTS = ("audit.json", "near_duplicates.csv", "closest_pairs.png")
HASH_BITS = 64
# Measured (bench/bench_audit.py --calibrate, docs/audit.md): at 8 bits every resized, JPEG, brightened,
# 1%-cropped and 2-degree-rotated copy is found, half of the 3% crops; 0.04% of distinct hand-made radiograph-like
# pairs (1.6% of the templated demo generator's) are paired. 12-14 bits finds every 3% crop at 5-20x those rates.
DEFAULT_PHASH_THRESHOLD = 8
DEFAULT_COSINE_THRESHOLD = 0.98
METHODS = ("same_file", "same_stem", "identical_bytes", "phash", "cosine")
# what a match means, printed and written beside the pairs (near_duplicates.csv, audit.json)
NOTES = {"phash": "pHash pairs look alike: a copy, or a different image that looks alike (films from one template "
                  "or protocol); look at closest_pairs.png before removing",
         "cosine": "cosine pairs: cos >= --cosine-threshold and 1 - cos within the calibrated copy distance "
                   "(audit.json cosine_calibration); an embedding can still put different images this close"}


# ----------------------------------------------------------------------------- hashes

def phash64(img):
    """64-bit DCT perceptual hash (imagehash.phash, 8 x 8) of a PIL image as a Python int (row-major bits)."""
    import imagehash
    bits = np.asarray(imagehash.phash(img, hash_size=8).hash, dtype=np.uint8).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hash_file(path):
    """(sha256 hex of the bytes, 64-bit pHash) of one image; ValueError naming the path when it cannot be read."""
    data = Path(path).read_bytes()
    return hashlib.sha256(data).hexdigest(), phash64(load_image(path).convert("L"))


def _hash_or_error(path):
    try:
        return hash_file(path)
    except (OSError, ValueError) as e:
        return str(e)


def hash_files(paths, workers=1, desc="hashing"):
    """(sha256 list with None for unreadable files, uint64 pHash array, {index: error}) in path order."""
    from utils import Progress
    if workers > 1 and len(paths) >= 512:  # a spawned pool costs ~3 s to start (imports torch): not for a few images
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(workers) as pool:
            results = list(Progress(pool.imap(_hash_or_error, paths, chunksize=16), desc=desc, total=len(paths)))
    else:
        results = [_hash_or_error(p) for p in Progress(paths, desc=desc, total=len(paths))]
    sha, ph, errors = [], np.zeros(len(paths), np.uint64), {}
    for i, r in enumerate(results):
        if isinstance(r, str):
            sha.append(None)
            errors[i] = r
        else:
            sha.append(r[0])
            ph[i] = r[1]
    return sha, ph, errors


def hamming(a, b):
    """Elementwise Hamming distance of two broadcastable uint64 arrays."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64))).astype(np.int64)


def _finish(i, j, a, b, threshold, same):
    """Exact distances of candidate pairs, keep <= threshold (and i < j within one set), unique, sorted."""
    d = hamming(a[i], b[j])
    keep = d <= threshold
    if same:
        keep &= i < j
    i, j, d = i[keep], j[keep], d[keep]
    key, first = np.unique(i * np.int64(len(b)) + j, return_index=True)  # sorted by (i, j)
    return i[first], j[first], d[first]


def hash_pairs_brute(a, b=None, threshold=10, block=2048):
    """Every pair within `threshold` bits, by all pairs (the reference): (i, j, distance) int64 arrays.

    b=None: pairs within a (i < j)."""
    a = np.asarray(a, np.uint64)
    same = b is None
    b = a if same else np.asarray(b, np.uint64)
    out = [], [], []
    for s in range(0, len(a), block):
        d = hamming(a[s:s + block, None], b[None, :])
        i, j = np.nonzero(d <= threshold)
        for lst, v in zip(out, (i + s, j, d[i, j])):
            lst.append(v.astype(np.int64))
    i, j, d = (np.concatenate(v) if v else np.zeros(0, np.int64) for v in out)
    return _finish(i, j, a, b, threshold, same)


def _masks(bits, radius):
    """Every `bits`-bit XOR mask with at most `radius` bits set (the probes around one block value)."""
    out = [0]
    for r in range(1, radius + 1):
        out += [sum(1 << k for k in c) for c in itertools.combinations(range(bits), r)]
    return np.array(out, np.int64)


def mih_blocks(threshold, n):
    """The block count with the least expected work per query for `n` indexed hashes (uniform bits assumed):
    blocks x probes per block x (1 + expected hashes per bucket). Blocks of at most 22 bits (4M buckets)."""
    def cost(m):
        bits = HASH_BITS // m
        probes = sum(math.comb(bits, r) for r in range(int(threshold) // m + 1))
        return m * probes * (1 + n / 2 ** bits)
    return min(range(3, HASH_BITS + 1), key=cost)


def hash_pairs_mih(a, b=None, threshold=8, blocks=None, query_block=4096):
    """Every pair within `threshold` bits by multi-index hashing (Norouzi et al., CVPR 2012).

    The 64 bits are split into `blocks` disjoint blocks (the last one takes the remainder); if d(x, y) <= t then
    some block differs in at most t // blocks bits (pigeonhole: otherwise every block differs in more, and the
    total exceeds t), so each block's table is probed at every value within that radius of the query's block and
    only those candidates get an exact distance. Same output as hash_pairs_brute.
    """
    a = np.asarray(a, np.uint64)
    same = b is None
    b = a if same else np.asarray(b, np.uint64)
    blocks = blocks or mih_blocks(threshold, len(b))
    width = HASH_BITS // blocks
    radius = int(threshold) // blocks
    out = [], []
    for k in range(blocks):
        bits = width if k < blocks - 1 else HASH_BITS - k * width
        masks = _masks(bits, radius)
        shift, lo = np.uint64(k * width), np.uint64((1 << bits) - 1)
        kb = ((b >> shift) & lo).astype(np.int64)
        order = np.argsort(kb, kind="stable")
        starts = np.searchsorted(kb[order], np.arange((1 << bits) + 1))  # bucket v: order[starts[v]:starts[v+1]]
        ka = ((a >> shift) & lo).astype(np.int64)
        for s in range(0, len(a), query_block):
            probes = (ka[s:s + query_block, None] ^ masks[None, :]).ravel()
            lo_, n = starts[probes], starts[probes + 1] - starts[probes]
            hit = n > 0  # most probes of a sparse table are empty: drop them before expanding
            probes_q = np.repeat(np.arange(s, min(s + query_block, len(a))), len(masks))[hit]
            lo_, n = lo_[hit], n[hit]
            if not len(n):
                continue
            # positions lo_[p] .. lo_[p] + n[p] - 1 for every probe p, flattened
            offs = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
            i, j = np.repeat(probes_q, n), order[np.repeat(lo_, n) + offs]
            keep = hamming(a[i], b[j]) <= threshold  # exact check per chunk: candidates never pile up in memory
            out[0].append(i[keep])
            out[1].append(j[keep])
    i, j = (np.concatenate(v) if v else np.zeros(0, np.int64) for v in out)
    return _finish(i.astype(np.int64), j.astype(np.int64), a, b, threshold, same)


def hash_pairs_faiss(a, b=None, threshold=10):
    """The same pairs with faiss's exact binary index (IndexBinaryFlat range search); needs faiss."""
    try:
        import faiss
    except ImportError as e:
        raise ValueError("--hash-search faiss needs faiss: pip install faiss-cpu (or use --hash-search mih)") from e
    a = np.asarray(a, np.uint64)
    same = b is None
    b = a if same else np.asarray(b, np.uint64)
    to_codes = lambda h: np.ascontiguousarray(h.astype(">u8")).view(np.uint8).reshape(-1, 8)  # noqa: E731
    index = faiss.IndexBinaryFlat(HASH_BITS)
    index.add(to_codes(b))
    lims, _, j = index.range_search(to_codes(a), int(threshold) + 1)  # faiss keeps distance < radius
    i = np.repeat(np.arange(len(a)), np.diff(lims).astype(np.int64))
    return _finish(i.astype(np.int64), j.astype(np.int64), a, b, threshold, same)


HASH_SEARCH = {"mih": hash_pairs_mih, "brute": hash_pairs_brute, "faiss": hash_pairs_faiss}


# ----------------------------------------------------------------------------- the audit

class AuditList:
    """One list of the audit: its records and, when images are read, hashes and embeddings."""

    def __init__(self, name, ds):
        self.name, self.ds = name, ds
        self.sha = self.phash = self.embeddings = None
        self.errors = {}

    @property
    def readable(self):
        return np.array([i not in self.errors for i in range(len(self.ds))], bool)


def exact_pairs(keys_a, keys_b, same):
    """(i, j) with keys_a[i] == keys_b[j] (not None); i < j when both sides are one list."""
    where = {}
    for j, k in enumerate(keys_b):
        if k is not None:
            where.setdefault(k, []).append(j)
    pairs = [(i, j) for i, k in enumerate(keys_a) if k is not None for j in where.get(k, ()) if not same or i < j]
    return np.array(pairs, np.int64).reshape(-1, 2)


def cosine_candidates(ea, eb, k, same):
    """(i, j, cos) of every pair in which one image is among the other's k nearest (metrics.knn_search, exact).

    Two lists are searched both ways and the pairs united: an image with more than k copies on the other side
    hides none of them, as each copy finds it. Within one list each pair appears once, as (smaller, larger).
    The cosine is recomputed in float64 from the pair's own two rows, so it belongs to that pair whichever
    side found it."""
    import metrics
    none = np.zeros(0, np.int64)

    def one_way(q, g, exclude_self):  # every (query row, neighbour row) of q's k nearest in g
        kk = min(k, len(g) - (1 if exclude_self else 0))
        if kk < 1 or len(q) == 0:
            return none, none
        _, idx = metrics.knn_search(q, g, kk, exclude_self=exclude_self)
        return np.repeat(np.arange(len(q)), kk), idx.ravel().astype(np.int64)

    if same:
        i, j = one_way(ea, ea, True)
        i, j = np.minimum(i, j), np.maximum(i, j)
    else:
        (i1, j1), (j2, i2) = one_way(ea, eb, False), one_way(eb, ea, False)
        i, j = np.concatenate([i1, i2]), np.concatenate([j1, j2])
    n_b = len(ea) if same else len(eb)
    key = np.unique(i * np.int64(max(n_b, 1)) + j)  # sorted by (i, j), each pair once
    i, j = key // max(n_b, 1), key % max(n_b, 1)
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    ua = unit(np.asarray(ea, np.float64))
    ub = ua if same else unit(np.asarray(eb, np.float64))
    return i, j, np.einsum("nd,nd->n", ua[i], ub[j])


def nearest_other_patient(i, j, dist, pid_a, pid_b, same):
    """The calibration's reference: each image's smallest 1 - cos to an image of another patient among its
    candidate pairs (its k nearest), for the smaller list's images (every image within one list); images whose
    k nearest are all of their own patient give none."""
    other = pid_a[i] != pid_b[j]
    best_a, best_b = np.full(len(pid_a), np.inf), np.full(len(pid_b), np.inf)
    np.minimum.at(best_a, i[other], dist[other])
    np.minimum.at(best_b, j[other], dist[other])
    best = np.minimum(best_a, best_b) if same else (best_a if len(pid_a) <= len(pid_b) else best_b)
    return best[np.isfinite(best)]


def cosine_copies(ea, eb, pid_a, pid_b, args, same):
    """(i, j, 1 - cos) of the embedding copies of a list pair and what decided them (audit.json).

    A copy needs cos >= --cosine-threshold AND 1 - cos <= --cosine-calibration x the median reference distance
    (nearest_other_patient). A metric-learning embedding pulls a class together, so different patients of one
    class sit far above a fixed cosine threshold; a copy of one image should be far closer than the typical
    nearest distinct image of this embedding. The median is the reference because copies, even many, do not
    move it unless they are half of the images."""
    i, j, cos = cosine_candidates(ea, eb, args.cosine_k, same)
    dist = 1.0 - cos
    ref = nearest_other_patient(i, j, dist, pid_a, pid_b, same)
    median = float(np.median(ref)) if len(ref) else None
    cut = 1.0 - args.cosine_threshold
    if args.cosine_calibration > 0 and median is not None:
        cut = min(cut, args.cosine_calibration * median)
    near = cos >= args.cosine_threshold
    if same:  # one patient's images within a list are no leak: neither reported nor counted
        near &= pid_a[i] != pid_b[j]
    copy = near & (dist <= cut)
    info = {"pairs_over_threshold": int(near.sum()), "copies": int(copy.sum()),
            "rejected_by_calibration": int((near & ~copy).sum()), "reference_images": len(ref),
            "reference_median_distance": median, "max_copy_distance": float(cut),
            "calibrated": bool(args.cosine_calibration > 0 and median is not None)}
    return i[copy], j[copy], dist[copy], info


def audit_pair(la, lb, args):
    """Rows (method, i, j, distance) of one list pair (la is lb: within one list, different patients only) and
    the cosine calibration (None without embeddings)."""
    same = la is lb
    rows, calibration = [], None
    if not same:
        for i, j in exact_pairs(la.ds.filenames, lb.ds.filenames, False):
            rows.append(("same_file", i, j, 0.0))
    # x.png beside X.jpeg: one image exported twice (a list-only hint, checked without images too)
    stems_a = [Path(f).stem.lower() for f in la.ds.filenames]
    stems_b = stems_a if same else [Path(f).stem.lower() for f in lb.ds.filenames]
    for i, j in exact_pairs(stems_a, stems_b, same):
        if la.ds.filenames[i] != lb.ds.filenames[j]:
            rows.append(("same_stem", i, j, 0.0))
    if la.sha is not None:
        for i, j in exact_pairs(la.sha, lb.sha, same):
            rows.append(("identical_bytes", i, j, 0.0))
        ia, ib = np.flatnonzero(la.readable), np.flatnonzero(lb.readable)
        search = HASH_SEARCH[args.hash_search]
        i, j, d = search(la.phash[ia], None if same else lb.phash[ib], threshold=args.phash_threshold)
        rows += [("phash", ia[x], (ia if same else ib)[y], float(z)) for x, y, z in zip(i, j, d)]
    if la.embeddings is not None:  # unreadable images have no embedding: searched without them
        ia, ib = np.flatnonzero(la.readable), np.flatnonzero(lb.readable)
        jb = ia if same else ib
        i, j, d, calibration = cosine_copies(la.embeddings[ia], lb.embeddings[jb], np.asarray(la.ds.patient_ids)[ia],
                                             np.asarray(lb.ds.patient_ids)[jb], args, same)
        rows += [("cosine", ia[x], jb[y], float(z)) for x, y, z in zip(i, j, d)]
    if same:
        pid = la.ds.patient_ids
        rows = [r for r in rows if pid[r[1]] != pid[r[2]]]
    return rows, calibration


def run_audit(lists, args, checks=METHODS):
    """Counts, shared patients, pair rows and cosine calibration for every list pair and within the test list."""
    names = [n for n in LISTS if n in lists]
    pairs = [(lists[a], lists[b]) for a, b in itertools.combinations(names, 2)]
    if "test" in lists:
        pairs.append((lists["test"], lists["test"]))
    counts, shared, rows, calibration = {}, {}, [], {}
    for la, lb in pairs:
        key = f"{la.name}-{lb.name}" if la is not lb else f"within-{la.name}"
        found, calibration[key] = audit_pair(la, lb, args)
        c = {m: len({(i, j) for mm, i, j, _ in found if mm == m}) for m in METHODS if m in checks}
        if la is not lb:
            pats = sorted(set(la.ds.patient_ids) & set(lb.ds.patient_ids))
            shared[key] = pats
            c = {"patients": len(pats), **c}
        copies_b = {j for _, _, j, _ in found}
        copies_a = {i for _, i, _, _ in found}
        c["images_with_a_copy"] = {la.name: len(copies_a), **({lb.name: len(copies_b)} if la is not lb else {})}
        counts[key] = c
        rows += [(la, i, lb, j, m, d) for m, i, j, d in found]
    return counts, shared, rows, calibration


def clean_list_lines(list_file, drop_files):
    """The list file's lines without those naming a file in drop_files: (kept lines, removed lines)."""
    kept, removed = [], []
    for line in Path(list_file).read_text(encoding="utf-8").splitlines(keepends=True):
        cols = line.split()
        is_record = cols and not line.lstrip().startswith("#") and len(cols) >= 2
        (removed if is_record and cols[1] in drop_files else kept).append(line)
    return kept, removed


def figure_pairs(rows, n):
    """The image pairs closest_pairs.png draws: (up to n pairs, how many there are, whether they remove images).

    The pairs that remove test images from --write-clean-list (a test image and a copy in train, val or gallery),
    else the other cross-list pairs. One entry per image pair, (list a, i, list b, j, [(method, distance)]);
    methods take turns (exact, pHash, cosine), each closest first, so that every method that removed an image is
    seen even when one method has many pairs."""
    rank = {"same_file": 0, "same_stem": 0, "identical_bytes": 0, "phash": 1, "cosine": 2}
    pairs = {}
    for la, i, lb, j, m, d in rows:
        if la is not lb and la.errors.get(i) is None and lb.errors.get(j) is None:
            pairs.setdefault((la.name, i, lb.name, j), (la, i, lb, j, []))[4].append((m, d))
    removes = lambda k: "test" in (k[0], k[2]) and {k[0], k[2]} & set(TRAIN_SIDE)  # noqa: E731
    keys = [k for k in pairs if removes(k)]
    removal = bool(keys)
    keys = keys if removal else list(pairs)
    queues = {}
    for k in keys:
        for m, d in pairs[k][4]:
            queues.setdefault(rank[m], []).append((d, k))
    queues = [sorted(q) for _, q in sorted(queues.items())]
    chosen, seen = [], set()
    while len(chosen) < min(n, len(keys)):
        for q in queues:
            while q and q[0][1] in seen:
                q.pop(0)
            if q and len(chosen) < n:
                seen.add(q[0][1])
                chosen.append(pairs[q.pop(0)[1]])
    return chosen, len(keys), removal


def _method_text(m, d):
    return f"pHash {int(d)} bits" if m == "phash" else (f"cosine 1-cos {d:.2g}" if m == "cosine" else m)


def draw_pairs(rows, path, n, rule):
    """figure_pairs' pairs side by side: list, file and patient of each image, every method with its distance,
    a title naming what is shown, "N of M shown" and the rule (`rule`: thresholds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    chosen, total, removal = figure_pairs(rows, n)
    what = ("pairs that remove test images (a copy in train/val/gallery)" if removal
            else "cross-list pairs (no test image has a copy on the training side)")
    height = 3 * max(len(chosen), 1) + 0.8
    fig, axes = plt.subplots(max(len(chosen), 1), 2, figsize=(7, height), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if not chosen:
        axes[0, 0].text(0, 0.5, "no cross-list pairs found", fontsize=12)
    for row, (la, i, lb, j, found) in zip(axes, chosen):
        for ax, lst, k in ((row[0], la, i), (row[1], lb, j)):
            ax.imshow(load_image(lst.ds.paths[k]).convert("L"), cmap="gray")
            ax.set_title(f"{lst.name}: {lst.ds.filenames[k][:28]}\npatient {lst.ds.patient_ids[k]}", fontsize=7)
        row[0].text(1.05, -0.1, "; ".join(_method_text(m, d) for m, d in found), transform=row[0].transAxes,
                    ha="center", fontsize=8)
    fig.suptitle(f"closest_pairs: {what}\n{len(chosen)} of {total} shown; {rule}\n"
                 "pHash pairs may be look-alikes (different films that look alike): judge by eye", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / height))  # keep the three title lines above the first row
    save_figure(fig, path, dpi=80)


# ----------------------------------------------------------------------------- embeddings

def load_embedding_set(emb_dir, lst):
    """EMB/<list>.npy and the files beside it (embeddings.load: checked, image ids required), rows in list order."""
    path = Path(emb_dir) / f"{lst.name}.npy"
    if not path.is_file():
        raise FileNotFoundError(f"--embeddings-dir {emb_dir}: {path.name} not found for the {lst.name} list; "
                                f"write it with extract_embeddings.py --test-image-list {lst.ds.list_file} "
                                f"--output {path}")
    s = embeddings.load(path, required=("image_ids",), flag="--embeddings-dir")
    return embeddings.take_ids(s, lst.ds.image_ids, str(lst.ds.list_file)).embeddings


def model_embeddings(model, lists, args):
    """Embeddings of every list with a checkpoint's model and its eval transform (embeddings.embed_dataset);
    unreadable images keep a zero row (they are searched without: audit_pair)."""
    from model import get_transform
    from utils import get_device
    device = get_device(args.device)
    model.to(device)
    tf = get_transform(model)
    for lst in lists.values():
        ds = ImageListDataset(lst.ds.list_file, lst.ds.image_dir, args.dataset, transform=tf,
                              class_names=lst.ds.class_names, cache_dir=args.cache_dir)
        keep = np.flatnonzero(lst.readable)  # unreadable images were listed and are skipped here too
        emb = embeddings.embed_dataset(model, ds, device, args.eval_batch_size, args.workers, progress=True,
                                       desc=f"embedding {lst.name}", indices=keep)
        out = np.zeros((len(ds), emb.shape[1]), np.float32)
        out[keep] = emb
        lst.embeddings = out


# ----------------------------------------------------------------------------- command line

def get_args_parser():
    p = argparse.ArgumentParser(description="Audit image lists for leaks: shared patients, files, copies",
                                parents=[get_data_parser(lists=("train", "val", "test")), get_gallery_parser(),
                                         get_runtime_parser(flags=("device", "eval_batch_size"))],
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("audit")
    # the audit's older name of --eval-batch-size (one value: the last one given wins)
    g.add_argument("--batch-size", dest="eval_batch_size", type=int, default=argparse.SUPPRESS,
                   help="same as --eval-batch-size (kept for older commands)")
    g.add_argument("--no-images", action="store_true",
                   help="read no image (patients, file names, and --embeddings-dir cosine); --dataset-dir not needed")
    g.add_argument("--phash-threshold", type=int, default=DEFAULT_PHASH_THRESHOLD,
                   help="pHash pairs at most this many bits apart (of 64) are near-duplicates (measured: docs/audit.md)")
    g.add_argument("--hash-search", default="mih", choices=sorted(HASH_SEARCH),
                   help="pHash candidate search: mih (multi-index hashing), brute (all pairs), faiss (exact index)")
    emb = g.add_mutually_exclusive_group()
    emb.add_argument("--resume", type=Path, default=None, help="checkpoint: embed every list with its model")
    emb.add_argument("--embeddings-dir", type=Path, default=None,
                     help="folder with one embedding set per list: train.npy, test.npy, ... with their image ids "
                          "(extract_embeddings.py)")
    g.add_argument("--cosine-threshold", type=float, default=DEFAULT_COSINE_THRESHOLD,
                   help="embedding pairs need cosine >= this (and --cosine-calibration) to be near-duplicates")
    g.add_argument("--cosine-k", type=int, default=10,
                   help="neighbours checked per image for the cosine check, searched from both lists of a pair")
    g.add_argument("--cosine-calibration", type=float, default=0.1,
                   help="a cosine pair is a copy only if its 1 - cos is also at most this times the median "
                        "1 - cos from an image to its nearest image of another patient (this embedding's typical "
                        "distinct neighbour; a metric-learning embedding pulls a class together); 0: threshold alone")
    g.add_argument("--max-cosine-share", type=float, default=0.1,
                   help="when the cosine check calls more than this share of a list's images copies, warn, and do "
                        "not write --write-clean-list (exit 1); 1 writes it anyway")
    g.add_argument("--figure-pairs", type=int, default=8,
                   help="pairs drawn in closest_pairs.png: those that remove test images, methods taking turns")
    g.add_argument("--write-clean-list", type=Path, default=None,
                   help="write the test list without the images that have a copy on the training side here")
    g.add_argument("--save-dir", type=Path, required=True, help="output folder")
    g.add_argument("--seed", type=int, default=0, help="seed (recorded; the audit itself is deterministic)")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return p


def same_file(a, b):
    """True when two paths name one file: equal after resolving symlinks, or os.path.samefile (hard links)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): the resolved paths said all there is
        return False


def run_files(args, given):
    """{flag: path} of every file this run reads or writes besides --write-clean-list."""
    files = {f"--{n}-image-list": Path(p) for n, p in given.items()}
    if args.resume is not None:
        files["--resume"] = args.resume
    if args.embeddings_dir is not None:  # every file of each set (embeddings.load reads those present)
        for n in given:
            for path in embeddings.sidecar_paths(args.embeddings_dir / f"{n}.npy").values():
                files[f"--embeddings-dir ({path.name})"] = path
    files.update({f"--save-dir ({n})": args.save_dir / n for n in OUTPUTS})
    return files


def check_clean_list_is_no_input(out, files):
    """The clean list never replaces a file the run reads or writes, with or without --overwrite."""
    for flag, path in files.items():
        if same_file(out, path):
            raise ValueError(f"--write-clean-list {out} is the same file as {flag} {path}; an input or output of "
                             "the audit is never replaced (--overwrite does not change that): choose another path")


def validate(args):
    """Every flag checked before any work; returns {name: AuditList} with its list read."""
    given = {n: getattr(args, f"{n}_image_list") for n in LISTS if getattr(args, f"{n}_image_list") is not None}
    if "test" not in given or len(given) < 2:
        raise ValueError("give --test-image-list and at least one of --train-image-list, --val-image-list, "
                         "--gallery-image-list")
    if not 0 <= args.phash_threshold < HASH_BITS:
        raise ValueError(f"--phash-threshold must be in 0..{HASH_BITS - 1} bits, got {args.phash_threshold}")
    if not -1 <= args.cosine_threshold <= 1:
        raise ValueError(f"--cosine-threshold must be in [-1, 1], got {args.cosine_threshold}")
    if args.cosine_k < 1 or args.figure_pairs < 0 or args.eval_batch_size < 1:
        raise ValueError("--cosine-k and --eval-batch-size must be >= 1, --figure-pairs >= 0")
    if args.no_images and args.resume:
        raise ValueError("--no-images reads no image, so --resume cannot embed any: drop one of them "
                         "(--embeddings-dir works without images)")
    if not args.no_images and args.dataset_dir is None:
        raise ValueError("--dataset-dir is needed to read the images; pass --no-images to audit the lists only")
    for flag, path in (("--resume", args.resume), ("--embeddings-dir", args.embeddings_dir)):
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{flag} {path} does not exist")
    if not 0 <= args.cosine_calibration <= 1 or not 0 <= args.max_cosine_share <= 1:
        raise ValueError("--cosine-calibration and --max-cosine-share must be in [0, 1]")
    check_writable_dir(args.save_dir)
    existing = [n for n in OUTPUTS if (args.save_dir / n).exists()]
    if args.write_clean_list is not None:
        check_clean_list_is_no_input(args.write_clean_list, run_files(args, given))
        check_writable_dir(args.write_clean_list.parent, "--write-clean-list")
        if args.write_clean_list.exists():
            existing.append(str(args.write_clean_list))
    if existing and not args.overwrite:
        raise ValueError(f"{', '.join(existing)} already exist in/at the outputs; choose another --save-dir / "
                         f"--write-clean-list or pass --overwrite")
    lists, class_names = {}, None
    for name, path in given.items():
        if args.no_images:
            image_dir = Path(".")
        elif name == "test":
            image_dir = test_image_dir(args.dataset_dir, args.test_dataset_dir)
        elif name == "gallery" and args.gallery_dataset_dir is not None:
            image_dir = args.gallery_dataset_dir
        else:
            image_dir = train_image_dir(args.dataset_dir)
        ds = ImageListDataset(path, image_dir, args.dataset, class_names=class_names, check_files=not args.no_images)
        class_names = class_names or (ds.class_names if args.dataset != "generic" else None)
        lists[name] = AuditList(name, ds)
    return lists


def run(args):
    print_args(args)
    set_seed(args.seed)
    lists = validate(args)
    model = None
    if args.resume is not None:
        from model import load_checkpoint
        model, _ = load_checkpoint(args.resume)
    if args.embeddings_dir is not None:
        for lst in lists.values():
            lst.embeddings = load_embedding_set(args.embeddings_dir, lst)
        dims = {lst.embeddings.shape[1] for lst in lists.values()}
        if len(dims) != 1:
            raise ValueError(f"--embeddings-dir {args.embeddings_dir}: lists have embeddings of widths {sorted(dims)}")
    skipped = {}
    if not args.no_images:
        for lst in lists.values():
            lst.sha, lst.phash, lst.errors = hash_files(lst.ds.paths, args.workers, desc=f"hashing {lst.name}")
            if lst.errors:
                skipped[lst.name] = [lst.errors[i] for i in sorted(lst.errors)]
                print(f"warning: {len(lst.errors)} unreadable images in {lst.ds.list_file} skipped, e.g. "
                      f"{skipped[lst.name][0]}", file=sys.stderr)
    if model is not None:
        model_embeddings(model, lists, args)
    checks = (["patients", "same_file", "same_stem"] + ([] if args.no_images else ["identical_bytes", "phash"])
              + (["cosine"] if any(lst.embeddings is not None for lst in lists.values()) else []))
    counts, shared, rows, calibration = run_audit(lists, args, checks)
    print_calibration(calibration, args)
    too_many = cosine_shares_over(lists, rows, args.max_cosine_share)
    refused = None
    if "test" in too_many and args.write_clean_list is not None:
        h, t = too_many["test"]
        refused = (f"--write-clean-list {args.write_clean_list} not written: the cosine check would remove {h} of "
                   f"{t} test images ({h / t:.0%}), more than --max-cosine-share {args.max_cosine_share:g}; check "
                   "near_duplicates.csv and closest_pairs.png, then raise --cosine-threshold, lower "
                   "--cosine-calibration, or pass --max-cosine-share 1 to write it anyway")

    ensure_writable_dir(args.save_dir)
    removed = []
    if args.write_clean_list is not None and refused is None:
        drop = {lists["test"].ds.filenames[i if la.name == "test" else j]
                for la, i, lb, j, _, _ in rows
                if la is not lb and {la.name, lb.name} & {"test"} and {la.name, lb.name} & set(TRAIN_SIDE)}
        kept, removed = clean_list_lines(lists["test"].ds.list_file, drop)
        atomic_write_text(args.write_clean_list, "".join(kept))
        print(f"clean test list: {args.write_clean_list} ({len(removed)} lines removed)")
        for line in removed:
            print(f"  removed: {line.rstrip()}")
    report = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())},
        "git": git_revision(), "seed": args.seed,
        "lists": {n: {"file": str(lst.ds.list_file), "images": len(lst.ds), "patients": len(set(lst.ds.patient_ids)),
                      "unreadable_skipped": len(lst.errors)} for n, lst in lists.items()},
        "checks": checks,
        "images_read": not args.no_images,
        "thresholds": {"phash_max_bits": args.phash_threshold, "phash_bits": HASH_BITS,
                       "cosine_min": args.cosine_threshold, "cosine_k": args.cosine_k},
        "hash_search": args.hash_search,
        "counts": counts, "shared_patients": shared, "skipped_images": skipped,
        "cosine_calibration": {k: v for k, v in calibration.items() if v is not None},
        "cosine_share_over_max": {n: {"images_with_a_copy": h, "images": t} for n, (h, t) in too_many.items()},
        "notes": {m: NOTES[m] for m in ("phash", "cosine") if m in checks},
        "clean_list": (None if args.write_clean_list is None else
                       {"file": str(args.write_clean_list), "written": refused is None, "refused": refused,
                        "removed_lines": [r.rstrip("\n") for r in removed]}),
    }
    save_json(report, args.save_dir / "audit.json")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["list_a", "file_a", "patient_a", "list_b", "file_b", "patient_b", "method", "distance", "note"])
    for la, i, lb, j, m, d in rows:
        w.writerow([la.name, la.ds.filenames[i], la.ds.patient_ids[i], lb.name, lb.ds.filenames[j],
                    lb.ds.patient_ids[j], m, f"{int(d)}" if m == "phash" else f"{d:.6g}", NOTES.get(m, "")])
    atomic_write_text(args.save_dir / "near_duplicates.csv", buf.getvalue())
    if not args.no_images:
        draw_pairs(rows, args.save_dir / "closest_pairs.png", args.figure_pairs, figure_rule(checks, calibration, args))
    elif (args.save_dir / "closest_pairs.png").exists():  # --overwrite of an audit with images: no stale figure
        (args.save_dir / "closest_pairs.png").unlink()
    for key, c in counts.items():
        print(f"{key:>20}: " + "  ".join(f"{k} {v}" for k, v in c.items() if k != "images_with_a_copy")
              + f"  images with a copy {c['images_with_a_copy']}")
    print(f"wrote {args.save_dir / 'audit.json'}, near_duplicates.csv ({len(rows)} rows)"
          + ("" if args.no_images else ", closest_pairs.png") + (
              "" if not args.no_images else "; --no-images: no byte or pHash check was made, no figure drawn"))
    if any(c.get("phash") for c in counts.values()):
        print(f"note: {NOTES['phash']}")
    for name, (h, t) in too_many.items():
        print(f"WARNING: the cosine check calls {h} of {t} {name} images ({h / t:.0%}) copies, more than "
              f"--max-cosine-share {args.max_cosine_share:g}: this embedding may put distinct images this close",
              file=sys.stderr)
    if refused:
        print(f"audit_data.py: error: {refused}", file=sys.stderr)
        return 1
    return 0


def print_calibration(calibration, args):
    """One line per list pair: what a cosine copy had to be in this embedding, and what the rule set aside."""
    for key, c in calibration.items():
        if c is None:
            continue
        ref = ("not calibrated: no image has a neighbour of another patient among its --cosine-k nearest"
               if c["reference_median_distance"] is None else
               f"median 1 - cos to the nearest image of another patient {c['reference_median_distance']:.3g} "
               f"({c['reference_images']} images)")
        print(f"cosine {key}: {ref}; copy: cos >= {args.cosine_threshold:g} and 1 - cos <= "
              f"{c['max_copy_distance']:.3g}; {c['copies']} copies, {c['rejected_by_calibration']} pairs over the "
              "threshold set aside as distinct neighbours")


def cosine_shares_over(lists, rows, max_share):
    """{list: (images with a cosine copy in another list, images)} for the lists over max_share."""
    hit = {n: set() for n in lists}
    for la, i, lb, j, m, _ in rows:
        if m == "cosine" and la is not lb:
            hit[la.name].add(i)
            hit[lb.name].add(j)
    return {n: (len(hit[n]), len(lists[n].ds)) for n in lists if len(hit[n]) > max_share * len(lists[n].ds)}


def figure_rule(checks, calibration, args):
    """The thresholds closest_pairs.png was made with, for its title."""
    parts = [f"pHash <= {args.phash_threshold} bits"] if "phash" in checks else []
    cuts = [c["max_copy_distance"] for k, c in calibration.items() if c is not None and not k.startswith("within-")]
    if cuts:
        parts.append(f"cosine >= {args.cosine_threshold:g} and 1-cos <= {min(cuts):.2g}"
                     + ("-" + f"{max(cuts):.2g}" if max(cuts) > min(cuts) else "")
                     + (" (calibrated)" if args.cosine_calibration > 0 else " (threshold only)"))
    return ", ".join(parts)


def main(args):
    return run_main(run, args, "audit_data.py")


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
