"""run_backbone_comparison.sh end to end on demo data (tiny models through environment overrides)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from model import build_model, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_backbone_comparison.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_script(env_overrides, timeout=240):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", **env_overrides)
    for key in ("DATASET_DIR", "TEST_LIST", "CONVNEXT_CKPT", "MODEL1_ARGS", "MODEL2_ARGS"):
        if key not in env_overrides:
            env.pop(key, None)  # a variable set in the caller's shell must not leak into the test
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_end_to_end(demo_data, tmp_path):
    torch.manual_seed(0)
    model = build_model("convnextv2", convnext_backbone="convnextv2_atto", pretrained=False, img_size=64,
                        embedding_dim=32)
    ckpt = tmp_path / "demo_best_ckpt.pth"
    torch.save(make_checkpoint(model, epoch=1), ckpt)
    out = tmp_path / "results"
    env = {"DEMO_DIR": str(demo_data), "DEMO_CKPT": str(ckpt), "OUT_DIR": str(out), "WORKERS": "0",
           "BATCH_SIZE": "16", "VISUALIZE_SAMPLES": "2", "DEVICE": "cpu"}
    proc = run_script(env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((out / "backbone_comparison_results.json").read_text())
    assert res["model1"]["name"] == "demo-trained" and res["model2"]["name"] == "untrained-atto"
    assert res["num_queries"] == len((demo_data / "test_split.txt").read_text().split("\n")) - 1
    assert (out / "overlap_histogram.png").is_file() and len(list(out.glob("query_*_comparison.png"))) == 2
    assert (out / "embeddings" / "model1.npy").is_file() and "Results:" in proc.stdout
    # second run: embeddings reused, comparison redone
    again = run_script(env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("== reusing") == 2


def test_real_mode_needs_a_checkpoint(tmp_path):
    proc = run_script({"DATASET_DIR": str(tmp_path), "TEST_LIST": str(tmp_path / "test.txt"),
                       "OUT_DIR": str(tmp_path / "r")}, timeout=30)
    assert proc.returncode == 2 and "CONVNEXT_CKPT" in proc.stderr
