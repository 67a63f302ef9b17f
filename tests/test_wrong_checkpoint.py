"""A checkpoint of the wrong kind given to a tool: one line naming the file, before any work (issue 19, item 12).

train_fusion.py writes learned fusion heads (model "fusion") with the same *_best_ckpt.pth naming as train.py;
every tool that takes an image model's --resume must refuse one, and train_fusion.py --apply an image model.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import audit_data
import explain
import model as M
import ood
import test as test_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fusion_ckpt(tmp_path_factory):
    """A tiny fusion head saved as train_fusion.py saves one (make_checkpoint of the head, plus training state)."""
    head = M.build_model("fusion", backbone=M.fusion_spec("concat", [8, 8]), embedding_dim=4)
    opt = torch.optim.Adam(head.parameters())
    path = tmp_path_factory.mktemp("fusion") / "fusion_concat_embed_4_seed_0_best_ckpt.pth"
    torch.save(M.make_checkpoint(head, optimizer=opt.state_dict(), epoch=1, best_metric=0.5), path)
    return path


@pytest.fixture(scope="module")
def image_ckpt(tmp_path_factory):
    m = M.build_model("timm", backbone="test_resnet", pretrained=False, use_mxa=False, img_size=48)
    path = tmp_path_factory.mktemp("image") / "image_best_ckpt.pth"
    torch.save(M.make_checkpoint(m, epoch=1), path)
    return path


def assert_refused(rc, err, ckpt, out):
    assert rc not in (0, None), err
    assert "Traceback" not in err, err
    lines = [l for l in err.strip().splitlines() if str(ckpt) in l]
    assert len(lines) == 1 and "fusion head" in lines[0] and "train_fusion.py --apply" in lines[0], err
    assert not out.exists(), f"{out} was created"


def lists(demo):
    return ["--dataset-dir", str(demo), "--test-image-list", str(demo / "test_split.txt")]


def tool_argv(tool, ckpt, demo, out):
    common = ["--resume", str(ckpt), "--device", "cpu", "--workers", "0"]
    if tool is test_script:
        return common + lists(demo) + ["--save-dir", str(out)]
    if tool is ood:
        return common + lists(demo) + ["--train-image-list", str(demo / "train_split.txt"), "--save-dir", str(out)]
    if tool is audit_data:
        return common + lists(demo) + ["--train-image-list", str(demo / "train_split.txt"), "--save-dir", str(out)]
    return common + lists(demo) + ["--save-dir", str(out), "--num-queries", "1", "--topk", "1"]  # explain.py


@pytest.mark.parametrize("tool", [test_script, ood, audit_data, explain], ids=lambda t: t.__name__)
def test_tools_refuse_a_fusion_checkpoint_in_one_line(tool, fusion_ckpt, demo_data, tmp_path, capsys):
    out = tmp_path / "out"
    try:
        rc = tool.main(tool.get_args_parser().parse_args(tool_argv(tool, fusion_ckpt, demo_data, out)))
    except SystemExit as e:
        rc = e.code
    assert_refused(rc, capsys.readouterr().err, fusion_ckpt, out)


def test_extract_embeddings_refuses_a_fusion_checkpoint_in_one_line(fusion_ckpt, demo_data, tmp_path):
    # through the command line: extract_embeddings.py turns the error into its one line in __main__
    out = tmp_path / "emb" / "x.npy"
    proc = subprocess.run([sys.executable, str(ROOT / "extract_embeddings.py"), "--resume", str(fusion_ckpt),
                           *lists(demo_data), "--output", str(out), "--device", "cpu", "--workers", "0"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert_refused(proc.returncode, proc.stderr, fusion_ckpt, out.parent)


def test_load_checkpoint_kinds(fusion_ckpt, image_ckpt):
    with pytest.raises(M.CheckpointError) as err:
        M.load_checkpoint(fusion_ckpt)  # image models by default
    assert str(fusion_ckpt) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(M.CheckpointError, match="fusion head"):
        M.read_checkpoint(fusion_ckpt)
    head, _ = M.load_checkpoint(fusion_ckpt, kind="fusion")
    assert head.model_name == "fusion"
    head, _ = M.load_checkpoint(fusion_ckpt, expected_model="fusion")  # train_fusion.py's older call
    assert head.model_name == "fusion"
    assert M.read_checkpoint(fusion_ckpt, kind=None)["model_name"] == "fusion"
    with pytest.raises(M.CheckpointError, match=r"image model \('timm'.*train_fusion.py"):
        M.load_checkpoint(image_ckpt, kind="fusion")
    with pytest.raises(ValueError, match="not an image model"):
        M.get_transform(head)  # the last line of defence: a fusion head has no image transform
    with pytest.raises(SystemExit):  # an image tool cannot even ask for one
        M.get_model_parser().parse_args(["--model", "fusion"])
