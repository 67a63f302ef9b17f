"""run_backbone_comparison.sh end to end on demo data (tiny models through environment overrides)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import build_model, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_backbone_comparison.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_script(env_overrides, timeout=240, args=()):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", **env_overrides)
    for key in ("DATASET_DIR", "TEST_LIST", "CONVNEXT_CKPT", "MODEL1_ARGS", "MODEL2_ARGS", "OVERWRITE", "PYTHON",
                "EMB_DIR", "WORKERS"):
        if key not in env_overrides:
            env.pop(key, None)  # a variable set in the caller's shell must not leak into the test
    env.setdefault("PYTHON", sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_demo_end_to_end(demo_data, tmp_path):
    torch.manual_seed(0)
    model = build_model("convnextv2", convnext_backbone="convnextv2_atto", pretrained=False, img_size=64,
                        embedding_dim=32)
    ckpt = tmp_path / "demo_best_ckpt.pth"
    torch.save(make_checkpoint(model, epoch=1), ckpt)
    out = tmp_path / "results"
    env = {"DEMO_DIR": str(demo_data), "DEMO_CKPT": str(ckpt), "OUT_DIR": str(out), "WORKERS": "0",
           "BATCH_SIZE": "16", "VISUALIZE_SAMPLES": "2", "DEVICE": "cpu", "SEED": "7"}
    proc = run_script(env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((out / "backbone_comparison_results.json").read_text())
    assert res["model1"]["name"] == "demo-trained" and res["model2"]["name"] == "untrained-atto"
    assert res["num_queries"] == len((demo_data / "test_split.txt").read_text().split("\n")) - 1
    assert (out / "overlap_histogram.png").is_file() and len(list(out.glob("query_*_comparison.png"))) == 2
    assert (out / "embeddings" / "model1.npy").is_file() and "Results:" in proc.stdout
    assert json.loads((out / "embeddings" / "model2_meta.json").read_text())["seed"] == 7  # SEED reaches extraction
    # second run into the same OUT_DIR: refused before any work, the results untouched
    before = (out / "backbone_comparison_results.json").stat().st_mtime_ns
    again = run_script(env)
    assert again.returncode == 2 and "already holds results" in again.stderr and "--overwrite" in again.stderr
    assert "== extracting" not in again.stdout and "== reusing" not in again.stdout
    assert (out / "backbone_comparison_results.json").stat().st_mtime_ns == before
    # a new OUT_DIR reuses the embeddings; --overwrite replaces the results
    other = dict(env, OUT_DIR=str(tmp_path / "results2"), EMB_DIR=str(out / "embeddings"))
    reused = run_script(other)
    assert reused.returncode == 0, reused.stderr[-3000:]
    assert reused.stdout.count("== reusing") == 2 and (tmp_path / "results2" / "backbone_comparison_results.json").is_file()
    replaced = run_script(env, args=["--overwrite"])
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert replaced.stdout.count("== extracting") == 2
    assert (out / "backbone_comparison_results.json").stat().st_mtime_ns != before


def test_help_runs_nothing_and_unknown_arguments_are_refused(tmp_path):
    out = tmp_path / "never"
    proc = run_script({"OUT_DIR": str(out)}, timeout=30, args=["--help"])
    assert proc.returncode == 0 and "Usage: bash run_backbone_comparison.sh" in proc.stdout
    assert "PYTHON=" in proc.stdout and "OUT_DIR=" in proc.stdout and not out.exists()
    proc = run_script({"OUT_DIR": str(out)}, timeout=30, args=["--epochs", "3"])
    assert proc.returncode == 2 and "unknown argument '--epochs'" in proc.stderr and not out.exists()


def test_an_interpreter_without_torch_is_named(tmp_path):
    fake = tmp_path / "python"  # an interpreter that cannot import torch, like a system python beside a venv
    fake.write_text("#!/usr/bin/env bash\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    out = tmp_path / "never"
    proc = run_script({"PYTHON": str(fake), "OUT_DIR": str(out)}, timeout=30)
    assert proc.returncode == 2 and f"{fake}" in proc.stderr and "cannot import torch" in proc.stderr
    assert "set PYTHON" in proc.stderr and not out.exists()
    proc = run_script({"PYTHON": str(tmp_path / "missing-python"), "OUT_DIR": str(out)}, timeout=30)
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_real_mode_needs_a_checkpoint(tmp_path):
    proc = run_script({"DATASET_DIR": str(tmp_path), "TEST_LIST": str(tmp_path / "test.txt"),
                       "OUT_DIR": str(tmp_path / "r")}, timeout=30)
    assert proc.returncode == 2 and "CONVNEXT_CKPT" in proc.stderr
