"""run_backbone_comparison.sh end to end on demo data (tiny models through environment overrides)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from model import build_model, fusion_spec, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_backbone_comparison.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_script(env_overrides, timeout=240, args=()):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", **env_overrides)
    for key in ("DATASET_DIR", "TEST_LIST", "CONVNEXT_CKPT", "MODEL1_ARGS", "MODEL2_ARGS"):
        if key not in env_overrides:
            env.pop(key, None)  # a variable set in the caller's shell must not leak into the test
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


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
    # the learned fusion: trained on the training list's embeddings, applied to the test list's, its row printed
    assert (out / "embeddings" / "fused.npy").is_file() and "Learned mlp fusion" in res["paired"]["mAP@5"]
    assert "Learned mlp fusion" in proc.stdout
    # same-patient results are excluded by default, as in the demo (EXCLUDE_SAME_PATIENT=1)
    assert "excluding same-patient images" in proc.stdout
    # second run: the results already there are never replaced silently
    refused = run_script(env)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr and "== extracting" not in refused.stdout
    # with --overwrite: embeddings reused, comparison redone (the learned fusion, tested above, left out for time)
    again = run_script(dict(env, LEARNED_FUSION="0"), args=["--overwrite"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("== reusing") == 2 and "== extracting" not in again.stdout
    # issue 21, the N-way mode (BACKBONES) on the same embeddings: the two models' sets are reused and a third set
    # is already there, so no image is embedded again (every model is still checked). The learned fusion of a subset
    # (FUSION_SUBSET) is left out here to keep the suite short: train_fusion.py on three sets and its row in the
    # N-way table are tested in tests/test_backbone_nway.py
    write_demo_set(demo_data, out / "embeddings" / "tvit.npy", 8, seed=1)
    nway = tmp_path / "nway"
    proc = run_script(dict(env, OUT_DIR=str(nway), EMB_DIR=str(out / "embeddings"), K="3", K_VALUES="1 3",
                           LEARNED_FUSION="0",
                           ARGS_tvit="--model timm --backbone test_vit --no-pretrained --img-size 64",
                           BACKBONES=f"model1:{ckpt}; tvit; model2=--model convnextv2 --convnext-backbone "
                                     f"convnextv2_atto --no-pretrained --img-size 64"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("== reusing") == 3 and "== extracting" not in proc.stdout
    res = json.loads((nway / "results.json").read_text())
    assert [m["name"] for m in res["models"]] == ["model1", "tvit", "model2"] and res["k_values"] == [1, 3]
    assert np.array(res["overlap_matrix"]["values"]).shape == (3, 3) and res["exclude_same_patient"]
    assert (nway / "overlap_matrix.png").is_file() and (nway / "spearman_matrix.png").is_file()
    assert "P@k as in Denner et al. 2025" in proc.stdout and "RRF all (k=60)" in proc.stdout


def test_real_mode_needs_a_checkpoint(tmp_path):
    proc = run_script({"DATASET_DIR": str(tmp_path), "TEST_LIST": str(tmp_path / "test.txt"),
                       "OUT_DIR": str(tmp_path / "r")}, timeout=30)
    assert proc.returncode == 2 and "CONVNEXT_CKPT" in proc.stderr


def test_help_prints_usage_and_runs_nothing(tmp_path):
    proc = run_script({"OUT_DIR": str(tmp_path / "r")}, timeout=30, args=["--help"])
    assert proc.returncode == 0 and "PYTHON=" in proc.stdout and "--overwrite" in proc.stdout
    assert not (tmp_path / "r").exists() and "==" not in proc.stdout


def test_interpreter_without_torch_is_refused(tmp_path):
    proc = run_script({"PYTHON": "/bin/false", "OUT_DIR": str(tmp_path / "r")}, timeout=30)
    assert proc.returncode == 2 and "cannot import torch" in proc.stderr and "PYTHON=/bin/false" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_existing_results_refused_before_any_work(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "backbone_comparison_results.json").write_text("{}")
    proc = run_script({"OUT_DIR": str(out), "DEMO_DIR": str(tmp_path / "demo")}, timeout=60)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert not (tmp_path / "demo").exists() and (out / "backbone_comparison_results.json").read_text() == "{}"


def test_seed_passed_and_workers_not_forced():
    text = SCRIPT.read_text()
    assert '--seed "$SEED"' in text and "WORKERS=${WORKERS:-}" in text and '"${PYTHON:-python}"' not in text
    assert "PYTHON=${PYTHON:-python}" in text


def test_fusion_checkpoint_refused_in_one_line_before_any_folder(tmp_path):
    # a train_fusion.py head has the same *_best_ckpt.pth naming as an image model's checkpoint
    head = build_model("fusion", backbone=fusion_spec("concat", [4, 4]), embedding_dim=4, pretrained=False)
    ckpt = tmp_path / "fusion_concat_best_ckpt.pth"
    torch.save(make_checkpoint(head, epoch=1), ckpt)
    out = tmp_path / "r"
    proc = run_script({"DEMO_DIR": str(tmp_path / "demo"), "DEMO_CKPT": str(ckpt), "OUT_DIR": str(out)}, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert f"{ckpt} is a learned fusion head" in proc.stderr and "train_fusion.py --apply" in proc.stderr
    assert not out.exists() and not (tmp_path / "demo").exists()  # no embeddings folder, no demo data


def test_missing_weights_refused_before_the_first_extraction(tmp_path):
    # model 1 needs nothing; model 2 (ConceptCLIP) has no weights here: stop before model 1 is extracted
    out = tmp_path / "r"
    proc = run_script({"DEMO_DIR": str(tmp_path / "demo"), "OUT_DIR": str(out),
                       "MODEL1_ARGS": "--model convnextv2 --convnext-backbone convnextv2_atto --no-pretrained",
                       "MODEL2_ARGS": f"--model conceptclip --conceptclip-path {tmp_path / 'no_conceptclip'}"},
                      timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "MODEL2_ARGS" in proc.stderr and f"--conceptclip-path {tmp_path / 'no_conceptclip'}: folder not found" \
        in proc.stderr
    assert "== extracting" not in proc.stdout and not out.exists() and not (tmp_path / "demo").exists()


# ----------------------------------------------------------------------------- issue 21: BACKBONES, the N-way mode

def write_demo_set(demo_dir, path, dim, seed):
    """A random embedding set of the demo test list's images (ids, labels, patients as extraction writes them):
    the script reuses a set already in EMB_DIR, so an N-way run needs only one real extraction."""
    import numpy as np

    import dataset
    import embeddings
    ds = dataset.ImageListDataset(demo_dir / "test_split.txt", demo_dir / "test", check_files=False)
    rows = np.random.default_rng(seed).standard_normal((len(ds), dim)).astype(np.float32)
    meta = embeddings.make_meta(model_name="timm", model_args={"backbone": "test_vit", "pretrained": False},
                                embedding_dim=dim, seed=seed, class_names=ds.class_names)
    embeddings.save(path, embeddings.EmbeddingSet.from_dataset(rows, ds, meta))


@pytest.mark.parametrize("backbones, message", [
    ("a:x.pth a:y.pth", "names 'a' twice"),
    ("a=--model timm --backbone resnet10t b:x.pth", "needs ';' between the entries"),
    ("a:x.pth", "two or more"),
])
def test_bad_backbones_refused_before_any_work(tmp_path, backbones, message):
    out = tmp_path / "r"
    proc = run_script({"BACKBONES": backbones, "OUT_DIR": str(out), "DEMO_DIR": str(tmp_path / "demo")}, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "demo").exists()
