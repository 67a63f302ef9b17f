"""Offline stand-ins of the CXR foundation encoders (model.ENCODERS): local folders with the real classes, the
real preprocessing values of each model card and random weights, for the demo, the tests and the benchmarks.

    # tiny random models (seconds): the 4-way demo comparison and the tests use these
    python data/make_standin_encoders.py --out data/demo_encoders
    # the real architectures at their real input sizes, config and processor only (no weights; build them with
    # --no-pretrained): what bench/bench_encoders.py times
    python data/make_standin_encoders.py --out /tmp/encoders_real --size real --no-weights

Then e.g. `--model raddino --pretrained-weights data/demo_encoders/raddino`. A stand-in embeds like the real
encoder (same code path, same processor, same output layer) but its weights are random: its retrieval numbers say
nothing about the real model. Writes OUT/NAME/ for raddino, dinov2, clip, medsiglip and biomedclip (xrv needs no
folder: `--model xrv --no-pretrained` builds torchxrayvision's architecture without its weight file).
"""
import argparse
import json
import sys
from pathlib import Path

NAMES = ("raddino", "dinov2", "clip", "medsiglip", "biomedclip")
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# a word-level vocabulary for the tiny text towers (a real one cannot be fetched offline)
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "chest", "x-ray", "radiograph", "with", "without", "no",
         "showing", "pneumonia", "normal", "effusion", "opacity", "consolidation", "covid-19", "photo", "of"]
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
# The published architectures (model cards / configs): ViT-B/14 for RAD-DINO and DINOv2-base, ViT-L/14 for CLIP,
# SigLIP so400m/14 at 448 for MedSigLIP (text tower: so400m's), BiomedCLIP = timm ViT-B/16 + PubMedBERT-base.
REAL = {
    "vit_b": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "vit_l": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "so400m": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
}


def word_tokenizer(folder):
    """A tiny fast tokenizer (word level) saved to `folder`: what AutoTokenizer loads for the CLIP / SigLIP
    stand-ins."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)


def hf_standin(folder, kind, size="tiny", weights=True):
    """A transformers stand-in of `kind` (raddino, dinov2, clip, medsiglip) in `folder`: config, image processor
    with the model card's values, tokenizer (text towers) and, with `weights`, random weights."""
    import torch
    from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config,
                              Dinov2Model, SiglipConfig, SiglipImageProcessor, SiglipModel)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    real = size == "real"
    if kind in ("raddino", "dinov2"):
        # rad-dino: shorter side 518, crop 518, its own mean/std; dinov2-base: 256 -> crop 224, ImageNet's
        side, crop, mean, std = ((518, 518, [0.5307] * 3, [0.2583] * 3) if kind == "raddino"
                                 else (256, 224, IMAGENET_MEAN, IMAGENET_STD))
        arch = {k: v for k, v in (REAL["vit_b"] if real else TINY).items() if k != "intermediate_size"}
        config = Dinov2Config(image_size=518 if real else crop, patch_size=14, mlp_ratio=4 if real else 2, **arch)
        net = Dinov2Model
        proc = BitImageProcessor(size={"shortest_edge": side}, crop_size={"height": crop, "width": crop},
                                 resample=3, image_mean=mean, image_std=std, do_convert_rgb=True)
    elif kind == "clip":
        text = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=768, intermediate_size=3072,
                    num_hidden_layers=12, num_attention_heads=12) if real else dict(
            vocab_size=len(WORDS), max_position_embeddings=16, **TINY)
        config = CLIPConfig(text_config=text, vision_config=dict(image_size=224, patch_size=14,
                                                                 **(REAL["vit_l"] if real else TINY)),
                            projection_dim=768 if real else 16)
        net = CLIPModel
        proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                                  image_mean=CLIP_MEAN, image_std=CLIP_STD)
    elif kind == "medsiglip":  # SigLIP at 448, a squash resize, mean = std = 0.5
        text = dict(vocab_size=32000, max_position_embeddings=64, **REAL["so400m"]) if real else dict(
            vocab_size=len(WORDS), max_position_embeddings=16, **TINY)
        config = SiglipConfig(text_config=text, vision_config=dict(image_size=448, patch_size=14,
                                                                   **(REAL["so400m"] if real else TINY)))
        net = SiglipModel
        proc = SiglipImageProcessor(size={"height": 448, "width": 448}, resample=2, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3)
    else:
        raise ValueError(f"unknown transformers stand-in {kind!r}; choose one of raddino, dinov2, clip, medsiglip")
    if weights:
        net(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    proc.save_pretrained(folder)
    if kind in ("clip", "medsiglip") and not real:
        word_tokenizer(folder)
    return folder


def open_clip_standin(folder, size="tiny", weights=True):
    """BiomedCLIP's layout in `folder`: open_clip_config.json (timm ViT trunk + Hugging Face BERT text tower, the
    text config in folder/text), a BERT tokenizer and, with `weights`, random weights."""
    import torch
    from transformers import BertConfig, BertTokenizer
    folder = Path(folder)
    (folder / "text").mkdir(parents=True, exist_ok=True)
    real = size == "real"
    BertConfig(vocab_size=30522 if real else len(WORDS), max_position_embeddings=512 if real else 32,
               **({k: v for k, v in REAL["vit_b"].items()} if real else TINY)).save_pretrained(folder / "text")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    cfg = {"model_cfg": {"embed_dim": 512 if real else 16,
                         "vision_cfg": {"timm_model_name": "vit_base_patch16_224" if real else "test_vit",
                                        "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear",
                                        "image_size": 224},
                         "text_cfg": {"hf_model_name": str(folder / "text"), "hf_tokenizer_name": str(folder / "text"),
                                      "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                                      "context_length": 256 if real else 16}},
           "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=1))
    if weights:
        import open_clip
        from safetensors.torch import save_file
        torch.manual_seed(0)
        net = open_clip.create_model(f"local-dir:{folder}", load_weights=False, pretrained_text=False)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def make_standins(out, names=NAMES, size="tiny", weights=True):
    """{name: folder} of the stand-ins of `names` under `out`."""
    out = Path(out)
    return {n: (open_clip_standin(out / n, size, weights) if n == "biomedclip" else hf_standin(out / n, n, size, weights))
            for n in names}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder; one subfolder per encoder")
    p.add_argument("--names", nargs="+", default=list(NAMES), choices=NAMES, help="which stand-ins")
    p.add_argument("--size", default="tiny", choices=["tiny", "real"],
                   help="tiny random models, or the real architectures (sizes of the published configs)")
    p.add_argument("--no-weights", dest="weights", action="store_false",
                   help="config and processor only (load with --no-pretrained); the real sizes need no disk then")
    return p


def main(args):
    for n, folder in make_standins(args.out, args.names, args.size, args.weights).items():
        print(f"{n}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
