"""The ConceptCLIP wrapper through the real AutoModel/AutoProcessor.from_pretrained(...,
trust_remote_code=True) path, on a tiny stand-in written to a temporary folder.

The stand-in has ConceptCLIP's interface: a PreTrainedModel from remote code whose
`encode_image(pixel_values)` returns (pooled image features, token features) and whose forward
returns a dict with "image_features"; a remote ProcessorMixin holding a SiglipImageProcessor
(squash resize to {"height", "width"}, its own image_mean / image_std).
"""
import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import model as M

MODELING = '''
import torch.nn as nn
from transformers import PretrainedConfig, PreTrainedModel


class TinyConceptCLIPConfig(PretrainedConfig):
    model_type = "tiny_conceptclip"

    def __init__(self, embed_dim=6, **kwargs):
        self.embed_dim = embed_dim
        super().__init__(**kwargs)


class TinyConceptCLIP(PreTrainedModel):
    config_class = TinyConceptCLIPConfig

    def __init__(self, config):
        super().__init__(config)
        # BatchNorm and Dropout make train/eval mode visible in the outputs
        self.visual = nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, config.embed_dim))
        self.text = nn.Embedding(10, config.embed_dim)  # the text tower is never used
        self.post_init()

    def encode_image(self, pixel_values):
        feats = self.visual(pixel_values)
        return feats, feats[:, None, :]

    def forward(self, pixel_values=None, input_ids=None):
        return {"image_features": self.encode_image(pixel_values)[0]}
'''

PROCESSING = '''
from transformers import ProcessorMixin


class TinyConceptCLIPProcessor(ProcessorMixin):
    attributes = ["image_processor"]
    image_processor_class = "SiglipImageProcessor"

    def __init__(self, image_processor=None, **kwargs):
        super().__init__(image_processor, **kwargs)

    def __call__(self, images=None, **kwargs):
        return self.image_processor(images, **kwargs)
'''

MEAN, STD, SIDE = [0.25, 0.5, 0.75], [0.5, 0.25, 0.125], 40


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel

    d = tmp_path_factory.mktemp("conceptclip_standin")
    (d / "config.json").write_text(json.dumps({
        "model_type": "tiny_conceptclip", "embed_dim": 6, "architectures": ["TinyConceptCLIP"],
        "auto_map": {"AutoConfig": "modeling_tiny_conceptclip.TinyConceptCLIPConfig",
                     "AutoModel": "modeling_tiny_conceptclip.TinyConceptCLIP"}}))
    (d / "modeling_tiny_conceptclip.py").write_text(textwrap.dedent(MODELING))
    (d / "processing_tiny_conceptclip.py").write_text(textwrap.dedent(PROCESSING))
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "processor_class": "TinyConceptCLIPProcessor",
        "auto_map": {"AutoProcessor": "processing_tiny_conceptclip.TinyConceptCLIPProcessor"},
        "do_resize": True, "size": {"height": SIDE, "width": SIDE}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": MEAN, "image_std": STD}))
    torch.manual_seed(0)
    net = AutoModel.from_config(AutoConfig.from_pretrained(str(d), trust_remote_code=True),
                                trust_remote_code=True)
    with torch.no_grad():  # weights that differ from any fresh init
        for p in net.parameters():
            p.add_(0.1)
    weights = {k: v.clone().contiguous() for k, v in net.state_dict().items()}
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d, weights


def build(path, **kw):
    return M.build_model("conceptclip", conceptclip_path=str(path), **kw)


def test_loads_pretrained_weights_frozen_by_default(standin):
    path, weights = standin
    m = build(path)
    assert type(m.clip).__name__ == "TinyConceptCLIP"  # the remote code, not a lookalike
    sd = m.clip.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in weights.items())
    assert m.embedding_dim == 6 and m.head is None
    assert m.pretrained_modules() == [m.clip]
    assert not any(p.requires_grad for p in m.parameters())
    assert m.model_args == {"conceptclip_path": str(path), "conceptclip_batch_size": 8,
                            "conceptclip_head": False, "embedding_dim": None,
                            "pretrained": True, "freeze_backbone": True}
    m.train()
    assert not m.clip.training  # frozen: BatchNorm statistics and dropout stay off
    x = torch.randn(3, 3, SIDE, SIDE)
    z1, z2 = m(x), m(x)
    assert torch.equal(z1, z2) and not z1.requires_grad


def test_data_config_is_the_processors_squash(standin):
    path, _ = standin
    m = build(path)
    assert m.data_config == {"img_size": SIDE, "mean": MEAN, "std": STD, "resize_mode": "squash",
                             "interpolation": "bicubic"}  # the stand-in processor says resample=3
    resize = M.get_transform(m).transforms[0]
    assert tuple(resize.size) == (SIDE, SIDE) and resize.interpolation.value == "bicubic"
    # left half black, right half white, 2:1 wide: a squash keeps both halves, a crop would not
    img = Image.new("RGB", (120, 60), (0, 0, 0))
    img.paste((255, 255, 255), (60, 0, 120, 60))
    x = M.get_transform(m)(img)
    assert x.shape == (3, SIDE, SIDE)
    black = torch.tensor([(0 - mu) / s for mu, s in zip(MEAN, STD)])  # [-0.5, -2, -6]
    white = torch.tensor([(1 - mu) / s for mu, s in zip(MEAN, STD)])  # [1.5, 2, 2]
    assert torch.allclose(x[:, SIDE // 2, 0], black, atol=1e-5)
    assert torch.allclose(x[:, SIDE // 2, SIDE - 1], white, atol=1e-5)


def test_micro_batches_equal_one_full_batch(standin, monkeypatch):
    path, _ = standin
    m = build(path, conceptclip_batch_size=2).eval()
    x = torch.randn(5, 3, SIDE, SIDE)
    sizes = []
    encode = m.clip.encode_image
    monkeypatch.setattr(m.clip, "encode_image", lambda px: sizes.append(len(px)) or encode(px))
    z = m(x)
    assert sizes == [2, 2, 1]
    expected = F.normalize(encode(x)[0], dim=1)  # the whole batch at once, by hand
    assert z.shape == (5, 6) and torch.allclose(z, expected, atol=1e-6)


def test_trainable_head_created_in_init(standin):
    path, _ = standin
    m = build(path, conceptclip_head=True, embedding_dim=4)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names == ["head.weight", "head.bias"]  # exists before any forward pass
    assert (m.head.in_features, m.head.out_features, m.embedding_dim) == (6, 4, 4)
    m.train()
    z = m(torch.randn(3, 3, SIDE, SIDE))
    assert z.shape == (3, 4) and torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    z.sum().backward()
    assert m.head.weight.grad is not None and torch.isfinite(m.head.weight.grad).all()
    assert all(p.grad is None for p in m.clip.parameters())
    same_width = build(path, conceptclip_head=True)
    assert (same_width.head.in_features, same_width.head.out_features) == (6, 6)
    with pytest.raises(ValueError, match="--conceptclip-head"):
        build(path, embedding_dim=4)


def test_unfrozen_backbone_trains(standin):
    path, _ = standin
    m = build(path, freeze_backbone=False).train()
    assert all(p.requires_grad for p in m.clip.parameters()) and m.clip.training
    m(torch.randn(2, 3, SIDE, SIDE)).sum().backward()
    assert m.clip.visual[-1].weight.grad is not None


def test_checkpoint_round_trip_rebuilds_from_config(standin, tmp_path):
    path, _ = standin
    m = build(path, conceptclip_head=True, embedding_dim=4).eval()
    torch.save(M.make_checkpoint(m), tmp_path / "cc.pth")
    m2, ckpt = M.load_checkpoint(tmp_path / "cc.pth", expected_model="conceptclip")
    assert ckpt["model_args"]["pretrained"] is True and m2.model_args == m.model_args
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))


def test_missing_model_names_conceptclip_path(tmp_path):
    with pytest.raises(RuntimeError, match="--conceptclip-path"):
        build(tmp_path / "nowhere")
