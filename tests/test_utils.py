import random

import numpy as np
import pytest
import torch

import utils


def test_rng_states_round_trip_through_weights_only_load(tmp_path):
    utils.set_seed(3)
    states = utils.get_rng_states()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    path = tmp_path / "rng.pth"
    utils.atomic_torch_save({"rng": states}, path)
    random.random(), np.random.rand(), torch.rand(1)  # move every generator on
    utils.set_rng_states(torch.load(path, weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_atomic_save_keeps_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "ckpt.pth"
    utils.atomic_torch_save({"a": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        utils.atomic_torch_save({"a": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temporary file left behind


def test_save_json_and_text(tmp_path):
    utils.save_json({"b": 2, "a": [1, 2]}, tmp_path / "x.json")
    assert (tmp_path / "x.json").read_text() == '{\n  "b": 2,\n  "a": [\n    1,\n    2\n  ]\n}\n'


def test_ensure_writable_dir_rejects_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="--out"):
        utils.ensure_writable_dir(f, flag="--out")


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert utils.init_distributed() is False
    assert (utils.get_rank(), utils.get_world_size(), utils.is_main_process()) == (0, 1, True)
    assert utils.all_gather_object({"x": 1}) == [{"x": 1}]


def test_get_device():
    assert utils.get_device("cpu") == torch.device("cpu")
    assert utils.get_device(None).type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cpu"):
            utils.get_device("cuda")


def test_atomic_writes_honour_the_umask(tmp_path):
    import os
    import stat
    old = os.umask(0o022)
    try:
        utils.save_json({"a": 1}, tmp_path / "shared.json")
        os.umask(0o077)
        utils.save_json({"a": 1}, tmp_path / "private.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600


def test_progress_prints_lines_without_a_terminal():
    import io
    stream = io.StringIO()
    bar = utils.Progress(range(3), desc="epoch 1", unit="steps", every_s=0, stream=stream)
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix(loss="0.1")
    assert seen == [0, 1, 2]
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("epoch 1: 1/3 steps (33%)") and "loss 0.1" in lines[0]
    quiet = io.StringIO()
    assert list(utils.Progress(range(3), enabled=False, every_s=0, stream=quiet)) == [0, 1, 2]
    assert quiet.getvalue() == ""


def test_check_writable_dir_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    assert utils.check_writable_dir(target) == target and not (tmp_path / "a").exists()


def test_run_main_turns_bad_input_into_one_line_and_keeps_bugs(capsys):
    def bad(args):
        raise ValueError("list a.txt:3: unknown label 'x'\n  allowed: normal, pneumonia")

    assert utils.run_main(bad, None, "tool.py") == 2
    assert capsys.readouterr().err == "tool.py: error: list a.txt:3: unknown label 'x' allowed: normal, pneumonia\n"
    assert utils.run_main(lambda a: 0, None, "tool.py") == 0

    def bug(args):
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        utils.run_main(bug, None, "tool.py")


def test_save_figure_is_atomic_and_leaves_the_old_file_on_failure(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp_path / "f.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    utils.save_figure(fig, path)
    first = path.read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and not plt.get_fignums()

    def broken(f, **kw):
        f.write(b"half")
        raise OSError("disk full")

    fig, _ = plt.subplots()
    fig.savefig = broken
    with pytest.raises(OSError):
        utils.save_figure(fig, path)
    assert path.read_bytes() == first and sorted(p.name for p in tmp_path.iterdir()) == ["f.png"]


def test_runtime_flags_have_one_type_and_default(monkeypatch):
    import argparse
    p = argparse.ArgumentParser(parents=[utils.get_runtime_parser()])
    a = p.parse_args([])
    assert (a.device, a.amp, a.eval_batch_size, a.chunk_size) == (None, "off", 32, None)
    assert p.parse_args(["--amp"]).amp == "auto" and p.parse_args(["--amp", "bf16"]).amp == "bf16"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert utils.resolve_amp("auto", cpu) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert utils.resolve_amp("auto", cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert utils.resolve_amp("auto", cuda) is None
    assert utils.resolve_amp(True, cuda) is torch.bfloat16 and utils.resolve_amp(False, cuda) is None
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        utils.resolve_amp("fp16", cpu)
