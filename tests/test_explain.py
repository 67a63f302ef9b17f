"""explain.py: saliency of similarity on known-by-construction models, scores by hand, inputs, one smoke run.

The region models' embeddings depend only on a known block of pixels (a fixed 0/1 gate on the feature map or
on the patch tokens), so every faithful map must sit there and nowhere else.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import explain as E
import model as M

SIZE, PATCH = 32, 4                        # 8 x 8 feature grid
CELLS = (slice(2, 6), slice(1, 4))         # rows 2..5, cols 1..3 of the grid
REGION = np.zeros((SIZE, SIZE), bool)
REGION[8:24, 4:16] = True                  # the same block in input pixels


class Gate(nn.Module):
    """Multiplies a (B, C, h, w) map or (B, N, C) tokens by a fixed 0/1 pattern."""

    def __init__(self, pattern):
        super().__init__()
        self.register_buffer("pattern", pattern)

    def forward(self, x):
        return x * self.pattern


def cell_pattern(grid, cells):
    p = torch.zeros(grid, grid)
    p[cells] = 1
    return p


class RegionConv(nn.Module):
    """A timm-like conv backbone: patchify conv -> gate on CELLS; head = plain GAP."""

    def __init__(self, channels=6):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, channels, PATCH, stride=PATCH, bias=False)
        self.act = nn.Identity()
        self.gate = Gate(cell_pattern(SIZE // PATCH, CELLS)[None, None])
        self.num_features = channels
        self.feature_info = [{"module": "gate", "num_chs": channels, "reduction": PATCH}]
        self.pretrained_cfg = {"architecture": "region_conv"}

    def forward_features(self, x):
        return self.gate(self.act(self.stem(x)))

    def forward_head(self, f, pre_logits=False):
        return f.mean(dim=(2, 3))


class TokenBlock(nn.Module):
    def __init__(self, width, pattern):
        super().__init__()
        self.norm1 = nn.Sequential(nn.LayerNorm(width), Gate(pattern[None, :, None]))
        self.mlp = nn.Linear(width, width)

    def forward(self, t):
        return self.norm1(t)


class RegionTokens(nn.Module):
    """A ViT-like token backbone: patch tokens (+ `prefix` class tokens) whose block output is non-zero only
    on the CELLS patches; the pooled feature is the mean over tokens."""

    def __init__(self, size, patch, cells, prefix, width=8):
        super().__init__()
        grid = size // patch
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.patch_embed.grid_size = (grid, grid)
        self.num_prefix_tokens = prefix
        self.cls_token = nn.Parameter(torch.randn(1, prefix, width)) if prefix else None
        pattern = torch.cat([torch.zeros(prefix), cell_pattern(grid, cells).reshape(-1)])
        self.blocks = nn.ModuleList([TokenBlock(width, pattern)])
        self.num_features = width
        self.pretrained_cfg = {"architecture": "region_tokens"}

    def forward_features(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], dim=1)
        return self.blocks[0](t)

    def forward_head(self, t, pre_logits=False):
        return t.mean(dim=1)

    def encode_image(self, x):  # ConceptCLIP interface: (pooled, token features)
        t = self.forward_features(x)
        return self.forward_head(t), t


def timm_like(backbone, dim=5, size=SIZE):
    """A real TimmEmbedding around a stand-in backbone (so model.explain_layers takes its real path)."""
    torch.manual_seed(0)
    m = M.TimmEmbedding.__new__(M.TimmEmbedding)
    nn.Module.__init__(m)
    m.backbone, m.mxa = backbone, None
    m.proj = nn.Linear(backbone.num_features, dim)
    m.proj.bias.data.mul_(0.05)  # small, so the features (not the bias) decide the cosine
    m.embedding_dim = dim
    m.data_config = {"img_size": size, "mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash"}
    m.model_args, m.frozen = {}, False
    return m.eval()


def conceptclip_like():
    """ConceptCLIP's layout: a frozen SigLIP-like tower, 27 x 27 patch tokens, no class token."""
    torch.manual_seed(0)
    tower = RegionTokens(54, 2, (slice(5, 14), slice(3, 9)), prefix=0)
    clip = nn.Module()
    clip.visual = nn.Module()
    clip.visual.trunk = tower
    clip.encode_image = tower.encode_image
    m = M.ConceptCLIPEmbedding.__new__(M.ConceptCLIPEmbedding)
    nn.Module.__init__(m)
    m.clip, m.head, m.micro_batch, m.embedding_dim = clip, None, 8, 8
    m.data_config = {"img_size": 54, "mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash"}
    m.model_args, m.frozen = {}, True
    m.clip.requires_grad_(False)
    region = np.zeros((54, 54), bool)
    region[10:28, 6:18] = True
    return m.eval(), region


def pair(size=SIZE, seed=0):
    """A query and a result that is like it but not too alike (at cosine 1 the cosine's gradient vanishes,
    at cosine < 0 every occlusion raises it)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, size, size, generator=g)
    return q, 0.7 * q + 0.7 * torch.randn(3, size, size, generator=g)


def far_from(region, d):
    """Pixels at Chebyshev distance > d from the region."""
    from scipy.ndimage import binary_dilation
    return ~binary_dilation(region, np.ones((2 * d + 1, 2 * d + 1), bool))


def test_region_models_depend_only_on_their_region():
    for m, region in ((timm_like(RegionConv()), REGION), conceptclip_like()):
        s = m.data_config["img_size"]
        q, _ = pair(s)
        noise = torch.randn(3, s, s) * torch.as_tensor(~region, dtype=torch.float32)
        with torch.no_grad():
            assert torch.allclose(m(q[None]), m((q + noise)[None]), atol=1e-6)
            assert not torch.allclose(m(q[None]), m((q + torch.randn(3, s, s))[None]), atol=1e-3)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"])
def test_cam_map_sits_on_the_region(method):
    m = timm_like(RegionConv())
    q, r = pair()
    with torch.no_grad():
        eq = m(q[None])[0]
    spec = M.explain_layers(m)
    assert spec.names == ["backbone"] and spec.layers[0][1] is m.backbone.gate
    maps, branches = E.cam_maps(m, spec, method, r[None], eq[None])
    assert maps.shape == (1, SIZE, SIZE) and branches == {}
    assert E.pointing_game(maps[0], REGION) == 1.0
    assert np.abs(maps[0][far_from(REGION, 2)]).max() < 1e-6  # only the bilinear upsampling's edge leaks
    assert E.mass_inside(maps[0], REGION) > 0.75  # area fraction 0.19


def test_token_layouts_vit_class_token_dropped_siglip_none():
    vit = timm_like(RegionTokens(SIZE, PATCH, CELLS, prefix=1))
    clip, clip_region = conceptclip_like()
    for m, region in ((vit, REGION), (clip, clip_region)):
        s = m.data_config["img_size"]
        spec = M.explain_layers(m)
        q, r = pair(s)
        with torch.no_grad():
            eq = m(q[None])[0]
        maps, _ = E.cam_maps(m, spec, "gradcam", r[None], eq[None])
        assert maps.shape == (1, s, s)
        assert E.pointing_game(maps[0], region) == 1.0
        assert np.abs(maps[0][far_from(region, s // 16)]).max() < 1e-6
    assert clip.frozen  # gradients were let through only during the explanation
    # dropping a token from a SigLIP grid (or keeping a ViT's class token) cannot be read as a grid
    with pytest.raises(ValueError, match="square grid"):
        M.tokens_to_map(torch.zeros(1, 27 * 27, 4), 1)
    assert M.tokens_to_map(torch.arange(2 * 5 * 3.).reshape(1, 5, 6)[:, :, :3], 1).shape == (1, 3, 2, 2)


def test_sbsm_map_sits_on_the_region_and_is_device_free():
    m = timm_like(RegionConv())
    q, r = pair()
    with torch.no_grad():
        eq = m(q[None])[0]
    r0 = r.clone()
    sal = E.sbsm_map(m, r, eq, window=8, stride=4, batch_size=7)
    assert torch.equal(r, r0)  # the image is never edited in place
    assert sal.shape == (SIZE, SIZE) and E.pointing_game(sal, REGION) == 1.0
    assert np.abs(sal[far_from(REGION, 7)]).max() < 1e-6  # windows that never touch the region change nothing
    # batching does not change the map
    assert np.allclose(sal, E.sbsm_map(m, r, eq, window=8, stride=4, batch_size=100), atol=1e-6)
    masks = E.occlusion_masks(10, 4, 3, torch.device("cpu"))
    assert masks.shape == (9, 10, 10) and masks.sum(0).min() >= 1  # starts 0, 3, 6: the last reaches the edge
    assert E.occlusion_masks(11, 4, 3, torch.device("cpu")).shape == (16, 11, 11)  # 0, 3, 6 and 7 for the edge
    if torch.cuda.is_available():  # the same function on CUDA gives the same map
        mc = timm_like(RegionConv()).cuda()
        sal_c = E.sbsm_map(mc, r.cuda(), eq.cuda(), window=8, stride=4, batch_size=7)
        assert np.allclose(sal, sal_c, atol=1e-4)


def test_simcam_sums_to_the_cosine_and_sits_on_the_region():
    m = timm_like(RegionConv())
    q, r = pair()
    with torch.no_grad():
        eq, er = m(q[None])[0], m(r[None])[0]
    head = M.linear_gap_head(m)
    grid, up = E.simcam_map(head, r, eq)
    cos = float(eq @ er)
    assert grid.shape == (8, 8) and abs(grid.sum() - cos) < 1e-5 and abs(up.sum() - cos) < 1e-5
    outside = np.ones((8, 8), bool)
    outside[CELLS] = False
    # outside the region only the bias, spread evenly: ref . b / (h w |z|) with z = W mean(F) + b
    with torch.no_grad():
        z = m.proj(m.backbone.forward_features(r[None]).mean(dim=(2, 3)))[0]
        bias_share = float(eq @ m.proj.bias / (64 * z.norm()))
    assert np.allclose(grid[outside], bias_share, atol=1e-7) and np.allclose(up[~REGION], bias_share / 16, atol=1e-8)
    assert np.all(np.abs(grid[CELLS] - bias_share) > 1e-4)
    # a head that is not a linear map of GAP features: clear errors
    with pytest.raises(ValueError, match="not a linear map|token or fused"):
        M.linear_gap_head(timm_like(RegionTokens(SIZE, PATCH, CELLS, prefix=1)))
    atto = M.build_model("timm", backbone="convnextv2_atto", pretrained=False, img_size=64)
    with pytest.raises(ValueError, match="global average pool"):
        M.linear_gap_head(atto)


def test_explain_layers_of_the_toolkit_models_and_hybrid_combination():
    hyb = M.build_model("hybrid_convnext_vit", convnext_backbone="convnextv2_atto",
                        vit_backbone="vit_tiny_patch16_224", embedding_dim=16, img_size=64, pretrained=False).eval()
    spec = M.explain_layers(hyb)
    assert spec.names == ["convnext", "vit"] and spec.layers[0][1] is hyb.mxa
    assert spec.layers[1][1] is hyb.vit.blocks[-1].norm1 and "mean" in spec.combine
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        refs = hyb(torch.randn(2, 3, 64, 64))
    maps, branches = E.cam_maps(hyb, spec, "gradcam", x, refs)
    assert maps.shape == (2, 64, 64) and set(branches) == {"convnext", "vit"}
    mean = (branches["convnext"] + branches["vit"]) / 2  # each branch already ReLU'd and scaled to [0, 1]
    lo, hi = mean.min(axis=(1, 2), keepdims=True), mean.max(axis=(1, 2), keepdims=True)
    assert np.allclose(maps, (mean - lo) / (hi - lo + 1e-7), atol=1e-4)
    res = M.build_model("timm", backbone="test_resnet", pretrained=False, use_mxa=False, img_size=64)
    assert M.explain_layers(res).layers[0][1] is res.backbone.layer4
    vit = M.build_model("vit", vit_backbone="vit_tiny_patch16_224", pretrained=False, img_size=64)
    assert M.explain_layers(vit).layers[0][1] is vit.backbone.blocks[-1].norm1
    flat = timm_like(RegionConv())
    del flat.backbone.feature_info
    flat.backbone.output_fmt = "NC"
    with pytest.raises(ValueError, match="no spatial feature map"):
        M.explain_layers(flat)


def test_map_back_through_resize_and_centre_crop():
    from dataset import build_transform
    h, w, s = 40, 60, 32
    yy, xx = np.mgrid[0:h, 0:w]
    orig = (2 * xx + yy + 10).astype(np.float32)  # a smooth ramp survives bilinear resampling twice
    img = Image.fromarray(orig, mode="F")
    for mode in ("crop", "squash"):
        t = build_transform(s, [0.0] * 3, [1.0] * 3, resize_mode=mode)
        seen_by_model = np.asarray(t.transforms[1](t.transforms[0](img)) if mode == "crop" else t.transforms[0](img))
        back = E.map_to_original(seen_by_model, (h, w), {"img_size": s, "resize_mode": mode})
        assert back.shape == (h, w) and back.dtype == np.float32
        if mode == "squash":
            assert np.abs(back - orig)[2:-2, 2:-2].max() < 1.5
        else:
            # resized to 36 x 54, crop columns 11..42 of 54 = original x in [12.2, 47.8): the rest was never seen
            assert np.all(back[:, :12] == 0) and np.all(back[:, 48:] == 0)
            assert np.abs(back - orig)[2:-2, 14:46].max() < 2.0
            cfg = {"img_size": s, "resize_mode": "crop"}
            assert E.map_to_original(np.ones((s, s)), (w, h), cfg)[:12].sum() == 0  # portrait: rows dropped


def test_curve_auc_and_insertion_deletion_by_hand():
    # normalised by the curve's ends: full image 0.9, all baseline 0.1
    assert E.curve_auc([0.9, 0.9, 0.9], 0.9, 0.1) == 1.0 and E.curve_auc([0.1, 0.1], 0.9, 0.1) == 0.0
    assert E.curve_auc([0.9, 0.1], 0.9, 0.1) == pytest.approx(0.5)
    assert E.curve_auc([0.9, 0.5, 0.5, 0.1], 0.9, 0.1) == pytest.approx((0.75 + 0.5 + 0.25) / 3)
    assert E.curve_auc([0.9, 1.3, -2.0, 0.1], 0.9, 0.1) == pytest.approx((1 + 0.5 + 0) / 3)  # clipped to [0, 1]
    assert E.curve_auc([0.4, 0.4], 0.4, 0.4) is None

    class MeanModel(nn.Module):  # embedding normalize([mean of channel 0, 1]): the curve is computable by hand
        def forward(self, x):
            return F.normalize(torch.stack([x[:, 0].mean(dim=(1, 2)), torch.ones(len(x))], dim=1), dim=1)

    s, steps = 4, 4
    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, s, s, generator=g) + 0.5
    base = torch.zeros(3, s, s)
    sal = image[0].numpy().copy()  # most salient = brightest: deletion removes the largest values first
    ref = torch.tensor([0.6, 0.8])
    ins, dele = E.insertion_deletion(MeanModel(), image, ref, sal, base, steps=steps, batch_size=2)
    v = np.sort(image[0].numpy().reshape(-1))[::-1]
    counts = np.round(np.linspace(0, 16, steps + 1)).astype(int)
    cos = lambda a: (0.6 * a + 0.8) / np.sqrt(a * a + 1)  # noqa: E731
    assert np.allclose(dele, [cos(v[c:].sum() / 16) for c in counts], atol=1e-5)
    assert np.allclose(ins, [cos(v[:c].sum() / 16) for c in counts], atol=1e-5)
    full, none = dele[0], dele[-1]
    assert ins[0] == pytest.approx(none) and ins[-1] == pytest.approx(full)
    assert E.curve_auc(dele, full, none) < E.curve_auc(ins, full, none)
    image0 = image.clone()
    E.insertion_deletion(MeanModel(), image, ref, sal, base, steps=steps, batch_size=3)
    assert torch.equal(image, image0)  # no in-place edit of the image
    if torch.cuda.is_available():  # the same function on CUDA gives the same curves
        class CudaMean(MeanModel):
            def forward(self, x):
                return F.normalize(torch.stack([x[:, 0].mean(dim=(1, 2)), torch.ones(len(x), device=x.device)], 1), dim=1)
        ins_c, del_c = E.insertion_deletion(CudaMean(), image.cuda(), ref.cuda(), sal, base.cuda(), steps=steps)
        assert np.allclose(ins, ins_c, atol=1e-5) and np.allclose(dele, del_c, atol=1e-5)


def test_masks_boxes_pointing_and_mass(tmp_path):
    Image.fromarray(np.pad(np.full((2, 3), 200, np.uint8), ((1, 1), (2, 0))), mode="L").save(tmp_path / "a.png")
    m = E.read_mask(tmp_path / "a.png", (4, 5))
    assert m.sum() == 6 and m[1, 2] and not m[0, 0]
    with pytest.raises(ValueError, match="a.png is 5 x 4 pixels but its image is 6 x 4"):
        E.read_mask(tmp_path / "a.png", (4, 6))
    (tmp_path / "b.csv").write_text("image_id,x,y,w,h\nimg1,1,0,2,2\nimg1,3.5,2,1,1\nimg2,0,0,1,1\n")
    boxes = E.read_boxes(tmp_path / "b.csv")
    assert boxes == {"img1": [(1, 0, 2, 2), (3.5, 2, 1, 1)], "img2": [(0, 0, 1, 1)]}
    bm = E.boxes_mask(boxes["img1"], (3, 5))
    assert bm.astype(int).tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0]]  # pixel centres inside: 3.5 is in [3.5, 4.5)
    with pytest.raises(ValueError, match="outside its 5 x 3 image"):
        E.boxes_mask([(4, 0, 2, 1)], (3, 5), "img1")
    (tmp_path / "c.csv").write_text("id,x,y\n")
    with pytest.raises(ValueError, match="header"):
        E.read_boxes(tmp_path / "c.csv")
    sal = np.zeros((3, 5))
    sal[0, 1], sal[2, 0] = 3.0, 1.0
    assert E.pointing_game(sal, bm) == 1.0 and E.mass_inside(sal, bm) == 0.75
    assert E.pointing_game(-np.ones((3, 5)), bm) == 0.0 and E.mass_inside(np.zeros((3, 5)), bm) == 0.0
    plateau = np.zeros((3, 5))
    plateau[:2, :4] = 2.0  # 8 maximal pixels, 4 of them in the finding
    assert E.pointing_game(plateau, bm) == 0.5


def test_random_baseline_scores_the_area_fraction():
    mask = np.zeros((32, 32), bool)
    mask[4:20, 8:24] = True  # area fraction 1/4
    maps = [E.random_map((32, 32), np.random.default_rng([0, i])) for i in range(600)]
    assert all(mp.min() == 0 and mp.dtype == np.float32 for mp in maps)
    pg = np.mean([E.pointing_game(mp, mask) for mp in maps])
    mass = np.mean([E.mass_inside(mp, mask) for mp in maps])
    assert abs(pg - 0.25) < 0.06 and abs(mass - 0.25) < 0.03  # binomial SD of the pointing mean: 0.018


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    m = M.build_model("timm", backbone="test_resnet", pretrained=False, use_mxa=False, embedding_dim=8, img_size=48)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(M.make_checkpoint(m, epoch=0), path)
    return path


def base_args(ckpt, demo, out, *extra):
    return E.get_args_parser().parse_args([
        "--resume", str(ckpt), "--dataset-dir", str(demo), "--test-image-list", str(demo / "test_split.txt"),
        "--topk", "2", "--num-queries", "2", "--device", "cpu", "--workers", "0", "--bootstrap", "50",
        "--save-dir", str(out), *extra])


def test_main_smoke_gradcam_scores_ood(ckpt, demo_data, tmp_path, capsys):
    ref = tmp_path / "ref.npy"
    np.save(ref, np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32))
    out = tmp_path / "out"
    args = base_args(ckpt, demo_data, out, "--method", "gradcam", "--evaluate", "--steps", "4", "--exclude-same-patient",
                     "--mask-dir", str(demo_data / "masks"), "--ood-reference", str(ref), "--ood-k", "5",
                     "--road-percentiles", "50", "--sanity", "--layers", "-2")
    assert E.main(args) == 0
    res = json.loads((out / "explain.json").read_text())
    # the evidence block (/tmp/evidence_schema.md, docs/explain.md): scores next to random, sanity, summary
    ev = res["evidence"]
    assert ev["method"] == "gradcam" and ev["target"] == "dot" and ev["num_pairs"] == 4
    assert ev["layers"] == ["backbone.layer3"] and ev["map_grid"] == [3, 3]  # test_resnet's stage before last, 48 px
    assert set(ev["scores"]) == {"insertion_auc", "deletion_auc", "road_morf", "road_lerf", "road", "pointing_game",
                                 "mass_inside"}
    for v in ev["scores"].values():
        assert set(v) == {"higher_is_better", "method", "random_baseline", "difference", "verdict"}
    assert all("road_morf" in p and "road" in p for p in res["pairs"])
    assert ev["sanity"]["cascade"][0] == "head" and not ev["sanity"]["random_baseline_passed"]
    printed = capsys.readouterr().out
    assert "random FAILS" in ev["summary"] and "sanity: gradcam" in printed and "pairs/s" in printed
    assert res["method"] == "gradcam" and res["num_pairs"] == 4 and res["checkpoint"] == str(ckpt)
    for p in res["pairs"]:
        for side in ("result_map", "query_map"):
            a = np.load(out / p[side])
            assert a.dtype == np.float32 and a.shape == (64, 64)  # the demo images' size
        assert 0 <= p["insertion_auc"] <= 1 and len(p["deletion_curve"]) == 5
        assert "query_ood_score" in p and isinstance(p["query_ood_flagged"], bool)
        assert p["result_id"].split("-")[0] != p["query_id"].split("-")[0]  # same patient excluded
    sc = res["scores"]
    assert set(sc["insertion_auc"]) == {"gradcam", "random_baseline"} and "per_class" in sc["deletion_auc"]["gradcam"]
    assert sc["pointing_game"]["gradcam"]["n"] + sc["pairs_without_finding"] == 4
    assert res["ood"]["num_queries"] == 2
    assert len(list((out / "figures").glob("*.png"))) == 2
    assert E.main(args) == 2 and "--overwrite" in capsys.readouterr().err  # nothing replaced without it
    (out / "mine.txt").write_text("user file")
    old_maps = {p["result_map"] for p in res["pairs"]}
    args = base_args(ckpt, demo_data, out, "--method", "random", "--num-queries", "1", "--seed", "3", "--overwrite")
    assert E.main(args) == 0
    new = json.loads((out / "explain.json").read_text())
    kept = {p.relative_to(out).as_posix() for p in (out / "maps").glob("*.npy")}
    assert kept == {p[k] for p in new["pairs"] for k in ("result_map", "query_map")}  # the old run's maps are gone
    assert len(list((out / "figures").glob("*.png"))) == 1 and (out / "mine.txt").read_text() == "user file"
    assert old_maps - kept


def test_main_sbsm_boxes_and_query_ids(ckpt, demo_data, tmp_path):
    out = tmp_path / "out"
    ids = [l.split()[1][:-4] for l in (demo_data / "test_split.txt").read_text().splitlines()][:1]
    args = base_args(ckpt, demo_data, out, "--method", "sbsm", "--window", "16", "--stride", "8",
                     "--boxes", str(demo_data / "finding_boxes.csv"), "--query-ids", *ids)
    assert E.main(args) == 0
    res = json.loads((out / "explain.json").read_text())
    assert [p["query_id"] for p in res["pairs"]] == ids * 2 and res["sbsm"]["window"] == 16


def test_bad_input_fails_before_work(ckpt, demo_data, tmp_path, capsys):
    out = tmp_path / "never"
    assert E.main(base_args(ckpt, demo_data, out, "--query-ids", "nope")) == 2
    assert "--query-ids ['nope']" in capsys.readouterr().err
    assert E.main(base_args(ckpt, demo_data, out, "--method", "sbsm", "--layers", "-1")) == 2
    assert "--layers is for the CAM methods" in capsys.readouterr().err
    masks = tmp_path / "masks"
    masks.mkdir()
    first = (demo_data / "test_split.txt").read_text().split()[1][:-4]
    Image.fromarray(np.ones((10, 10), np.uint8)).save(masks / f"{first}.png")
    assert E.main(base_args(ckpt, demo_data, out, "--mask-dir", str(masks))) == 2
    assert "must have its image's size" in capsys.readouterr().err
    (tmp_path / "b.csv").write_text(f"image_id,x,y,w,h\n{first},60,0,10,10\n")
    assert E.main(base_args(ckpt, demo_data, out, "--boxes", str(tmp_path / "b.csv"))) == 2
    assert "outside its 64 x 64 image" in capsys.readouterr().err
    atto = M.build_model("timm", backbone="convnextv2_atto", pretrained=False, img_size=48)
    torch.save(M.make_checkpoint(atto), tmp_path / "atto.pth")
    assert E.main(base_args(tmp_path / "atto.pth", demo_data, out, "--method", "simcam")) == 2
    assert "global average pool" in capsys.readouterr().err
    assert not out.exists()  # nothing written by failed runs


@pytest.mark.parametrize("name", ["test_efficientnet", "test_mambaout", "test_vit_relpos"])
def test_any_timm_model_with_a_spatial_map(name):
    # conv (NCHW, last feature_info stage), NHWC (MambaOut: permuted), token model (norm1, class token dropped)
    m = M.build_model("timm", backbone=name, pretrained=False, img_size=64, use_mxa=False).eval()
    spec = M.explain_layers(m)
    with torch.no_grad():
        refs = m(torch.randn(2, 3, 64, 64))
    maps, _ = E.cam_maps(m, spec, "gradcam", torch.randn(2, 3, 64, 64), refs)
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all() and maps.max() > 0


# --------------------------------------------------------------------------- issue 19

def frozen_and_trainable_twins():
    """(frozen backbone + trainable head, the same weights all trainable, input size) for a timm model and for
    ConceptCLIP with its head."""
    import copy
    kw = dict(backbone="test_resnet", pretrained=False, use_mxa=False, embedding_dim=8, img_size=48)
    frozen = M.build_model("timm", freeze_backbone=True, **kw).eval()
    free = M.build_model("timm", freeze_backbone=False, **kw).eval()
    free.load_state_dict(frozen.state_dict())
    clip, _ = conceptclip_like()
    clip.head, clip.embedding_dim = nn.Linear(8, 4), 4  # frozen tower, trainable head (--conceptclip-head)
    clip_free = copy.deepcopy(clip)
    clip_free.frozen = False
    clip_free.clip.requires_grad_(True)
    return [(frozen, free, 48), (clip, clip_free, 54)]


@pytest.mark.parametrize("method", list(E.CAM_METHODS))
def test_cam_map_of_a_frozen_backbone_equals_the_trainable_twins(method):
    for frozen, free, s in frozen_and_trainable_twins():
        assert any(p.requires_grad for p in frozen.parameters())  # the head trains
        q, r = pair(s)
        with torch.no_grad():
            eq = frozen(q[None])[0]
        before = [p.requires_grad for p in frozen.parameters()]
        a, _ = E.cam_maps(frozen, M.explain_layers(frozen), method, r[None], eq[None])
        b, _ = E.cam_maps(free, M.explain_layers(free), method, r[None], eq[None])
        assert np.isfinite(a).all() and a.max() > 0
        assert np.allclose(a, b, atol=1e-5)  # d cos / d activation does not depend on which weights train
        assert [p.requires_grad for p in frozen.parameters()] == before and frozen.frozen


def test_a_saliency_library_failure_is_one_line(ckpt, demo_data, tmp_path, capsys, monkeypatch):
    from pytorch_grad_cam.base_cam import BaseCAM

    def broken(self, *a, **k):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setattr(BaseCAM, "compute_cam_per_layer", broken)
    assert E.main(base_args(ckpt, demo_data, tmp_path / "out", "--method", "gradcam++")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--method gradcam++" in err and "backbone.layer4" in err
    assert "AttributeError" in err and not (tmp_path / "out").exists()  # found before anything was written


def test_spread_grid_by_hand_and_keeps_the_sum():
    # 2 cells onto 3 pixels: pixel 0 takes 2/3 of cell 0, pixel 1 a third of each, pixel 2 2/3 of cell 1
    a = np.array([[2 / 3, 0], [1 / 3, 1 / 3], [0, 2 / 3]])
    grid = np.array([[1.0, 2.0], [3.0, -4.0]])
    out = E.spread_grid(grid, (3, 3), {"img_size": 3, "resize_mode": "squash"})
    assert np.allclose(out, a @ grid @ a.T) and out.sum() == pytest.approx(grid.sum())
    g = np.random.default_rng(0).standard_normal((3, 5))
    for hw in ((40, 61), (61, 40), (7, 9)):
        for mode in ("crop", "squash"):
            out = E.spread_grid(g, hw, {"img_size": 32, "resize_mode": mode})
            assert out.shape == hw and out.sum() == pytest.approx(g.sum(), abs=1e-5)
    # crop: 40 x 61 resized to 36 x 54, crop rows 2..33, columns 11..42 = original y in [2.22, 37.78), x in
    # [12.43, 48.57): the rest is 0
    out = E.spread_grid(g, (40, 61), {"img_size": 32, "resize_mode": "crop"})
    assert np.all(out[:, :12] == 0) and np.all(out[:, 49:] == 0) and np.all(out[:2] == 0) and np.all(out[38:] == 0)
    assert np.all(out[2:38, 12:49] != 0)


def test_simcam_input_map_sums_to_the_cosine_off_the_grid():
    torch.manual_seed(0)
    conv, proj = nn.Conv2d(3, 6, 7, stride=7), nn.Linear(6, 4)
    x, ref = torch.randn(3, 30, 30), F.normalize(torch.randn(4), dim=0)  # 30 px onto a 4 x 4 grid
    with torch.no_grad():
        cos = float(ref @ F.normalize(proj(conv(x[None]).mean(dim=(2, 3)))[0], dim=0))
    grid, up = E.simcam_map((conv, proj.weight, proj.bias), x, ref)
    assert grid.shape == (4, 4) and up.shape == (30, 30)
    assert grid.sum() == pytest.approx(cos, abs=1e-6) and up.sum() == pytest.approx(cos, abs=1e-5)


def test_main_simcam_saved_maps_sum_to_the_cosine(demo_data, tmp_path):
    m = M.build_model("timm", backbone="test_resnet", pretrained=False, use_mxa=False, embedding_dim=8, img_size=45)
    feature_map = M.linear_gap_head(m)[0]
    with torch.no_grad():
        assert feature_map(torch.zeros(1, 3, 45, 45)).shape[-1] == 2  # 45 px is not a multiple of the grid
    torch.save(M.make_checkpoint(m), tmp_path / "r45.pth")
    out = tmp_path / "out"
    assert E.main(base_args(tmp_path / "r45.pth", demo_data, out, "--method", "simcam")) == 0
    for p in json.loads((out / "explain.json").read_text())["pairs"]:
        for side in ("result_map", "query_map"):
            a = np.load(out / p[side])
            assert a.shape == (64, 64) and float(a.sum()) == pytest.approx(p["similarity"], abs=1e-4)


def test_main_uses_the_image_cache(ckpt, demo_data, tmp_path, monkeypatch):
    import dataset
    cache = tmp_path / "cache"
    args = base_args(ckpt, demo_data, tmp_path / "a", "--method", "random", "--cache-dir", str(cache))
    assert E.main(args) == 0
    n = len((demo_data / "test_split.txt").read_text().splitlines())
    assert len(list(cache.rglob("*.npy"))) == n  # every image decoded once into the cache

    def no_decoding(path):
        raise AssertionError(f"{path} decoded although it is cached")

    monkeypatch.setattr(dataset, "load_image", no_decoding)  # the cache's only way to the source images
    args = base_args(ckpt, demo_data, tmp_path / "b", "--method", "random", "--cache-dir", str(cache))
    assert E.main(args) == 0
    a, b = (json.loads((tmp_path / d / "explain.json").read_text())["pairs"] for d in "ab")
    assert [p["similarity"] for p in a] == [p["similarity"] for p in b]


def test_results_of_the_querys_own_patient_are_marked(ckpt, demo_data, tmp_path, capsys):
    import shutil
    d = tmp_path / "data"
    (d / "test").mkdir(parents=True)
    lines = (demo_data / "test_split.txt").read_text().splitlines()[:6]
    rows = []
    for n, line in enumerate(lines):  # every image its own patient, except the query and its exact copy
        _, fname, label, src = line.split()
        shutil.copy(demo_data / "test" / fname, d / "test" / fname)
        rows.append(f"{'p0' if n == 0 else f'u{n}'} {fname} {label} {src}")
    query, label = lines[0].split()[1], lines[0].split()[2]
    shutil.copy(demo_data / "test" / query, d / "test" / "copy.png")
    rows.append(f"p0 copy.png {label} demo")
    (d / "test_split.txt").write_text("\n".join(rows) + "\n")
    args = base_args(ckpt, d, tmp_path / "out", "--method", "random", "--query-ids", query[:-4])
    assert E.main(args) == 0
    res = json.loads((tmp_path / "out" / "explain.json").read_text())
    # the copy is rank 1 (cosine 1) and the query's patient; rank 2 is another patient
    assert [(p["result_id"], p["same_patient"]) for p in res["pairs"]] == [("copy", True), (res["pairs"][1]["result_id"], False)]
    assert res["pairs"][1]["result_id"] != "copy" and res["same_patient_pairs"] == 1
    assert "rank 1 = the query's own patient (p0)" in capsys.readouterr().out


def test_a_fusion_checkpoint_is_refused_in_one_line(demo_data, tmp_path, capsys):
    fusion = M.build_model("fusion", backbone="fusion-concat:4,4", embedding_dim=4)
    torch.save(M.make_checkpoint(fusion), tmp_path / "fusion.pth")
    out = tmp_path / "never"
    assert E.main(base_args(tmp_path / "fusion.pth", demo_data, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fusion" in err and "fusion.pth" in err
    assert not out.exists()


def test_help_states_each_default_once():
    import re
    text = " ".join(E.get_args_parser().format_help().split())
    assert not re.search(r"\(default[^)]*\) \(default", text)
    # --device: utils.get_runtime_parser's shared wording
    assert "not given: cuda when available" in text and "(default: 5)" in text


# --------------------------------------------------------------------------- issue 22: targets, layers, ROAD, sanity

class RegionTwoStage(nn.Module):
    """Input gated to REGION, then two bias-free conv stages (16 x 16, then 8 x 8 at 32 px); head = plain GAP.
    Every feature outside the region is exactly 0 at both stages."""

    def __init__(self, channels=6):
        super().__init__()
        torch.manual_seed(0)
        self.gate = Gate(torch.as_tensor(REGION, dtype=torch.float32)[None, None])
        self.stages = nn.Sequential(nn.Sequential(nn.Conv2d(3, channels, 2, 2, bias=False), nn.ReLU()),
                                    nn.Conv2d(channels, channels, 2, 2, bias=False))
        self.num_features = channels
        self.feature_info = [{"module": "stages.0", "num_chs": channels, "reduction": 2},
                             {"module": "stages.1", "num_chs": channels, "reduction": 4}]
        self.pretrained_cfg = {"architecture": "region_two_stage"}

    def forward_features(self, x):
        return self.stages(self.gate(x))

    def forward_head(self, f, pre_logits=False):
        return f.mean(dim=(2, 3))


@pytest.mark.parametrize("target", ["cosine", "dot"])
@pytest.mark.parametrize("method,layers", [("gradcam", ["-1"]), ("gradcam", ["-2"]), ("gradcam", ["-2", "-1"]),
                                           ("layercam", ["stages.0"])])
def test_cam_targets_and_layers_sit_on_the_region(target, method, layers):
    m = timm_like(RegionTwoStage())
    q, r = pair()
    with torch.no_grad():
        eq = m(q[None])[0]
    spec = E.resolve_layers(m, [f"backbone.{x}" if x.startswith("stages") else x for x in layers])
    grids = E.layer_grids(m, spec, r)
    assert grids == [{"-1": (8, 8), "-2": (16, 16), "stages.0": (16, 16)}[x] for x in layers]
    maps, _ = E.cam_maps(m, spec, method, r[None], eq[None], target=target)
    assert E.pointing_game(maps[0], REGION) == 1.0
    assert np.abs(maps[0][far_from(REGION, 2)]).max() < 1e-6
    assert E.mass_inside(maps[0], REGION) > 0.75  # area fraction 0.19


def test_dot_target_gradcam_is_the_exact_split_less_the_bias():
    # linear-on-GAP: Grad-CAM of z . q_hat at the last map = ReLU(simcam grid - bias share), scaled to [0, 1]
    import cv2
    m = timm_like(RegionTwoStage())
    q, r = pair()
    with torch.no_grad():
        eq = m(q[None])[0]
        z = m.proj(m.backbone.forward_features(r[None]).mean(dim=(2, 3)))[0]
        bias = float(eq @ m.proj.bias)
    grid, _ = E.simcam_map(M.linear_gap_head(m), r, eq)
    g = np.maximum(grid * float(z.norm()) * 64 - bias, 0)  # q . W F_ij, ReLU'd

    def scale(a):  # pytorch-grad-cam's scale_cam_image: min-max, per layer and again after combining
        return (a - a.min()) / (1e-7 + (a - a.min()).max())
    hand = scale(cv2.resize(scale(g), (SIZE, SIZE)))
    maps, _ = E.cam_maps(m, M.explain_layers(m), "gradcam", r[None], eq[None], target="dot")
    assert np.allclose(maps[0], hand, atol=1e-4)
    # the model is unchanged by the dot target's wrapper, and a model without a final normalize is refused
    assert torch.allclose(E.Unnormalised(m)(r[None]), z[None], atol=1e-6)
    with pytest.raises(ValueError, match="--target dot"):
        E.Unnormalised(nn.Linear(3, 2))(torch.zeros(1, 3))


def test_layers_by_stage_or_name_and_bad_layers():
    m = timm_like(RegionTwoStage())
    assert E.resolve_layers(m, None).names == ["backbone"]  # model.explain_layers: the last map
    assert E.resolve_layers(m, ["-2", "backbone.stages.1"]).names == ["backbone.stages.0", "backbone.stages.1"]
    with pytest.raises(ValueError, match="2 feature stages"):
        E.resolve_layers(m, ["5"])
    with pytest.raises(ValueError, match="no module 'nope'"):
        E.resolve_layers(m, ["nope"])
    demo = M.build_model("democnn", embedding_dim=4, img_size=32)
    assert [n for n, _ in E.cascade_groups(demo)] == ["head", "backbone.stages.3", "backbone.stages.2",
                                                      "backbone.stages.1", "backbone.stages.0", "stem"]


def sanity_args(**kw):
    import argparse
    return argparse.Namespace(**{"batch_size": 8, "target": "dot", "window": 8, "stride": 4, "bootstrap": 50,
                                 "seed": 0, "sanity_threshold": 0.5, **kw})


@pytest.mark.parametrize("method", ["gradcam", "random"])
def test_sanity_check_randomised_model_drops_random_fails(method):
    torch.manual_seed(0)
    m = M.build_model("democnn", embedding_dim=8, img_size=SIZE).eval()
    args = sanity_args()
    cases = []
    for seed in range(2):
        q, r = pair(seed=seed)
        with torch.no_grad():
            eq = m(q[None])
        keys, rkeys = [[0, seed, 0]], [[0, seed, 0, 1]]
        maps = E.method_maps(m, method, M.explain_layers(m), r[None], eq, args, keys)[0]
        rmaps = E.method_maps(m, "random", None, r[None], eq, args, rkeys)[0]
        cases.append((r[None], q, maps, keys, rmaps, rkeys))
    s = E.sanity_check(m, method, cases, args, M.explain_layers)
    assert s["cascade"][0] == "head" and s["cascade"][-1] == "stem" and len(s["steps"]) == 6
    for step in s["random_baseline_steps"]:  # a random map never depended on the model
        assert step["spearman"]["mean"] == 1.0 and abs(step["ssim"]["mean"] - 1.0) < 1e-9
    assert not s["random_baseline_passed"] and "random FAILS" in s["summary"]
    head, final = s["steps"][0], s["steps"][-1]
    if method == "gradcam":  # a large drop from 1 (the trained model's own map) at the first step already
        assert head["spearman"]["mean"] < 0.2 and head["ssim"]["mean"] < 0.2
        assert final["spearman"]["mean"] < 0.5 and final["ssim"]["mean"] < 0.5 and s["passed"]
    else:
        assert final["spearman"]["mean"] == 1.0 and not s["passed"] and f"{method} FAILS" in s["summary"]


def test_sanity_check_on_the_region_model():
    # the region model: re-initialised weights move Grad-CAM's map inside the region (the gate is architecture,
    # not weights, so the map stays there): the rank correlation drops, random's does not
    m = timm_like(RegionTwoStage())
    args = sanity_args()
    q, r = pair()
    with torch.no_grad():
        eq = m(q[None])
    maps = E.method_maps(m, "gradcam", M.explain_layers(m), r[None], eq, args, [[0]])[0]
    rmaps = E.method_maps(m, "random", None, r[None], eq, args, [[1]])[0]
    s = E.sanity_check(m, "gradcam", [(r[None], q, maps, [[0]], rmaps, [[1]])], args, M.explain_layers)
    assert s["random_baseline_steps"][-1]["spearman"]["mean"] == 1.0
    assert s["steps"][-1]["spearman"]["mean"] < 0.9


class LinearEmbedding(nn.Module):
    """f(x) = normalize(W vec(x)): a hand-made linear model for ROAD."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, x):
        return F.normalize(x.flatten(1) @ self.w.T, dim=1)


def test_road_on_a_linear_model_by_hand():
    # 1 channel, 5 x 5; percentile 95 of the ranks 0..24 removes the top 2 (MoRF) or bottom 2 (LeRF) pixels;
    # placed apart inside the image, each is imputed (no noise) as its 8 neighbours' weighted mean
    # (1/6 edge, 1/12 corner: pytorch-grad-cam's NoisyLinearImputer, Rong et al.'s weights)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 5, 5, generator=g)
    w = torch.randn(2, 25, generator=g)
    model = LinearEmbedding(w)
    ref = F.normalize(torch.tensor([1.0, 0.5]), dim=0)
    sal = np.arange(25, dtype=np.float32).reshape(5, 5) * 0 + 0.5
    sal[1, 1], sal[3, 3] = 2.0, 1.0   # most relevant
    sal[1, 3], sal[3, 1] = 0.0, 0.1   # least relevant

    def impute(x, where):
        x = x.clone()
        k = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])
        for i, j in where:
            x[0, i, j] = (img[0, i - 1:i + 2, j - 1:j + 2] * k).sum()
        return x

    def cos(x):
        return float(F.cosine_similarity(x.flatten()[None] @ w.T, ref[None]))

    out = E.road_scores(model, img, ref, sal, percentiles=[95], noise=0.0)
    assert abs(out["road_morf"] - cos(impute(img, [(1, 1), (3, 3)]))) < 1e-5
    assert abs(out["road_lerf"] - cos(impute(img, [(1, 3), (3, 1)]))) < 1e-5
    assert abs(out["road"] - (out["road_lerf"] - out["road_morf"]) / 2) < 1e-12
    # the noise is seeded: the same seed gives the same scores
    a, b = (E.road_scores(model, img, ref, sal, percentiles=[50, 95], noise=0.1, seed=1) for _ in range(2))
    assert a == b


@pytest.mark.parametrize("cfg", [
    {"img_size": 32, "resize_mode": "crop"},                                                  # toolkit: 1.125 x, round
    {"img_size": 32, "resize_mode": "crop", "resize_size": 32, "crop_rounding": "floor"},     # HF processor (raddino)
    {"img_size": 28, "resize_mode": "crop", "resize_size": 40, "crop_rounding": "floor"},     # HF 256 -> 224 (dinov2)
    {"img_size": 32, "resize_mode": "squash"}])
def test_maps_carried_back_through_each_eval_transform_land_on_the_object(cfg):
    """The model's input itself used as a 'map': carried back to the original by map_to_original it must put the
    bright object where it is in the original, for every resize/crop a model's data_config can ask for (a foundation
    encoder's processor gives resize_size and floor rounding; geometry from 1.125 x would miss the object)."""
    from dataset import build_transform
    h, w = 61, 47
    a = np.zeros((h, w), np.uint8)
    a[30:40, 20:30] = 255  # inside every centre crop
    img = Image.fromarray(a).convert("RGB")
    x = build_transform(cfg["img_size"], [0.0] * 3, [1.0] * 3, resize_mode=cfg["resize_mode"],
                        resize_size=cfg.get("resize_size"), crop_rounding=cfg.get("crop_rounding", "round"))(img)
    back = E.map_to_original(x[0].numpy(), (h, w), cfg)
    obj = a > 0
    assert back[obj].mean() > 0.8 and back[~obj].mean() < 0.05
    assert back[np.unravel_index(back.argmax(), back.shape)] > 0.9 and obj[np.unravel_index(back.argmax(), back.shape)]
