"""Why is this result similar to my query? Similarity saliency maps, scored for faithfulness and localisation.

Every method explains s(q, r) = cosine of the two embeddings, on both sides: the result's map with the
query's embedding fixed, and the query's map with the result's fixed. Results are the query's top-k,
ranked exactly as test.py ranks them (metrics.rank: same tie rule, same-patient exclusion).

    # the demo (python train.py --demo first): Grad-CAM of 6 queries' top 5, scored against the planted findings
    python explain.py --resume checkpoints/demo/covid_hybrid_convnext_vit_embed_128_seed_0/covid_hybrid_convnext_vit_embed_128_seed_0_best_ckpt.pth \
        --dataset-dir data/demo --test-image-list data/demo/test_split.txt --exclude-same-patient \
        --method gradcam --topk 5 --num-queries 6 --mask-dir data/demo/masks --evaluate --save-dir results/explain_demo
    # occlusion (SBSM) of chosen queries against a training archive, boxes as localisation truth, CPU only
    python explain.py --resume CKPT --dataset-dir DIR --test-image-list test.txt --gallery-image-list train.txt \
        --query-ids IMG1 IMG2 --method sbsm --window 48 --stride 16 --boxes boxes.csv --device cpu --save-dir OUT
    # with an OOD warning per query (ood.py's kNN score against the archive's saved embeddings)
    python explain.py ... --ood-reference emb/train.npy --ood-k 50
    # the explain demo (bench/bench_explain_demo.py trains model.py's democnn, 8 x 8 maps at 128 px): Grad-CAM of
    # the dot-product target at the stage before last (16 x 16), ROAD beside insertion/deletion, the sanity check
    python explain.py --resume DEMOCNN_CKPT --dataset-dir D --test-image-list D/test_split.txt --exclude-same-patient \
        --method gradcam --target dot --layers -3 --mask-dir D/masks --evaluate --sanity --save-dir results/explain_democnn

Methods: gradcam, gradcam++ and the other CAMs of pytorch-grad-cam (layers from model.explain_layers or
--layers; target --target dot = z . e_partner with z the unnormalised embedding, or cosine), sbsm
(occlusion), simcam (exact decomposition, linear-on-GAP heads only), random (a smoothed random map: the
baseline). Writes SAVE_DIR/explain.json, SAVE_DIR/maps/*.npy (float32, the original image's size, 0 where
the model never looked; bilinear, except simcam's: spread by area, so each saved simcam map sums to its pair's
cosine) and SAVE_DIR/figures/QUERY_ID.png. Results of the query's own patient (possible without
--exclude-same-patient) are marked: "same_patient" in explain.json, SAME PATIENT in the figure, a console note.
Scores (--evaluate: insertion, deletion and ROAD; --mask-dir/--boxes: pointing game, mass inside; --sanity:
Adebayo et al.'s cascading model randomisation): docs/explain.md. explain.json's "evidence" block and every
figure carry the scores next to the random baseline's on the same pairs, and the sanity verdict.
"""
import argparse
import contextlib
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import metrics
import ood
from dataset import (ImageListDataset, get_data_parser, get_gallery_parser, load_image, resolve_class_names,
                     test_image_dir, train_image_dir)
from embeddings import embed_dataset
from model import CheckpointError
from utils import (HelpFormatter, atomic_np_save, check_writable_dir, ensure_writable_dir, get_device,
                   get_runtime_parser, git_revision, one_line, print_args, run_main, save_figure, save_json,
                   set_seed)

# pytorch-grad-cam class per --method (imported lazily: the other methods need no grad-cam install)
CAM_METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "hirescam": "HiResCAM",
               "gradcamelementwise": "GradCAMElementWise", "layercam": "LayerCAM", "eigengradcam": "EigenGradCAM",
               "eigencam": "EigenCAM", "scorecam": "ScoreCAM"}
METHODS = list(CAM_METHODS) + ["sbsm", "simcam", "random"]


def get_args_parser():
    p = argparse.ArgumentParser(description="Similarity saliency of retrieval results",
                                parents=[get_data_parser(lists=("test",), test_help="query list (images in the test "
                                                         "folder); leave-one-out unless --gallery-image-list"),
                                         get_gallery_parser(), get_runtime_parser(flags=("device", "eval_batch_size")),
                                         ood.get_ood_warning_parser()],
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("model and retrieval")
    g.add_argument("--resume", type=Path, required=True, help="checkpoint written by train.py")
    g.add_argument("--exclude-same-patient", action="store_true", help="remove gallery images of the query's patient")
    g.add_argument("--topk", type=int, default=5, help="results explained per query")
    g.add_argument("--num-queries", type=int, default=20, help="queries drawn with --seed (ignored with --query-ids)")
    g.add_argument("--query-ids", nargs="+", default=None, help="image ids of the queries (filename stems; "
                   "path parts joined by _ where stems repeat in the list)")
    g = p.add_argument_group("explanation")
    g.add_argument("--method", default="gradcam", choices=METHODS, help="saliency method (docs/explain.md)")
    g.add_argument("--window", type=int, default=None, help="sbsm occluding window side in input pixels "
                                                            "(default: a quarter of the model's input size)")
    g.add_argument("--stride", type=int, default=None, help="sbsm window stride in input pixels (default: window / 2)")
    g.add_argument("--batch-size", type=int, default=32,
                   help="images per forward pass of sbsm, CAMs, and curves (embedding: --eval-batch-size)")
    g.add_argument("--target", default="dot", choices=["dot", "cosine"],
                   help="what a CAM method differentiates: dot = the explained side's unnormalised embedding . the "
                        "partner's unit embedding (its Grad-CAM is the exact split of a linear-on-GAP head); "
                        "cosine = the cosine itself (its gradient is orthogonal to the embedding: docs/explain.md)")
    g.add_argument("--layers", nargs="+", default=None, metavar="LAYER",
                   help="CAM methods: explain these layers (several: maps combined by pytorch-grad-cam's multi-layer "
                        "rule): an integer = the backbone's feature stage (-1 last, -2 the one before), or a module "
                        "name as in model.named_modules() (default: model.explain_layers, the last spatial map)")
    g.add_argument("--seed", type=int, default=0, help="query draw, random baseline and bootstrap seed")
    g = p.add_argument_group("scores")
    g.add_argument("--evaluate", action="store_true", help="insertion and deletion curves on the result image")
    g.add_argument("--steps", type=int, default=16, help="points of each insertion/deletion curve after the first")
    g.add_argument("--curve-baseline", default="blur", choices=["blur", "mean"],
                   help="what deleted pixels become and insertion starts from: a blurred copy or the dataset mean")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--mask-dir", type=Path, default=None, help="finding masks IMAGE_ID.png (non-zero = finding)")
    m.add_argument("--boxes", type=Path, default=None, help="finding boxes CSV image_id,x,y,w,h (original pixels)")
    g.add_argument("--road-percentiles", type=int, nargs="+", default=list(ROAD_PERCENTILES), metavar="P",
                   help="--evaluate: ROAD removes the top (MoRF) / bottom (LeRF) 100 - P %% of each map, per P "
                        "(fewer P = faster: each is a sparse solve per map)")
    g.add_argument("--road-noise", type=float, default=0.01,
                   help="--evaluate: ROAD's imputation noise (pytorch-grad-cam's NoisyLinearImputer; 0 = none)")
    g.add_argument("--sanity", action="store_true",
                   help="model-randomisation check (Adebayo et al. 2018): cascade from the head down, rank "
                        "correlation and SSIM of each result map against the randomised model's")
    g.add_argument("--sanity-threshold", type=float, default=0.5,
                   help="a method fails the check when, fully randomised, its mean Spearman correlation is >= this")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (0: none)")
    g = p.add_argument_group("output")
    g.add_argument("--save-dir", type=Path, default=Path("./results/explain"), help="output folder")
    g.add_argument("--overwrite", action="store_true", help="replace an existing explain.json and its maps")
    return p


# --------------------------------------------------------------------------- maps on the model's input

def _cosine(e, ref):
    return F.cosine_similarity(e, ref.expand_as(e), dim=-1)


class CosineTarget:
    """pytorch-grad-cam target: the cosine of one output embedding (1-D) to a fixed reference embedding."""

    def __init__(self, ref):
        self.ref = ref

    def __call__(self, output):
        return F.cosine_similarity(output, self.ref.to(output.device), dim=-1)


class DotTarget:
    """pytorch-grad-cam target: output . ref, with output the UNNORMALISED embedding (Unnormalised) and ref the
    partner's unit embedding. Its gradient in the embedding is the constant ref, so for a linear-on-GAP head
    its Grad-CAM is the exact split of the similarity (simcam) up to the bias, unlike the cosine's."""

    def __init__(self, ref):
        self.ref = ref

    def __call__(self, output):
        return (output * self.ref.to(output.device)).sum(-1)


TARGETS = {"cosine": CosineTarget, "dot": DotTarget}


class TargetError(ValueError):
    """--target dot on a model whose output is not an F.normalize result: the model's limit, not the library's."""


class Unnormalised(torch.nn.Module):
    """`model` returning z instead of normalize(z): the input of the last F.normalize call of its forward is
    recorded (the call itself is unchanged) and returned. A model whose output is not that call's result is a
    TargetError (a ValueError): --target dot needs an embedding that is an L2-normalised vector."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        seen, normalize = [], F.normalize

        def record(t, *a, **k):
            out = normalize(t, *a, **k)
            seen.append((t, out))
            return out
        F.normalize = record  # only for this forward; restored below whatever happens
        try:
            out = self.model(x)
        finally:
            F.normalize = normalize
        if not seen or seen[-1][1] is not out:
            raise TargetError(f"--target dot: the output of {type(self.model).__name__} is not the result of "
                             "torch.nn.functional.normalize, so its unnormalised embedding is unknown; use --target cosine")
        return seen[-1][0]


class SaliencyError(RuntimeError):
    """pytorch-grad-cam failed on this model: the message names the method and the hooked layers."""


@contextlib.contextmanager
def gradients_through(model):
    """Let the gradient of the cosine reach the hooked layers whatever trains. A frozen tower (ConceptCLIP's
    forward skips autograd when frozen) or a frozen backbone under a trainable head gives its activations no
    gradient of their own, so the parameters stop asking for one here and the input asks instead (cam_maps):
    d cos / d activation does not depend on which weights train, and no weight gradient is computed. The
    parameters' requires_grad and the model's `frozen` flag are restored afterwards."""
    frozen = getattr(model, "frozen", None)
    wanted = [(p, p.requires_grad) for p in model.parameters()]
    if frozen:
        model.frozen = False
    try:
        for p, _ in wanted:
            p.requires_grad_(False)
        yield
    finally:
        for p, r in wanted:
            p.requires_grad_(r)
        if frozen:
            model.frozen = frozen


def cam_maps(model, spec, method, images, refs, batch_size=32, target="cosine"):
    """CAM maps (B, S, S) in [0, 1] of images (B, 3, S, S) with targets cos(f(image_i), refs_i) (target "dot":
    z(image_i) . refs_i, z unnormalised), and per layer {name: (B, S, S)} when the spec has several (combined by
    spec.combine). A failure inside pytorch-grad-cam is a SaliencyError naming the method and the layers."""
    import pytorch_grad_cam as pgc
    base = getattr(pgc, CAM_METHODS[method])

    def aggregate(self, per_layer):  # keep each branch's map (pytorch-grad-cam averages them)
        self.per_layer = [np.asarray(p[:, 0], np.float32) for p in per_layer]
        return base.aggregate_multi_layers(self, per_layer)

    cls = type(f"Branch{base.__name__}", (base,), {"aggregate_multi_layers": aggregate})
    names = {id(m): n for n, m in model.named_modules()}
    where = ", ".join(names.get(id(m), type(m).__name__) for _, m in spec.layers)
    out, branches = [], {n: [] for n in spec.names}
    was_training = model.training
    net, make_target = (Unnormalised(model) if target == "dot" else model), TARGETS[target]
    with gradients_through(model), cls(model=net, target_layers=[m for _, m in spec.layers],
                                       reshape_transform=spec.reshape) as cam:
        cam.batch_size = batch_size  # ScoreCAM's forward passes per batch of masked inputs
        for s in range(0, len(images), batch_size):
            # the input always asks for the gradient: the only way it reaches the layers (gradients_through)
            x, r = images[s:s + batch_size].detach().requires_grad_(True), refs[s:s + batch_size]
            try:
                out.append(np.asarray(cam(input_tensor=x, targets=[make_target(v) for v in r]), np.float32))
            except TargetError:
                raise  # the model, not the library: said as is
            except Exception as e:
                msg = str(e).splitlines()[0] if str(e) else ""
                raise SaliencyError(f"--method {method}: pytorch-grad-cam failed at layer {where} of "
                                    f"{type(model).__name__} ({type(e).__name__}: {msg}); try --method sbsm, "
                                    "which needs no hooks") from e
            for n, m in zip(spec.names, cam.per_layer):
                branches[n].append(m)
    model.train(was_training)
    return np.concatenate(out), ({n: np.concatenate(v) for n, v in branches.items()} if len(spec.layers) > 1 else {})


def resolve_layers(model, layers):
    """ExplainSpec for --layers: None = model.explain_layers(model) (the last spatial map); else each entry is an
    integer (the backbone's feature_info stage: -1 last, -2 the one before; the hybrid's ConvNeXt) or a module
    name as in model.named_modules(). Several layers are combined by pytorch-grad-cam's multi-layer rule."""
    from model import ExplainSpec, explain_layers
    base = explain_layers(model)  # also refuses a model without a spatial map
    if not layers:
        return base
    prefix = next((n for n in ("backbone", "convnext") if hasattr(model, n)), None)
    info = getattr(getattr(model, prefix), "feature_info", None) if prefix else None
    stages = [f"{prefix}.{d['module']}" for d in info] if isinstance(info, list) else []
    chosen = []
    for entry in layers:
        try:
            i = int(entry)
        except ValueError:
            name = entry
        else:
            if not -len(stages) <= i < len(stages):
                raise ValueError(f"--layers {entry}: {type(model).__name__} has {len(stages)} feature stages "
                                 f"({', '.join(stages) or 'none'}); give -{len(stages)}..{len(stages) - 1} or a module name")
            name = stages[i]
        try:
            chosen.append((name, model.get_submodule(name)))
        except AttributeError:
            raise ValueError(f"--layers {entry}: {type(model).__name__} has no module '{name}'; feature stages: "
                             f"{', '.join(stages) or 'none'} (any name of model.named_modules() works)") from None
    return ExplainSpec(chosen, base.reshape, combine=None if len(chosen) == 1 else
                       "mean of the layers' maps, each ReLU'd and min-max scaled to [0, 1] at the input size "
                       "(pytorch-grad-cam's multi-layer rule)")


@torch.no_grad()
def layer_grids(model, spec, image):
    """[(h, w)] of each explained layer's map for one image (3, S, S), read by forward hooks."""
    grids, hooks = [], [m.register_forward_hook(lambda _m, _i, o: grids.append(tuple(spec.reshape(o).shape[-2:])))
                        for _, m in spec.layers]
    try:
        model(image[None])
    finally:
        for h in hooks:
            h.remove()
    return grids[:len(spec.layers)]


def method_maps(model, method, how, images, refs, args, keys):
    """Maps (n, S, S) at the model's input of images (n, 3, S, S) toward refs (n, D), by --method; `keys` seed
    the random maps. Returns (maps, per-layer maps {name: (n, S, S)}, simcam grids or None)."""
    size = images.shape[-1]
    if method in CAM_METHODS:
        maps, branch = cam_maps(model, how, method, images, refs, args.batch_size, args.target)
        return maps, branch, None
    if method == "sbsm":
        return np.stack([sbsm_map(model, x, r, args.window, args.stride, args.batch_size)
                         for x, r in zip(images, refs)]), {}, None
    if method == "simcam":  # the grids are carried back by area (spread_grid): the sums stay exact
        grids, maps = zip(*[simcam_map(how, x, r) for x, r in zip(images, refs)])
        return np.stack(maps), {}, grids
    return np.stack([random_map((size, size), np.random.default_rng(k)) for k in keys]), {}, None


def occlusion_masks(size, window, stride, device):
    """(n, S, S) float masks of the sliding windows (1 = occluded); the last row/column window touches the edge."""
    starts = list(range(0, max(size - window, 0) + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    ar = torch.arange(size, device=device)
    inside = torch.stack([(ar >= s) & (ar < s + window) for s in starts]).float()  # (w, S)
    return (inside[:, None, :, None] * inside[None, :, None, :]).reshape(-1, size, size)


@torch.no_grad()
def sbsm_map(model, image, ref, window, stride, batch_size=32, fill=None):
    """Occlusion saliency (S, S) of `image` (3, S, S): per pixel the mean, over the windows covering it, of the
    drop in cosine to `ref` when the window is replaced by `fill` (default 0 = the dataset mean after
    normalisation). New tensors per batch, no in-place edit: the same code on CPU and CUDA."""
    size = image.shape[-1]
    masks = occlusion_masks(size, window, stride, image.device)
    fill = torch.zeros_like(image) if fill is None else fill
    base = _cosine(model(image[None]).float(), ref)
    drops = []
    for s in range(0, len(masks), batch_size):
        m = masks[s:s + batch_size, None]  # (b, 1, S, S)
        x = image[None] * (1 - m) + fill[None] * m
        drops.append(base - _cosine(model(x).float(), ref))
    drops = torch.cat(drops)
    cover = masks.sum(0)
    sal = (drops[:, None, None] * masks).sum(0) / cover.clamp(min=1)
    return sal.cpu().numpy().astype(np.float32)


def simcam_map(head, image, ref):
    """Exact split of cos(ref, f(image)) over the feature grid, for f = normalize(W mean_hw(F) + b).

    cos = ref . z / |z| with z = mean_ij (W F_ij + b), so map_ij = ref . (W F_ij + b) / (h w |z|) sums to the
    cosine exactly (the bias spread evenly over locations). Returns (grid map (h, w), input-size map (S, S)):
    the input-size map is the grid spread by area (spread_grid), so it sums to the cosine too, also when S is
    not a multiple of the grid."""
    feature_map, weight, bias = head
    with torch.no_grad():
        fmap = feature_map(image[None])[0].float()  # (C, h, w)
        c, h, w = fmap.shape
        loc = fmap.reshape(c, h * w).T  # (hw, C)
        if weight is not None:
            loc = loc @ weight.float().T + (0 if bias is None else bias.float())
        z = loc.mean(0)
        grid = ((loc @ ref.float()) / (h * w * z.norm())).reshape(h, w).cpu().numpy()
    size = image.shape[-1]
    return grid, spread_grid(grid, (size, size), {"img_size": size, "resize_mode": "squash"})


def random_map(shape, rng, sigma=None):
    """A smoothed random map (the baseline): white noise blurred with a Gaussian (sigma = side / 16, wrapped so
    that every pixel is alike), shifted to be >= 0."""
    from scipy.ndimage import gaussian_filter
    sigma = max(shape) / 16 if sigma is None else sigma
    m = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (m - m.min()).astype(np.float32)


# --------------------------------------------------------------------------- back to the original image

def input_geometry(orig_hw, data_config):
    """How the eval transform puts an original image (H, W) on the model's S x S input: (S, the resized image's
    (rh, rw), the crop's (top, left)), as dataset.build_transform does it. crop: shorter side resized to
    data_config's resize_size (default int(1.125 S); a foundation encoder's processor gives its own), then centre
    crop, offsets rounded half up (torchvision) or down (crop_rounding "floor": Hugging Face processors); squash:
    resize to S x S."""
    size, (h, w) = int(data_config["img_size"]), orig_hw
    if data_config["resize_mode"] == "squash":
        return size, (size, size), (0, 0)
    # torchvision Resize(int): shorter side -> short, longer int(short * long / shorter)
    short = int(data_config.get("resize_size") or 1.125 * size)
    rh, rw = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
    if data_config.get("crop_rounding", "round") == "floor":
        return size, (rh, rw), ((rh - size) // 2, (rw - size) // 2)
    return size, (rh, rw), (int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0)))


def map_to_original(saliency, orig_hw, data_config):
    """Carry an (S, S) map on the model's input back to the original image (H, W) through the eval transform
    (input_geometry), bilinear: values, not sums, are kept. Pixels the crop dropped are 0."""
    h, w = orig_hw
    size, (rh, rw), (top, left) = input_geometry(orig_hw, data_config)
    # each original pixel centre in the model's input, in grid_sample's [-1, 1] (pixel edges at +-1)
    ys = ((np.arange(h) + 0.5) * rh / h - top) / size * 2 - 1
    xs = ((np.arange(w) + 0.5) * rw / w - left) / size * 2 - 1
    grid = torch.stack(torch.meshgrid(torch.as_tensor(xs, dtype=torch.float32),
                                      torch.as_tensor(ys, dtype=torch.float32), indexing="xy"), dim=-1)
    m = torch.tensor(np.asarray(saliency, np.float32))[None, None]
    out = F.grid_sample(m, grid[None], mode="bilinear", padding_mode="border", align_corners=False)[0, 0].numpy()
    seen = (np.abs(ys) <= 1)[:, None] & (np.abs(xs) <= 1)[None, :]
    return np.where(seen, out, 0).astype(np.float32)


def area_shares(n, edges):
    """(n, cells) matrix: the share of each cell [edges[c], edges[c + 1]) that falls in pixel [i, i + 1) of a
    line of n pixels. A column sums to 1 for a cell inside [0, n]."""
    edges = np.asarray(edges, np.float64)
    lo, hi, px = edges[None, :-1], edges[None, 1:], np.arange(n)[:, None]
    return np.clip(np.minimum(px + 1, hi) - np.maximum(px, lo), 0, None) / (hi - lo)


def spread_grid(grid, orig_hw, data_config):
    """Carry a grid map (h, w) whose cells cover the model's input back to the original image (H, W) keeping its
    SUM (simcam): each pixel gets, from every cell it overlaps, the cell's value times the share of the cell's
    area that the pixel covers (cells located through the eval transform, input_geometry). Every cell lies
    inside the image, so the map sums to the grid's sum at any size, a multiple of the grid or not; pixels the
    crop dropped are 0. A sum-keeping map is a density: per pixel, the pixel's part of the cosine."""
    h, w = orig_hw
    gh, gw = np.shape(grid)
    size, (rh, rw), (top, left) = input_geometry(orig_hw, data_config)
    ey = (np.arange(gh + 1) * size / gh + top) * h / rh  # cell edges in original pixels
    ex = (np.arange(gw + 1) * size / gw + left) * w / rw
    out = area_shares(h, ey) @ np.asarray(grid, np.float64) @ area_shares(w, ex).T
    return out.astype(np.float32)


# --------------------------------------------------------------------------- faithfulness

def curve_auc(curve, full, base):
    """Area under a similarity curve sampled at equal steps of the fraction of pixels changed (0 .. 1), normalised
    to [0, 1]: each point as (s - base) / (full - base), clipped to [0, 1], where full is the similarity of the
    untouched image and base that of the all-baseline image (the curve's two ends); trapezoid rule. None when the
    baseline image is as similar as the image itself (|full - base| < 1e-6: nothing to explain)."""
    if abs(full - base) < 1e-6:
        return None
    y = np.clip((np.asarray(curve, np.float64) - base) / (full - base), 0, 1)
    return float(((y[1:] + y[:-1]) / 2).mean())


@torch.no_grad()
def insertion_deletion(model, image, ref, saliency, baseline, steps=16, batch_size=32):
    """Insertion and deletion curves (steps + 1 cosines to `ref` each) of `image` (3, S, S) at the model's input.

    Deletion replaces the most salient pixels first with `baseline` (3, S, S); insertion restores them, most
    salient first, onto `baseline`. Ties in the map are broken by pixel index (a stable sort). Each image of
    a curve is a new tensor (torch.where), so a CUDA run edits no temporary copy.
    """
    size = image.shape[-1]
    sal = torch.as_tensor(np.asarray(saliency, np.float32), device=image.device).reshape(-1)
    order = torch.argsort(-sal, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=image.device)
    counts = torch.round(torch.linspace(0, order.numel(), steps + 1, device=image.device)).long()
    curves = {}
    for name, first, second in (("deletion", baseline, image), ("insertion", image, baseline)):
        sims = []
        for s in range(0, steps + 1, batch_size):
            c = counts[s:s + batch_size]
            top = (rank[None, :] < c[:, None]).reshape(-1, 1, size, size)  # (b, 1, S, S) changed pixels
            x = torch.where(top, first[None], second[None])
            sims.append(_cosine(model(x).float(), ref))
        curves[name] = torch.cat(sims).cpu().numpy()
    return curves["insertion"], curves["deletion"]


def blurred(image):
    """The curves' blurred copy: Gaussian blur with sigma = S / 16 (kernel ~4 sigma, odd)."""
    from torchvision.transforms.functional import gaussian_blur
    sigma = image.shape[-1] / 16
    k = int(4 * sigma) | 1
    return gaussian_blur(image[None], [k, k], [sigma, sigma])[0]


ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


@torch.no_grad()
def road_scores(model, image, ref, saliency, percentiles=ROAD_PERCENTILES, noise=0.01, seed=0, batch_size=32):
    """ROAD (Rong et al. 2022) on the similarity, with pytorch-grad-cam's classes: for each percentile p the
    pixels ranked at or above p (MoRF: most relevant first, the top 100 - p %; LeRF: the least relevant
    100 - p %) are replaced by noisy linear imputation from their neighbours (NoisyLinearImputer, `noise`
    absolute, seeded), and the cosine of the imputed image to `ref` is taken. Returns {road_morf, road_lerf:
    mean cosine over p (lower MoRF, higher LeRF = more faithful), road: (lerf - morf) / 2 (pytorch-grad-cam's
    ROADCombined, higher = more faithful)}. The map is passed as its ranks (ties broken by pixel index, as in
    insertion_deletion), so a flat region of the map removes exactly its share, not all tied pixels at once.
    pytorch-grad-cam's perturbations (RemoveMostRelevantFirst / RemoveLeastRelevantFirst with its
    NoisyLinearImputer) make the images; their cosines are taken here in one batch (its
    PerturbationConfidenceMetric would run one forward pass per image)."""
    from pytorch_grad_cam.metrics.perturbation_confidence import RemoveLeastRelevantFirst, RemoveMostRelevantFirst
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    sal = np.asarray(saliency, np.float32)
    order = np.argsort(-sal.reshape(-1), kind="stable")
    relevance = np.empty(sal.size, np.float32)
    relevance[order] = np.arange(sal.size - 1, -1, -1, dtype=np.float32) / max(sal.size - 1, 1)
    relevance = torch.from_numpy(relevance.reshape(sal.shape))
    imputer, img = NoisyLinearImputer(noise=noise), image.detach().float().cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = torch.stack([remove(p, imputer)(img, relevance) for remove in (RemoveMostRelevantFirst,
                                                                             RemoveLeastRelevantFirst)
                         for p in percentiles]).to(image.device, image.dtype)
    sims = torch.cat([_cosine(model(x[s:s + batch_size]).float(), ref)
                      for s in range(0, len(x), batch_size)]).cpu().numpy()
    n = len(percentiles)
    out = {"road_morf": float(sims[:n].mean()), "road_lerf": float(sims[n:].mean())}
    out["road"] = (out["road_lerf"] - out["road_morf"]) / 2
    return out


# --------------------------------------------------------------------------- sanity check (model randomisation)

def cascade_groups(model):
    """[(name, [parameters])] from the top of the model down, the order of Adebayo et al.'s cascading
    randomisation: "head" (everything after the last feature stage: MXA, projection, head norm), then each
    feature stage of the backbone's feature_info from the last, then "stem" (what comes before the first
    stage). A model without a feature_info list (token models, the hybrid, ConceptCLIP) is cut at its
    top-level children instead, last registered first. Groups without parameters are left out."""
    named = list(model.named_parameters())
    bb = getattr(model, "backbone", None)
    info = getattr(bb, "feature_info", None) if bb is not None else None
    if isinstance(info, list) and info and not hasattr(bb, "patch_embed"):
        stages = [f"backbone.{d['module']}." for d in info]
        first = next((i for i, (n, _) in enumerate(named) if any(n.startswith(s) for s in stages)), len(named))
        groups = {"head": [], **{s[:-1]: [] for s in reversed(stages)}, "stem": []}
        for i, (n, prm) in enumerate(named):
            stage = max((s for s in stages if n.startswith(s)), key=len, default=None)
            if stage is not None:
                groups[stage[:-1]].append(prm)
            else:
                groups["stem" if n.startswith("backbone.") and i < first else "head"].append(prm)
        return [(k, v) for k, v in groups.items() if v]
    return [(n, list(m.parameters())) for n, m in reversed(list(model.named_children())) if any(m.parameters())]


def randomise_(model, params, seed):
    """Re-initialise `params` in place: each module owning one of them calls its reset_parameters (BatchNorm:
    running statistics too); a module without one gets N(0, 0.02) weights. Seeded; other parameters kept."""
    ids = {id(p) for p in params}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            own = [p for p in m.parameters(recurse=False) if id(p) in ids]
            if not own:
                continue
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            else:
                with torch.no_grad():
                    for p in own:
                        p.normal_(0, 0.02)


def map_similarity(a, b):
    """(Spearman rank correlation, SSIM) of two maps of the same shape. SSIM on each map min-max scaled to
    [0, 1] (data range 1, skimage's 7 x 7 window); a constant map has rank correlation 1 with another constant
    map, 0 with any other."""
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    flat_a, flat_b = np.ptp(a) == 0, np.ptp(b) == 0
    rho = (1.0 if flat_a and flat_b else 0.0) if flat_a or flat_b else float(spearmanr(a.ravel(), b.ravel())[0])

    def unit(m):
        return (m - m.min()) / np.ptp(m) if np.ptp(m) > 0 else np.zeros_like(m)
    return rho, float(structural_similarity(unit(a), unit(b), data_range=1.0))


def sanity_check(model, method, cases, args, spec_of):
    """Adebayo et al.'s cascading randomisation, for `method` and for the random baseline. cases: per query
    (result images (k, 3, S, S), query image (3, S, S), trained result maps (k, S, S), random-map keys (k),
    random-baseline maps (k, S, S), their keys). At each step the next group of cascade_groups (head first)
    is re-initialised in a copy of the model (cumulatively), the query is re-embedded by that copy, and each
    result's map is recomputed; the trained and randomised maps are compared by map_similarity. A random map
    depends on its key only, not on the model, so the baseline's comparison is made once and holds at every
    step. Returns the explain.json "sanity" block (per step mean and CI over pairs)."""
    import copy

    def stats(name, r):
        return {"randomised": name, **{k: _stat([v[i] for v in r], args.bootstrap, args.seed)
                                       for i, k in enumerate(("spearman", "ssim"))}}
    rmodel = copy.deepcopy(model).eval()
    groups = cascade_groups(rmodel)
    how = spec_of(rmodel)  # randomise_ edits parameters in place: the copy's modules stay the same
    rrows = []
    for rimgs, _, _, _, rmaps, rkeys in cases:
        rrows += [map_similarity(a, b) for a, b in zip(rmaps, method_maps(rmodel, "random", None, rimgs, None, args,
                                                                          rkeys)[0])]
    rstat = stats(None, rrows)
    steps, rsteps = [], []
    for n, (name, params) in enumerate(groups):
        randomise_(rmodel, params, args.seed + n)
        rows = []
        for rimgs, qimg, maps, keys, _, _ in cases:
            with torch.no_grad():
                ref = rmodel(qimg[None]).float().expand(len(rimgs), -1)
            new = method_maps(rmodel, method, how, rimgs, ref, args, keys)[0]
            rows += [map_similarity(a, b) for a, b in zip(maps, new)]
        steps.append(stats(name, rows))
        rsteps.append({**rstat, "randomised": name})
        print(f"sanity: randomised down to {name:<12} {method}: Spearman {steps[-1]['spearman']['mean']:.3f}, "
              f"SSIM {steps[-1]['ssim']['mean']:.3f}   random: Spearman {rsteps[-1]['spearman']['mean']:.3f}")
    last, rlast = steps[-1]["spearman"]["mean"], rsteps[-1]["spearman"]["mean"]
    passed, rpassed = bool(last < args.sanity_threshold), bool(rlast < args.sanity_threshold)

    def verdict(m, ok, rho):
        return (f"{m} passes (Spearman {rho:.2f} at full randomisation)" if ok else
                f"{m} FAILS: its maps barely change when the model is randomised (Spearman {rho:.2f})")
    summary = verdict(method, passed, last) + "; " + verdict("random", rpassed, rlast) + \
        (": it never depended on the model" if not rpassed else "")
    return {"cascade": [g for g, _ in groups], "steps": steps, "random_baseline_steps": rsteps,
            "threshold": args.sanity_threshold, "passed": passed, "random_baseline_passed": rpassed,
            "compared": "result maps at the model's input, trained vs randomised model (query re-embedded)",
            "summary": summary}


def _stat(vals, n_boot, seed):
    """{mean, ci95 (metrics.bootstrap_ci), n} of vals, None skipped."""
    vals = [v for v in vals if v is not None]
    return {"mean": float(np.mean(vals)) if vals else None, "ci95": metrics.bootstrap_ci(vals, n_boot, seed),
            "n": len(vals)}


def _fmt_stat(s):
    """A _stat summary as "mean [low, high]" ("n/a" without values)."""
    return "n/a" if s["mean"] is None else f"{s['mean']:.3f}" + (
        f" [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]" if s["ci95"] else "")


# --------------------------------------------------------------------------- localisation

def image_size(path):
    """(H, W) of an image file, from its header where possible."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:
        w, h = load_image(path).size
        return h, w


def read_mask(path, hw=None):
    """Bool mask of a PNG (non-zero = finding); ValueError when its size is not the image's (H, W)."""
    from PIL import Image
    with Image.open(path) as im:
        m = np.asarray(im.convert("L")) > 0
    if hw is not None and m.shape != tuple(hw):
        raise ValueError(f"--mask-dir: {path} is {m.shape[1]} x {m.shape[0]} pixels but its image is {hw[1]} x {hw[0]}; "
                         "a mask must have its image's size")
    return m


def read_boxes(path):
    """{image_id: [(x, y, w, h), ...]} of a CSV image_id,x,y,w,h (several rows per image allowed)."""
    boxes = {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0][:5]] != ["image_id", "x", "y", "w", "h"]:
        raise ValueError(f"--boxes {path}: the first line must be the header image_id,x,y,w,h")
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            x, y, w, h = (float(v) for v in row[1:5])
        except ValueError:
            raise ValueError(f"--boxes {path} line {n}: x, y, w, h must be numbers, got {row}") from None
        if w <= 0 or h <= 0:
            raise ValueError(f"--boxes {path} line {n}: box width and height must be > 0, got {row}")
        boxes.setdefault(row[0].strip(), []).append((x, y, w, h))
    return boxes


def boxes_mask(boxes, hw, image_id="", source="--boxes"):
    """Bool (H, W) mask of the boxes (a pixel is in a box when its centre is); a box outside the image is an error."""
    h, w = hw
    m = np.zeros((h, w), bool)
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    for bx, by, bw, bh in boxes:
        if bx < 0 or by < 0 or bx + bw > w or by + bh > h:
            raise ValueError(f"{source}: box ({bx:g}, {by:g}, {bw:g}, {bh:g}) of {image_id} is outside its "
                             f"{w} x {h} image")
        m |= ((ys >= by) & (ys < by + bh))[:, None] & ((xs >= bx) & (xs < bx + bw))[None, :]
    return m


def pointing_game(saliency, mask):
    """The share of the map's maximal pixels that lie inside the finding: 1.0 or 0.0 for a single maximum; a
    plateau (a coarse map upsampled, an occlusion map's stride blocks) shares the point, as a random tie-break
    would on average. A map with no positive value points nowhere (0.0)."""
    s = np.asarray(saliency)
    if not (s > 0).any():
        return 0.0
    top = s == s.max()
    return float(np.asarray(mask)[top].mean())


def mass_inside(saliency, mask):
    """Fraction of the map's positive mass inside the finding (0.0 for a map with no positive value)."""
    pos = np.maximum(np.asarray(saliency, np.float64), 0)
    total = pos.sum()
    return float(pos[mask].sum() / total) if total > 0 else 0.0


def summarise(rows, key, classes, n_boot, seed):
    """Mean, bootstrap 95% CI and count of rows[i][key] (None skipped), overall and per class."""
    out = _stat([r.get(key) for r in rows], n_boot, seed)
    out["per_class"] = {c: _stat([r.get(key) for r, rc in zip(rows, classes) if rc == c], n_boot, seed)
                        for c in sorted(set(classes))}
    return out


HIGHER_IS_BETTER = {"pointing_game": True, "mass_inside": True, "insertion_auc": True, "deletion_auc": False,
                    "road_morf": False, "road_lerf": True, "road": True}


def evidence(args, layers, grid, pairs, rand_rows, keys, scores, sanity):
    """explain.json's "evidence" block: per score the method's and the random baseline's mean and CI on the
    same pairs, their paired difference and a verdict from its CI; the sanity result when computed; a summary
    line (also printed under every figure). Schema: docs/explain.md."""
    cam = args.method in CAM_METHODS
    out = {}
    for key in keys:
        diffs = [p[key] - r[key] for p, r in zip(pairs, rand_rows) if p.get(key) is not None and r.get(key) is not None]
        d = _stat(diffs, args.bootstrap, args.seed)
        ci, up = d["ci95"], HIGHER_IS_BETTER[key]
        verdict = "no CI" if ci is None or d["n"] < 2 else (
            "better than random" if (ci[0] > 0 if up else ci[1] < 0) else
            "worse than random" if (ci[1] < 0 if up else ci[0] > 0) else "not distinguishable from random")
        out[key] = {"higher_is_better": up, "method": {k: scores[key][args.method][k] for k in ("mean", "ci95", "n")},
                    "random_baseline": {k: scores[key]["random_baseline"][k] for k in ("mean", "ci95", "n")},
                    "difference": d, "verdict": verdict}
    uni = scores.get("uniform_area_fraction")
    ev = {"method": args.method, "target": args.target if cam else "cosine", "layers": layers, "map_grid": grid,
          "num_pairs": len(pairs), "scores": out,
          "uniform_area_fraction": None if uni is None else {k: uni[k] for k in ("mean", "ci95", "n")},
          "sanity": sanity}
    what = args.method + (f" ({args.target} target, {', '.join(layers)})" if cam else "")
    parts = [f"{k} {v['method']['mean']:.3f} vs random {v['random_baseline']['mean']:.3f}: {v['verdict']}"
             for k, v in out.items() if v["method"]["mean"] is not None and v["random_baseline"]["mean"] is not None]
    ev["summary"] = f"{what} on {len(pairs)} pairs: " + ("; ".join(parts) if parts else "no scores (--evaluate, "
                                                          "--mask-dir or --boxes)") + \
        (f"; sanity: {sanity['summary']}" if sanity else "; sanity: not run (--sanity)")
    return ev


def evidence_lines(ev):
    """The evidence as short lines for a figure: one per score (method [CI] vs random [CI], verdict), sanity."""
    lines = [f"{k}: {_fmt_stat(v['method'])} vs random {_fmt_stat(v['random_baseline'])} ({v['verdict']})"
             for k, v in ev["scores"].items()]
    s = ev["sanity"]
    lines.append("sanity: " + (s["summary"] if s else "not run (--sanity)"))
    return [f"evidence on this run's {ev['num_pairs']} pairs ({ev['method']}" +
            (f", {ev['target']} target" if ev["layers"] else "") + "):"] + lines


# --------------------------------------------------------------------------- inputs

def check_args(args):
    """Flag problems reported before the model is built or anything written."""
    if not args.resume.is_file():
        raise ValueError(f"--resume {args.resume}: file not found; give a checkpoint written by train.py")
    if args.test_image_list is None or (args.dataset_dir is None and args.test_dataset_dir is None):
        raise ValueError("give --test-image-list and --dataset-dir (or --test-dataset-dir)")
    if args.gallery_image_list is not None and args.gallery_dataset_dir is None and args.dataset_dir is None:
        raise ValueError("--gallery-image-list needs --gallery-dataset-dir or --dataset-dir")
    for flag, v, lo in (("--topk", args.topk, 1), ("--num-queries", args.num_queries, 1), ("--steps", args.steps, 1),
                        ("--batch-size", args.batch_size, 1), ("--bootstrap", args.bootstrap, 0)):
        if v < lo:
            raise ValueError(f"{flag} must be >= {lo}, got {v}")
    if not all(1 <= v <= 99 for v in args.road_percentiles):
        raise ValueError(f"--road-percentiles must be in 1..99, got {args.road_percentiles}")
    if not 0 <= args.sanity_threshold <= 1:
        raise ValueError(f"--sanity-threshold must be in [0, 1], got {args.sanity_threshold}")
    if args.mask_dir is not None and not args.mask_dir.is_dir():
        raise ValueError(f"--mask-dir {args.mask_dir}: not a folder")
    if args.boxes is not None and not args.boxes.is_file():
        raise ValueError(f"--boxes {args.boxes}: file not found")
    out = args.save_dir / "explain.json"
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} already exists; choose another --save-dir or pass --overwrite to replace it")
    check_writable_dir(args.save_dir)


def check_method(model, method, size, args):
    """The method's needs of this model (layers, head, window), checked before any image is embedded."""
    from model import linear_gap_head
    if args.layers and method not in CAM_METHODS:
        raise ValueError(f"--layers is for the CAM methods ({', '.join(CAM_METHODS)}), not --method {method}")
    if method in CAM_METHODS or args.evaluate:
        try:
            import pytorch_grad_cam  # noqa: F401
        except ImportError:
            raise ValueError(f"--method {method}{' --evaluate (ROAD)' if args.evaluate else ''} needs "
                             "pytorch-grad-cam: pip install 'grad-cam>=1.5,<1.6'") from None
    if args.sanity:
        try:
            import skimage  # noqa: F401
        except ImportError:
            raise ValueError("--sanity needs scikit-image (SSIM): pip install 'scikit-image>=0.22'") from None
    if method in CAM_METHODS:
        return resolve_layers(model, args.layers)
    if method == "simcam":
        return linear_gap_head(model)
    if method == "sbsm":
        args.window = args.window or max(1, size // 4)
        args.stride = args.stride or max(1, args.window // 2)
        if not 1 <= args.window <= size or args.stride < 1:
            raise ValueError(f"--window must be in 1..{size} (the model's input size) and --stride >= 1, "
                             f"got {args.window}, {args.stride}")
    return None


def localisation_truth(args, datasets):
    """{image_id: bool mask (H, W)} for every listed image with a finding, sizes checked against the images."""
    if args.mask_dir is None and args.boxes is None:
        return None
    paths = {i: p for ds in datasets for i, p in zip(ds.image_ids, ds.paths)}
    truth = {}
    if args.mask_dir is not None:
        for i, p in paths.items():
            mp = args.mask_dir / f"{i}.png"
            if mp.is_file():
                m = read_mask(mp, image_size(p))
                if m.any():
                    truth[i] = m
    else:
        boxes = read_boxes(args.boxes)
        unknown = sorted(set(boxes) - set(paths))
        if unknown:
            print(f"note: {len(unknown)} image ids of --boxes {args.boxes} are in no list (ignored), e.g. {unknown[:3]}")
        for i in set(boxes) & set(paths):
            truth[i] = boxes_mask(boxes[i], image_size(paths[i]), i, f"--boxes {args.boxes}")
    return truth


def pick_queries(args, image_ids):
    """Query indices: --query-ids (every id must exist) or --num-queries drawn with --seed."""
    if args.query_ids:
        where = {i: n for n, i in enumerate(image_ids)}
        missing = [q for q in args.query_ids if q not in where]
        if missing:
            raise ValueError(f"--query-ids {missing} are not in --test-image-list {args.test_image_list} "
                             f"(ids as in the list's outputs, e.g. {image_ids[0]})")
        return np.array([where[q] for q in args.query_ids], np.int64)
    n = min(args.num_queries, len(image_ids))
    return np.sort(np.random.default_rng(args.seed).choice(len(image_ids), n, replace=False))


def remove_previous_outputs(save):
    """--overwrite: delete the maps and figures an earlier explain.json in `save` lists (only those), so the
    folder never mixes two runs; other files are left alone."""
    old = save / "explain.json"
    if not old.is_file():
        return
    try:
        pairs = json.loads(old.read_text()).get("pairs", [])
    except ValueError:
        return
    rels = {p.get(k) for p in pairs for k in ("result_map", "query_map")}
    rels |= {m for p in pairs for b in p.get("branch_maps", {}).values() for m in b.values()}
    rels |= {f"figures/{p.get('query_id')}.png" for p in pairs}
    for rel in rels:
        path = (save / str(rel)).resolve()
        if rel and save.resolve() in path.parents and path.is_file():
            path.unlink()
    old.unlink()


# --------------------------------------------------------------------------- figure

def plot_query(path, query, results, method, ood_note=None, evidence=None):
    """The query and its top-k, each with its overlay (row 1: results' maps, row 2: the query's map per result),
    similarity, green/red frame = same/different label, one colour bar (maps scaled to their own maximum);
    `evidence` (lines of text: the run's scores next to random, the sanity verdict) printed under the panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = len(results)
    import textwrap
    width = 2.2 * (k + 1) + 0.6
    lines = [w for line in (evidence or ()) for w in textwrap.wrap(line, int(width * 16), subsequent_indent="  ")]
    extra = 0.11 * len(lines)
    fig, axes = plt.subplots(2, k + 1, figsize=(width, 5.2 + extra), squeeze=False)
    if lines:  # 6 pt monospace: ~19 characters per inch, 16 leave a margin
        fig.subplots_adjust(bottom=(extra + 0.1) / (5.2 + extra))
        fig.text(0.01, 0.005, "\n".join(lines), fontsize=6, va="bottom", family="monospace")

    def show(ax, img, sal, title, color, finding=None):
        ax.imshow(img, cmap="gray")
        if finding is not None:  # the known finding's outline, to judge the map against
            ax.contour(finding, levels=[0.5], colors="white", linewidths=0.8)
        im = None
        if sal is not None:
            peak = float(np.max(np.abs(sal))) or 1.0
            im = ax.imshow(np.maximum(sal, 0) / peak, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(title, fontsize=7, color=color)
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_edgecolor(color)
            s.set_linewidth(3)
        return im

    qcol = "darkorange" if ood_note else "black"
    qf = query.get("finding")
    show(axes[0, 0], query["image"], None, f"query {query['id']}\n{query['label']}" + (f"\n{ood_note}" if ood_note else ""),
         qcol, qf)
    show(axes[1, 0], query["image"], None, "query (its map toward\neach result: right)", "black", qf)
    im = None
    for j, r in enumerate(results):
        col = "green" if r["same_label"] else "red"
        tag = "\nSAME PATIENT" if r.get("same_patient") else ""  # own line: a panel is ~2 inches wide
        im = show(axes[0, j + 1], r["image"], r["result_map"],
                  f"{j + 1}: {r['id']}\n{r['label']}  s = {r['similarity']:.3f}{tag}", col, r.get("finding"))
        show(axes[1, j + 1], query["image"], r["query_map"], f"query, toward result {j + 1}", col, qf)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, label=f"{method} (share of max)")
    fig.suptitle(f"{method}: where the similarity comes from (top: each result, query fixed; bottom: the query, "
                 "result fixed); green = same label, red = not" + ("; white = known finding" if any(
                     x.get("finding") is not None for x in [query] + list(results)) else "")
                 + ("; SAME PATIENT = the query's own patient" if any(r.get("same_patient") for r in results)
                    else ""), fontsize=8)
    save_figure(fig, path, dpi=90)


# --------------------------------------------------------------------------- run

def run(args):
    check_args(args)
    from model import get_transform, load_checkpoint, read_checkpoint
    device = get_device(args.device)
    model, ckpt = load_checkpoint(args.resume, map_location=device)
    cfg = getattr(model, "data_config", None)
    if cfg is None:  # a learned fusion head (train_fusion.py) takes embeddings, not images
        raise CheckpointError(f"--resume {args.resume} holds model '{ckpt.get('model_name')}', which embeds "
                              "other embeddings, not images; explain.py needs an image model's checkpoint "
                              "written by train.py")
    size = int(cfg["img_size"])
    how = check_method(model, args.method, size, args)
    ood_ref = None
    if args.ood_reference is not None:
        ood_ref = ood.load_reference(args.ood_reference, args.ood_method, args.ood_k, seed=args.seed,
                                     expected_dim=model.embedding_dim)
    stored = read_checkpoint(args.resume).get("class_names") if args.dataset == "generic" else None
    names, _ = resolve_class_names(args.dataset, args.test_image_list, [args.gallery_image_list], given=stored)
    transform = get_transform(model)
    qdir = test_image_dir(args.dataset_dir or args.test_dataset_dir, args.test_dataset_dir)
    query_ds = ImageListDataset(args.test_image_list, qdir, dataset=args.dataset, transform=transform,
                                class_names=names, cache_dir=args.cache_dir)
    gallery_ds = query_ds
    if args.gallery_image_list is not None:
        gdir = args.gallery_dataset_dir or train_image_dir(args.dataset_dir)
        gallery_ds = ImageListDataset(args.gallery_image_list, gdir, dataset=args.dataset, transform=transform,
                                      class_names=names, cache_dir=args.cache_dir)
    loo = gallery_ds is query_ds
    for ds in {id(d): d for d in (query_ds, gallery_ds)}.values():  # maps and figures are named by image id
        ds.check_unique_ids()
    queries = pick_queries(args, query_ds.image_ids)
    cand, _ = metrics.candidate_counts(query_ds.labels, None if loo else gallery_ds.labels, query_ds.patient_ids,
                                       gallery_ds.patient_ids, args.exclude_same_patient)
    metrics.check_k([args.topk], cand)
    truth = localisation_truth(args, [query_ds] if loo else [query_ds, gallery_ds])
    print_args(args)
    set_seed(args.seed)

    def embed(ds):  # rows in list order
        return embed_dataset(model, ds, device, args.eval_batch_size, args.workers, progress=True,
                             desc=f"embedding {ds.list_file.name}")

    qemb = embed(query_ds)
    gemb = qemb if loo else embed(gallery_ds)
    group = args.exclude_same_patient
    ranking = metrics.rank(qemb, query_ds.labels, None if loo else gemb, None if loo else gallery_ds.labels,
                           k=args.topk, exclude_self=loo, full_ranking=False,
                           query_groups=np.array(query_ds.patient_ids) if group else None,
                           gallery_groups=None if loo or not group else np.array(gallery_ds.patient_ids))
    ood_scores = ood_flags = None
    if ood_ref is not None:
        ood_scores, ood_flags = ood.score_queries(ood_ref, qemb[queries])

    grid = None
    if args.method in CAM_METHODS:  # one pair first: a saliency-library failure stops the run before any write
        first = gallery_ds[ranking.indices[queries[0], 0]][0].to(device)
        cam_maps(model, how, args.method, first[None], torch.as_tensor(qemb[queries[:1]], device=device),
                 args.batch_size, args.target)
        grid = list(max(layer_grids(model, how, first)))
    save = ensure_writable_dir(args.save_dir)
    remove_previous_outputs(save)
    (save / "maps").mkdir(exist_ok=True)
    (save / "figures").mkdir(exist_ok=True)
    pairs, rand_rows, t0, n_maps, t_maps, figures, cases = [], [], time.time(), 0, 0.0, [], []
    for qn, qi in enumerate(queries):
        qimg = query_ds[qi][0].to(device)
        gis = ranking.indices[qi]
        rimgs = torch.stack([gallery_ds[g][0] for g in gis]).to(device)
        eq = torch.as_tensor(qemb[qi], device=device)
        er = torch.as_tensor(gemb[gis], device=device)
        # both sides at once: results toward the query, then the query toward each result
        imgs = torch.cat([rimgs, qimg[None].expand(len(gis), -1, -1, -1)])
        refs = torch.cat([eq[None].expand(len(gis), -1), er])
        t1 = time.time()
        keys = [[args.seed, int(qi), j] for j in range(len(imgs))]
        maps, branch, grids = method_maps(model, args.method, how, imgs, refs, args, keys)
        if grids is not None:  # simcam: the grid of its exact split
            grid = list(grids[0].shape)
        n_maps += len(imgs)
        t_maps += time.time() - t1
        qid = query_ds.image_ids[qi]
        qhw = image_size(query_ds.paths[qi])
        qpatient = query_ds.patient_ids[qi]
        shown, rmaps = [], []
        for j, gi in enumerate(gis):
            rid = gallery_ds.image_ids[gi]
            rhw = image_size(gallery_ds.paths[gi])
            entry = {"query_id": qid, "query_label": names[query_ds.labels[qi]], "rank": j + 1, "result_id": rid,
                     "result_label": names[gallery_ds.labels[gi]], "similarity": float(ranking.sims[qi, j]),
                     "same_label": bool(ranking.relevant[qi, j]),
                     # always recorded: without --exclude-same-patient the query's own patient can be a result
                     "same_patient": bool(gallery_ds.patient_ids[gi] == qpatient)}
            if ood_ref is not None:
                entry["query_ood_score"], entry["query_ood_flagged"] = float(ood_scores[qn]), bool(ood_flags[qn])
            full = {}
            for side, k, hw in (("result", j, rhw), ("query", len(gis) + j, qhw)):
                full[side] = map_to_original(maps[k], hw, cfg) if grids is None else spread_grid(grids[k], hw, cfg)
                rel = f"maps/{qid}__{j + 1}_{rid}__{side}.npy"
                atomic_np_save(save / rel, full[side])
                entry[f"{side}_map"] = rel
            for bname, bmaps in branch.items():
                for side, m, hw in (("result", bmaps[j], rhw), ("query", bmaps[len(gis) + j], qhw)):
                    rel = f"maps/{qid}__{j + 1}_{rid}__{side}__{bname}.npy"
                    atomic_np_save(save / rel, map_to_original(m, hw, cfg))
                    entry.setdefault("branch_maps", {}).setdefault(bname, {})[f"{side}_map"] = rel
            rnd = {}
            if args.evaluate or truth is not None or args.sanity:  # the random baseline on the same pair
                rnd["map"] = random_map((size, size), np.random.default_rng([args.seed, int(qi), j, 1]))
                rmaps.append(rnd["map"])
            if args.evaluate:
                base = blurred(rimgs[j]) if args.curve_baseline == "blur" else torch.zeros_like(rimgs[j])
                for tag, m, dst in (("", maps[j], entry), ("random", rnd["map"], rnd)):
                    dst.update(road_scores(model, rimgs[j], eq, m, args.road_percentiles, args.road_noise, args.seed,
                                           args.batch_size))
                    ins, dele = insertion_deletion(model, rimgs[j], eq, m, base, args.steps, args.batch_size)
                    s_img, s_base = float(dele[0]), float(dele[-1])  # the curves' ends: untouched, all baseline
                    dst["insertion_auc"] = curve_auc(ins, s_img, s_base)
                    dst["deletion_auc"] = curve_auc(dele, s_img, s_base)
                    if not tag:
                        entry["insertion_curve"] = [round(float(v), 5) for v in ins]
                        entry["deletion_curve"] = [round(float(v), 5) for v in dele]
            if truth is not None and rid in truth:
                mask = truth[rid]
                entry["pointing_game"] = pointing_game(full["result"], mask)
                entry["mass_inside"] = mass_inside(full["result"], mask)
                seen = map_to_original(np.ones((size, size), np.float32), rhw, cfg) > 0.5
                entry["area_fraction"] = float(mask[seen].mean()) if seen.any() else 0.0
                rfull = map_to_original(rnd["map"], rhw, cfg)
                rnd["pointing_game"], rnd["mass_inside"] = pointing_game(rfull, mask), mass_inside(rfull, mask)
            rnd.pop("map", None)
            pairs.append(entry)
            rand_rows.append(rnd)
            # drawn once the run's evidence is known (the maps are read back from disk then)
            shown.append({"id": rid, "label": entry["result_label"], "similarity": entry["similarity"],
                          "same_label": entry["same_label"], "same_patient": entry["same_patient"],
                          "path": gallery_ds.paths[gi], "result_map": entry["result_map"],
                          "query_map": entry["query_map"]})
        if args.sanity:  # the trained maps of this query's results, kept for the randomised model's
            rkeys = [[args.seed, int(qi), j, 1] for j in range(len(gis))]
            cases.append((rimgs, qimg, maps[:len(gis)], keys[:len(gis)], np.stack(rmaps), rkeys))
        note = None
        if ood_ref is not None and ood_flags[qn]:
            note = f"OOD: unlike the archive (score {ood_scores[qn]:.3g})"
        figures.append((qid, query_ds.paths[qi], names[query_ds.labels[qi]], shown, note))
        own = [str(j + 1) for j, r in enumerate(shown) if r["same_patient"]]
        print(f"query {qn + 1}/{len(queries)} {qid}: {len(gis)} results explained"
              + (f"; rank {', '.join(own)} = the query's own patient ({qpatient})" if own else ""))
    elapsed = time.time() - t0

    res = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())},
           "checkpoint": str(args.resume), "model_name": ckpt["model_name"], "git_revision": git_revision(),
           "method": args.method, "input_size": size, "resize_mode": cfg["resize_mode"],
           "num_queries": int(len(queries)), "num_pairs": len(pairs), "seconds": elapsed,
           "same_patient_pairs": sum(p["same_patient"] for p in pairs),
           # the maps alone (both sides of each pair), without scoring, saving and figures
           "map_seconds": t_maps, "pairs_per_second": len(pairs) / t_maps if t_maps > 0 else None,
           "maps_per_pair": n_maps / max(len(pairs), 1), "device": str(device)}
    if args.method in CAM_METHODS and len(how.layers) > 1:
        res["branches"] = {"names": how.names, "combined": how.combine}
    if args.method == "sbsm":
        res["sbsm"] = {"window": args.window, "stride": args.stride, "fill": "dataset mean (0 after normalisation)"}
    if ood_ref is not None:
        res["ood"], _ = ood.query_report(ood_ref, ood_scores, ood_flags, [query_ds.image_ids[i] for i in queries],
                                         query_ds.labels[queries])
    classes = [p["query_label"] for p in pairs]
    scores = {}
    keys = (["insertion_auc", "deletion_auc", "road_morf", "road_lerf", "road"] if args.evaluate else []) + \
           (["pointing_game", "mass_inside"] if truth is not None else [])
    for key in keys:
        scores[key] = {args.method: summarise(pairs, key, classes, args.bootstrap, args.seed),
                       "random_baseline": summarise(rand_rows, key, classes, args.bootstrap, args.seed)}
    if truth is not None:
        scores["uniform_area_fraction"] = summarise(pairs, "area_fraction", classes, args.bootstrap, args.seed)
        scores["pairs_without_finding"] = sum("pointing_game" not in p for p in pairs)
    if args.evaluate:
        scores["curves"] = (f"{args.steps + 1} points from 0 to all pixels changed at the model's input "
                            f"({size} x {size}); baseline: {args.curve_baseline}; AUC of (s - s_baseline) / (s_image - "
                            "s_baseline) clipped to [0, 1]; higher insertion and lower deletion = more faithful")
        scores["road_definition"] = (f"ROAD: cosine to the query after noisy linear imputation (noise {args.road_noise}) "
                                     "of the top (MoRF) / bottom (LeRF) 100 - p % of the map, mean over p = "
                                     f"{', '.join(map(str, args.road_percentiles))}; "
                                     "road = (LeRF - MoRF) / 2; lower MoRF, higher LeRF and road = more faithful")
    res["scores"] = scores
    sanity = None
    if args.sanity:
        sanity = sanity_check(model, args.method, cases, args,
                              lambda m: check_method(m, args.method, size, args))
    res["evidence"] = evidence(args, [n for n, _ in how.layers] if args.method in CAM_METHODS else None, grid,
                               pairs, rand_rows, keys, scores, sanity)
    res["pairs"] = pairs
    for key in keys:
        a, b = scores[key][args.method], scores[key]["random_baseline"]
        print(f"{key:<14} {args.method}: {_fmt_stat(a)}   random baseline: {_fmt_stat(b)}   (n = {a['n']})")
    if truth is not None:
        u = scores["uniform_area_fraction"]["mean"]
        print(f"uniform map (finding's area fraction): {'n/a' if u is None else f'{u:.3f}'}; "
              f"{scores['pairs_without_finding']} pairs skipped (result without finding)")
    print(f"{len(pairs)} pairs in {elapsed:.1f} s; maps (both sides) {t_maps:.1f} s = {res['pairs_per_second']:.2f} pairs/s")
    if sanity is not None:
        print(f"sanity: {sanity['summary']}")
    lines = evidence_lines(res["evidence"])
    for qid, qpath, qlabel, shown, note in figures:
        for r in shown:
            r["image"] = np.asarray(load_image(r.pop("path")).convert("L"))
            r["result_map"], r["query_map"] = (np.load(save / r[k]) for k in ("result_map", "query_map"))
            r["finding"] = None if truth is None else truth.get(r["id"])
        plot_query(save / "figures" / f"{qid}.png",
                   {"id": qid, "label": qlabel, "image": np.asarray(load_image(qpath).convert("L")),
                    "finding": None if truth is None else truth.get(qid)}, shown, args.method, note, lines)
    save_json(res, save / "explain.json")  # last: its presence means a complete run
    print(f"wrote {save / 'explain.json'} and {len(queries)} figures in {save / 'figures'}")
    return 0


def main(args):
    try:
        return run_main(run, args, "explain.py")  # bad input: one line, exit 2
    except SaliencyError as e:  # the saliency library failed mid-run: one line, not its traceback
        print(f"explain.py: error: {one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
