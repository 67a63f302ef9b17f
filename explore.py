"""Explore retrieval in a browser, offline: one static page (index.html + data.js + thumbnails + map overlays)
that shows, per query, its top-k with similarities, the explanation maps with their scores next to random, the
OOD badge, the concept profiles and a refine-by-concept slider; and a summary view of the metrics.

It reads what the other tools wrote and never recomputes what a given file holds (the ranking comes from the
embedding set through metrics.rank, exactly as test.py ranks). On the demo, after `python train.py --demo`:
    CK=checkpoints/demo/covid_hybrid_convnext_vit_embed_128_seed_0/covid_hybrid_convnext_vit_embed_128_seed_0_best_ckpt.pth
    python test.py --resume $CK --dataset-dir data/demo --test-image-list data/demo/test_split.txt \
        --exclude-same-patient --save-dir results/demo
    python extract_embeddings.py --resume $CK --dataset-dir data/demo --test-dataset-dir data/demo/train \
        --test-image-list data/demo/train_split.txt --output results/emb/train.npy
    python concepts.py probe --embeddings results/emb/train.npy --concept-labels data/demo/concept_labels.csv \
        --save-dir results/probes
    for M in gradcam random; do python explain.py --resume $CK --dataset-dir data/demo --exclude-same-patient \
        --test-image-list data/demo/test_split.txt --method $M --topk 5 --num-queries 27 --mask-dir data/demo/masks \
        --device cpu --save-dir results/explain_$M; done
    python explore.py --results results/demo --explain results/explain_gradcam results/explain_random \
        --probes results/probes/probes.npz --ood-reference results/emb/train.npy --ood-k 5 --topk 8 \
        --hierarchy data/ontology/covidx_hierarchy.txt --save-dir results/explore
    # open results/explore/index.html (file://; no server, no network)
Every input is optional but the query set:
    python explore.py --embeddings emb/test.npy [--gallery-embeddings emb/train.npy] --exclude-same-patient \
        --explain EXPLAIN_DIR [EXPLAIN_DIR2 ...] --ood OOD_DIR | --ood-reference emb/train.npy \
        --probes probes/probes.npz [--profile profile_test.csv] --compare convnext=emb/convnext_test.npy \
        --hierarchy data/ontology/covidx_hierarchy.txt --save-dir results/explore
What is missing can be computed by the tools' own main() into SAVE_DIR/inputs (the demo: `--demo`, which is
--compute results,explain,ood,concepts on train.py --demo's checkpoint and data/demo):
    python explore.py --resume CKPT --dataset-dir DIR --test-image-list T --train-image-list TR --mask-dir MASKS \
        --concept-labels LABELS.csv --exclude-same-patient --compute results,explain,ood,concepts \
        --explain-queries 20 --explain-args '--evaluate --sanity' --test-args '--k-values 1 5 10' --device cpu
With several embedding sets (--compare NAME=Q.npy[,G.npy], aligned by image id) each query shows every set's
top-k by metrics.rank (same exclusions) as thumbnails, same/different label and overlap@k with the main set.
Refine-by-concept (the page's sliders; also refine_order below, which the tests compare with the page):
    q' = q/|q| + sum_c a_c w_c/|w_c|  (w_c: the concept's probe weights, a_c: the slider)
    s_j = q' . g_j / (|q'| |g_j|) over the query's precomputed candidates (its top --candidates by metrics.rank,
    exclusions already applied); order by s_j descending, equal s_j by gallery index, lower first (metrics.TIE_RULE).
"""
import argparse
import base64
import csv
import dataclasses
import datetime
import io
import json
import shlex
import shutil
import time
from pathlib import Path

import numpy as np

import embeddings
import metrics
from utils import HelpFormatter, atomic_write_text, ensure_writable_dir, git_revision, one_line, run_main

ASSETS = Path(__file__).resolve().parent / "explore_assets"
PAGE_FILES = ("index.html", "explore.js", "explore.css")
COMPUTE = ("results", "explain", "ood", "concepts")
DEMO_RUN = "covid_hybrid_convnext_vit_embed_128_seed_0"  # train.py --demo's run folder
DEMO_CKPT = f"checkpoints/demo/{DEMO_RUN}/{DEMO_RUN}_best_ckpt.pth"


def get_args_parser():
    p = argparse.ArgumentParser(description="Build a static retrieval explorer page", formatter_class=HelpFormatter)
    g = p.add_argument_group("queries and ranking (one of --results / --embeddings)")
    g.add_argument("--results", type=Path, default=None,
                   help="a test.py --save-dir: results.json, embeddings.npy [gallery_embeddings.npy], query_ood.csv")
    g.add_argument("--embeddings", type=Path, default=None, help="query embedding set X.npy (embeddings.py)")
    g.add_argument("--gallery-embeddings", type=Path, default=None, help="gallery set; not given: leave-one-out")
    g.add_argument("--exclude-same-patient", action="store_true",
                   help="drop the query's patient from its results (with --results: taken from results.json)")
    g.add_argument("--topk", type=int, default=10, help="results shown per query")
    g.add_argument("--candidates", type=int, default=100,
                   help="top-N re-ranked by the concept sliders (at least 10 x --topk)")
    g = p.add_argument_group("what the other tools wrote")
    g.add_argument("--explain", type=Path, nargs="*", default=[], help="explain.py --save-dir folders (one per method)")
    g.add_argument("--ood", type=Path, default=None, help="ood.py --save-dir (ood.json, ood_scores.csv)")
    g.add_argument("--probes", type=Path, default=None,
                   help="concepts.py probe output probes.npz (profiles, slider directions)")
    g.add_argument("--profile", type=Path, default=None, help="concepts.py profile CSV (read instead of the probes')")
    g.add_argument("--compare", nargs="*", default=[], metavar="NAME=Q.npy[,G.npy]",
                   help="other backbones' sets of the same images, shown side by side with overlap@k")
    g.add_argument("--hierarchy", type=Path, default=None, help="class tree (metrics.load_hierarchy) for relations")
    g.add_argument("--image-list", type=Path, default=None, help="list of the query images (default: the set's meta)")
    g.add_argument("--image-dir", type=Path, default=None, help="their folder (default: the set's meta)")
    g.add_argument("--gallery-image-list", type=Path, default=None)
    g.add_argument("--gallery-image-dir", type=Path, default=None)
    g = p.add_argument_group("computing what is missing (each by its tool's own main(), into SAVE_DIR/inputs)")
    g.add_argument("--compute", default="", help=f"comma list of {', '.join(COMPUTE)}: results = test.py on "
                   "--test-image-list; explain = explain.py per --compute-methods; ood = extract_embeddings.py of "
                   "--train-image-list as the --ood-reference; concepts = concepts.py probe on it (--concept-labels)")
    g.add_argument("--demo", action="store_true", help="the demo in one command after `python train.py --demo`: "
                   f"--resume {DEMO_CKPT}, data/demo lists, masks and concept labels, --compute "
                   "results,explain,ood,concepts, --exclude-same-patient, the covidx hierarchy; explicit flags win")
    g.add_argument("--resume", type=Path, default=None, help="checkpoint (train.py) for --compute")
    g.add_argument("--dataset-dir", type=Path, default=None, help="image folder (DIR/train, DIR/test) for --compute")
    g.add_argument("--test-image-list", type=Path, default=None, help="query list for --compute")
    g.add_argument("--train-image-list", type=Path, default=None, help="archive list for --compute ood,concepts")
    g.add_argument("--concept-labels", type=Path, default=None, help="concept labels CSV for --compute concepts")
    g.add_argument("--mask-dir", type=Path, default=None, help="finding masks for --compute explain (evidence)")
    g.add_argument("--compute-methods", default="gradcam,random", help="explain.py methods for --compute explain")
    g.add_argument("--device", default=None, help="device for --compute (default: cuda if available)")
    g.add_argument("--workers", type=int, default=None, help="data-loader workers of the tools (default: theirs)")
    g.add_argument("--explain-queries", type=int, default=None,
                   help="explain.py --num-queries for --compute explain (default: every query)")
    g.add_argument("--explain-args", default="", metavar="'FLAGS'",
                   help="more explain.py flags for --compute explain, one quoted string, e.g. '--evaluate --sanity' "
                   "(a single flag: --explain-args=--sanity)")
    g.add_argument("--test-args", default="", metavar="'FLAGS'",
                   help="more test.py flags for --compute results, one quoted string, e.g. '--k-values 1 5'")
    g.add_argument("--ood-reference", type=Path, default=None,
                   help="training embedding set: ood.load_reference (kNN, 95%% ID accepted); also gives percentiles")
    g.add_argument("--ood-k", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--save-dir", type=Path, default=Path("results/explore"))
    g.add_argument("--thumb-size", type=int, default=128, help="longest side of the JPEG thumbnails")
    g.add_argument("--map-size", type=int, default=32, help="longest side of the PNG map overlays")
    g.add_argument("--concept-threshold", type=float, default=0.5, help="probability at which a finding is shown")
    g.add_argument("--title", default="Retrieval explorer")
    g.add_argument("--overwrite", action="store_true", help="replace an existing page in --save-dir")
    return p


# ----------------------------------------------------------------------------- the ranking the page shows

def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def refine_order(query, gallery, directions, alphas, candidates, k):
    """The page's refine-by-concept ranking (module docstring), in float64 like the page's JavaScript.
    query (D,), gallery (M, D) unit float32 rows, directions (C, D) unit, alphas (C,), candidates (N,) gallery
    indices. Returns (top-k gallery indices, their cosines)."""
    q = np.asarray(query, np.float64) + np.asarray(alphas, np.float64) @ np.asarray(directions, np.float64)
    cand = np.asarray(candidates, np.int64)
    s = (np.asarray(gallery, np.float64)[cand] @ q) / max(np.linalg.norm(q), 1e-300)
    order = np.lexsort((cand, -s))[:k]  # similarity descending, then gallery index ascending
    return cand[order], s[order]


def load_sets(args):
    """(query set, gallery set or None, results.json dict or None, exclude_same_patient)."""
    res = None
    if (args.results is None) == (args.embeddings is None):
        raise ValueError("give exactly one of --results DIR (a test.py --save-dir) or --embeddings X.npy")
    if args.results is not None:
        rj = args.results / "results.json"
        if not rj.is_file():
            raise ValueError(f"--results {args.results}: no results.json (write it with test.py --save-dir)")
        res = read_json(rj, "--results")
        qpath = args.results / "embeddings.npy"
        if not qpath.is_file():
            raise ValueError(f"--results {args.results}: no embeddings.npy (test.py writes it with --resume; from "
                             "saved sets give --embeddings X.npy [--gallery-embeddings G.npy] instead)")
        gpath = args.results / "gallery_embeddings.npy"
        gpath = gpath if gpath.is_file() else None
        excl = bool(res.get("exclude_same_patient", False))
    else:
        qpath, gpath, excl = args.embeddings, args.gallery_embeddings, args.exclude_same_patient
    q = embeddings.load(qpath, flag="--embeddings")
    g = None if gpath is None else embeddings.load(gpath, flag="--gallery-embeddings")
    if g is not None:
        names, _, glab = embeddings.common_classes(q, g)
        g = dataclasses.replace(g, labels=glab, class_names=names)
        q = dataclasses.replace(q, class_names=names)
    if excl and (q.patient_ids is None or (g is not None and g.patient_ids is None)):
        raise ValueError(f"--exclude-same-patient needs the patient ids beside {qpath}")
    return q, g, res, excl


def read_json(path, flag):
    """A JSON file another tool wrote; an unreadable one stops the build with a line that names it."""
    try:
        out = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{flag} {path}: not a readable JSON file ({one_line(e)}); write it again with its tool") \
            from None
    if not isinstance(out, dict):
        raise ValueError(f"{flag} {path}: expected a JSON object, found {type(out).__name__}")
    return out


def image_paths(es, list_file, image_dir, flag):
    """{image id: path} from the list the set was extracted from (its meta) or the flags."""
    from dataset import list_image_ids, read_image_list
    list_file = list_file or es.meta.get("list_file")
    image_dir = image_dir or es.meta.get("image_dir")
    if not list_file or not image_dir:
        return {}, f"no image list/folder in {es.name}'s meta; pass {flag} and its folder to show images"
    if not Path(list_file).is_file():
        return {}, f"image list {list_file} not found: images are not shown (pass {flag})"
    dataset = es.meta.get("dataset") or "generic"
    recs = read_image_list(list_file, dataset, es.class_names if dataset == "generic" else None)
    ids = list_image_ids([r.filename for r in recs])
    return {i: Path(image_dir) / r.filename for i, r in zip(ids, recs)}, None


# ----------------------------------------------------------------------------- images and maps

def write_thumb(src, dst, size):
    """JPEG thumbnail (longest side `size`) of an image; returns (original (H, W), note or None)."""
    from PIL import Image
    from dataset import load_image
    if src is None or not Path(src).is_file():
        return None, f"image file {src} not found"
    try:
        if Path(src).suffix.lower() in (".jpg", ".jpeg"):  # decode at reduced scale: a 3k px JPEG in ~10 ms
            im = Image.open(src)
            hw = (im.height, im.width)
            im.draft("L", (2 * size, 2 * size))
            im = im.convert("L")
        else:
            im = load_image(src).convert("L")
            hw = (im.height, im.width)
    except Exception as e:  # unreadable file: a note on the page, not a failed build
        return None, f"image {src} unreadable ({type(e).__name__})"
    im.thumbnail((size, size), Image.BOX)
    im.save(dst, "JPEG", quality=82)
    return hw, None


def _palette():
    """256-entry palette: index v = colour of a jet-like colormap at v/255, alpha v (0 = transparent)."""
    v = np.linspace(0, 1, 256)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    pal = (np.stack([r, g, b], 1) * 255).astype(np.uint8).ravel().tolist()
    alpha = bytes(np.clip(v * 1.4 * 255, 0, 255).astype(np.uint8).tolist())
    return pal, alpha


PALETTE, ALPHA = _palette()


def map_cell(arr, size):
    """(size, size) uint8 palette indices of a saliency map: its positive part scaled to its own maximum,
    area-downscaled to fit the square and centred in it, as the page's thumbnails are (object-fit: contain)."""
    from PIL import Image
    a = np.clip(np.nan_to_num(np.asarray(arr, np.float32), nan=0.0), 0, None)
    top = float(a.max())
    a = a / top if top > 0 else a
    h, w = a.shape
    s = size / max(h, w)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    small = np.asarray(Image.fromarray(a, "F").resize((nw, nh), Image.BOX))
    cell = np.zeros((size, size), np.uint8)
    y, x = (size - nh) // 2, (size - nw) // 2
    cell[y:y + nh, x:x + nw] = np.clip(small * 255 + 0.5, 0, 255).astype(np.uint8)
    return cell


def write_sprite(cells, dst):
    """One palette PNG per query and method: the map cells side by side (index 0 = transparent)."""
    from PIL import Image
    p = Image.fromarray(np.concatenate(cells, axis=1), "P")
    p.putpalette(PALETTE)
    p.save(dst, "PNG", transparency=ALPHA)


# ----------------------------------------------------------------------------- readers of the other tools' files

def read_explain(dirs, qids, top_ids, notes):
    """Per method: {"maps": {(query id, result id): (result map, query map, rank)}, "scores", "evidence", ...}."""
    out = {}
    qset = set(qids)
    for d in dirs:
        f = Path(d) / "explain.json"
        if not f.is_file():
            raise ValueError(f"--explain {d}: no explain.json (write it with explain.py --save-dir {d})")
        ex = read_json(f, "--explain")
        method = str(ex.get("method") or Path(d).name)
        pairs = ex.get("pairs") or []
        if not isinstance(pairs, list):
            raise ValueError(f"--explain {f}: 'pairs' is a {type(pairs).__name__}, not a list (explain.py's format)")
        for n, p in enumerate(pairs):
            miss = [kk for kk in ("query_id", "result_id") if not isinstance(p, dict) or kk not in p]
            if miss:
                raise ValueError(f"--explain {f}: pair {n} has no {' / '.join(miss)}; not explain.py's format (or "
                                 "another version): write it again with explain.py")
        known = [p for p in pairs if p["query_id"] in qset]
        if pairs and not known:
            raise ValueError(f"--explain {d}: none of its {len({p['query_id'] for p in pairs})} query ids (e.g. "
                             f"{pairs[0]['query_id']!r}) is a query of the embedding set: the folders come from "
                             "different runs or lists; explain the same test list")
        if method in out:
            method = f"{method} ({Path(d).name})"
        entry = {"dir": Path(d), "maps": {}, "scores": ex.get("scores") if isinstance(ex.get("scores"), dict) else {},
                 "evidence": read_evidence(ex.get("evidence"), method),
                 "checkpoint": ex.get("checkpoint"), "num_pairs": len(pairs), "pair_notes": {}}
        deeper = 0
        for p in known:
            q = p["query_id"]
            rank = p.get("rank") if isinstance(p.get("rank"), int) else 0
            if rank > len(top_ids[q]):  # explained deeper than the page shows
                deeper += 1
                continue
            if p["result_id"] not in top_ids[q]:
                entry["pair_notes"].setdefault(q, []).append(
                    f"{method}: explain.json's rank {p.get('rank')} result {p['result_id']} is not in this ranking's "
                    f"top {len(top_ids[q])} (another run or --exclude-same-patient setting?): its map is not shown")
                continue
            entry["maps"][(q, p["result_id"])] = (p.get("result_map"), p.get("query_map"), p.get("rank"))
        out[method] = entry
        if deeper:
            notes.append(f"--explain {d}: {deeper} pairs ranked below the page's top k are not shown")
        n_out = len(pairs) - len(known)
        if n_out:
            notes.append(f"--explain {d}: {n_out} of {len(pairs)} pairs have a query outside the embedding set")
    # the random baseline fails the model-randomisation check by construction; say so on its maps too when
    # another method's sanity block measured it (explain.py --sanity runs random beside the method)
    for name, entry in out.items():
        ev = entry["evidence"]
        if (ev or {}).get("method", name) != "random" or (ev and ev["sanity"]):
            continue
        src = next((m for m, e in out.items() if e["evidence"] and e["evidence"]["sanity"]
                    and e["evidence"]["sanity"]["random_baseline_passed"] is False), None)
        if src is not None:
            ev = ev or read_evidence({"method": "random"}, "random")
            ev["sanity"] = {**out[src]["evidence"]["sanity"], "passed": False, "from": src,
                            "summary": f"measured in {src}'s sanity check: {out[src]['evidence']['sanity']['summary']}"}
            entry["evidence"] = ev
    return out


def _num(x):
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) else None


def _stat(s):
    """{"mean", "ci95", "n"} of the evidence schema, or None; anything else in it is dropped."""
    if not isinstance(s, dict):
        return None
    ci = s.get("ci95")
    ci = [_num(ci[0]), _num(ci[1])] if isinstance(ci, (list, tuple)) and len(ci) == 2 else None
    return {"mean": _num(s.get("mean")), "ci95": None if ci is None or None in ci else ci,
            "n": s["n"] if isinstance(s.get("n"), int) else None}


def _flag(x):
    return x if isinstance(x, bool) else None


def read_evidence(ev, method):
    """explain.json's "evidence" block (issue 22's schema, docs/explain.md) reduced to what the page shows, so a
    newer explain.py that adds keys (another score, a per-method sanity block) or leaves fields null draws the
    same page: scores of any name (method, random baseline, paired difference, verdict), target, layers, the
    sanity verdict (passed True / False / None = not run) with its last cascade step. None when absent."""
    if not isinstance(ev, dict):
        return None
    scores = {}
    for name, v in (ev.get("scores") if isinstance(ev.get("scores"), dict) else {}).items():
        if isinstance(v, dict):
            scores[str(name)] = {"higher_is_better": _flag(v.get("higher_is_better")), "method": _stat(v.get("method")),
                                 "random_baseline": _stat(v.get("random_baseline")),
                                 "difference": _stat(v.get("difference")),
                                 "verdict": None if v.get("verdict") is None else str(v["verdict"])}
    san = ev.get("sanity")
    if isinstance(san, dict) and "passed" not in san and isinstance(san.get(method), dict):
        san = san[method]  # a sanity block per method
    sanity = None
    if isinstance(san, dict):
        steps = [st for st in san.get("steps") or [] if isinstance(st, dict)]
        last = steps[-1] if steps else None
        sanity = {"passed": _flag(san.get("passed")),
                  "random_baseline_passed": _flag(san.get("random_baseline_passed")),
                  "threshold": _num(san.get("threshold")), "summary": str(san.get("summary") or ""),
                  "cascade": [str(c) for c in san.get("cascade") or []] if isinstance(san.get("cascade"), list) else [],
                  "last": None if last is None else {"randomised": str(last.get("randomised", "")),
                                                     "spearman": _stat(last.get("spearman")),
                                                     "ssim": _stat(last.get("ssim"))}}
    layers = ev.get("layers")
    grid = ev.get("map_grid")
    known = {"method", "target", "layers", "map_grid", "num_pairs", "scores", "uniform_area_fraction", "sanity",
             "summary"}
    return {"method": str(ev.get("method") or method),
            "target": None if ev.get("target") is None else str(ev["target"]),
            "layers": [str(x) for x in layers] if isinstance(layers, list) else None,
            "map_grid": [int(x) for x in grid] if isinstance(grid, list) and all(isinstance(x, int) for x in grid)
            else None, "num_pairs": ev["num_pairs"] if isinstance(ev.get("num_pairs"), int) else None,
            "scores": scores, "uniform_area_fraction": _stat(ev.get("uniform_area_fraction")), "sanity": sanity,
            "summary": None if ev.get("summary") is None else str(ev["summary"]),
            "other_keys": sorted(str(x) for x in ev if x not in known)}


def read_ood(args, q, res, notes):
    """{"scores": (N,) or None, "flags", "threshold", "percentile" (N,) or None, "source", "calibration"}."""
    ids = [str(i) for i in q.image_ids]
    if args.ood_reference is not None:
        import ood
        det = ood.load_reference(args.ood_reference, "knn", args.ood_k, seed=args.seed, expected_dim=q.dim)
        scores, flags = ood.score_queries(det, q.embeddings)
        ref = embeddings.load(args.ood_reference, required=(), flag="--ood-reference")  # as load_reference reads it
        _, cal = ood.calibration_split(ref.n, ref.labels, ref.patient_ids, 0.2, args.seed)
        cal_scores = np.sort(det.score(ref.embeddings[cal]))
        pct = 100.0 * np.searchsorted(cal_scores, scores, side="right") / len(cal_scores)
        return {"scores": scores, "flags": flags, "threshold": float(det.threshold), "percentile": pct,
                "source": f"ood.load_reference({args.ood_reference}, knn, k={args.ood_k})",
                "calibration": det.info.get("calibration")}
    table, thr, source, cal = None, None, None, None
    if args.ood is not None:
        f, j = args.ood / "ood_scores.csv", args.ood / "ood.json"
        if not f.is_file() or not j.is_file():
            raise ValueError(f"--ood {args.ood}: needs ood_scores.csv and ood.json (an ood.py --save-dir)")
        oj = read_json(j, "--ood")
        try:
            thr, cal = float(oj["threshold"]["value"]), oj["threshold"].get("calibration")
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"--ood {j}: no threshold.value (ood.py's ood.json format); write it again with ood.py") \
                from None
        table = read_score_csv(f, "--ood", "score", lambda r: r.get("set") == "query")
        source = f"{args.ood} (ood.py, {oj.get('method', 'knn')})"
    elif args.results is not None and (args.results / "query_ood.csv").is_file() and res and res.get("ood"):
        f = args.results / "query_ood.csv"
        table = read_score_csv(f, "--results", "ood_score", lambda r: True)
        try:
            thr, cal = float(res["ood"]["threshold"]), res["ood"].get("calibration")
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"--results {args.results / 'results.json'}: 'ood' has no threshold (test.py's format)") \
                from None
        source = f"{f} (test.py --ood-reference)"
    if table is None:
        return None
    hit = [i for i in ids if i in table]
    if not hit:
        raise ValueError(f"{source}: none of its image ids (e.g. {next(iter(table), '-')!r}) is a query of the "
                         "embedding set: the folders come from different runs or lists")
    if len(hit) < len(ids):
        notes.append(f"{source}: {len(ids) - len(hit)} queries have no OOD score (not in the file)")
    scores = np.array([table.get(i, np.nan) for i in ids])
    return {"scores": scores, "flags": scores > thr, "threshold": thr, "percentile": None, "source": source,
            "calibration": cal}


def read_score_csv(f, flag, column, keep):
    """{image id: score} of a CSV another tool wrote; a missing column or a non-number names the file and row."""
    try:
        rows = list(csv.DictReader(io.StringIO(f.read_text(encoding="utf-8"))))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{flag} {f}: not readable ({one_line(e)})") from None
    table = {}
    for n, r in enumerate(rows, start=2):
        if "image_id" not in r or column not in r:
            raise ValueError(f"{flag} {f}: no image_id / {column} column; write it again with its tool")
        if keep(r):
            try:
                table[r["image_id"]] = float(r[column])
            except (TypeError, ValueError):
                raise ValueError(f"{flag} {f}, line {n}: {column} {r[column]!r} is not a number") from None
    return table


def read_concepts(args, q, g, notes):
    """(concept names, query values (N, C), gallery values (M, C), unit directions (C, D) or None, vocab)."""
    if args.probes is None and args.profile is None:
        return None
    import concepts as C
    from ontology import load_vocabulary, read_concept_labels
    vocab = load_vocabulary()
    names = qv = gv = dirs = None
    if args.probes is not None:
        probes = C.load_probes(args.probes)
        C.check_same_model(probes, q, args.probes)
        names = probes["concepts"]
        w = np.asarray(probes["weights"], np.float64)
        dirs = (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)
        qv = C.probe_profile(unit(q.embeddings), probes["weights"], probes["bias"])
        gv = qv if g is None else C.probe_profile(unit(g.embeddings), probes["weights"], probes["bias"])
    if args.profile is not None:
        lab = read_concept_labels(args.profile, vocab)
        qv, ns = C.match_labels(q.image_ids, lab)
        gv = qv if g is None else C.match_labels(g.image_ids, lab)[0]
        if names is not None and list(lab.concepts) != list(names):
            notes.append(f"--profile {args.profile}: its concepts differ from the probes'; sliders use the probes'")
            dirs = None if set(names) != set(lab.concepts) else dirs[[names.index(c) for c in lab.concepts]]
        names = list(lab.concepts)
        notes.extend(ns)
    return names, np.asarray(qv, np.float64), np.asarray(gv, np.float64), dirs, vocab


# ----------------------------------------------------------------------------- --compute

def apply_demo(args):
    root = Path(__file__).resolve().parent
    demo = root / "data" / "demo"
    for key, value in (("resume", root / DEMO_CKPT), ("dataset_dir", demo),
                       ("test_image_list", demo / "test_split.txt"),
                       ("train_image_list", demo / "train_split.txt"), ("mask_dir", demo / "masks"),
                       ("concept_labels", demo / "concept_labels.csv"),
                       ("hierarchy", root / "data" / "ontology" / "covidx_hierarchy.txt")):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.compute:
        given = args.results is not None or args.embeddings is not None
        args.compute = ",".join(c for c in COMPUTE if c != "results" or not given)
    args.exclude_same_patient = True
    if not Path(args.resume).is_file():
        raise ValueError(f"--demo: {args.resume} not found; run `python train.py --demo` first")


def check_compute(args):
    need = {"results": ["resume", "dataset_dir", "test_image_list"], "explain": ["resume", "dataset_dir"],
            "ood": ["resume", "dataset_dir", "train_image_list"],
            "concepts": ["resume", "dataset_dir", "train_image_list", "concept_labels"]}
    for step in args.compute_set:
        missing = [f"--{k.replace('_', '-')}" for k in need[step] if getattr(args, k) is None]
        if missing:
            raise ValueError(f"--compute {step} needs {', '.join(missing)}")
    if "results" in args.compute_set and (args.results is not None or args.embeddings is not None):
        raise ValueError("--compute results and --results/--embeddings: give one (the ranking is read, or computed)")
    if "explain" in args.compute_set and args.explain:
        raise ValueError("--compute explain and --explain: give one (explain.py folders are read, or computed)")
    for flag, tool in (("explain_args", "explain"), ("test_args", "test")):
        text = getattr(args, flag)
        if not text:
            continue
        name = "--" + flag.replace("_", "-")
        try:
            extra = shlex.split(text)
        except ValueError as e:
            raise ValueError(f"{name} {text!r}: {e}") from None
        module = __import__(tool)
        try:  # the tool's own parser, before any tool runs
            module.get_args_parser().parse_args(["--resume", "x", *extra])
        except SystemExit:
            raise ValueError(f"{name} {text!r}: {tool}.py does not take these (its message is above)") from None


def _tool(module, argv, step):
    rc = module.main(module.get_args_parser().parse_args([str(a) for a in argv]))
    if rc != 0:
        raise ValueError(f"--compute {step}: {module.__name__}.py stopped with exit code {rc} (its message is above)")


def compute_missing(args):
    """Run the tools for what --compute names, into SAVE_DIR/inputs; set the flags that read their outputs."""
    work = args.save_dir / "inputs"
    over = ["--overwrite"] if args.overwrite else []
    dev = ["--device", args.device] if args.device else []
    wk = ["--workers", args.workers] if args.workers is not None else []
    excl = ["--exclude-same-patient"] if args.exclude_same_patient else []
    if "results" in args.compute_set:
        import test as T
        print(f"--compute results: test.py -> {work / 'results'}")
        _tool(T, ["--resume", args.resume, "--dataset-dir", args.dataset_dir, "--test-image-list",
                  args.test_image_list, "--save-dir", work / "results", *excl, *dev, *wk, *over,
                  *shlex.split(args.test_args)], "results")
        args.results = work / "results"
    if {"ood", "concepts"} & args.compute_set:
        import extract_embeddings
        from dataset import train_image_dir
        train = work / "emb" / "train.npy"
        if not train.is_file() or args.overwrite:
            print(f"--compute ood/concepts: extract_embeddings.py {args.train_image_list} -> {train}")
            _tool(extract_embeddings, ["--resume", args.resume, "--dataset-dir", args.dataset_dir, "--test-dataset-dir",
                                       train_image_dir(args.dataset_dir), "--test-image-list", args.train_image_list,
                                       "--output", train, *dev, *wk, *over], "ood")
        if "ood" in args.compute_set and args.ood_reference is None and args.ood is None:
            args.ood_reference = train
        if "concepts" in args.compute_set and args.probes is None:
            import concepts
            _tool(concepts, ["probe", "--embeddings", train, "--concept-labels", args.concept_labels,
                             "--save-dir", work / "probes", *over], "concepts")
            args.probes = work / "probes" / "probes.npz"
    if "explain" in args.compute_set:
        import explain
        q = embeddings.load(args.results / "embeddings.npy" if args.results else args.embeddings)
        lst = args.test_image_list or q.meta.get("list_file")
        nq = q.n if args.explain_queries is None else min(args.explain_queries, q.n)
        for m in [m.strip() for m in args.compute_methods.split(",") if m.strip()]:
            out = work / f"explain_{m}"
            print(f"--compute explain: explain.py --method {m} -> {out}")
            _tool(explain, ["--resume", args.resume, "--dataset-dir", args.dataset_dir, "--test-image-list", lst,
                            "--method", m, "--topk", args.topk, "--num-queries", nq, "--save-dir", out, *excl, *dev,
                            *wk, *over, *(["--mask-dir", args.mask_dir] if args.mask_dir else []),
                            *shlex.split(args.explain_args)], "explain")
            args.explain.append(out)


# ----------------------------------------------------------------------------- build

def b64(a):
    return base64.b64encode(np.ascontiguousarray(a, "<f4").tobytes()).decode("ascii")


def r4(x):
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


def run(args):
    if args.demo:
        apply_demo(args)
    args.compute_set = {c.strip() for c in args.compute.split(",") if c.strip()}
    bad = args.compute_set - set(COMPUTE)
    if bad:
        raise ValueError(f"--compute {args.compute}: unknown {sorted(bad)}; choose from {', '.join(COMPUTE)}")
    if args.candidates < 10 * args.topk:
        raise ValueError(f"--candidates {args.candidates} must be at least 10 x --topk ({10 * args.topk})")
    if (args.save_dir / "index.html").exists() and not args.overwrite:
        raise ValueError(f"--save-dir {args.save_dir} already holds a page; pass --overwrite to replace it")
    check_compute(args)
    t0 = time.time()
    compute_missing(args)
    q, g, res, excl = load_sets(args)
    loo = g is None
    gs = q if loo else g
    qids, gids = [str(i) for i in q.image_ids], [str(i) for i in gs.image_ids]
    qgrp = q.patient_ids if excl else None
    ggrp = None if loo or not excl else gs.patient_ids
    gemb, glab = (None, None) if loo else (gs.embeddings, gs.labels)  # None: leave-one-out on the queries
    counts = metrics.candidate_counts(q.labels, glab, qgrp, ggrp, excl)[0]
    metrics.check_k([args.topk], counts)
    cand_min = counts.min()
    n_cand = int(min(args.candidates, cand_min))
    notes = []
    if n_cand < args.candidates:
        notes.append(f"candidates per query: {n_cand} (the gallery after exclusions is smaller than {args.candidates})")
    rk = metrics.rank(q.embeddings, q.labels, gemb, glab, k=n_cand, exclude_self=loo, query_groups=qgrp,
                      gallery_groups=ggrp, full_ranking=False)
    k = args.topk
    top_ids = {qids[i]: [gids[j] for j in rk.indices[i, :k]] for i in range(q.n)}
    explain = read_explain(args.explain, qids, top_ids, notes)
    oodr = read_ood(args, q, res, notes)
    conc = read_concepts(args, q, None if loo else gs, notes)
    hier = None
    if args.hierarchy is not None:
        hier = metrics.load_hierarchy(args.hierarchy, q.class_names)
    compare = []
    for spec in args.compare:
        name, _, files = spec.partition("=")
        if not files:
            raise ValueError(f"--compare {spec}: expected NAME=Q.npy[,G.npy]")
        qf, _, gf = files.partition(",")
        cq = embeddings.align(q, embeddings.load(qf, flag="--compare"))
        cg = None if not gf else embeddings.align(gs, embeddings.load(gf, flag="--compare"))
        if (cg is None) != loo:
            raise ValueError(f"--compare {spec}: give a gallery set exactly when the main ranking has one")
        crk = metrics.rank(cq.embeddings, cq.labels, None if loo else cg.embeddings, None if loo else cg.labels,
                           k=k, exclude_self=loo, query_groups=qgrp, gallery_groups=ggrp, full_ranking=False)
        compare.append((name, crk, qf, gf or None))

    save = ensure_writable_dir(args.save_dir)
    for sub in ("thumbs", "maps"):
        if (save / sub).exists() and args.overwrite:
            shutil.rmtree(save / sub)
        (save / sub).mkdir(exist_ok=True)
    # images: every query and every gallery image among the candidates; originals are never copied
    qpaths, qnote = image_paths(q, args.image_list, args.image_dir, "--image-list")
    gpaths, gnote = (qpaths, qnote) if loo else image_paths(gs, args.gallery_image_list, args.gallery_image_dir,
                                                            "--gallery-image-list")
    notes += [n for n in {qnote, gnote} if n]
    used = np.unique(np.concatenate([rk.indices.ravel()] + [c[1].indices.ravel() for c in compare]))
    gal_items, gal_index, hw = [], {}, {}
    t_img = time.time()

    def thumb(i, iid, path, lab, pid, prefix):
        name = f"thumbs/{prefix}{i}.jpg"
        size, note = write_thumb(path, save / name, args.thumb_size) if path is not None else \
            (None, "image not found in the image list" if (qpaths or gpaths) else None)
        hw[(prefix, iid)] = size
        return {"id": iid, "gidx": int(i) if prefix == "g" else None, "label": int(lab) if lab is not None else None,
                "patient": None if pid is None else str(pid), "thumb": name if size else None, "note": note}

    for j in used:
        gal_index[int(j)] = len(gal_items)
        gal_items.append(thumb(int(j), gids[j], gpaths.get(gids[j]), None if gs.labels is None else gs.labels[j],
                               None if gs.patient_ids is None else gs.patient_ids[j], "g"))
    queries = []
    for i in range(q.n):
        if loo and i in gal_index:
            item = dict(gal_items[gal_index[i]])
            hw[("q", qids[i])] = hw[("g", qids[i])]
        else:
            item = thumb(i, qids[i], qpaths.get(qids[i]), None if q.labels is None else q.labels[i],
                         None if q.patient_ids is None else q.patient_ids[i], "q")
        queries.append(item)
    t_img = time.time() - t_img

    # maps: one overlay per side of each explained pair, checked against the original image's size; the cells of
    # one query (rank 1 result, rank 1 query side, rank 2 ...) are one sprite PNG: 2k maps in one file
    t_map = time.time()
    methods = {}
    blank = np.zeros((args.map_size, args.map_size), np.uint8)
    for mi, (mname, ex) in enumerate(explain.items()):
        mm = {}
        for i, qi in enumerate(qids):
            row, cells = [], []
            for r, j in enumerate(rk.indices[i, :k]):
                rid = gids[j]
                m = ex["maps"].get((qi, rid))
                if m is None:
                    row.append(None)
                    cells += [blank, blank]
                    continue
                cell = {}
                for c, (side, rel, key) in enumerate((("r", m[0], ("g", rid)), ("q", m[1], ("q", qi)))):
                    cells.append(blank)
                    if rel is None:
                        continue
                    f = ex["dir"] / rel
                    try:
                        arr = embeddings.read_array(f)
                    except ValueError as e:
                        cell[side + "note"] = f"map {rel}: {e}"
                        continue
                    want = hw.get(key)
                    if arr.ndim != 2 or (want is not None and tuple(arr.shape) != tuple(want)):
                        cell[side + "note"] = (f"map {rel} has shape {tuple(arr.shape)} but the image is "
                                               f"{tuple(want) if want else 'unknown'}: not shown")
                        continue
                    cells[-1] = map_cell(arr, args.map_size)
                    cell[side] = 2 * r + c
                row.append(cell)
            if any(row):
                name = f"maps/{mi}_{i}.png"
                write_sprite(cells, save / name)
                mm[i] = {"file": name, "cells": row}
        methods[mname] = {"maps": mm, "scores": ex["scores"], "evidence": ex["evidence"],
                          "checkpoint": ex["checkpoint"], "notes": ex["pair_notes"], "dir": str(ex["dir"])}
    t_map = time.time() - t_map

    names = list(q.class_names) if q.class_names else [str(c) for c in range(int(gs.labels.max()) + 1)]
    gq = [gal_index[int(j)] for j in rk.indices.ravel()]
    gq = np.array(gq, np.int64).reshape(rk.indices.shape)
    for i, item in enumerate(queries):
        item["top"] = gq[i, :k].tolist()
        item["sims"] = [r4(s) for s in rk.sims[i, :k + 1]]  # k + 1: the margin of the k-th
        item["cand"] = gq[i].tolist()
        item["notes"] = [n for ex in methods.values() for n in ex["notes"].get(qids[i], [])]
        if oodr is not None:
            s = oodr["scores"][i]
            item["ood"] = None if not np.isfinite(s) else {
                "score": r4(s), "flag": bool(oodr["flags"][i]),
                "pct": None if oodr["percentile"] is None else round(float(oodr["percentile"][i]), 1)}
        for name, crk, _, _ in compare:  # the other backbone's top-k of this query: gallery items, cosines
            item.setdefault("cmp", {})[name] = {"top": [gal_index[int(j)] for j in crk.indices[i]],
                                                "sims": [r4(v) for v in crk.sims[i]]}
        if hier is not None:
            item["h"] = [r4(hier.distance[q.labels[i], gs.labels[j]]) for j in rk.indices[i, :k]]
    data = {"title": args.title, "k": k, "n_cand": n_cand, "classes": names, "loo": loo,
            "exclude_same_patient": excl, "tie_rule": metrics.TIE_RULE, "queries": queries, "gallery": gal_items,
            "notes": notes, "methods": {m: {kk: v for kk, v in d.items() if kk != "notes"} for m, d in methods.items()},
            "compare": [c[0] for c in compare],
            "hierarchy": None if hier is None else {"source": hier.source, "H": hier.H, "distance": hier.distance_name},
            "sources": {"queries": str(q.path), "gallery": None if loo else str(gs.path),
                        "results": None if args.results is None else str(args.results),
                        "explain": [str(d) for d in args.explain], "ood": None if oodr is None else oodr["source"],
                        "probes": None if args.probes is None else str(args.probes),
                        "profile": None if args.profile is None else str(args.profile),
                        "compare": {c[0]: [c[2], c[3]] for c in compare}},
            "model": q.meta.get("model_name"), "created_utc": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds"), "git": git_revision(),
            "formula": "q' = q/|q| + sum_c a_c w_c/|w_c|; s_j = q'.g_j/(|q'||g_j|) over the candidates; "
                       "descending, ties by gallery index (lower first)"}
    if res is not None:
        data["metrics"] = {kk: res.get(kk) for kk in ("num_queries", "num_gallery", "exclude_same_patient", "R@1",
                                                       "R@5", "R@10", "mP@5", "mAP", "mAP@5", "mAP@10", "MAP@R",
                                                       "ci95", "per_class", "hierarchical", "protocol")
                           if kk in res}
    else:  # no results.json given: the toolkit's metrics of the same ranking
        ev = metrics.evaluate(q.embeddings, q.labels, gemb, glab,
                              k_values=[kk for kk in (1, 5, 10) if kk <= cand_min], query_groups=qgrp,
                              gallery_groups=ggrp, exclude_same_group=excl,
                              class_names=names, bootstrap=200, seed=args.seed, vote_k=())
        data["metrics"] = {kk: ev.get(kk) for kk in ("num_queries", "num_gallery", "R@1", "R@5", "R@10", "mAP",
                                                      "mAP@5", "mAP@10", "MAP@R", "ci95", "per_class") if kk in ev}
        data["metrics"]["computed"] = "metrics.evaluate on the embedding set (no results.json given)"
    if oodr is not None:
        data["ood"] = {"threshold": oodr["threshold"], "source": oodr["source"], "calibration": oodr["calibration"]}
    qe, ge = unit(q.embeddings), unit(gs.embeddings)
    emb = {"q": b64(qe), "g": b64(ge[used]), "dim": q.dim}
    if conc is not None:
        cnames, qv, gv, dirs, vocab = conc
        data["concepts"] = {"names": cnames, "labels": [vocab.name(c) if vocab.resolve(c) else c for c in cnames],
                            "threshold": args.concept_threshold, "sliders": dirs is not None}
        for i, item in enumerate(queries):
            item["prof"] = [r4(v) for v in qv[i]]
        for j, item in zip(used, gal_items):
            item["prof"] = [r4(v) for v in gv[j]]
        sentences(qe, ge, gs.image_ids, rk, k, conc, args.concept_threshold, queries)
        if dirs is not None:
            emb["dirs"] = b64(dirs)
    atomic_write_text(save / "data.js", "window.EXPLORE = " + json.dumps(data, separators=(",", ":")) + ";\n")
    atomic_write_text(save / "embeddings.js", "window.EXPLORE_EMB = " + json.dumps(emb) + ";\n")
    for f in PAGE_FILES:
        shutil.copyfile(ASSETS / f, save / f)
    page = [f for f in save.rglob("*") if f.is_file() and "inputs" not in f.relative_to(save).parts[:1]]
    mb = sum(f.stat().st_size for f in page) / 1e6  # the page; --compute's inputs/ is not needed to view it
    print(f"{q.n} queries, top {k} of {n_cand} candidates, {len(gal_items)} gallery thumbnails ({t_img:.1f} s), "
          f"{sum(len(m['maps']) for m in methods.values())} query x method map rows ({t_map:.1f} s); page {mb:.1f} MB")
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {save / 'index.html'} in {time.time() - t0:.1f} s (open it from file://)")
    return 0


def sentences(qe, ge, gallery_ids, rk, k, conc, thr, queries):
    """concepts.py's one-sentence explanation of every shown pair (its own functions); qe, ge: unit rows."""
    import concepts as C
    cnames, qv, gv, dirs, vocab = conc
    for i, item in enumerate(queries):
        top = rk.indices[i, :k]
        shares = insides = None
        if dirs is not None:
            shares = C.span_share(qe[i], ge[top], dirs)
            insides = C.span_parts(qe[i], ge[top], dirs)[1]
        out = []
        for r, j in enumerate(top):
            pair = C.explain_pair(vocab, cnames, qv[i], gv[j], thr)
            share = None if shares is None or not np.isfinite(shares[r]) else float(shares[r])
            out.append({"text": C.summary_sentence(vocab, r + 1, str(gallery_ids[j]), float(rk.sims[i, r]), pair,
                                                   share, None if insides is None else float(insides[r]))})
        item["why"] = out


def main(args):
    return run_main(run, args, "explore.py")


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
