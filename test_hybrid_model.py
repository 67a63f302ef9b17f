"""Sanity check of the hybrid ConvNeXtV2 + ViT embedding model: build, forward, norms, backward.

The full paper model (ConvNeXtV2-B + ViT-B/16, 384 px, D = 1024), random init, no download:
    python test_hybrid_model.py
With the pretrained timm weights (downloads them, or uses the local cache):
    python test_hybrid_model.py --pretrained
Tiny variant (seconds):
    python test_hybrid_model.py --convnext-backbone convnextv2_atto --vit-backbone vit_tiny_patch16_224 --img-size 64
On a GPU the check runs on cuda automatically; force the CPU with --device cpu.

Prints one check-mark line per step and "All tests passed!"; exits with 1 on any failure.
"""
import argparse
import sys
import time

import torch

from model import DEFAULT_MODEL_ARGS, build_model, get_model_parser
from utils import HelpFormatter, get_device, get_runtime_parser


class _HelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The toolkit's --help (each default said once), with the module docstring's commands kept as written."""


def get_args_parser():
    parent = get_model_parser()
    # the model is fixed here; the other model flags keep their names and defaults
    parent.set_defaults(model="hybrid_convnext_vit", embedding_dim=1024)
    p = argparse.ArgumentParser(description=__doc__, parents=[parent, get_runtime_parser(flags=("device",))],
                                formatter_class=_HelpFormatter)
    p.add_argument("--pretrained", dest="hub_pretrained", action="store_true",
                   help="load the timm hub weights (default: random init, no download)")
    p.add_argument("--batch-size", type=int, default=2, help="images in the test forward/backward pass")
    p.add_argument("--seed", type=int, default=0, help="seeds the random weights and the test batch")
    return p


def check(ok, message):
    if not ok:
        raise AssertionError(message)
    print(f"\u2713 {message}", flush=True)


def main(args):
    torch.manual_seed(args.seed)
    model_args = {k: getattr(args, k) for k in DEFAULT_MODEL_ARGS if k in vars(args)}
    # random init unless --pretrained or local weight files are given
    model_args["pretrained"] = bool(args.hub_pretrained)
    start = time.perf_counter()
    try:
        device = get_device(args.device)  # not given: cuda when available; an unusable --device is a failed check
        model = build_model("hybrid_convnext_vit", **model_args).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        check(True, f"built hybrid_convnext_vit ({args.convnext_backbone} + {args.vit_backbone}, "
                    f"{n_params / 1e6:.1f}M parameters, pretrained={model_args['pretrained']}) on {device}")
        d = model.embedding_dim
        check(model.fusion[0].in_features == model.conv_dim + model.vit_dim,
              f"fusion input width {model.conv_dim} (ConvNeXt) + {model.vit_dim} (ViT) = "
              f"{model.conv_dim + model.vit_dim}")

        model.train()
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
        emb = model(x)
        check(tuple(emb.shape) == (args.batch_size, d),
              f"forward {tuple(x.shape)} -> {tuple(emb.shape)} (expected {(args.batch_size, d)})")
        norms = emb.detach().norm(dim=1)
        check(torch.allclose(norms, torch.ones_like(norms), atol=1e-4),
              f"embedding norms = {[round(v, 4) for v in norms.tolist()]} (expected 1.0)")
        check(bool(torch.isfinite(emb).all()), "embeddings are finite")

        # a loss that depends on every output: distance to a fixed random unit target
        target = torch.nn.functional.normalize(torch.randn_like(emb), dim=1)
        loss = (emb - target).pow(2).sum()
        loss.backward()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        missing = [n for n, p in trainable if p.grad is None]
        check(not missing, f"backward: all {len(trainable)} trainable parameters got a gradient"
              + (f" (missing: {missing[:5]})" if missing else ""))
        bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
        check(not bad, "all gradients are finite" + (f" (non-finite: {bad[:5]})" if bad else ""))
        check(any(p.grad.abs().sum() > 0 for _, p in trainable), "gradients are not all zero")
    except Exception as e:  # a failed check or a crash: say which and exit non-zero
        print(f"\u2717 {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"All tests passed! ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
