"""model.py: attention blocks by hand, every model's output, weights files, checkpoints, CLI."""
import math

import pytest
import timm
import torch
from PIL import Image

import model as M

# timm's test_* models build in a fraction of a second; the real small ConvNeXtV2/ViT variants
# (convnextv2_atto, vit_tiny_patch16_224) are built once, in the `atto_hybrid` fixture.
BASE = {"convnext_backbone": "test_convnext", "vit_backbone": "test_vit", "img_size": 64,
        "pretrained": False}


def tiny(name, **extra):
    """BASE restricted to the arguments `name` uses (others would only warn), plus extra."""
    return {**{k: v for k, v in BASE.items() if k in M.MODELS[name].ARG_NAMES}, **extra}


@pytest.fixture(scope="module")
def atto_hybrid():
    return M.build_model("hybrid_convnext_vit", convnext_backbone="convnextv2_atto",
                         vit_backbone="vit_tiny_patch16_224", img_size=64, pretrained=False,
                         embedding_dim=40)


def sig(v):
    return 1.0 / (1.0 + math.exp(-v))


def unit_rows(z):
    return torch.allclose(z.norm(dim=1), torch.ones(z.shape[0]), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# attention blocks against hand computations

# x: 2 channels on a 1 x 2 grid. channel 0 = [1, 3], channel 1 = [2, 0]
X = torch.tensor([[[[1.0, 3.0]], [[2.0, 0.0]]]])


def test_channel_attention_by_hand():
    ca = M.ChannelAttention(2, reduction=16)  # hidden = max(2 // 16, 1) = 1
    assert ca.mlp[0].weight.shape == (1, 2, 1, 1) and ca.mlp[0].bias is None
    assert ca.mlp[2].weight.shape == (2, 1, 1, 1) and ca.mlp[2].bias is None
    with torch.no_grad():
        ca.mlp[0].weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
        ca.mlp[2].weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
    # avg = [2, 1] -> relu(2 - 1) = 1 -> [1, 2];  max = [3, 2] -> relu(3 - 2) = 1 -> [1, 2]
    # gate = sigmoid([2, 4])
    expected = torch.tensor([[[[1 * sig(2), 3 * sig(2)]], [[2 * sig(4), 0.0]]]])
    assert torch.allclose(ca(X), expected, atol=1e-6)
    # the ReLU matters: with first weights [-1, 1] both hidden values are relu(-1) = relu(-1) = 0
    with torch.no_grad():
        ca.mlp[0].weight.mul_(-1)
    assert torch.allclose(ca(X), X * 0.5, atol=1e-6)  # sigmoid(0) = 1/2


def test_spatial_attention_by_hand():
    sa = M.SpatialAttention(kernel_size=1)
    with torch.no_grad():
        sa.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))  # mean - max
    # per pixel: mean = [1.5, 1.5], max = [2, 3] -> gate = sigmoid([-0.5, -1.5])
    g = [sig(-0.5), sig(-1.5)]
    expected = torch.tensor([[[[1 * g[0], 3 * g[1]]], [[2 * g[0], 0.0]]]])
    assert torch.allclose(sa(X), expected, atol=1e-6)
    sa7 = M.SpatialAttention()  # default 7 x 7, same-size output
    assert sa7.conv.weight.shape == (1, 2, 7, 7) and sa7.conv.bias is None
    assert sa7(torch.randn(2, 5, 9, 11)).shape == (2, 5, 9, 11)
    with pytest.raises(ValueError, match="odd"):
        M.SpatialAttention(4)


def test_mxa_is_channel_then_spatial():
    mxa = M.MXA(8)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(mxa(x), mxa.sa(mxa.ca(x)))


# ---------------------------------------------------------------------------------------------
# every model: output shape and unit norm

CASES = [
    ("convnextv2", {}, 64),
    ("convnextv2", {"use_mxa": False, "embedding_dim": 32}, 32),
    ("vit", {}, 64),
    ("vit", {"img_size": 96, "embedding_dim": 16}, 16),   # 6 x 6 patches instead of 10 x 10
    ("hybrid_convnext_vit", {}, 1024),
    ("hybrid_convnext_vit", {"embedding_dim": None}, 1024),
    ("hybrid_convnext_vit", {"embedding_dim": 48, "use_mxa": False}, 48),
    ("timm", {"backbone": "test_convnext"}, 64),
    ("timm", {"backbone": "test_vit", "embedding_dim": 8}, 8),
]


@pytest.mark.parametrize("name,extra,dim", CASES)
def test_output_shape_and_unit_norm(name, extra, dim):
    model = M.build_model(name, **tiny(name, **extra)).eval()
    s = model.data_config["img_size"]
    with torch.no_grad():
        z = model(torch.randn(3, 3, s, s))
    assert z.shape == (3, dim) and model.embedding_dim == dim
    assert unit_rows(z)
    assert model.model_name == name


def test_classic_baselines_shape_and_norm():
    x = torch.randn(2, 3, 32, 32)
    for name, width in (("resnet50", 2048), ("densenet121", 1024)):
        model = M.build_model(name, img_size=32, pretrained=False).eval()
        with torch.no_grad():
            z = model(x)
        assert z.shape == (2, width) and unit_rows(z)
        assert set(model.model_args) == set(M.MODELS[name].ARG_NAMES)


def test_mxa_placement_and_timm_token_models():
    conv = M.build_model("convnextv2", **tiny("convnextv2", convnext_backbone="test_convnext2"))
    assert conv.mxa.ca.mlp[0].in_channels == 128  # last-stage width of test_convnext2
    assert M.build_model("convnextv2", **tiny("convnextv2", use_mxa=False)).mxa is None
    vit = M.build_model("timm", backbone="test_vit", img_size=64, pretrained=False)
    assert vit.mxa is None and vit.model_args["use_mxa"] is False  # stored as applied


# The smallest timm configuration of each token/NHWC family: MXA needs a (B, C, H, W) map, which these
# do not give, so the default --model timm (MXA on) must skip it rather than crash in the forward pass.
TOKEN_FAMILIES = [("resmlp_12_224", 64), ("mixer_s32_224", 64), ("gmlp_ti16_224", 64), ("levit_128s", 64),
                  ("efficientformer_l1", 224), ("coat_lite_tiny", 64), ("swin_tiny_patch4_window7_224", 64)]


@pytest.mark.parametrize("backbone,size", TOKEN_FAMILIES)
def test_timm_token_families_skip_mxa_and_say_so(backbone, size, capsys):
    m = M.build_model("timm", backbone=backbone, img_size=size, pretrained=False, embedding_dim=8).eval()
    assert "MXA not applied" in capsys.readouterr().out  # the log says so
    assert m.mxa is None and m.model_args["use_mxa"] is False
    with torch.no_grad():
        z = m(torch.randn(2, 3, size, size))
    assert z.shape == (2, 8) and unit_rows(z)
    ckpt = M.make_checkpoint(m)  # ... and the checkpoint
    assert ckpt["model_args"]["use_mxa"] is False and "MXA not applied" in ckpt["model_notes"][0]


def test_spatial_map_found_by_dry_run_not_by_class():
    # LeViT's conv variant gives an NCHW map, its token variant does not: same family, different answer
    conv = M.build_model("timm", backbone="levit_conv_128s", img_size=64, pretrained=False)
    assert conv.mxa is not None and conv.mxa.ca.mlp[0].in_channels == conv.backbone.num_features
    assert M.make_checkpoint(conv)["model_notes"] == []
    assert M.feature_shape(conv.backbone, 64) == (2, 384, 1, 1)
    # the dry run runs on a meta twin: the real model, shared weights included (CoaT), is untouched
    coat = timm.create_model("coat_lite_tiny", pretrained=False, num_classes=0, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = coat.forward_features(x)
    assert M.feature_shape(coat, 64) == (2, 5, 320)
    assert not any(t.is_meta for t in list(coat.parameters()) + list(coat.buffers()))
    with torch.no_grad():
        assert torch.equal(coat.forward_features(x), before)


def test_size_a_model_cannot_take_is_refused_with_its_default():
    with pytest.raises(ValueError, match=r"'efficientformer_l1' cannot take 64 x 64 inputs \(its default size is 224\)"):
        M.build_model("timm", backbone="efficientformer_l1", img_size=64, pretrained=False)


def test_unknown_timm_name_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean convnextv2_atto"):
        M.build_model("timm", backbone="convnextv2_atoo", pretrained=False)


def test_hybrid_widths_and_fusion_layers(atto_hybrid):
    m = atto_hybrid
    assert (m.conv_dim, m.vit_dim) == (320, 192)
    lin1, ln, relu, lin2 = m.fusion
    assert (lin1.in_features, lin1.out_features) == (512, 40)
    assert isinstance(ln, torch.nn.LayerNorm) and ln.normalized_shape == (40,)
    assert isinstance(relu, torch.nn.ReLU)
    assert (lin2.in_features, lin2.out_features) == (40, 40)
    assert m.mxa.ca.mlp[0].in_channels == 320
    with torch.no_grad():
        z = m.eval()(torch.randn(2, 3, 64, 64))
    assert z.shape == (2, 40) and unit_rows(z)


def test_hybrid_vit_branch_renormalisation(atto_hybrid):
    # input normalised with ImageNet stats (ConvNeXt); vit_tiny was trained with mean = std = 0.5:
    # pixel p -> x = (p - 0.485) / 0.229 -> x_vit = (p - 0.5) / 0.5 = x * 0.229 / 0.5 + (0.485 - 0.5) / 0.5
    m = atto_hybrid
    assert m.data_config["mean"] == [0.485, 0.456, 0.406]
    assert m.vit_scale[0, 0, 0, 0].item() == pytest.approx(0.458)
    assert m.vit_shift[0, 0, 0, 0].item() == pytest.approx(-0.03)
    assert "vit_scale" not in m.state_dict()  # derived from the backbones, not stored


def test_paper_default_hybrid_on_meta_device():
    # the real default configuration (ConvNeXtV2-B + ViT-B/16, 384 px, D = 1024) without
    # allocating or computing anything: shapes only
    with torch.device("meta"):
        m = M.build_model("hybrid_convnext_vit", pretrained=False)
        z = m(torch.empty(2, 3, 384, 384))
    assert (m.conv_dim, m.vit_dim, m.embedding_dim) == (1024, 768, 1024)
    assert m.fusion[0].in_features == 1792 and z.shape == (2, 1024)
    assert m.model_args["convnext_backbone"] == "convnextv2_base.fcmae_ft_in22k_in1k_384"
    assert m.model_args["vit_backbone"] == "vit_base_patch16_384"


# ---------------------------------------------------------------------------------------------
# freezing, parameter groups, grad checkpointing

def test_freeze_backbone_and_pretrained_modules():
    m = M.build_model("hybrid_convnext_vit", **tiny("hybrid_convnext_vit", freeze_backbone=True))
    assert m.pretrained_modules() == [m.convnext, m.vit]
    pre = {id(p) for mod in m.pretrained_modules() for p in mod.parameters()}
    assert not any(p.requires_grad for mod in m.pretrained_modules() for p in mod.parameters())
    new = [n for n, p in m.named_parameters() if id(p) not in pre]
    assert new and all(n.startswith(("mxa.", "fusion.")) for n in new)
    assert all(p.requires_grad for n, p in m.named_parameters() if id(p) not in pre)
    m.train()
    assert not m.convnext.training and not m.vit.training and m.fusion.training
    unfrozen = M.build_model("convnextv2", **tiny("convnextv2"))
    assert all(p.requires_grad for p in unfrozen.parameters())
    assert unfrozen.model_args["freeze_backbone"] is False


def test_grad_checkpointing_gives_same_output_and_grads():
    torch.manual_seed(0)
    m = M.build_model("convnextv2", **tiny("convnextv2", embedding_dim=8)).train()
    x = torch.randn(2, 3, 64, 64)
    z0 = m(x)
    z0.sum().backward()
    g0 = m.proj.weight.grad.clone()
    m.zero_grad()
    m.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in m.backbone.stages)
    z1 = m(x)
    z1.sum().backward()
    assert torch.allclose(z0, z1, atol=1e-6) and torch.allclose(g0, m.proj.weight.grad, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# local weight files and hub weights

def _timm_full(name, **kw):
    torch.manual_seed(1)
    return timm.create_model(name, pretrained=False, **kw)  # classifier included


def test_local_weights_round_trip_drops_classifier(tmp_path):
    src = _timm_full("test_convnext")
    path = tmp_path / "convnext.pth"
    torch.save({"state_dict": src.state_dict()}, path)  # wrapped, head.fc included
    m = M.build_model("convnextv2", **tiny("convnextv2", pretrained=True),
                      pretrained_weights=str(path))  # the file wins over the hub
    own = m.backbone.state_dict()
    assert "head.fc.weight" in src.state_dict() and "head.fc.weight" not in own
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in own.items())


def test_local_vit_weights_safetensors_resampled_pos_embed(tmp_path):
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed
    src = _timm_full("test_vit")  # native 160 px: 10 x 10 grid
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    m = M.build_model("hybrid_convnext_vit", **tiny("hybrid_convnext_vit"),
                      vit_weights=str(path))  # 64 px: 4 x 4 grid
    pos = m.vit.pos_embed
    assert src.pos_embed.shape == (1, 1 + 100, 64) and pos.shape == (1, 1 + 16, 64)
    assert torch.allclose(pos, resample_abs_pos_embed(src.pos_embed, new_size=(4, 4),
                                                      num_prefix_tokens=1))
    assert torch.equal(m.vit.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_local_weights_shape_mismatch_and_missing_key(tmp_path):
    wrong = tmp_path / "wider.pth"
    torch.save(_timm_full("test_convnext2").state_dict(), wrong)  # wider stages
    with pytest.raises(RuntimeError, match=r"wider\.pth does not match(.|\n)*size mismatch"):
        M.build_model("convnextv2", **tiny("convnextv2"), pretrained_weights=str(wrong))
    sd = _timm_full("test_convnext").state_dict()
    del sd["stem.0.weight"]
    partial = tmp_path / "partial.pth"
    torch.save(sd, partial)
    with pytest.raises(RuntimeError, match=r"(?s)Missing key.*stem\.0\.weight.*--no-pretrained"):
        M.build_model("hybrid_convnext_vit", **tiny("hybrid_convnext_vit"),
                      convnext_weights=str(partial))
    with pytest.raises(FileNotFoundError, match="--pretrained-weights"):
        M.build_model("vit", **tiny("vit"), pretrained_weights=str(tmp_path / "none.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_text("not a torch file")
    with pytest.raises(RuntimeError, match="cannot read the weight file"):
        M.build_model("vit", **tiny("vit"), pretrained_weights=str(junk))


def test_offline_hub_weights_give_clear_error():
    # conftest sets HF_HUB_OFFLINE=1: the hub cannot be reached, so there must be no silent
    # fall back to random weights
    with pytest.raises(RuntimeError) as err:
        M.build_model("timm", backbone="test_convnext2", img_size=64, pretrained=True)
    msg = str(err.value)
    # one line, and a ValueError: the scripts print it as their one-line error instead of a traceback
    assert isinstance(err.value, M.WeightsUnavailableError) and isinstance(err.value, ValueError)
    assert "\n" not in msg
    for flag in ("--no-pretrained", "--pretrained-weights", "--convnext-weights", "--vit-weights"):
        assert flag in msg


# ---------------------------------------------------------------------------------------------
# checkpoints

@pytest.fixture()
def saved(tmp_path):
    m = M.build_model("convnextv2", **tiny("convnextv2", embedding_dim=16)).eval()
    ckpt = M.make_checkpoint(m, epoch=3, best_metric=0.5)
    ckpt["model_args"]["pretrained"] = True  # as trained: reload must still not touch the hub
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    return m, path


def test_checkpoint_round_trip_weights_only(saved):
    m, path = saved
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "cxr-retrieval" and raw["format_version"] == 1 and raw["epoch"] == 3
    m2, ckpt = M.load_checkpoint(path, expected_model="convnextv2", expected_embedding_dim=16)
    assert not m2.training and ckpt["best_metric"] == 0.5
    assert m2.model_args == raw["model_args"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))


def test_checkpoint_errors(saved, tmp_path):
    m, path = saved
    with pytest.raises(M.CheckpointError, match="holds model 'convnextv2'.*--model vit"):
        M.load_checkpoint(path, expected_model="vit")
    with pytest.raises(M.CheckpointError, match="16-d embeddings.*--embedding-dim 32"):
        M.load_checkpoint(path, expected_embedding_dim=32)
    with pytest.raises(M.CheckpointError, match="not found"):
        M.load_checkpoint(tmp_path / "missing.pth")
    data = path.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(M.CheckpointError, match="trunc.pth cannot be read.*truncated"):
        M.load_checkpoint(tmp_path / "trunc.pth")
    torch.save({"epoch": 1, "net": {"w": torch.zeros(1)}}, tmp_path / "foreign.pth")
    with pytest.raises(M.CheckpointError, match="not a checkpoint of this toolkit"):
        M.load_checkpoint(tmp_path / "foreign.pth")
    torch.save(m.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(M.CheckpointError, match="bare state dict.*--pretrained-weights"):
        M.load_checkpoint(tmp_path / "bare.pth")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_args"]["embedding_dim"] = 8  # weights of a 16-d head, args of an 8-d one
    torch.save(ckpt, tmp_path / "mismatch.pth")
    with pytest.raises(M.CheckpointError, match="does not match model 'convnextv2'"):
        M.load_checkpoint(tmp_path / "mismatch.pth")
    with pytest.raises(ValueError, match="reserved"):
        M.make_checkpoint(m, format="other")


# ---------------------------------------------------------------------------------------------
# factory, CLI, transform

def test_build_model_argument_errors():
    with pytest.raises(ValueError, match="unknown model 'vitt'"):
        M.build_model("vitt")
    with pytest.raises(ValueError, match=r"unknown model 'raddinov2'.*'biomedclip'.*'clip'.*'dinov2'.*'medsiglip'"
                                         r".*'raddino'.*'xrv'"):  # the known names, encoders included
        M.build_model("raddinov2")
    with pytest.raises(ValueError, match="unknown model arguments"):
        M.build_model("vit", **tiny("vit"), dropout=0.1)
    with pytest.raises(ValueError, match="--backbone NAME"):
        M.build_model("timm", pretrained=False)
    with pytest.raises(ValueError, match="unknown timm model 'nope'.*--vit-backbone"):
        M.build_model("vit", vit_backbone="nope", pretrained=False)
    with pytest.warns(UserWarning, match="ignores --backbone"):
        M.build_model("vit", **tiny("vit"), backbone="resnet18")


def test_cli_flags_to_model_args():
    p = M.get_model_parser()
    args = p.parse_args(["--model", "vit", "--vit-backbone", "test_vit",
                         "--img-size", "64", "--no-pretrained", "--embedding-dim", "24"])
    name, kw = M.model_args_from_cli(args)
    assert name == "vit" and set(kw) == set(M.DEFAULT_MODEL_ARGS)
    assert kw["pretrained"] is False and kw["use_mxa"] is True and kw["freeze_backbone"] is None
    m = M.build_model(name, **kw)
    assert m.embedding_dim == 24 and m.model_args["img_size"] == 64
    args = p.parse_args(["--no-mxa", "--freeze-backbone"])
    assert args.model == "hybrid_convnext_vit" and args.use_mxa is False and args.freeze_backbone


def test_get_transform_uses_data_config():
    m = M.build_model("convnextv2", **tiny("convnextv2"))
    t = M.get_transform(m)
    img = Image.new("RGB", (100, 80), (51, 102, 204))  # 0.2, 0.4, 0.8
    x = t(img)
    assert x.shape == (3, 64, 64)
    assert m.data_config["mean"] == [0.5] * 3 and m.data_config["std"] == [0.5] * 3  # test_convnext's
    expected = [(0.2 - 0.5) / 0.5, (0.4 - 0.5) / 0.5, (0.8 - 0.5) / 0.5]
    assert torch.allclose(x[:, 32, 32], torch.tensor(expected), atol=1e-5)
    assert M.get_transform(m, train=True, rand_resize=True)(img).shape == (3, 64, 64)


# ---------------------------------------------------------------------------------------------
# a new MXA block keeps the backbone's ranking (issue 19, item 19)

def test_new_mxa_gates_are_the_constant_one_half():
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(M.ChannelAttention(8)(x), x * 0.5) and torch.equal(M.SpatialAttention()(x), x * 0.5)
    assert torch.equal(M.MXA(8)(x), x * M.MXA.INIT_SCALE) and M.MXA.INIT_SCALE == 0.25


def _without_mxa(model, name, **args):
    """The same model built with --no-mxa and given every weight of `model` but the MXA block's."""
    plain = M.build_model(name, **args, use_mxa=False).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mxa.")}, strict=True)
    return plain


@pytest.mark.parametrize("name,args", [
    ("timm", {"backbone": "test_resnet"}),                        # GAP: exact
    ("timm", {"backbone": "test_resnet", "embedding_dim": 16}),   # + projection
    ("convnextv2", {"convnext_backbone": "test_convnext"}),       # GAP + head LayerNorm (scale-free up to its eps)
])
def test_untrained_mxa_keeps_the_ranking_for_every_seed(name, args):
    x = torch.randn(6, 3, 48, 48, generator=torch.Generator().manual_seed(7))
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        with_mxa = M.build_model(name, **args, img_size=48, pretrained=False).eval()
        assert with_mxa.mxa is not None
        plain = _without_mxa(with_mxa, name, **args, img_size=48, pretrained=False)
        with torch.no_grad():
            a, b = with_mxa(x), plain(x)
        sim_a, sim_b = a @ a.T, b @ b.T
        assert torch.allclose(sim_a, sim_b, atol=1e-5), (name, seed, (sim_a - sim_b).abs().max())
        assert torch.equal(sim_a.fill_diagonal_(-2).argsort(1, descending=True),
                           sim_b.fill_diagonal_(-2).argsort(1, descending=True)), (name, seed)


def test_a_head_that_is_not_scale_free_is_said(tmp_path, capsys):
    # MobileNetV3 applies a biased conv and hardswish after pooling: x / 4 there is not a harmless scale
    for backbone, scale_free in (("mobilenetv3_small_050", False), ("test_resnet", True)):
        weights = tmp_path / f"{backbone}.pth"
        torch.save(timm.create_model(backbone, num_classes=0).state_dict(), weights)
        assert M.mxa_init_keeps_ranking(M.create_backbone(backbone, False)) is scale_free
        m = M.build_model("timm", backbone=backbone, img_size=64, pretrained_weights=str(weights))
        said = any("--no-mxa for a frozen-feature baseline" in n for n in m.notes)
        assert said is not scale_free, (backbone, m.notes)


# ---------------------------------------------------------------------------------------------
# weights checked before any work, offline (issue 19, item 18)

@pytest.fixture()
def offline_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # "without loading the model": nothing may be built or downloaded
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("check_weights built a model"))
    return tmp_path / "hf" / "hub"


def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value, ValueError)
    return msg


def test_check_weights_offline_names_the_model_and_the_flags(offline_empty_cache):
    with pytest.raises(M.WeightsUnavailableError) as err:
        M.check_weights("timm", {"backbone": "resnet18"})
    msg = _one_line(err)
    for part in ("'resnet18'", "timm/resnet18.a1_in1k", "--pretrained-weights FILE", "--no-pretrained", "network"):
        assert part in msg, part
    with pytest.raises(M.WeightsUnavailableError, match="--convnext-weights FILE"):
        M.check_weights("hybrid_convnext_vit", {})
    with pytest.raises(M.WeightsUnavailableError, match="densenet121"):
        M.check_weights("densenet121", {})
    with pytest.raises(M.WeightsUnavailableError, match="--pretrained-weights .*nope.pth: file not found"):
        M.check_weights("resnet50", {"pretrained_weights": str(offline_empty_cache / "nope.pth")})
    # nothing to fetch: random weights, or a fusion head
    assert M.check_weights("timm", {"backbone": "resnet18", "pretrained": False}) is None
    assert M.check_weights("hybrid_convnext_vit", {"pretrained": False}) is None
    assert M.check_weights("fusion", {}) is None


def test_check_weights_finds_the_hub_cache(offline_empty_cache):
    # the hub cache layout: models--ORG--NAME/snapshots/REV/FILE with refs/main naming REV
    repo = offline_empty_cache / "models--timm--resnet18.a1_in1k"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "model.safetensors").write_bytes(b"x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    assert M.check_weights("timm", {"backbone": "resnet18"}) is None
    assert M.check_weights("timm", {"backbone": "resnet18.a1_in1k"}) is None
    with pytest.raises(M.WeightsUnavailableError, match="resnet34"):
        M.check_weights("timm", {"backbone": "resnet34"})


def test_check_weights_conceptclip(offline_empty_cache, tmp_path):
    with pytest.raises(M.WeightsUnavailableError) as err:
        M.check_weights("conceptclip", {})
    msg = _one_line(err)
    assert M.DEFAULT_CONCEPTCLIP in msg and "--conceptclip-path DIR" in msg
    local = tmp_path / "cc"
    local.mkdir()
    (local / "config.json").write_text("{}")
    with pytest.raises(M.WeightsUnavailableError, match="lacks weights"):
        M.check_weights("conceptclip", {"conceptclip_path": str(local)})
    assert M.check_weights("conceptclip", {"conceptclip_path": str(local), "pretrained": False}) is None
    (local / "model.safetensors").write_bytes(b"x")
    assert M.check_weights("conceptclip", {"conceptclip_path": str(local)}) is None
    with pytest.raises(M.WeightsUnavailableError, match="folder not found"):
        M.check_weights("conceptclip", {"conceptclip_path": str(tmp_path / "missing")})


def test_check_weights_refuses_an_unknown_timm_name_as_a_typo():
    # an unknown name must not be told to try --no-pretrained (that fails too): it is a typo
    with pytest.raises(ValueError, match="unknown timm model 'resnet18x'.*did you mean resnet18"):
        M.check_weights("timm", {"backbone": "resnet18x", "pretrained": True})
