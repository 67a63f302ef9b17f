"""Embedding models for chest X-ray retrieval: one registry, one factory, one checkpoint format.

Every model maps a normalised image batch (B, 3, S, S) to L2-normalised embeddings (B, D) and
carries what is needed to rebuild and feed it:

    model = build_model("hybrid_convnext_vit", embedding_dim=1024, pretrained=False)
    transform = get_transform(model)             # the one eval transform for this model
    ckpt = make_checkpoint(model, epoch=3)       # plain dict, loads with weights_only=True
    model, ckpt = load_checkpoint("x_ckpt.pth")  # rebuilt from the file alone, strict

Registry (`MODELS`):
    convnextv2           timm ConvNeXtV2-B (384, in22k->in1k) -> MXA on the last stage -> GAP [-> Linear]
    vit                  timm ViT-B/16 (384) CLS pre-logits [-> Linear]
    hybrid_convnext_vit  the paper's model: ConvNeXtV2 -> MXA -> GAP (1024) || ViT CLS (768)
                         -> concat -> Linear -> LayerNorm -> ReLU -> Linear(D, D)   (D = 1024)
    resnet50, densenet121  classic baselines (timm implementations, plain GAP)
    timm                 any timm model (--backbone NAME), pooled features, MXA on NCHW maps
    conceptclip          frozen ConceptCLIP image tower (HF remote code) [-> trainable Linear]
    raddino, biomedclip, medsiglip, xrv, dinov2, clip
                         CXR foundation encoders and baselines (table: ENCODERS, shown by --help), each loaded
                         with its authors' library and fed by its own processor; frozen [-> --encoder-head Linear]
    democnn              a small conv net (4 stages -> GAP [-> Linear]), random init: the explain demo's model

Scripts get the flags from `get_model_parser()` and the arguments from `model_args_from_cli(args)`;
they never branch on the model name.
"""
import argparse
import copy
import os
import warnings
from pathlib import Path

import timm
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

CHECKPOINT_FORMAT = "cxr-retrieval"
CHECKPOINT_VERSION = 1

DEFAULT_CONVNEXT = "convnextv2_base.fcmae_ft_in22k_in1k_384"
DEFAULT_VIT = "vit_base_patch16_384"
DEFAULT_CONCEPTCLIP = "JerrryNie/ConceptCLIP"
HYBRID_DEFAULT_DIM = 1024

# Every model argument with its default. All values are plain JSON types so they can be stored
# in a checkpoint and in args.json. freeze_backbone=None means "the model's own default"
# (False for the timm models, True for ConceptCLIP).
DEFAULT_MODEL_ARGS = {
    "embedding_dim": None,
    "img_size": 384,
    "pretrained": True,
    "pretrained_weights": None,
    "convnext_backbone": DEFAULT_CONVNEXT,
    "vit_backbone": DEFAULT_VIT,
    "convnext_weights": None,
    "vit_weights": None,
    "backbone": None,
    "use_mxa": True,
    "conceptclip_path": DEFAULT_CONCEPTCLIP,
    "conceptclip_batch_size": 8,
    "conceptclip_head": False,
    "encoder_head": False,
    "encoder_batch_size": 8,
    "freeze_backbone": None,
}

# Which flag sets which argument, for error messages.
_FLAG = {k: "--" + k.replace("_", "-") for k in DEFAULT_MODEL_ARGS}
_FLAG.update(pretrained="--no-pretrained", use_mxa="--no-mxa")


# ----------------------------------------------------------------------------------------------
# Attention blocks (CBAM-style "MXA": channel attention, then spatial attention)

class ChannelAttention(nn.Module):
    """Channel gate: sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))) * x, one shared bias-free MLP.

    The MLP's last layer starts at zero, so a new gate is the constant sigmoid(0) = 1/2: an untrained block
    scales the features and changes no ranking (the first layer gets gradients once the last has moved)."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),  # 1x1 convs == Linear on (B, C, 1, 1)
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )
        nn.init.zeros_(self.mlp[2].weight)

    def forward(self, x):  # x: (B, C, H, W)
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return x * torch.sigmoid(avg + mx)  # gate (B, C, 1, 1) broadcast over H, W


class SpatialAttention(nn.Module):
    """Spatial gate: sigmoid(conv([mean_c(x), max_c(x)])) * x, one conv from 2 maps to 1.

    The conv starts at zero: a new gate is the constant 1/2 at every location (see ChannelAttention)."""

    def __init__(self, kernel_size=7):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"SpatialAttention kernel_size must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.zeros_(self.conv.weight)

    def forward(self, x):  # x: (B, C, H, W)
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(desc))  # gate (B, 1, H, W) broadcast over C


class MXA(nn.Module):
    """Mixed attention: channel attention followed by spatial attention.

    A new block is exactly x / 4 (two gates of 1/2; a power of two scales floats without rounding), so at
    initialisation it keeps the backbone's ranking wherever what follows is scale-free: GAP then L2
    normalisation, a bias-free projection, a LayerNorm (up to its eps). Trained checkpoints hold their own
    weights: the initialisation changes new models only."""

    INIT_SCALE = 0.25

    def __init__(self, channels, reduction=16, kernel_size=7):
        super().__init__()
        self.ca = ChannelAttention(channels, reduction)
        self.sa = SpatialAttention(kernel_size)

    def forward(self, x):
        return self.sa(self.ca(x))


# ----------------------------------------------------------------------------------------------
# timm backbones and local weight files

def _first_line(e, limit=300):
    """An exception's first line, shortened: hub errors run to many lines."""
    text = str(e).strip().splitlines()
    return text[0][:limit] if text else type(e).__name__


def _weights_hint():
    return ("Use --no-pretrained for random initialisation, or give a local weight file with "
            "--pretrained-weights PATH (single-backbone models) or --convnext-weights PATH / "
            "--vit-weights PATH (hybrid_convnext_vit).")


class WeightsUnavailableError(ValueError, RuntimeError):
    """Pretrained weights a model needs are not on this machine and cannot be fetched. A ValueError (bad
    input: one line, before any work) and, as hub failures were before, a RuntimeError."""


def _env_true(name):
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hf_offline():
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def _is_local(src):
    """Whether a weights source names a local folder (an existing one, or a path) rather than a hub id."""
    return Path(src).expanduser().is_dir() or src.startswith((".", "/", "~")) or src.count("/") > 1


_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _hf_cache_dir():
    """The Hugging Face hub cache the environment names now (huggingface_hub reads it once, at import)."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return os.environ[key]
    return os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None


def _hub_has(repo_id, filenames):
    """Whether the local hub cache holds one of `filenames` of `repo_id` (a lookup, no network)."""
    from huggingface_hub import try_to_load_from_cache
    repo, _, revision = repo_id.partition("@")
    cache = _hf_cache_dir()
    return any(isinstance(try_to_load_from_cache(repo, f, cache_dir=cache, revision=revision or None), str)
               for f in filenames)


def _check_timm_weights(name, weights, flag):
    """One timm backbone's pretrained weights: the local file, else the timm/Hugging Face cache when offline."""
    fix = (f"give a local weight file with {flag} FILE, or use --no-pretrained (random initialisation)")
    check_timm_name(name)  # a typo is a typo: --no-pretrained would not help
    if weights is not None:
        if not Path(weights).is_file():
            raise WeightsUnavailableError(f"{flag} {weights}: file not found; {fix}")
        return
    if name.startswith("hf-hub:"):
        repo, files = name[len("hf-hub:"):], ("open_clip_model.safetensors", "model.safetensors",
                                              "open_clip_pytorch_model.bin", "pytorch_model.bin")
        url = None
    else:
        cfg = timm.models.get_pretrained_cfg(name)
        repo, url = (cfg.hf_hub_id, cfg.url) if cfg is not None else (None, None)
        if not repo and not url and not (cfg is not None and cfg.file):
            raise WeightsUnavailableError(f"timm has no pretrained weights for '{name}'; {fix}")
        files = (cfg.hf_hub_filename,) if cfg is not None and cfg.hf_hub_filename else (
            "model.safetensors", "pytorch_model.bin")
    if not _env_true("HF_HUB_OFFLINE"):
        return  # timm downloads them; a failure then is a one-line WeightsUnavailableError (create_backbone)
    if repo and _hub_has(repo, files):
        return
    if url and Path(torch.hub.get_dir(), "checkpoints", os.path.basename(url.split("?")[0])).is_file():
        return
    where = f"Hugging Face hub {repo}" if repo else url
    raise WeightsUnavailableError(
        f"the pretrained weights of timm model '{name}' ({where}) are not on this machine and HF_HUB_OFFLINE=1 "
        f"forbids downloading them: fetch them once on a machine with network access (python -c \"import timm; "
        f"timm.create_model('{name}', pretrained=True)\" fills the cache), or {fix}")


def _check_conceptclip(path, pretrained):
    """ConceptCLIP's config and remote code (always: the architecture is built from them) and, with
    pretrained, its weights: in the --conceptclip-path folder, else the Hugging Face cache when offline."""
    path = str(path)
    flag, fix = "--conceptclip-path", ("download it once on a machine with network access (huggingface-cli "
                                       f"download {DEFAULT_CONCEPTCLIP} --local-dir DIR) and pass --conceptclip-path DIR")
    weight_files = _HF_WEIGHTS
    local = Path(path).expanduser()
    if local.is_dir():
        missing = [n for n in ("config.json",) if not (local / n).is_file()]
        if pretrained and not any((local / f).is_file() for f in weight_files):
            missing.append("weights (" + " / ".join(weight_files) + ")")
        if missing:
            raise WeightsUnavailableError(f"{flag} {path}: the folder lacks {', '.join(missing)}; {fix}")
        return
    if _is_local(path):
        raise WeightsUnavailableError(f"{flag} {path}: folder not found; {fix}")
    if not _hf_offline():
        return  # transformers downloads it
    if not _hub_has(path, ("config.json",)) or (pretrained and not _hub_has(path, weight_files)):
        raise WeightsUnavailableError(f"ConceptCLIP '{path}' is not in the Hugging Face cache "
                                      f"({_hf_cache_dir() or 'the default cache'}) and offline mode (HF_HUB_OFFLINE / "
                                      f"TRANSFORMERS_OFFLINE) forbids downloading it: {fix}")


def check_weights(model_name, model_args):
    """Raise WeightsUnavailableError, in one line naming the model id and the flags, when `model_name` built
    with `model_args` needs pretrained weights (or, for ConceptCLIP, code and config) that are not on this
    machine while offline. Looks at files and the hub cache only: no model is built, nothing is downloaded.
    Scripts call it before any work; from a shell:
        python -c "import model; model.check_weights('timm', {'backbone': 'resnet18'})"
    """
    if model_name not in MODELS:
        raise ValueError(f"unknown model '{model_name}'; choose one of {sorted(MODELS)} (--model)")
    args = {**DEFAULT_MODEL_ARGS, **model_args}
    if model_name == "conceptclip":
        _check_conceptclip(args["conceptclip_path"], args["pretrained"])
        return
    if model_name in ENCODER_MODELS:
        _check_encoder(model_name, args)
        return
    sources = getattr(MODELS[model_name], "weight_sources", None)
    if sources is None:
        return  # no pretrained part (fusion heads)
    for name, weights, flag in sources(args):
        if weights is not None or args["pretrained"]:
            _check_timm_weights(name, weights, flag)


def check_timm_name(name):
    """An unknown timm name is refused with the closest known names (before weights are looked for)."""
    if not name.startswith("hf-hub:") and not timm.is_model(name.split(".")[0]):
        import difflib
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown timm model '{name}' (set by --backbone, --convnext-backbone or "
                         f"--vit-backbone){hint} (all names: timm.list_models())")


def create_backbone(name, pretrained, weights=None, img_size=None, flag="--pretrained-weights"):
    """A timm model without classifier (num_classes=0): forward_features + forward_head(pre_logits).

    Weights: `weights` (local file) wins over `pretrained` (timm hub); otherwise random init.
    img_size is passed only to models that take it (ViTs); conv nets are size-agnostic.
    """
    check_timm_name(name)
    kwargs = {"num_classes": 0}
    if img_size is not None:
        kwargs["img_size"] = img_size
    use_hub = bool(pretrained) and weights is None
    try:
        try:
            model = timm.create_model(name, pretrained=use_hub, **kwargs)
        except TypeError as e:
            # conv nets have no img_size argument; they accept any input size anyway
            if "img_size" not in str(e):
                raise
            kwargs.pop("img_size")
            model = timm.create_model(name, pretrained=use_hub, **kwargs)
    except RuntimeError as e:
        if not use_hub or "Unknown model" in str(e):
            raise
        raise WeightsUnavailableError(f"could not load the pretrained timm weights of '{name}' ({_first_line(e)}). "
                                      + _weights_hint()) from e
    except Exception as e:  # hub/offline errors come as OSError, HTTP or hub-specific errors
        if not use_hub:
            raise
        raise WeightsUnavailableError(f"could not load the pretrained timm weights of '{name}' "
                                      f"({type(e).__name__}: {_first_line(e)}). A machine with network access "
                                      "fetches them into the cache. " + _weights_hint()) from e
    if weights is not None:
        load_backbone_weights(model, weights, flag)
    return model


def _read_state_dict(path, flag):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: file not found. " + _weights_hint())
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"{flag} {path}: cannot read the weight file ({type(e).__name__}: {e}). "
                           "Give a .pth/.safetensors file holding the timm model's state dict.") from e
    for key in ("state_dict", "model"):  # common wrappers {"state_dict": sd} / {"model": sd}
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise RuntimeError(f"{flag} {path}: expected a state dict (name -> tensor) of the timm model, "
                           f"got {type(sd).__name__}.")
    return dict(sd)


def load_backbone_weights(model, path, flag="--pretrained-weights"):
    """Load a file holding the timm model's own state dict (classifier included) strictly.

    The classifier the embedding model does not use is dropped, a ViT position embedding is
    resampled to the model's grid; any other missing, unexpected or mis-shaped weight is an error.
    """
    sd = _read_state_dict(path, flag)
    own = model.state_dict()
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    for k in list(sd):
        if k not in own and any(k == h or k.startswith(h + ".") for h in heads):
            del sd[k]
    pos = sd.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        sd["pos_embed"] = resample_abs_pos_embed(pos, new_size=model.patch_embed.grid_size,
                                                 num_prefix_tokens=prefix)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{flag} {path} does not match timm model "
                           f"'{model.pretrained_cfg.get('architecture', type(model).__name__)}': {e}\n"
                           "Give the weights of the same architecture (see --convnext-backbone / "
                           "--vit-backbone / --backbone), or use --no-pretrained.") from e


def _timm_norm(backbone):
    cfg = backbone.pretrained_cfg
    return [float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))], \
           [float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))]


def feature_shape(backbone, img_size):
    """Shape of forward_features for one img_size x img_size image, found by a dry run on the meta
    device (shapes only: no memory, no compute), so any timm model is judged by what it outputs rather
    than by its class. Raises ValueError, naming the model and the size, when the model cannot take
    that size (fixed-resolution attention biases, e.g. EfficientFormer at other than 224)."""
    # A meta twin: deepcopy with every tensor pre-mapped to a meta stand-in copies no data, keeps shared
    # weights shared, and never touches the real model.
    memo = {}
    for p in backbone.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for t in backbone.buffers():
        memo[id(t)] = torch.empty_like(t, device="meta")
    twin = copy.deepcopy(backbone, memo)
    x = torch.empty(2, 3, img_size, img_size, device="meta")  # 2: BatchNorm in train mode needs >1 value
    try:
        with torch.no_grad():
            f = twin.forward_features(x)
        if not torch.is_tensor(f):
            raise TypeError(f"forward_features returned {type(f).__name__}, not a tensor")
    except Exception as e:
        name = backbone.pretrained_cfg.get("architecture", type(backbone).__name__)
        default = backbone.pretrained_cfg.get("input_size", (None,))[-1]
        hint = f" (its default size is {default})" if default else ""
        raise ValueError(f"timm model '{name}' cannot take {img_size} x {img_size} inputs{hint}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:200]}. Choose another --img-size "
                         "or another backbone.") from e
    return tuple(f.shape)


def is_spatial(shape, backbone):
    """An NCHW map (B, C, H, W) with C the feature width: what MXA, a CAM and simcam act on."""
    return len(shape) == 4 and shape[1] == backbone.num_features


def mxa_init_keeps_ranking(backbone, exact=False):
    """Whether the backbone's pooled output is unchanged by a new MXA block (the feature map times
    MXA.INIT_SCALE): up to a positive factor (exact=False: an L2 normalisation or a bias-free projection
    follows) or as is (exact=True: a fusion with other features follows). Checked on the head itself, since a
    timm head may add a LayerNorm (scale-free up to its eps), a conv or an activation after pooling."""
    g = torch.Generator().manual_seed(0)  # a private generator: the model's initialisation must not depend on this
    p = next(backbone.parameters())
    f = 3 * torch.randn(4, backbone.num_features, 2, 2, generator=g).to(p.device, p.dtype)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            a, b = (backbone.forward_head(x, pre_logits=True).flatten(1).float() for x in (f, f * MXA.INIT_SCALE))
    finally:
        backbone.train(was_training)
    if not exact:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return torch.allclose(a, b, rtol=1e-3, atol=1e-4)


def _pooled_width(backbone):
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


# ----------------------------------------------------------------------------------------------
# Models

class EmbeddingModel(nn.Module):
    """Shared behaviour: frozen backbones stay frozen (and in eval mode), grad checkpointing."""

    model_name = None
    ARG_NAMES = ()

    def __init__(self):
        super().__init__()
        self.notes = []  # what was decided while building (e.g. MXA skipped), printed and checkpointed

    def pretrained_modules(self):
        return []

    def _finish(self, model_args, freeze_backbone):
        self.model_args = model_args
        self.frozen = bool(freeze_backbone)
        if self.frozen:
            for m in self.pretrained_modules():
                m.requires_grad_(False)
            self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        if getattr(self, "frozen", False):
            # frozen weights also mean frozen BatchNorm statistics and no dropout noise
            for m in self.pretrained_modules():
                m.eval()
        return self

    def set_grad_checkpointing(self, enable=True):
        for m in self.pretrained_modules():
            m.set_grad_checkpointing(enable)


class TimmEmbedding(EmbeddingModel):
    """One timm backbone: features -> [MXA on NCHW maps] -> timm's pre-logits pooling -> [Linear]."""

    model_name = "timm"
    ARG_NAMES = ("backbone", "embedding_dim", "img_size", "pretrained", "pretrained_weights",
                 "use_mxa", "freeze_backbone")

    def __init__(self, backbone, embedding_dim=None, img_size=384, pretrained=True,
                 pretrained_weights=None, use_mxa=True, freeze_backbone=None):
        super().__init__()
        if not backbone:
            raise ValueError(f"model '{self.model_name}' needs a timm model name: --backbone NAME "
                             "(e.g. --backbone convnextv2_atto)")
        self.backbone = create_backbone(backbone, pretrained, pretrained_weights, img_size)
        shape = feature_shape(self.backbone, img_size)  # also refuses a size the model cannot take
        spatial = is_spatial(shape, self.backbone)
        if use_mxa and not spatial:
            # ViT / MLP-Mixer / ResMLP / gMLP / LeViT / CoaT give tokens (B, N, C), Swin an NHWC map:
            # nothing MXA's spatial attention could act on. Said in the log and the checkpoint.
            self.notes.append(f"MXA not applied: timm model '{backbone}' gives features of shape "
                              f"{tuple(shape)} at {img_size} px, not a spatial (B, C, H, W) map")
        use_mxa = bool(use_mxa) and spatial  # stored as what is applied
        self.mxa = MXA(self.backbone.num_features) if use_mxa else None
        if use_mxa and (pretrained or pretrained_weights) and not mxa_init_keeps_ranking(self.backbone):
            self.notes.append(f"a new MXA block scales the feature map by {MXA.INIT_SCALE} and the head of timm "
                              f"model '{backbone}' is not scale-free after pooling, so the untrained block changes "
                              "the pretrained features' ranking; use --no-mxa for a frozen-feature baseline")
        width = _pooled_width(self.backbone)
        self.proj = nn.Linear(width, embedding_dim) if embedding_dim else None
        if self.proj is not None:
            # bias-free at the start: with it the untrained MXA's constant scale would shift the ranking
            nn.init.zeros_(self.proj.bias)
        self.embedding_dim = embedding_dim or width
        mean, std = _timm_norm(self.backbone)
        self.data_config = {"img_size": img_size, "mean": mean, "std": std, "resize_mode": "crop"}
        self._finish({"backbone": backbone, "embedding_dim": embedding_dim, "img_size": img_size,
                      "pretrained": bool(pretrained), "pretrained_weights": pretrained_weights,
                      "use_mxa": use_mxa, "freeze_backbone": bool(freeze_backbone)}, freeze_backbone)

    @classmethod
    def weight_sources(cls, a):
        """[(timm name, local weight file or None, its flag)] of this model's pretrained parts (check_weights)."""
        return [(a["backbone"], a["pretrained_weights"], "--pretrained-weights")] if a["backbone"] else []

    def pretrained_modules(self):
        return [self.backbone]

    def features(self, x):
        f = self.backbone.forward_features(x)  # (B, C, H, W) conv nets, (B, N, C) ViTs
        if self.mxa is not None:
            f = self.mxa(f)
        return self.backbone.forward_head(f, pre_logits=True)  # GAP (+ head norm) / CLS token

    def forward(self, x):
        z = self.features(x)
        if self.proj is not None:
            z = self.proj(z)
        return F.normalize(z, dim=1)


class ConvNeXtV2Embedding(TimmEmbedding):
    model_name = "convnextv2"
    ARG_NAMES = ("convnext_backbone", "embedding_dim", "img_size", "pretrained",
                 "pretrained_weights", "use_mxa", "freeze_backbone")

    @classmethod
    def weight_sources(cls, a):
        return [(a["convnext_backbone"], a["pretrained_weights"], "--pretrained-weights")]

    def __init__(self, convnext_backbone=DEFAULT_CONVNEXT, use_mxa=True, **kw):
        super().__init__(convnext_backbone, use_mxa=use_mxa, **kw)
        self.model_args = {"convnext_backbone": self.model_args.pop("backbone"), **self.model_args}


class ViTEmbedding(TimmEmbedding):
    model_name = "vit"
    ARG_NAMES = ("vit_backbone", "embedding_dim", "img_size", "pretrained", "pretrained_weights",
                 "freeze_backbone")

    @classmethod
    def weight_sources(cls, a):
        return [(a["vit_backbone"], a["pretrained_weights"], "--pretrained-weights")]

    def __init__(self, vit_backbone=DEFAULT_VIT, **kw):
        super().__init__(vit_backbone, use_mxa=False, **kw)
        self.model_args.pop("use_mxa")
        self.model_args = {"vit_backbone": self.model_args.pop("backbone"), **self.model_args}


class _FixedBackbone(TimmEmbedding):
    """Classic baselines: a fixed timm architecture, plain GAP, no attention block."""
    ARG_NAMES = ("embedding_dim", "img_size", "pretrained", "pretrained_weights", "freeze_backbone")
    TIMM_NAME = None

    @classmethod
    def weight_sources(cls, a):
        return [(cls.TIMM_NAME, a["pretrained_weights"], "--pretrained-weights")]

    def __init__(self, **kw):
        super().__init__(self.TIMM_NAME, use_mxa=False, **kw)
        for k in ("backbone", "use_mxa"):
            self.model_args.pop(k)


class ResNet50Embedding(_FixedBackbone):
    model_name = "resnet50"
    TIMM_NAME = "resnet50"


class DenseNet121Embedding(_FixedBackbone):
    model_name = "densenet121"
    TIMM_NAME = "densenet121"


class HybridConvNeXtViT(EmbeddingModel):
    """The paper's hybrid: ConvNeXtV2 last stage -> MXA -> GAP  ||  ViT CLS token,
    concat -> Linear -> LayerNorm -> ReLU -> Linear(D, D) -> L2 normalise."""

    model_name = "hybrid_convnext_vit"
    ARG_NAMES = ("embedding_dim", "img_size", "pretrained", "convnext_backbone", "vit_backbone",
                 "convnext_weights", "vit_weights", "use_mxa", "freeze_backbone")

    def __init__(self, embedding_dim=HYBRID_DEFAULT_DIM, img_size=384, pretrained=True,
                 convnext_backbone=DEFAULT_CONVNEXT, vit_backbone=DEFAULT_VIT,
                 convnext_weights=None, vit_weights=None, use_mxa=True, freeze_backbone=None):
        super().__init__()
        embedding_dim = embedding_dim or HYBRID_DEFAULT_DIM
        self.convnext = create_backbone(convnext_backbone, pretrained, convnext_weights,
                                        flag="--convnext-weights")
        self.vit = create_backbone(vit_backbone, pretrained, vit_weights, img_size,
                                   flag="--vit-weights")
        if not is_spatial(feature_shape(self.convnext, img_size), self.convnext):
            raise ValueError(f"--convnext-backbone {convnext_backbone} does not give an NCHW feature "
                             "map; the hybrid's first branch must be a conv net (e.g. convnextv2_atto)")
        self.mxa = MXA(self.convnext.num_features) if use_mxa else None
        if use_mxa and (pretrained or convnext_weights) and not mxa_init_keeps_ranking(self.convnext, exact=True):
            # the pooled conv features meet the ViT's in one Linear: here only a scale-invariant head is harmless
            self.notes.append(f"a new MXA block scales the feature map by {MXA.INIT_SCALE} and the head of "
                              f"'{convnext_backbone}' has no LayerNorm to undo it, so the untrained block changes "
                              "the conv branch's weight in the fusion")
        self.conv_dim = _pooled_width(self.convnext)  # 1024 for ConvNeXtV2-B
        self.vit_dim = _pooled_width(self.vit)        # 768 for ViT-B
        self.fusion = nn.Sequential(
            nn.Linear(self.conv_dim + self.vit_dim, embedding_dim),
            nn.LayerNorm(embedding_dim),
            nn.ReLU(inplace=True),
            nn.Linear(embedding_dim, embedding_dim),
        )
        self.embedding_dim = embedding_dim
        # The input is normalised for the ConvNeXt branch; the ViT may have been pretrained with
        # another mean/std (ImageNet vs 0.5), so its branch re-normalises: x_vit = x * a + b.
        c_mean, c_std = _timm_norm(self.convnext)
        v_mean, v_std = _timm_norm(self.vit)
        cm, cs, vm, vs = (torch.tensor(v).view(1, 3, 1, 1) for v in (c_mean, c_std, v_mean, v_std))
        self.register_buffer("vit_scale", cs / vs, persistent=False)
        self.register_buffer("vit_shift", (cm - vm) / vs, persistent=False)
        self.data_config = {"img_size": img_size, "mean": c_mean, "std": c_std, "resize_mode": "crop"}
        self._finish({"embedding_dim": embedding_dim, "img_size": img_size,
                      "pretrained": bool(pretrained), "convnext_backbone": convnext_backbone,
                      "vit_backbone": vit_backbone, "convnext_weights": convnext_weights,
                      "vit_weights": vit_weights, "use_mxa": bool(use_mxa),
                      "freeze_backbone": bool(freeze_backbone)}, freeze_backbone)

    @classmethod
    def weight_sources(cls, a):
        return [(a["convnext_backbone"], a["convnext_weights"], "--convnext-weights"),
                (a["vit_backbone"], a["vit_weights"], "--vit-weights")]

    def pretrained_modules(self):
        return [self.convnext, self.vit]

    def forward(self, x):
        c = self.convnext.forward_features(x)                 # (B, Cc, h, w)
        if self.mxa is not None:
            c = self.mxa(c)
        c = self.convnext.forward_head(c, pre_logits=True)    # (B, Cc) GAP + head norm
        xv = x * self.vit_scale + self.vit_shift
        v = self.vit.forward_head(self.vit.forward_features(xv), pre_logits=True)  # (B, Cv) CLS
        return F.normalize(self.fusion(torch.cat([c, v], dim=1)), dim=1)


class ConceptCLIPEmbedding(EmbeddingModel):
    """Image tower of ConceptCLIP (HF remote code), frozen by default, optional trainable Linear.

    Encoding: `encode_image(pixel_values)` of the remote model (tuple -> first item = pooled image
    features), else `model(pixel_values=...)["image_features"]`. Preprocessing comes from its
    processor: squash resize to the processor's size and its own mean/std (0.5 for SigLIP).
    """

    model_name = "conceptclip"
    ARG_NAMES = ("conceptclip_path", "conceptclip_batch_size", "conceptclip_head", "embedding_dim",
                 "pretrained", "freeze_backbone")

    def __init__(self, conceptclip_path=DEFAULT_CONCEPTCLIP, conceptclip_batch_size=8,
                 conceptclip_head=False, embedding_dim=None, pretrained=True, freeze_backbone=None):
        super().__init__()
        if int(conceptclip_batch_size) < 1:
            raise ValueError(f"--conceptclip-batch-size must be >= 1, got {conceptclip_batch_size}")
        if embedding_dim and not conceptclip_head:
            raise ValueError("--embedding-dim with --model conceptclip needs --conceptclip-head "
                             "(a trainable projection); without it the native width is used")
        freeze_backbone = True if freeze_backbone is None else bool(freeze_backbone)
        self.clip, processor = _load_conceptclip(conceptclip_path, pretrained)
        self.data_config = _processor_data_config(processor, conceptclip_path)
        self.micro_batch = int(conceptclip_batch_size)
        # width of the image features: one dummy image through the tower (configs of remote code
        # name it differently), done once here so the head exists before any optimizer sees it.
        s = self.data_config["img_size"]
        was_training = self.clip.training
        self.clip.eval()
        with torch.no_grad():
            width = self._encode(torch.zeros(1, 3, s, s)).shape[1]
        self.clip.train(was_training)
        self.head = nn.Linear(width, embedding_dim or width) if conceptclip_head else None
        self.embedding_dim = (embedding_dim or width) if conceptclip_head else width
        self._finish({"conceptclip_path": str(conceptclip_path),
                      "conceptclip_batch_size": self.micro_batch,
                      "conceptclip_head": bool(conceptclip_head), "embedding_dim": embedding_dim,
                      "pretrained": bool(pretrained), "freeze_backbone": freeze_backbone},
                     freeze_backbone)

    def pretrained_modules(self):
        return [self.clip]

    def set_grad_checkpointing(self, enable=True):
        if self.frozen:
            return  # no backward through the tower, nothing to checkpoint
        if not getattr(self.clip, "supports_gradient_checkpointing", False):
            raise ValueError("--grad-checkpointing: the ConceptCLIP remote code does not support "
                             "gradient checkpointing; drop the flag or freeze the backbone")
        if enable:
            self.clip.gradient_checkpointing_enable()
        else:
            self.clip.gradient_checkpointing_disable()

    def _encode(self, x):
        if hasattr(self.clip, "encode_image"):
            out = self.clip.encode_image(x)
        else:
            out = self.clip(pixel_values=x)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["image_features"]
        elif isinstance(out, (tuple, list)):
            out = out[0]  # (pooled features, token features)
        return out.float()

    def forward(self, x):
        # micro-batches bound the memory of the 400M-parameter tower; frozen -> no graph kept
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            z = torch.cat([self._encode(chunk) for chunk in x.split(self.micro_batch)])
        if self.head is not None:
            z = self.head(z)
        return F.normalize(z, dim=1)


def _load_conceptclip(path, pretrained):
    from transformers import AutoConfig, AutoModel, AutoProcessor
    hint = ("Give a local copy of the model with --conceptclip-path DIR (a folder holding its "
            "config.json, remote code and weights, e.g. from `huggingface-cli download "
            f"{DEFAULT_CONCEPTCLIP} --local-dir DIR`), or run once with network access to fill "
            "the Hugging Face cache.")
    try:
        if pretrained:
            model = AutoModel.from_pretrained(str(path), trust_remote_code=True)
        else:  # checkpoint reload: architecture only, the weights come from the checkpoint
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=True)
            model = AutoModel.from_config(config, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=True)
    except (OSError, ValueError, ImportError) as e:
        raise WeightsUnavailableError(f"could not load ConceptCLIP from '{path}' ({type(e).__name__}: "
                                      f"{_first_line(e)}). " + hint) from e
    return model, processor


def _processor_data_config(processor, path):
    ip = getattr(processor, "image_processor", processor)
    size = getattr(ip, "size", None)
    if isinstance(size, dict) and "height" in size and "width" in size:
        if size["height"] != size["width"]:
            raise ValueError(f"ConceptCLIP processor at '{path}' resizes to a non-square "
                             f"{size}; only square sizes are supported")
        side = int(size["height"])
    elif isinstance(size, int):
        side = size
    else:
        raise ValueError(f"ConceptCLIP processor at '{path}' has size={size!r}; expected "
                         "{'height': S, 'width': S} (a squash resize)")
    if getattr(ip, "do_rescale", True) and abs(getattr(ip, "rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise ValueError(f"ConceptCLIP processor at '{path}' rescales by {ip.rescale_factor}, "
                         "not 1/255 as ToTensor does")
    if getattr(ip, "do_normalize", True):
        mean, std = list(ip.image_mean), list(ip.image_std)
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    # transformers' PILImageResampling: 2 = BILINEAR, 3 = BICUBIC (SigLIP processors use bicubic).
    resample = int(getattr(ip, "resample", 3))
    if resample not in (2, 3):
        raise ValueError(f"ConceptCLIP processor at '{path}' resamples with PIL filter {resample}; "
                         "only bilinear (2) and bicubic (3) are supported")
    return {"img_size": side, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "resize_mode": "squash", "interpolation": "bicubic" if resample == 3 else "bilinear"}


# ----------------------------------------------------------------------------------------------
# CXR foundation encoders (issue 21): each loaded with the library its authors publish it for, frozen by
# default, [-> trainable Linear (--encoder-head)]. The table is the one place that says, per encoder, where the
# weights come from and where the preprocessing is read; `--help`, encoder_info() and each set's meta show it.

ENCODERS = {
    "raddino": {
        "id": "microsoft/rad-dino", "library": "transformers AutoModel (Dinov2Model)",
        "input": "518 px (shorter side 518, centre crop)", "channels": 3,
        "normalisation": "its AutoImageProcessor (preprocessor_config.json)", "output": "CLS token (pooler_output)",
        "dim": 768, "licence": "MSRLA (Microsoft Research Licence Agreement)", "gated": False,
        "fetch": "huggingface-cli download microsoft/rad-dino --local-dir DIR"},
    "biomedclip": {
        "id": "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "library": "open_clip (hf-hub: / local-dir:)",
        "input": "224 px (shorter side 224, centre crop)", "channels": 3,
        "normalisation": "open_clip's preprocess (open_clip_config.json preprocess_cfg)", "output": "encode_image",
        "dim": 512, "licence": "MIT", "gated": False,
        "fetch": "huggingface-cli download microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 --local-dir DIR; "
                 "huggingface-cli download microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract config.json "
                 "(its text tower's config, read from the cache)"},
    "medsiglip": {
        "id": "google/medsiglip-448", "library": "transformers AutoModel (SiglipModel)",
        "input": "448 px (squash)", "channels": 3,
        "normalisation": "its AutoImageProcessor (SiglipImageProcessor)", "output": "get_image_features (pooled)",
        "dim": 1152, "licence": "Health AI Developer Foundations terms of use", "gated": True,
        "fetch": "accept the terms on huggingface.co/google/medsiglip-448, huggingface-cli login, then "
                 "huggingface-cli download google/medsiglip-448 --local-dir DIR"},
    "xrv": {
        "id": "densenet121-res224-all", "library": "torchxrayvision (--backbone densenet121-res224-all | "
                                                  "resnet50-res512-all)",
        "input": "224 px (densenet) / 512 px (resnet): centre square crop, resize", "channels": 1,
        "normalisation": "torchxrayvision: one channel in [-1024, 1024] (xrv.utils.normalize(img, 255)), "
                         "XRayCenterCrop, XRayResizer",
        "output": "features2 (densenet) / pooled layer4 (resnet)", "dim": 1024, "licence": "Apache-2.0",
        "gated": False,
        "fetch": "python -c \"import torchxrayvision as xrv; xrv.models.get_weights('NAME')\" (fills "
                 "~/.torchxrayvision/models_data/; copy that folder and pass --pretrained-weights DIR)",
        "variants": {"densenet121-res224-all": {"size": 224, "dim": 1024},
                     "resnet50-res512-all": {"size": 512, "dim": 2048}}},
    "dinov2": {
        "id": "facebook/dinov2-base", "library": "transformers AutoModel (Dinov2Model)",
        "input": "224 px (shorter side 256, centre crop 224)", "channels": 3,
        "normalisation": "its AutoImageProcessor (BitImageProcessor)", "output": "CLS token (pooler_output)",
        "dim": 768, "licence": "Apache-2.0", "gated": False,
        "fetch": "huggingface-cli download facebook/dinov2-base --local-dir DIR"},
    "clip": {
        "id": "openai/clip-vit-large-patch14", "library": "transformers AutoModel (CLIPModel)",
        "input": "224 px (shorter side 224, centre crop)", "channels": 3,
        "normalisation": "its AutoImageProcessor (CLIPImageProcessor)", "output": "get_image_features",
        "dim": 768, "licence": "MIT", "gated": False,
        "fetch": "huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR"},
}


def encoders_help():
    """The table as text for --help: one entry per encoder."""
    return "; ".join(f"{name}: {r['id']}, {r['input']}, {r['channels']} channel(s), normalisation from "
                     f"{r['normalisation']}, {r['dim'] if 'variants' not in r else '1024 / 2048'}-d, licence "
                     f"{r['licence']}{', GATED' if r['gated'] else ''}" for name, r in ENCODERS.items())


def encoder_row(name):
    """A copy of ENCODERS[name] as an embedding set's meta shows it (the xrv variants table left out)."""
    return {k: v for k, v in ENCODERS[name].items() if k != "variants"}


def encoder_info(model):
    """The ENCODERS row of `model` (a copy, with the weights source, backbone, input size and dim it was built
    with), or None for models that are not foundation encoders. For an embedding set's meta."""
    model = _unwrap(model)
    if not isinstance(model, FoundationEncoder):
        return None
    row = encoder_row(model.model_name)
    row.update(name=model.model_name, source=model.source or "torchxrayvision's cache (~/.torchxrayvision)",
               input_size=int(model.data_config["img_size"]), native_dim=int(model.native_dim),
               embedding_dim=int(model.embedding_dim), head=model.head is not None)
    if model.model_name == "xrv":
        row.update(id=model.variant, dim=int(model.native_dim))
    return row


# torchxrayvision bundles a baseline (jfhealthcare) whose code does `from model.utils import ...` with its folder
# put first on sys.path: beside this toolkit's model.py that import fails ('model' is not a package), and on its
# own it leaves its `model` package in sys.modules and its folders on sys.path. While torchxrayvision is first
# imported, this toolkit's `model` is stepped aside and afterwards restored, and sys.path put back; the finder
# below does it for any `import torchxrayvision` made after this module was imported, whoever makes it.

class _IsolatedLoader:
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        import sys
        ours = {k: sys.modules.pop(k) for k in [k for k in sys.modules if k == "model" or k.startswith("model.")]}
        path = list(sys.path)
        try:
            self.loader.exec_module(module)
        finally:
            for k in [k for k in sys.modules if k == "model" or k.startswith("model.")]:
                del sys.modules[k]  # torchxrayvision's baseline's own `model` package: its classes keep working
            sys.modules.update(ours)
            sys.path[:] = path


class _TorchXRayVisionFinder:
    """A meta path finder that acts on the one name `torchxrayvision` and on nothing else."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchxrayvision":
            return None
        import importlib.machinery
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _IsolatedLoader(spec.loader)
        return spec


def _install_xrv_finder():
    import sys
    if not any(type(f).__name__ == "_TorchXRayVisionFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchXRayVisionFinder())


_install_xrv_finder()


def import_torchxrayvision():
    """torchxrayvision, imported beside this toolkit's model.py (see _TorchXRayVisionFinder)."""
    try:
        import torchxrayvision
    except ImportError as e:
        raise ImportError(f"--model xrv needs torchxrayvision: pip install 'torchxrayvision>=1.5,<1.6' ({e})") from e
    return torchxrayvision


def _encoder_source(name, pretrained_weights):
    """The weights source of encoder `name`: --pretrained-weights (local folder or hub id) or the official id."""
    if name == "xrv":
        return str(Path(pretrained_weights).expanduser()) if pretrained_weights else None
    src = str(pretrained_weights or ENCODERS[name]["id"])
    return src[len("hf-hub:"):] if src.startswith("hf-hub:") else src


_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                      "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")


def _xrv_variant(backbone):
    variants = ENCODERS["xrv"]["variants"]
    v = backbone or ENCODERS["xrv"]["id"]
    if v not in variants:
        raise ValueError(f"--model xrv --backbone {v}: choose one of {sorted(variants)}")
    return v


def _xrv_weight_file(variant, folder):
    """(expected local file, url) of torchxrayvision weights `variant` in `folder` (default its own cache)."""
    xrv = import_torchxrayvision()
    url = xrv.models.model_urls[variant]["weights_url"]
    folder = folder or xrv.utils.get_cache_dir()
    return Path(folder).expanduser() / os.path.basename(url), url


def _check_encoder(name, args):
    """check_weights for the foundation encoders: config, processor and (pretrained) weights of encoder `name`
    in the --pretrained-weights folder, else in the Hugging Face cache when offline. Files only, no network."""
    row, pretrained = ENCODERS[name], bool(args["pretrained"])
    if name == "xrv":
        variant = _xrv_variant(args.get("backbone"))
        if not pretrained:
            return
        folder = _encoder_source(name, args.get("pretrained_weights"))
        path, url = _xrv_weight_file(variant, folder)
        if path.is_file():
            return
        fix = (f"fetch it once on a machine with network access ({row['fetch'].replace('NAME', variant)}, or wget "
               f"{url} -O DIR/{path.name}) and pass --pretrained-weights DIR, or use --no-pretrained")
        if folder is not None:
            raise WeightsUnavailableError(f"--pretrained-weights {folder}: no torchxrayvision weights {path.name} "
                                          f"({variant}) in the folder; {fix}")
        if _hf_offline():
            raise WeightsUnavailableError(f"torchxrayvision weights {variant} ({path}) are not on this machine and "
                                          f"offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) forbids "
                                          f"downloading them: {fix}")
        return  # torchxrayvision downloads them
    src = _encoder_source(name, args.get("pretrained_weights"))
    fetch = row["fetch"] + ", then --pretrained-weights DIR"
    weights = _OPEN_CLIP_WEIGHTS if name == "biomedclip" else _HF_WEIGHTS
    needed = ("open_clip_config.json",) if name == "biomedclip" else ("config.json", "preprocessor_config.json")
    if _is_local(src):
        local = Path(src).expanduser()
        if not local.is_dir():
            raise WeightsUnavailableError(f"--pretrained-weights {src}: folder not found ({name}, {row['id']}); "
                                          f"fetch it on a machine with network access: {fetch}")
        missing = [n for n in needed if not (local / n).is_file()]
        if pretrained and not any((local / f).is_file() for f in weights):
            missing.append("weights (" + " / ".join(weights) + ")")
        if missing:
            raise WeightsUnavailableError(f"--pretrained-weights {src}: the folder lacks {', '.join(missing)} of "
                                          f"{name} ({row['id']}); fetch it on a machine with network access: {fetch}")
        return
    if not _hf_offline():
        return  # the library downloads it (a gated model needs `huggingface-cli login` first)
    if not all(_hub_has(src, (n,)) for n in needed) or (pretrained and not _hub_has(src, weights)):
        raise WeightsUnavailableError(
            f"{name} weights '{src}' are not in the Hugging Face cache ({_hf_cache_dir() or 'the default cache'}) and "
            f"offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) forbids downloading them: on a machine with "
            f"network access run {fetch}" + (" (a gated model: accept its terms first)" if row["gated"] else ""))


def _hf_data_config(ip, src):
    """The eval transform's settings read from a Hugging Face image processor: its resize (shortest_edge + centre
    crop, or a squash to height x width), filter, rescale and mean/std. Crop offsets round down as its own do."""
    size, what = getattr(ip, "size", None), f"the image processor of '{src}'"
    size = dict(size) if size is not None and not isinstance(size, int) else {"shortest_edge": size}
    if "shortest_edge" in size and size["shortest_edge"]:
        crop = dict(getattr(ip, "crop_size", None) or {})
        if not getattr(ip, "do_center_crop", False) or crop.get("height") != crop.get("width"):
            raise ValueError(f"{what} resizes the shorter side without a square centre crop ({size}, crop {crop}); "
                             "only square inputs are supported")
        cfg = {"img_size": int(crop["height"]), "resize_size": int(size["shortest_edge"]), "resize_mode": "crop",
               "crop_rounding": "floor"}
    elif size.get("height") and size.get("height") == size.get("width"):
        cfg = {"img_size": int(size["height"]), "resize_mode": "squash"}
    else:
        raise ValueError(f"{what} has size={size!r}; expected {{'shortest_edge': S}} or a square {{'height', 'width'}}")
    if getattr(ip, "do_rescale", True) and abs(float(getattr(ip, "rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise ValueError(f"{what} rescales by {ip.rescale_factor}, not 1/255 as ToTensor does")
    resample = int(getattr(ip, "resample", 3))
    if resample not in (2, 3):
        raise ValueError(f"{what} resamples with PIL filter {resample}; only bilinear (2) and bicubic (3) are "
                         "supported")
    mean, std = (ip.image_mean, ip.image_std) if getattr(ip, "do_normalize", True) else ([0.0] * 3, [1.0] * 3)
    return {**cfg, "mean": [float(v) for v in mean], "std": [float(v) for v in std], "channels": 3,
            "interpolation": "bicubic" if resample == 3 else "bilinear"}


class XRayVisionTransform:
    """torchxrayvision's preprocessing of a PIL image: 8-bit pixels to [-1024, 1024] (xrv.utils.normalize(img,
    255)), the channels averaged to one, XRayCenterCrop (the centre square), XRayResizer(size) -> (1, S, S).
    train: a random horizontal flip first (the toolkit's augmentation for every model). Picklable (workers)."""

    def __init__(self, size, train=False):
        self.size, self.train = int(size), bool(train)

    def __call__(self, img):
        xrv = import_torchxrayvision()
        a = np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB") else img)
        a = xrv.utils.normalize(a, 255)
        a = a.mean(2)[None] if a.ndim == 3 else a[None]  # (1, H, W)
        if self.train and torch.rand(()) < 0.5:
            a = np.ascontiguousarray(a[:, :, ::-1])
        a = xrv.datasets.XRayResizer(self.size)(xrv.datasets.XRayCenterCrop()(a))
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def __repr__(self):
        return f"XRayVisionTransform(size={self.size}, train={self.train})"


class FoundationEncoder(EmbeddingModel):
    """Shared behaviour of the foundation encoders: the tower (`self.net`, frozen by default) maps the input to its
    native features, micro-batched; an optional trainable Linear (--encoder-head) maps them to --embedding-dim;
    the output is L2-normalised. Subclasses load the tower and its processor (`_load`), encode (`_encode`) and
    give the layer the CAM methods explain (`explain_layer() -> (module, reshape)`). A text tower, where there is one, stays frozen and
    `encode_text(prompts) -> (T, D)` (has_text_tower = True) embeds prompts in the image embeddings' space."""

    ARG_NAMES = ("pretrained_weights", "embedding_dim", "encoder_head", "encoder_batch_size", "pretrained",
                 "freeze_backbone")
    has_text_tower = False
    # load_checkpoint keeps --pretrained-weights: the architecture is rebuilt from that folder's config
    config_from_weights_source = True

    def __init__(self, pretrained_weights=None, embedding_dim=None, encoder_head=False, encoder_batch_size=8,
                 pretrained=True, freeze_backbone=None, backbone=None):
        super().__init__()
        if int(encoder_batch_size) < 1:
            raise ValueError(f"--encoder-batch-size must be >= 1, got {encoder_batch_size}")
        if embedding_dim and not encoder_head:
            raise ValueError(f"--embedding-dim with --model {self.model_name} needs --encoder-head (a trainable "
                             "projection); without it the encoder's native width is used")
        freeze_backbone = True if freeze_backbone is None else bool(freeze_backbone)
        self.source = _encoder_source(self.model_name, pretrained_weights)
        self.net, self.data_config, self.native_dim = self._load(self.source, bool(pretrained), backbone)
        for n, p in self.net.named_parameters():
            if not self._is_image_param(n):
                p.requires_grad_(False)  # the text tower: no gradient from an image loss, no DDP unused parameters
        self.micro_batch = int(encoder_batch_size)
        self.head = nn.Linear(self.native_dim, embedding_dim or self.native_dim) if encoder_head else None
        self.embedding_dim = self.head.out_features if self.head is not None else int(self.native_dim)
        args = {"pretrained_weights": pretrained_weights if pretrained_weights is None else str(pretrained_weights),
                "embedding_dim": embedding_dim, "encoder_head": bool(encoder_head),
                "encoder_batch_size": self.micro_batch, "pretrained": bool(pretrained),
                "freeze_backbone": freeze_backbone}
        if "backbone" in self.ARG_NAMES:
            args["backbone"] = backbone
        self._finish(args, freeze_backbone)

    def _is_image_param(self, name):
        return True

    def _unavailable(self, src, e):
        """The one-line error of a failed load of the tower from `src`."""
        return WeightsUnavailableError(f"could not load {self.model_name} from '{src}' ({type(e).__name__}: "
                                       f"{_first_line(e)}); on a machine with network access run "
                                       f"{ENCODERS[self.model_name]['fetch']} and pass --pretrained-weights DIR")

    def pretrained_modules(self):
        return [self.net]

    def set_grad_checkpointing(self, enable=True):
        if self.frozen:
            return  # no backward through the tower
        if not getattr(self.net, "supports_gradient_checkpointing", False):
            raise ValueError(f"--grad-checkpointing: --model {self.model_name} does not support it; drop the flag")
        if enable:
            self.net.gradient_checkpointing_enable()
        else:
            self.net.gradient_checkpointing_disable()

    def forward(self, x):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            z = torch.cat([self._encode(chunk).float() for chunk in x.split(self.micro_batch)])
        if self.head is not None:
            z = self.head(z)
        return F.normalize(z, dim=1)

    def _text_check(self):
        if self.head is not None:
            raise ValueError(f"encode_text: --model {self.model_name} was built with --encoder-head, whose "
                             "projection maps image features only; text and image embeddings then live in "
                             "different spaces. Use the encoder without the head for text prompts")

    def logit_scale(self):
        """The learned temperature of the image-text logits (exp of the model's logit_scale), for zero-shot
        scores as the model computes them (concepts.py); text-tower models only."""
        if not self.has_text_tower:
            raise ValueError(f"--model {self.model_name} has no text tower")
        return float(self.net.logit_scale.detach().float().exp())


class _HFVisionEncoder(FoundationEncoder):
    """A transformers model (AutoModel) and its AutoImageProcessor: local folder (no network) or hub id."""

    def _load(self, src, pretrained, backbone):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel
        try:
            if pretrained:
                net = AutoModel.from_pretrained(src)
            else:  # checkpoint reload: the architecture from its config, the weights from the checkpoint
                net = AutoModel.from_config(AutoConfig.from_pretrained(src))
            ip = AutoImageProcessor.from_pretrained(src)
        except (OSError, ValueError) as e:
            raise self._unavailable(src, e) from e
        return net, _hf_data_config(ip, src), self._width(net.config)


class RadDinoEncoder(_HFVisionEncoder):
    """`raddino`: RAD-DINO (DINOv2 ViT-B/14 on chest X-rays), CLS token of the last layer norm (768)."""
    model_name = "raddino"

    def _width(self, config):
        return config.hidden_size

    def _encode(self, x):
        return self.net(pixel_values=x).pooler_output  # layernorm(CLS)

    def explain_layer(self):
        layers = self.net.encoder.layer
        prefix = 1 + int(getattr(self.net.config, "num_register_tokens", 0) or 0)  # class + register tokens
        return layers[-1].norm1, (lambda t: tokens_to_map(t, prefix))


class DinoV2Encoder(RadDinoEncoder):
    """`dinov2`: DINOv2 ViT-B/14 (natural images), CLS token (768): the generic self-supervised baseline."""
    model_name = "dinov2"


class _HFCLIPEncoder(_HFVisionEncoder):
    """A transformers CLIP-style model: image features from get_image_features, text from get_text_features."""
    has_text_tower = True
    prefix_tokens = 1

    def _is_image_param(self, name):
        return name.startswith(("vision_model.", "visual_projection."))

    def _encode(self, x):
        out = self.net.get_image_features(pixel_values=x)
        return out if torch.is_tensor(out) else out.pooler_output

    def explain_layer(self):
        layers = self.net.vision_model.encoder.layers
        n = self.prefix_tokens
        return layers[-1].layer_norm1, (lambda t: tokens_to_map(t, n))

    def _tokenizer(self):
        if getattr(self, "_tok", None) is None:
            from transformers import AutoTokenizer
            self._tok = AutoTokenizer.from_pretrained(self.source)
        return self._tok

    @torch.no_grad()
    def encode_text(self, prompts):
        self._text_check()
        tok = self._tokenizer()(list(prompts), truncation=True, return_tensors="pt", **self.text_kwargs())
        dev = next(self.net.parameters()).device
        feats = self.net.get_text_features(**{k: v.to(dev) for k, v in tok.items() if k in self.text_inputs})
        feats = feats if torch.is_tensor(feats) else feats.pooler_output
        return F.normalize(feats.float(), dim=1)


class CLIPEncoder(_HFCLIPEncoder):
    """`clip`: OpenAI CLIP ViT-L/14 (transformers), image embeds (768): the generic vision-language baseline."""
    model_name = "clip"
    text_inputs = ("input_ids", "attention_mask")

    def _width(self, config):
        return config.projection_dim

    def text_kwargs(self):
        return {"padding": True, "max_length": self.net.config.text_config.max_position_embeddings}


class MedSigLIPEncoder(_HFCLIPEncoder):
    """`medsiglip`: MedSigLIP-448 (SigLIP), pooled image features (1152). SigLIP has no class token: every token
    is a patch. Its text tower was trained on prompts padded to the full length, without attention mask."""
    model_name = "medsiglip"
    prefix_tokens = 0
    text_inputs = ("input_ids",)

    def _width(self, config):
        return config.vision_config.hidden_size

    def _is_image_param(self, name):
        return name.startswith("vision_model.")

    def text_kwargs(self):
        return {"padding": "max_length", "max_length": self.net.config.text_config.max_position_embeddings}


class BiomedCLIPEncoder(FoundationEncoder):
    """`biomedclip`: BiomedCLIP through open_clip (timm ViT-B/16 trunk, PubMedBERT text), encode_image (512)."""
    model_name = "biomedclip"
    has_text_tower = True

    def _open_clip_name(self, src):
        return f"local-dir:{Path(src).expanduser()}" if _is_local(src) else f"hf-hub:{src}"

    def _load(self, src, pretrained, backbone):
        import open_clip
        try:
            net = open_clip.create_model(self._open_clip_name(src), load_weights=pretrained,
                                         require_pretrained=pretrained, pretrained_image=False, pretrained_text=False)
        except (OSError, ValueError, RuntimeError) as e:
            raise self._unavailable(src, e) from e
        pc = dict(net.visual.preprocess_cfg)
        size = pc["size"] if isinstance(pc["size"], int) else pc["size"][0]
        if not isinstance(pc["size"], int) and pc["size"][0] != pc["size"][1]:
            raise ValueError(f"biomedclip '{src}': non-square input {pc['size']} is not supported")
        modes = {"shortest": {"resize_mode": "crop", "resize_size": int(size), "crop_rounding": "round"},
                 "squash": {"resize_mode": "squash"}}
        if pc.get("resize_mode", "shortest") not in modes or pc.get("interpolation", "bicubic") not in ("bicubic",
                                                                                                       "bilinear"):
            raise ValueError(f"biomedclip '{src}': open_clip preprocess {pc} is not supported")
        cfg = {"img_size": int(size), **modes[pc.get("resize_mode", "shortest")],
               "mean": [float(v) for v in pc["mean"]], "std": [float(v) for v in pc["std"]], "channels": 3,
               "interpolation": pc.get("interpolation", "bicubic")}
        with torch.no_grad():  # open_clip's configs name the width differently per tower: ask the tower
            width = net.encode_image(torch.zeros(1, 3, size, size)).shape[1]
        return net, cfg, width

    def _is_image_param(self, name):
        return name.startswith("visual.")

    def set_grad_checkpointing(self, enable=True):
        if not self.frozen:
            self.net.set_grad_checkpointing(enable)

    def _encode(self, x):
        return self.net.encode_image(x)

    def explain_layer(self):
        trunk = self.net.visual.trunk
        n = int(getattr(trunk, "num_prefix_tokens", 1))
        return trunk.blocks[-1].norm1, (lambda t: tokens_to_map(t, n))

    @torch.no_grad()
    def encode_text(self, prompts):
        self._text_check()
        if getattr(self, "_tok", None) is None:
            import open_clip
            self._tok = open_clip.get_tokenizer(self._open_clip_name(self.source))
        dev = next(self.net.parameters()).device
        return F.normalize(self.net.encode_text(self._tok(list(prompts)).to(dev)).float(), dim=1)


class XRayVisionEncoder(FoundationEncoder):
    """`xrv`: torchxrayvision's DenseNet-121 (features2, 1024) or ResNet-50 (pooled layer4, 2048), both trained on
    the union of public CXR sets ('-all'), one channel in [-1024, 1024]. Their classifiers are dropped (Identity):
    the embedding never uses them, and a rebuild without the weight file (checkpoint reload) has the same keys.
    --pretrained-weights: a folder holding torchxrayvision's weight file (default its ~/.torchxrayvision cache)."""
    model_name = "xrv"
    ARG_NAMES = FoundationEncoder.ARG_NAMES + ("backbone",)
    config_from_weights_source = False  # the architecture is in code

    def _load(self, folder, pretrained, backbone):
        xrv = import_torchxrayvision()
        self.variant = _xrv_variant(backbone)
        if pretrained:
            path, _ = _xrv_weight_file(self.variant, folder)
            if not path.is_file():
                raise WeightsUnavailableError(f"torchxrayvision weights {path} not found; "
                                              f"{ENCODERS['xrv']['fetch'].replace('NAME', self.variant)}")
        if self.variant.startswith("densenet"):
            net = xrv.models.DenseNet(weights=self.variant if pretrained else None, cache_dir=folder)
            width = net.classifier.in_features
            net.classifier, net.op_threshs = nn.Identity(), None
        else:
            if pretrained:
                net = xrv.models.ResNet(weights=self.variant, cache_dir=folder).model
            else:  # the architecture torchxrayvision builds before loading its file
                import torchvision
                net = torchvision.models.resnet50(num_classes=len(xrv.models.model_urls[self.variant]["labels"]),
                                                  weights=None)
                net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
            width = net.fc.in_features
            net.fc = nn.Identity()
        size = ENCODERS["xrv"]["variants"][self.variant]["size"]
        # [-1024, 1024] == Normalize(0.5, 1 / 2048) after ToTensor: said so for tools that undo the normalisation
        cfg = {"img_size": size, "resize_mode": "crop", "resize_size": size, "crop_rounding": "floor",
               "mean": [0.5], "std": [1 / 2048], "channels": 1, "pipeline": "torchxrayvision",
               "interpolation": "bilinear"}
        return net, cfg, width

    def set_grad_checkpointing(self, enable=True):
        if enable and not self.frozen:
            raise ValueError("--grad-checkpointing: --model xrv does not support it; drop the flag")

    def _encode(self, x):
        if self.variant.startswith("densenet"):
            return self.net.features2(x)  # relu(norm5) -> global average pool
        m = self.net  # torchxrayvision's ResNet.features, its input already at 512 px
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
        return torch.flatten(m.avgpool(x), 1)

    def explain_layer(self):
        if self.variant.startswith("densenet"):
            return self.net.features.norm5, (lambda t: t)
        return self.net.layer4, (lambda t: t)


ENCODER_MODELS = {"raddino": RadDinoEncoder, "biomedclip": BiomedCLIPEncoder, "medsiglip": MedSigLIPEncoder,
                  "xrv": XRayVisionEncoder, "dinov2": DinoV2Encoder, "clip": CLIPEncoder}


# ----------------------------------------------------------------------------------------------
# The explain demo's model (issue 22): a small conv net fine enough for saliency maps, trained on 2 CPU cores
# in minutes. Its backbone speaks timm's interface (forward_features, forward_head, feature_info), so it is a
# TimmEmbedding for explain_layers, linear_gap_head (simcam) and checkpoints.

class _SmallConvNet(nn.Module):
    """stem (stride 2) + 4 stages (3x3 conv, BatchNorm, ReLU, twice; stride 2, 2, 2, 1): at 128 px the stage
    maps are 32, 16, 8 and 8 pixels square; plain global average pool as head."""

    def __init__(self, widths=(16, 32, 64, 64), strides=(2, 2, 2, 1)):
        super().__init__()
        def block(cin, cout, s):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, s, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.stages = nn.Sequential(*[block(a, b, s) for a, b, s in zip((widths[0],) + widths[:-1], widths, strides)])
        self.num_features = widths[-1]
        red = [2 * int(np.prod(strides[:i + 1])) for i in range(len(widths))]
        self.feature_info = [{"module": f"stages.{i}", "num_chs": w, "reduction": r}
                             for i, (w, r) in enumerate(zip(widths, red))]
        self.pretrained_cfg = {"architecture": "small_convnet", "mean": (0.5,) * 3, "std": (0.25,) * 3}

    def forward_features(self, x):  # (B, 3, S, S) -> (B, C, S / 16, S / 16)
        return self.stages(self.stem(x))

    def forward_head(self, f, pre_logits=True):
        return f.mean(dim=(2, 3))

    def set_grad_checkpointing(self, enable=True):
        pass  # too small to need it


class SmallConvNetEmbedding(TimmEmbedding):
    """`democnn`: _SmallConvNet -> GAP [-> Linear]: linear on pooled features, so simcam's split is exact."""

    model_name = "democnn"
    ARG_NAMES = ("embedding_dim", "img_size", "pretrained", "freeze_backbone")

    @classmethod
    def weight_sources(cls, a):
        return []  # random init only: nothing to download

    def __init__(self, embedding_dim=None, img_size=128, pretrained=False, freeze_backbone=None):  # no weights exist
        EmbeddingModel.__init__(self)
        self.backbone = _SmallConvNet()
        self.mxa = None
        self.proj = nn.Linear(self.backbone.num_features, embedding_dim) if embedding_dim else None
        self.embedding_dim = embedding_dim or self.backbone.num_features
        mean, std = _timm_norm(self.backbone)
        self.data_config = {"img_size": img_size, "mean": mean, "std": std, "resize_mode": "crop"}
        self._finish({"embedding_dim": embedding_dim, "img_size": img_size,
                      "freeze_backbone": bool(freeze_backbone)}, freeze_backbone)


MODELS = {
    "convnextv2": ConvNeXtV2Embedding,
    "vit": ViTEmbedding,
    "hybrid_convnext_vit": HybridConvNeXtViT,
    "resnet50": ResNet50Embedding,
    "densenet121": DenseNet121Embedding,
    "timm": TimmEmbedding,
    "conceptclip": ConceptCLIPEmbedding,
    **ENCODER_MODELS,
    "democnn": SmallConvNetEmbedding,
}


# ----------------------------------------------------------------------------------------------
# Factory, transform, CLI

def build_model(name, **model_args):
    """Build a registered model. Arguments a model does not use are ignored (with a warning when
    they differ from their default); unknown argument names are an error."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of {sorted(MODELS)} (--model)")
    unknown = sorted(set(model_args) - set(DEFAULT_MODEL_ARGS))
    if unknown:
        raise ValueError(f"unknown model arguments {unknown}; known: {sorted(DEFAULT_MODEL_ARGS)}")
    cls = MODELS[name]
    ignored = [_FLAG[k] for k, v in model_args.items()
               if k not in cls.ARG_NAMES and v != DEFAULT_MODEL_ARGS[k] and v is not None]
    if ignored:
        warnings.warn(f"--model {name} ignores {', '.join(ignored)}", stacklevel=2)
    kwargs = {k: model_args.get(k, DEFAULT_MODEL_ARGS[k]) for k in cls.ARG_NAMES}
    if kwargs.get("embedding_dim") is not None and int(kwargs["embedding_dim"]) < 1:
        raise ValueError(f"--embedding-dim must be >= 1, got {kwargs['embedding_dim']}")
    model = cls(**kwargs)
    for note in getattr(model, "notes", ()):
        if utils.is_main_process():
            print(f"note: {note}")
    return model


def _unwrap(model):
    model = getattr(model, "module", model)       # DistributedDataParallel
    return getattr(model, "_orig_mod", model)     # torch.compile


@torch.no_grad()
def compute_embeddings(model, loader, device, amp_dtype=None, channels_last=False, progress=False,
                       desc="embedding"):
    """Embed every batch of `loader` (items (image, label, index) as ImageListDataset's).

    Returns (indices int64 (n,), embeddings float32 (n, D)) in loader order. The model's train/eval
    mode is restored afterwards. The one embedding loop underneath embeddings.embed_dataset, which every
    script calls: it places the rows by index in list order and gathers torchrun shards.
    """
    was_training = model.training
    model.eval()
    idx, out = [], []
    from utils import Progress  # a bar on a terminal, a periodic line in a log: long extractions never look hung
    for images, _, index in Progress(loader, desc=desc, unit="batches", enabled=progress):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out.append(model(images).float().cpu())
        idx.append(torch.as_tensor(index))
    model.train(was_training)
    if not out:  # an empty shard under torchrun
        return np.zeros(0, np.int64), np.zeros((0, _unwrap(model).embedding_dim), np.float32)
    return torch.cat(idx).numpy().astype(np.int64), torch.cat(out).numpy()


def get_transform(model, train=False, rand_resize=False):
    """The transform for `model` (its data_config), shared by training, testing and extraction."""
    from dataset import build_transform
    cfg = _unwrap(model).data_config
    if cfg is None:  # a fusion head takes saved embeddings, not images
        raise ValueError(f"model '{_unwrap(model).model_name}' is not an image model and has no image transform; "
                         "use an image model's checkpoint (written by train.py)")
    if cfg.get("pipeline") == "torchxrayvision":  # one channel in [-1024, 1024], torchxrayvision's own crop and resize
        return XRayVisionTransform(cfg["img_size"], train=train)
    # resize_size / crop_rounding: read from a foundation encoder's processor (absent: the toolkit's own 1.125 x)
    return build_transform(cfg["img_size"], cfg["mean"], cfg["std"], train=train,
                           rand_resize=rand_resize, resize_mode=cfg["resize_mode"],
                           interpolation=cfg.get("interpolation", "bilinear"),
                           resize_size=cfg.get("resize_size"), crop_rounding=cfg.get("crop_rounding", "round"))


def get_model_parser():
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="hybrid_convnext_vit", choices=sorted(set(MODELS) - {"fusion"}),
                   help="embedding model (docs/models.md)")
    g.add_argument("--embedding-dim", type=int, default=None,
                   help="output width (default: native width; hybrid_convnext_vit: 1024)")
    g.add_argument("--backbone", default=None, help="timm model name for --model timm; torchxrayvision weights for "
                   "--model xrv (densenet121-res224-all, the default, or resnet50-res512-all)")
    g.add_argument("--convnext-backbone", default=DEFAULT_CONVNEXT,
                   help="timm name of the ConvNeXt (convnextv2, hybrid), e.g. convnextv2_atto")
    g.add_argument("--vit-backbone", default=DEFAULT_VIT,
                   help="timm name of the ViT (vit, hybrid), e.g. vit_tiny_patch16_224")
    g.add_argument("--no-mxa", dest="use_mxa", action="store_false",
                   help="ablate the channel+spatial attention block")
    g.add_argument("--img-size", type=int, default=384, help="square input size in pixels")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="random initialisation (no download)")
    g.add_argument("--pretrained-weights", default=None,
                   help="local timm state dict (.pth/.safetensors) for single-backbone models; for a foundation "
                        "encoder a local folder (no network) or a hub id (default: its official id)")
    g.add_argument("--convnext-weights", default=None, help="local ConvNeXt state dict (hybrid)")
    g.add_argument("--vit-weights", default=None, help="local ViT state dict (hybrid)")
    g.add_argument("--conceptclip-path", default=DEFAULT_CONCEPTCLIP,
                   help="HF id or local folder of ConceptCLIP")
    g.add_argument("--conceptclip-batch-size", type=int, default=8,
                   help="micro-batch size through the ConceptCLIP tower")
    g.add_argument("--conceptclip-head", action="store_true",
                   help="add a trainable Linear after ConceptCLIP")
    g.add_argument("--encoder-head", action="store_true",
                   help="add a trainable Linear after a foundation encoder (--embedding-dim sets its width)")
    g.add_argument("--encoder-batch-size", type=int, default=8,
                   help="micro-batch size through a foundation encoder's tower")
    g.add_argument("--freeze-backbone", action=argparse.BooleanOptionalAction, default=None,
                   help="freeze pretrained backbone weights (default: off; on for conceptclip and the foundation "
                        "encoders)")
    e = p.add_argument_group("foundation encoders (--model NAME: hub id, input, normalisation source, dim, licence; "
                             "weights: fetch on a networked machine, then --pretrained-weights DIR)",
                             description=encoders_help())
    return p


def model_args_from_cli(args):
    """(model name, model_args dict) from parsed get_model_parser() flags."""
    return args.model, {k: getattr(args, k) for k in DEFAULT_MODEL_ARGS}


# ----------------------------------------------------------------------------------------------
# Checkpoints

class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: the message says which file, why, and what to do."""


_RESERVED = ("format", "format_version", "model_name", "model_args", "embedding_dim", "model", "model_notes")


def make_checkpoint(model, **extra):
    """A plain dict (tensors, numbers, strings) loadable with torch.load(weights_only=True)."""
    model = _unwrap(model)
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"make_checkpoint: extra keys {clash} are reserved")
    return {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
            "model_name": model.model_name, "model_args": copy.deepcopy(model.model_args),
            "embedding_dim": int(model.embedding_dim), "model": model.state_dict(),
            "model_notes": list(getattr(model, "notes", [])), **extra}


# What a checkpoint holds, by the use a caller can make of it: "image" models embed images (every tool with
# --resume), a "fusion" head (train_fusion.py) maps saved embeddings to fused ones (train_fusion.py --apply).
CHECKPOINT_KINDS = ("image", "fusion")


def checkpoint_kind(ckpt):
    return "fusion" if ckpt.get("model_name") == "fusion" else "image"


def check_checkpoint_kind(path, ckpt, kind):
    """CheckpointError, in one line naming the file and where it can be used, when `ckpt` is not of `kind`."""
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"checkpoint kind {kind!r}: choose one of {CHECKPOINT_KINDS}")
    found = checkpoint_kind(ckpt)
    if found == kind:
        return
    if found == "fusion":
        raise CheckpointError(f"checkpoint {path} is a learned fusion head (train_fusion.py) over saved embeddings, "
                              f"not an image model: use it with train_fusion.py --apply {path} --embeddings ...; "
                              "give this tool a checkpoint written by train.py")
    raise CheckpointError(f"checkpoint {path} is an image model ('{ckpt.get('model_name')}', written by train.py), "
                          "not a fusion head: give train_fusion.py --apply a *_best_ckpt.pth written by "
                          "train_fusion.py, and this file to extract_embeddings.py / test.py --resume")


def read_checkpoint(path, map_location="cpu", kind="image"):
    """torch.load a toolkit checkpoint (weights_only) and check its format; no model is built.

    kind: "image" (default: what every --resume takes), "fusion" (train_fusion.py --apply) or None (any)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; check the path (--resume)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}): the file is truncated "
                              "or not a torch file. Use another checkpoint (e.g. *_best_ckpt.pth) "
                              "or retrain.") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
            raise CheckpointError(f"{path} is a bare state dict, not a checkpoint of this toolkit; "
                                  "backbone weights go to --pretrained-weights / --convnext-weights "
                                  "/ --vit-weights")
        raise CheckpointError(f"{path} is not a checkpoint of this toolkit (no format "
                              f"'{CHECKPOINT_FORMAT}'); give a file written by train.py")
    if ckpt.get("format_version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has format version {ckpt['format_version']}, newer than this "
                              f"code ({CHECKPOINT_VERSION}); update the toolkit")
    for key in ("model_name", "model_args", "model"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path} lacks '{key}'; the file is damaged")
    if kind is not None:
        check_checkpoint_kind(path, ckpt, kind)
    return ckpt


def load_checkpoint(path, map_location="cpu", expected_model=None, expected_embedding_dim=None, kind=None):
    """Rebuild the model from the checkpoint alone (pretrained=False: no download), load its
    weights strictly, return (model in eval mode, checkpoint dict).

    kind: the kind of checkpoint the caller can use, "image" (image models; the default) or "fusion"
    (train_fusion.py --apply); another kind is a one-line CheckpointError before any model is built.
    kind=None keeps the older call load_checkpoint(path, expected_model="fusion") working: it means "fusion"
    when expected_model is "fusion", else "image"."""
    if kind is None:
        kind = "fusion" if expected_model == "fusion" else "image"
    ckpt = read_checkpoint(path, map_location, kind=kind)
    name, stored = ckpt["model_name"], ckpt["model_args"]
    if expected_model is not None and name != expected_model:
        raise CheckpointError(f"checkpoint {path} holds model '{name}', but --model {expected_model} "
                              f"was asked for; use --model {name} or another checkpoint")
    if name not in MODELS:
        raise CheckpointError(f"checkpoint {path} holds unknown model '{name}'")
    args = dict(stored, pretrained=False)
    keep = getattr(MODELS[name], "config_from_weights_source", False)  # foundation encoders: the folder's config
    for k in ("pretrained_weights", "convnext_weights", "vit_weights"):
        if k in args and not (keep and k == "pretrained_weights"):
            args[k] = None  # the checkpoint holds the weights; the original files need not exist
    model = build_model(name, **args)
    if expected_embedding_dim is not None and model.embedding_dim != expected_embedding_dim:
        raise CheckpointError(f"checkpoint {path} gives {model.embedding_dim}-d embeddings, but "
                              f"--embedding-dim {expected_embedding_dim} was asked for; drop the flag "
                              "or use a matching checkpoint")
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not match model '{name}' built from its "
                              f"model_args: {e}") from e
    model.model_args = copy.deepcopy(stored)  # keep provenance (pretrained source) when re-saved
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval(), ckpt


# ----------------------------------------------------------------------------------------------
# Explanations (explain.py): which layer of each model to explain, how to read it as a map

class ExplainSpec:
    """What explain.py's CAM methods hook in a model.

    layers: [(branch name, module)] whose OUTPUT is explained (pytorch-grad-cam target layers);
    reshape: activation or gradient of any of those layers -> (B, C, h, w); combine: how the branches'
    maps make one map (None for a single branch).
    """

    def __init__(self, layers, reshape, combine=None):
        self.layers, self.reshape, self.combine = list(layers), reshape, combine

    @property
    def names(self):
        return [n for n, _ in self.layers]


def tokens_to_map(t, num_prefix_tokens):
    """(B, N, C) tokens -> (B, C, g, g): prefix tokens (class / register) dropped, the rest a square grid.
    NCHW maps pass through, so one function serves the hybrid's conv and token branches."""
    if t.ndim == 4:
        return t
    n = t.shape[1] - num_prefix_tokens
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"cannot read {t.shape[1]} tokens with {num_prefix_tokens} prefix tokens as a square "
                         "grid of patches; this token model has no spatial map to explain")
    return t[:, num_prefix_tokens:].reshape(t.shape[0], g, g, t.shape[2]).permute(0, 3, 1, 2)


def _timm_explain_layer(backbone, mxa, what):
    """(module, reshape) of a timm backbone's last spatial map: conv nets at the last feature map
    (after MXA when there is one, before pooling); ViTs at the last block's norm1 (prefix tokens dropped);
    NHWC models (Swin) at the last stage, permuted."""
    if mxa is not None:
        return mxa, (lambda t: t)
    info = getattr(backbone, "feature_info", None)
    blocks = getattr(backbone, "blocks", None)
    if hasattr(backbone, "patch_embed") and blocks is not None and len(blocks) and hasattr(blocks[-1], "norm1"):
        prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        return blocks[-1].norm1, (lambda t: tokens_to_map(t, prefix))
    if info:
        last = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
        module = backbone.get_submodule(last)
        if getattr(backbone, "output_fmt", "NCHW") == "NHWC":
            return module, (lambda t: t.permute(0, 3, 1, 2) if t.ndim == 4 else t)
        return module, (lambda t: t)
    raise ValueError(f"{what} has no spatial feature map (no feature_info, no patch tokens) for the CAM methods; "
                     "use --method sbsm (occlusion, works on any model) or random")


def _conceptclip_explain_layer(clip):
    """The SigLIP image tower's last block norm1: a timm ViT trunk (open_clip layout, visual.trunk) or an HF
    SigLIP vision model (vision_model.encoder.layers). SigLIP has no class token: every token is a patch
    (27 x 27 at 384 px), so none is dropped unless the trunk says it has prefix tokens."""
    for prefix in ("visual.trunk", "vision_model", "visual", "model.visual.trunk"):
        try:
            tower = clip.get_submodule(prefix)
        except AttributeError:
            continue
        blocks = getattr(tower, "blocks", None)
        if blocks is not None and len(blocks) and hasattr(blocks[-1], "norm1"):
            n = int(getattr(tower, "num_prefix_tokens", 0))
            return f"{prefix}.blocks.{len(blocks) - 1}.norm1", blocks[-1].norm1, n
        layers = getattr(getattr(tower, "encoder", None), "layers", None)
        if layers is not None and len(layers) and hasattr(layers[-1], "layer_norm1"):
            return f"{prefix}.encoder.layers.{len(layers) - 1}.layer_norm1", layers[-1].layer_norm1, 0
    raise ValueError("ConceptCLIP: no SigLIP image tower found (looked for visual.trunk.blocks[-1].norm1 and "
                     "vision_model.encoder.layers[-1].layer_norm1); the CAM methods cannot hook it; use --method sbsm")


def explain_layers(model):
    """ExplainSpec of `model` for the CAM methods; ValueError (naming the model) when it has no spatial map."""
    model = _unwrap(model)
    if isinstance(model, HybridConvNeXtViT):
        vit_prefix = int(getattr(model.vit, "num_prefix_tokens", 1))
        conv = model.mxa if model.mxa is not None else _timm_explain_layer(model.convnext, None, "the ConvNeXt")[0]
        return ExplainSpec([("convnext", conv), ("vit", model.vit.blocks[-1].norm1)],
                           lambda t: tokens_to_map(t, vit_prefix),
                           combine="mean of the two branch maps, each ReLU'd and min-max scaled to [0, 1] at the "
                                   "input size (pytorch-grad-cam's multi-layer rule)")
    if isinstance(model, TimmEmbedding):
        module, reshape = _timm_explain_layer(model.backbone, model.mxa,
                                              f"timm model '{model.backbone.pretrained_cfg.get('architecture', '?')}'")
        return ExplainSpec([("backbone", module)], reshape)
    if isinstance(model, ConceptCLIPEmbedding):
        _, module, prefix = _conceptclip_explain_layer(model.clip)
        return ExplainSpec([("siglip", module)], lambda t: tokens_to_map(t, prefix))
    if isinstance(model, FoundationEncoder):  # token grids with their prefix tokens dropped; conv maps as they are
        module, reshape = model.explain_layer()
        return ExplainSpec([(model.model_name, module)], reshape)
    raise ValueError(f"no explanation layers are known for {type(model).__name__}; use --method sbsm or random")


def linear_gap_head(model):
    """For simcam: (feature_map_fn x -> (B, C, h, w), weight (D, C) or None, bias (D,) or None) of a model whose
    embedding is normalize(W @ mean_hw(feature map) + b). Checked numerically on the model's own head, so a
    head LayerNorm (ConvNeXt), a class token (ViT) or a non-linear fusion (hybrid) is a ValueError."""
    model = _unwrap(model)
    if not isinstance(model, TimmEmbedding) or not is_spatial(
            feature_shape(model.backbone, model.data_config["img_size"]), model.backbone):
        raise ValueError(f"simcam needs an embedding that is a linear map of globally average-pooled conv features; "
                         f"{getattr(model, 'model_name', type(model).__name__)} is not one (token or fused model); "
                         "use gradcam or sbsm")
    bb = model.backbone
    with torch.no_grad():
        f = torch.randn(2, bb.num_features, 3, 3, device=next(model.parameters()).device)
        pooled = bb.forward_head(f, pre_logits=True)
        if pooled.shape != (2, bb.num_features) or not torch.allclose(pooled, f.mean(dim=(2, 3)), atol=1e-5):
            raise ValueError(f"simcam: the head of '{bb.pretrained_cfg.get('architecture', '?')}' is not a plain "
                             "global average pool (e.g. ConvNeXt pools then applies a LayerNorm), so the cosine "
                             "does not split exactly over locations; use gradcam or sbsm")

    def feature_map(x):
        f = bb.forward_features(x)
        return model.mxa(f) if model.mxa is not None else f

    proj = model.proj
    return feature_map, (None if proj is None else proj.weight), (None if proj is None else proj.bias)


# ----------------------------------------------------------------------------------------------
# Learned fusion heads on frozen embeddings (train_fusion.py), registered as model "fusion".
# Its own block: the configuration travels in the existing `backbone` and `embedding_dim` model arguments
# ("fusion-{head}:{d1},{d2},...") so that DEFAULT_MODEL_ARGS and the image models' CLI stay untouched, and
# load_checkpoint rebuilds it like any other model.

FUSION_HEADS = ("concat", "mlp", "gated")


def fusion_spec(head, input_dims):
    return f"fusion-{head}:" + ",".join(str(int(d)) for d in input_dims)


def parse_fusion_spec(spec):
    """'fusion-gated:256,512' -> ('gated', [256, 512]); a clear error for anything else."""
    try:
        kind, dims = str(spec).split(":")
        head = kind[len("fusion-"):] if kind.startswith("fusion-") else None
        dims = [int(d) for d in dims.split(",")]
    except ValueError:
        head, dims = None, []
    if head not in FUSION_HEADS or len(dims) < 2 or min(dims) < 1:
        raise ValueError(f"fusion head spec {spec!r}: expected 'fusion-{{{','.join(FUSION_HEADS)}}}:D1,D2[,...]'")
    return head, dims


class FusionHead(nn.Module):
    """Fuse M frozen embeddings of one image; input (B, D1 + ... + DM), each block L2-normalised first.

    concat: Linear over the concatenation. mlp: Linear-LayerNorm-ReLU-Linear (the paper's fusion block).
    gated: each input projected to the output width and normalised, then mixed with per-image softmax weights
    computed from the concatenation. The output is L2-normalised, as every model of this registry.
    """
    model_name = "fusion"
    ARG_NAMES = ("backbone", "embedding_dim", "pretrained")

    def __init__(self, backbone=None, embedding_dim=None, pretrained=False):
        super().__init__()
        self.head, self.input_dims = parse_fusion_spec(backbone)
        total = sum(self.input_dims)
        self.embedding_dim = int(embedding_dim or 128)
        e = self.embedding_dim
        if self.head == "concat":
            self.proj = nn.Linear(total, e)
        elif self.head == "mlp":
            self.proj = nn.Sequential(nn.Linear(total, e), nn.LayerNorm(e), nn.ReLU(inplace=True), nn.Linear(e, e))
        else:
            self.projs = nn.ModuleList(nn.Linear(d, e) for d in self.input_dims)
            self.gate = nn.Linear(total, len(self.input_dims))
        self.model_args = {"backbone": backbone, "embedding_dim": self.embedding_dim}
        # not an image model: no transform; extract_embeddings.py cannot use it (train_fusion.py --apply does)
        self.data_config = None

    def split(self, x):
        return [F.normalize(p, dim=1) for p in torch.split(x, self.input_dims, dim=1)]

    def forward(self, x):
        parts = self.split(x)
        if self.head == "gated":
            w = torch.softmax(self.gate(torch.cat(parts, 1)), dim=1)          # (B, M)
            z = torch.stack([F.normalize(p(v), dim=1) for p, v in zip(self.projs, parts)], 1)  # (B, M, E)
            return F.normalize((w.unsqueeze(2) * z).sum(1), dim=1)
        return F.normalize(self.proj(torch.cat(parts, 1)), dim=1)


MODELS["fusion"] = FusionHead
