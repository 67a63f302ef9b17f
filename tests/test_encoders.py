"""The CXR foundation encoders (model.ENCODERS) on stand-ins built offline from the real classes with tiny configs:
build and embed, preprocessing equal to each model's official processor, offline errors, checkpoints, training,
explanation grids, text towers, extraction and the torchxrayvision import clash."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import model as M
from make_standin_encoders import make_standins  # data/ is on sys.path (conftest)

ROOT = Path(__file__).resolve().parents[1]

# (model name, extra model args) of every entry, xrv twice (its two variants)
CASES = [("raddino", {}), ("dinov2", {}), ("clip", {}), ("medsiglip", {}), ("biomedclip", {}),
         ("xrv", {"backbone": "densenet121-res224-all"}), ("xrv", {"backbone": "resnet50-res512-all"})]
IDS = ["raddino", "dinov2", "clip", "medsiglip", "biomedclip", "xrv-densenet", "xrv-resnet"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster than several fighting over shared cores (10 s vs 0.1 s a DenseNet pass)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """name -> local folder of a tiny stand-in (data/make_standin_encoders.py; xrv: None, built without a weight
    file)."""
    out = make_standins(tmp_path_factory.mktemp("encoders"))
    out["xrv"] = None
    return out


def _args(name, extra, standins, **kw):
    a = dict(extra, **kw)
    if name == "xrv":
        a.setdefault("pretrained", False)
    else:
        a.setdefault("pretrained_weights", str(standins[name]))
    return a


@pytest.fixture(scope="module")
def built(standins):
    return {i: M.build_model(n, **_args(n, e, standins)).eval() for i, (n, e) in zip(IDS, CASES)}


def _image(w=293, h=219):
    """Non-square, grayscale-ish (channels nearly equal), with structure in every quadrant. 293 x 219: the crops of
    the 518 and 224 px processors have odd margins (3 mod 4), where rounding the offset down or half-even differ."""
    y, x = np.mgrid[0:h, 0:w]
    g = (127 + 100 * np.sin(x / 17.0) * np.cos(y / 11.0)).astype(np.float64)
    rgb = np.stack([g, g + 3 * np.sin(x / 5.0), g - 2], axis=2)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")


def _official(name, extra, folder, img):
    """The input tensor the model's own library makes of `img`."""
    if name == "xrv":
        xrv = M.import_torchxrayvision()
        size = M.ENCODERS["xrv"]["variants"][extra["backbone"]]["size"]
        a = xrv.datasets.normalize(np.asarray(img), 255).mean(2)[None]
        a = xrv.datasets.XRayResizer(size)(xrv.datasets.XRayCenterCrop()(a))
        return torch.from_numpy(a)
    if name == "biomedclip":
        import open_clip
        return open_clip.create_model_and_transforms(f"local-dir:{folder}", load_weights=False,
                                                     pretrained_text=False)[2](img)
    from transformers import AutoImageProcessor
    return AutoImageProcessor.from_pretrained(folder)(img, return_tensors="pt")["pixel_values"][0]


# ---------------------------------------------------------------------------------------------------------------

def test_table_declares_every_encoder_and_help_shows_it():
    import argparse
    keys = {"id", "library", "input", "channels", "normalisation", "output", "dim", "licence", "gated", "fetch"}
    text = argparse.ArgumentParser(parents=[M.get_model_parser()]).format_help()
    flat = "".join(text.split())  # argparse wraps lines, at hyphens too
    for name, row in M.ENCODERS.items():
        assert name in M.MODELS and keys <= set(row), name
        assert f"{name}:{row['id']}" in flat
    assert M.ENCODERS["medsiglip"]["gated"] and not M.ENCODERS["raddino"]["gated"]


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_build_embeds_unit_norm_at_declared_dim_and_frozen(built, standins, case):
    name, extra = CASES[case]
    m = built[IDS[case]]
    info = M.encoder_info(m)
    cfg = m.data_config
    s = 64 if name == "xrv" else cfg["img_size"]  # the conv nets take any size; token models their own
    z = m(torch.randn(3, cfg["channels"], s, s))
    assert z.shape == (3, m.embedding_dim) and torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    native = {"raddino": lambda: m.net.config.hidden_size, "dinov2": lambda: m.net.config.hidden_size,
              "clip": lambda: m.net.config.projection_dim, "medsiglip": lambda: m.net.config.vision_config.hidden_size,
              "biomedclip": lambda: 16,  # embed_dim of the stand-in's open_clip_config.json
              "xrv": lambda: M.ENCODERS["xrv"]["variants"][extra["backbone"]]["dim"]}[name]()
    assert m.embedding_dim == native == info["native_dim"]
    assert info["name"] == name and info["licence"] == M.ENCODERS[name]["licence"]
    assert set(m.model_args) == set(type(m).ARG_NAMES)  # what a checkpoint stores to rebuild it
    assert m.frozen and not any(p.requires_grad for p in m.parameters())
    assert M.encoder_info(M.build_model("timm", backbone="resnet18", pretrained=False)) is None


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_input_tensor_equals_the_official_processor(built, standins, case):
    name, extra = CASES[case]
    img = _image()
    ours = M.get_transform(built[IDS[case]])(img)
    ref = _official(name, extra, standins[name], img)
    assert ours.shape == ref.shape and ours.shape[0] == built[IDS[case]].data_config["channels"]
    assert (ours - ref).abs().max().item() < 1e-5


def test_floor_crop_matters_for_hf_processors(built):
    """The image above needs a crop offset rounded down: torchvision's CenterCrop would shift it by a pixel."""
    import dataset
    cfg = built["raddino"].data_config
    assert cfg["crop_rounding"] == "floor" and cfg["resize_size"] == 518
    img = _image()
    rounded = dataset.build_transform(518, cfg["mean"], cfg["std"], resize_mode="crop", interpolation="bicubic",
                                      resize_size=518)(img)
    assert (rounded - M.get_transform(built["raddino"])(img)).abs().max() > 1e-3


@pytest.mark.parametrize("key", ["raddino", "biomedclip", "xrv-resnet"])
def test_training_transform_augments_then_normalises_as_the_processor(built, key):
    m = built[key]
    tf = M.get_transform(m, train=True)
    img = _image()
    torch.manual_seed(0)
    flips = {bool(torch.equal(tf(img), M.get_transform(m)(img))) for _ in range(8)}
    assert flips == {True, False}  # a random horizontal flip, nothing else: unflipped = the eval tensor
    if key != "xrv-resnet":
        assert tf.transforms[-1].mean == m.data_config["mean"] and tf.transforms[-1].std == m.data_config["std"]


@pytest.mark.parametrize("name", ["raddino", "biomedclip", "medsiglip", "dinov2", "clip"])
def test_offline_missing_weights_name_the_id_and_the_fetch_command(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(M.WeightsUnavailableError) as e:
        M.check_weights(name, {})
    msg = str(e.value)
    assert M.ENCODERS[name]["id"] in msg and "huggingface-cli download" in msg and "--pretrained-weights" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(M.WeightsUnavailableError, match="lacks"):
        M.check_weights(name, {"pretrained_weights": str(tmp_path / "empty")})


def test_xrv_missing_weight_file_is_named(tmp_path):
    with pytest.raises(M.WeightsUnavailableError, match=r"resnet50-res512-all.*get_weights"):
        M.check_weights("xrv", {"backbone": "resnet50-res512-all", "pretrained_weights": str(tmp_path)})
    with pytest.raises(ValueError, match="densenet121-res224-all"):
        M.check_weights("xrv", {"backbone": "densenet", "pretrained": False})
    M.check_weights("xrv", {"pretrained": False})


@pytest.mark.parametrize("name", ["raddino", "biomedclip", "medsiglip"])
def test_local_folder_makes_no_network_call(name, standins, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network call")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    M.check_weights(name, {"pretrained_weights": str(standins[name])})
    m = M.build_model(name, pretrained_weights=str(standins[name]))
    if m.has_text_tower:
        assert m.encode_text(["normal chest x-ray"]).shape == (1, m.embedding_dim)


def test_xrv_loads_its_weight_files_from_a_local_folder_with_torchxrayvision(tmp_path, monkeypatch):
    """Weight files in torchxrayvision's own formats (DenseNet: a pickled model; ResNet: a state dict), named as
    its URLs name them: loaded by torchxrayvision itself, no network, features as torchxrayvision computes them."""
    xrv = M.import_torchxrayvision()
    import torchvision
    urls = {v: Path(xrv.models.model_urls[v]["weights_url"]).name for v in M.ENCODERS["xrv"]["variants"]}
    torch.manual_seed(0)
    torch.save(xrv.models.DenseNet(weights=None), tmp_path / urls["densenet121-res224-all"])
    r = torchvision.models.resnet50(num_classes=18, weights=None)
    r.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    torch.save(r.state_dict(), tmp_path / urls["resnet50-res512-all"])

    def refuse(*a, **k):
        raise AssertionError("network call")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    for variant in urls:
        M.check_weights("xrv", {"backbone": variant, "pretrained_weights": str(tmp_path)})
        m = M.build_model("xrv", backbone=variant, pretrained_weights=str(tmp_path)).eval()
        if variant.startswith("densenet"):
            ref = xrv.models.DenseNet(weights=variant, cache_dir=str(tmp_path)).eval()
            x = (torch.rand(1, 1, 224, 224) * 2 - 1) * 1024  # at its native size, as the transform gives
            with torch.no_grad():
                assert torch.allclose(m(x), F.normalize(ref.features2(x), dim=1), atol=1e-5)
        else:  # its file's weights, loaded by torchxrayvision (_encode is ResNet.features less its resize to 512)
            ref = r.state_dict()
            assert all(torch.equal(v, ref[k]) for k, v in m.net.state_dict().items()) and len(ref) == len(
                m.net.state_dict()) + 2  # + fc.weight, fc.bias: the classifier is dropped


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_checkpoint_round_trip_gives_identical_embeddings(standins, case, tmp_path):
    name, extra = CASES[case]
    torch.manual_seed(1)
    m = M.build_model(name, **_args(name, extra, standins, encoder_head=True, embedding_dim=8)).eval()
    path = tmp_path / "ckpt.pth"
    torch.save(M.make_checkpoint(m, epoch=1), path)
    back, ckpt = M.load_checkpoint(path)
    assert ckpt["model_args"]["pretrained_weights"] == m.model_args["pretrained_weights"]
    s = 64 if name == "xrv" else m.data_config["img_size"]
    x = torch.randn(2, m.data_config["channels"], s, s)
    with torch.no_grad():
        assert torch.equal(m(x), back(x))


def test_one_training_step_moves_only_the_head(standins):
    m = M.build_model("raddino", pretrained_weights=str(standins["raddino"]), encoder_head=True, embedding_dim=8)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    z = m(torch.randn(2, 3, 518, 518))
    (z @ torch.randn(8)).sum().backward()
    opt.step()
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"head.weight", "head.bias"}


@pytest.mark.parametrize("name,extra", [("raddino", {}), ("xrv", {"backbone": "densenet121-res224-all"}),
                                        ("clip", {})])
def test_full_fine_tuning_puts_the_image_tower_in_the_backbone_group(standins, name, extra):
    import train
    m = M.build_model(name, **_args(name, extra, standins, freeze_backbone=False))
    groups = {g["name"]: g for g in train.param_groups(m, lr=1e-3, backbone_lr_mult=0.1, weight_decay=0)}
    image = [p for p in m.net.parameters() if p.requires_grad]
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in image} and image
    assert groups["backbone"]["lr"] == pytest.approx(1e-4) and "new" not in groups
    if name == "clip":  # the text tower stays frozen: no gradient from an image loss
        assert not any(p.requires_grad for p in m.net.text_model.parameters())


@pytest.mark.parametrize("key", ["raddino", "dinov2", "clip", "medsiglip", "biomedclip"])
def test_explain_grid_is_aligned_with_the_image(built, key):
    """Perturb exactly the patches of the top-left quadrant's left half (not symmetric: a transposed grid fails):
    at the explained layer of a one-block tower only those cells change, so the reshape dropped the right prefix
    tokens and laid the grid out as the image."""
    m = built[key]
    if key == "biomedclip":
        trunk = m.net.visual.trunk
        saved, trunk.blocks = trunk.blocks, trunk.blocks[:1]  # one block: attention mixes nothing before norm1
    try:
        spec = M.explain_layers(m)
        (_, layer), = spec.layers
        s = m.data_config["img_size"]
        patch = {"biomedclip": 16}.get(key, 14)
        g = s // patch
        rows, cols = (g // 2) * patch, (g // 4) * patch
        x = torch.randn(1, 3, s, s)
        x2 = x.clone()
        x2[:, :, :rows, :cols] += 1.0
        acts = []
        h = layer.register_forward_hook(lambda mod, i, o: acts.append(o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            m(x), m(x2)
        h.remove()
        a, b = spec.reshape(acts[0]), spec.reshape(acts[1])
        assert a.shape[2:] == (g, g)
        changed = (a - b).abs().amax(dim=1)[0] > 1e-6
        expected = torch.zeros(g, g, dtype=torch.bool)
        expected[:g // 2, :g // 4] = True
        assert torch.equal(changed, expected)
    finally:
        if key == "biomedclip":
            trunk.blocks = saved


@pytest.mark.parametrize("key", ["raddino", "clip"])
def test_gradcam_of_an_embedding_that_sees_one_quadrant_lights_that_quadrant(built, key):
    """A 0/1 gate on the explained layer's tokens keeps the class token and the patches of the top-left quadrant's
    left half: the class-token embedding of the one-block tower then depends on those pixels only (the other tokens
    reach it as constants), so explain.py's Grad-CAM of either side of a pair must sit there (not symmetric: a
    transposed grid fails)."""
    import explain as E
    m = built[key]
    spec = M.explain_layers(m)
    (_, layer), = spec.layers
    s, patch = m.data_config["img_size"], 14
    g = s // patch
    rows, cols = (g // 2) * patch, (g // 4) * patch
    keep = torch.zeros(g, g)
    keep[:g // 2, :g // 4] = 1
    gate = torch.cat([torch.ones(1), keep.flatten()])[None, :, None]  # (1, 1 + g * g, 1)
    hook = layer.register_forward_hook(lambda mod, i, o: o * gate)
    try:
        torch.manual_seed(0)
        a = torch.randn(2, 3, s, s)
        with torch.no_grad():
            outside = a.clone()
            outside += torch.randn(2, 3, s, s)
            outside[:, :, :rows, :cols] = a[:, :, :rows, :cols]
            assert torch.allclose(m(a), m(outside), atol=1e-5)  # the embedding sees the quadrant only
            refs = m(a.flip(0))  # each image explained toward the other: query and result side
        maps, _ = E.cam_maps(m, spec, "gradcam", a, refs)
    finally:
        hook.remove()
    region = np.zeros((s, s), bool)
    region[:rows, :cols] = True
    # the map is zero outside the region on the token grid; upsampled (bilinear, cell centres) it can only
    # reach half a patch past the region's border, where it falls to 0 at the next cell's centre
    reach = np.zeros((s, s), bool)
    reach[:rows + patch // 2, :cols + patch // 2] = True
    for side in maps:
        assert E.pointing_game(side, region) == 1.0 and E.mass_inside(side, reach) > 0.999


@pytest.mark.parametrize("key,layer", [("xrv-densenet", "features.norm5"), ("xrv-resnet", "layer4")])
def test_explain_conv_layers(built, key, layer):
    m = built[key]
    spec = M.explain_layers(m)
    (name, module), = spec.layers
    assert module is m.net.get_submodule(layer)
    acts = []
    h = module.register_forward_hook(lambda mod, i, o: acts.append(o))
    with torch.no_grad():
        m(torch.randn(1, 1, 128, 128))
    h.remove()
    assert spec.reshape(acts[0]).shape[2:] == (4, 4)  # stride 32


@pytest.mark.parametrize("name", ["biomedclip", "medsiglip", "clip"])
def test_text_tower_in_the_image_space(built, standins, name):
    m = built[name]
    prompts = ["normal chest x-ray", "chest x-ray with pneumonia", "photo of effusion"]
    t = m.encode_text(prompts)
    assert m.has_text_tower and t.shape == (3, m.embedding_dim)
    assert torch.allclose(t.norm(dim=1), torch.ones(3), atol=1e-5) and not torch.allclose(t[0], t[1])
    with torch.no_grad():  # the library's own tokenizer and text features, by hand
        if name == "biomedclip":
            import open_clip
            tok = open_clip.get_tokenizer(f"local-dir:{standins[name]}")
            ref = m.net.encode_text(tok(prompts))
        else:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(standins[name])
            if name == "medsiglip":
                ids = tok(prompts, padding="max_length", max_length=16, return_tensors="pt")
                ref = m.net.get_text_features(input_ids=ids["input_ids"])
            else:
                ids = tok(prompts, padding=True, return_tensors="pt")
                ref = m.net.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    assert torch.allclose(t, F.normalize(ref, dim=1), atol=1e-5)
    assert not built["raddino"].has_text_tower and not hasattr(built["raddino"], "encode_text")
    headed = M.build_model(name, pretrained_weights=str(standins[name]), encoder_head=True, embedding_dim=8)
    with pytest.raises(ValueError, match="encoder-head"):
        headed.encode_text(prompts)


def test_extract_embeddings_with_a_local_raddino_folder(demo_data, standins, tmp_path):
    import embeddings
    import extract_embeddings as ee
    out = tmp_path / "raddino.npy"
    args = ee.get_args_parser().parse_args(
        ["--dataset-dir", str(demo_data), "--test-image-list", str(demo_data / "test_split.txt"),
         "--output", str(out), "--workers", "0", "--device", "cpu", "--model", "raddino",
         "--pretrained-weights", str(standins["raddino"]), "--batch-size", "5"])
    assert ee.run(args) == 0
    s = embeddings.load(out)
    assert s.embeddings.shape[1] == 32 and np.allclose(np.linalg.norm(s.embeddings, axis=1), 1, atol=1e-5)


def test_extract_embeddings_under_torchrun_equals_one_process(demo_data, standins, tmp_path):
    """extract_embeddings.py from the local folder in one process, and from a checkpoint of the same encoder (with a
    trained head) under torchrun with two CPU ranks (gloo): rows in list order, as one process writes them. The one
    torchrun test of the script (--resume and the rebuild from the stored --pretrained-weights included)."""
    import embeddings
    import extract_embeddings as ee
    torch.manual_seed(0)
    m = M.build_model("raddino", pretrained_weights=str(standins["raddino"]), encoder_head=True, embedding_dim=8)
    ckpt = tmp_path / "raddino_best_ckpt.pth"
    torch.save(M.make_checkpoint(m, epoch=1, class_names=["normal", "pneumonia", "COVID-19"]), ckpt)
    one, ddp = tmp_path / "one.npy", tmp_path / "ddp.npy"
    data = ["--dataset-dir", str(demo_data), "--test-image-list", str(demo_data / "test_split.txt"), "--workers", "0",
            "--batch-size", "5"]
    assert ee.run(ee.get_args_parser().parse_args(["--resume", str(ckpt), *data, "--output", str(one),
                                                   "--device", "cpu"])) == 0
    s = embeddings.load(one)
    assert s.meta["encoder"]["id"] == M.ENCODERS["raddino"]["id"] and s.meta["encoder"]["head"]
    assert s.meta["encoder"]["licence"] == M.ENCODERS["raddino"]["licence"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "extract_embeddings.py"), "--resume", str(ckpt), *data, "--output", str(ddp)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = embeddings.load(ddp)
    assert list(d.image_ids) == list(s.image_ids) and list(d.labels) == list(s.labels)
    np.testing.assert_allclose(d.embeddings, s.embeddings, atol=1e-5)
    # and the rows are the model's own, in list order
    from dataset import ImageListDataset
    ds = ImageListDataset(demo_data / "test_split.txt", demo_data / "test", transform=M.get_transform(m))
    with torch.no_grad():
        want = m.eval()(torch.stack([ds[i][0] for i in range(len(ds))]))
    np.testing.assert_allclose(s.embeddings, want.numpy(), atol=1e-5)


def test_torchxrayvision_imports_cleanly_beside_the_toolkit_model():
    """`import model` then a plain `import torchxrayvision` (its bundled baseline imports `model.utils`), then the
    wrapper; here, in this process, the other order (the wrapper has imported it), then a plain import."""
    code = ("import sys, importlib; path = list(sys.path); import model; import torchxrayvision as xrv; "
            f"assert model.__file__ == {str(ROOT / 'model.py')!r}; assert sys.modules['model'] is model; "
            "assert 'model.utils' not in sys.modules and sys.path == path; xrv.models.DenseNet(weights=None); "
            "model.build_model('xrv', pretrained=False); assert importlib.import_module('model') is model; print('ok')")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
    # in this process too, whatever the tests before imported: the toolkit's model stays `model`
    M.build_model("xrv", pretrained=False)
    import torchxrayvision  # noqa: F401
    assert sys.modules["model"] is M and "model.utils" not in sys.modules
    assert not any("baseline_models" in p for p in sys.path)


def test_zero_shot_concept_profile_through_the_text_tower(standins, tmp_path):
    """concepts.py profile --model clip: probability = sigmoid(scale * (cos(image, pos) - cos(image, neg))), with
    the image embedding extract_embeddings.py would write and the prompts through the model's own text tower,
    computed here by hand from the wrapper's parts."""
    from make_demo_data import make_demo_data
    import concepts
    from dataset import ImageListDataset
    from ontology import load_vocabulary
    data = tmp_path / "demo"
    make_demo_data(data, num_patients=6, images_per_patient=1, size=64, seed=0)
    out = tmp_path / "clip.csv"
    rc = concepts.main(concepts.get_args_parser().parse_args(
        ["profile", "--model", "clip", "--pretrained-weights", str(standins["clip"]), "--dataset-dir", str(data),
         "--test-image-list", str(data / "test_split.txt"), "--concepts", "pneumonia", "pleural_effusion",
         "--output", str(out), "--device", "cpu"]))
    assert rc == 0
    rows = [line.split(",") for line in out.read_text().splitlines()]
    m = M.build_model("clip", pretrained_weights=str(standins["clip"])).eval()
    ds = ImageListDataset(data / "test_split.txt", data / "test", transform=M.get_transform(m))
    vocab = load_vocabulary()
    with torch.no_grad():
        img = m(torch.stack([ds[i][0] for i in range(len(ds))]))
        for j, c in enumerate(["pneumonia", "pleural_effusion"]):
            cid = vocab.resolve(c)
            pos = F.normalize(m.encode_text([concepts.PROMPT_POS.format(t) for t in vocab.prompt_terms(cid)]).mean(0),
                              dim=0)
            neg = F.normalize(m.encode_text([concepts.PROMPT_NEG.format(t) for t in vocab.prompt_terms(cid)]).mean(0),
                              dim=0)
            want = torch.sigmoid(m.net.logit_scale.exp() * (img @ pos - img @ neg))
            got = torch.tensor([float(r[1 + j]) for r in rows[1:]])
            assert torch.allclose(got, want, atol=1e-5), (c, got, want)
    assert rows[0][0] == "image_id" and [r[0] for r in rows[1:]] == list(ds.image_ids)
    # a model without a text tower is refused before any image is read, naming the ones that have one
    with pytest.raises(ValueError, match=r"no text tower.*biomedclip.*clip.*medsiglip"):
        concepts.run_profile(concepts.get_args_parser().parse_args(
            ["profile", "--model", "raddino", "--dataset-dir", str(data), "--test-image-list",
             str(data / "test_split.txt"), "--output", str(tmp_path / "x.csv")]), vocab)


def test_ood_mcm_in_checkpoint_mode_uses_the_encoders_text_tower(standins, demo_data, tmp_path):
    """ood.py --resume CKPT --method mcm on a CLIP stand-in: the class prompts through the model's own text tower;
    each query's score is -max softmax(cos(query, prompt_c) / T) over the ID classes, recomputed here by hand."""
    import ood
    from dataset import ImageListDataset
    m = M.build_model("clip", pretrained_weights=str(standins["clip"])).eval()
    ckpt = tmp_path / "clip.pth"
    torch.save(M.make_checkpoint(m, epoch=0, class_names=["normal", "pneumonia", "COVID-19"]), ckpt)
    out = tmp_path / "mcm"
    rc = ood.main(ood.get_args_parser().parse_args(
        [str(a) for a in ["--resume", ckpt, "--method", "mcm", "--dataset-dir", demo_data, "--train-image-list",
                          demo_data / "train_split.txt", "--test-image-list", demo_data / "test_split.txt",
                          "--ood-classes", "COVID-19", "--workers", 0, "--device", "cpu", "--save-dir", out]]))
    assert rc == 0
    ds = ImageListDataset(demo_data / "test_split.txt", demo_data / "test", transform=M.get_transform(m))
    with torch.no_grad():
        q = m(torch.stack([ds[i][0] for i in range(len(ds))]))
        t = m.encode_text([ood.DEFAULT_PROMPT.format(c) for c in ("normal", "pneumonia")])
    want = -torch.softmax(q @ t.T, dim=1).max(dim=1).values
    np.testing.assert_allclose(np.load(out / "ood_scores.npy"), want.numpy(), atol=1e-5)
