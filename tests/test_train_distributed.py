"""train.py under torchrun: 2 CPU processes (gloo), tiny model, one short epoch; rank 0 alone writes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STEM = "covid_convnextv2_embed_16_seed_0"


def test_torchrun_two_cpu_processes(demo_data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), "--model", "convnextv2", "--convnext-backbone", "convnextv2_atto", "--img-size", "64",
           "--no-pretrained", "--embedding-dim", "16", "-p", "3", "-k", "2", "--iters-per-epoch", "2", "--epochs", "1",
           "--workers", "0", "--device", "cpu", "--val-fraction", "0.3", "--dataset-dir", str(demo_data),
           "--train-image-list", str(demo_data / "train_split.txt"), "--test-image-list",
           str(demo_data / "test_split.txt"), "--save-dir", str(tmp_path), "--save-freq", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / STEM
    # one process wrote: one log line per epoch, one args print, one test result
    assert sorted(p.name for p in tmp_path.iterdir()) == [STEM]
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["args.json", "log.jsonl", "training_curves.png", "results.json", f"{STEM}_last_ckpt.pth",
         f"{STEM}_best_ckpt.pth", f"{STEM}_epoch_1_ckpt.pth"])
    rows = (run_dir / "log.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["epoch"] == 1
    assert proc.stdout.count("epoch 1/1") == 1 and proc.stdout.count("git:") == 1
    res = json.loads((run_dir / "results.json").read_text())
    n_test = len((demo_data / "test_split.txt").read_text().splitlines())
    assert res["num_queries"] == n_test  # rank 0 evaluated every test image exactly once
    ckpt = torch.load(run_dir / f"{STEM}_last_ckpt.pth", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the unwrapped module was saved
    assert ckpt["args"]["labels_per_batch"] == 3
