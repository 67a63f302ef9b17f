"""Shared test set-up: repo root on sys.path, hub access off, one small generated demo dataset."""
import os
import sys
from pathlib import Path

import pytest

# Without these a hub call waits ~50 s for the network before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))

# The real COVIDx lists (no images) live beside the repo; tests read them in place.
COVIDX_DIR = ROOT.parent / "shared" / "data" / "covidx"


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small generated demo dataset: train/, test/, train_split.txt, test_split.txt."""
    from make_demo_data import make_demo_data

    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out, num_patients=12, images_per_patient=3, size=64, seed=0)
    return out


@pytest.fixture(scope="session")
def covidx_dir():
    if not COVIDX_DIR.is_dir():
        pytest.skip(f"COVIDx lists not found at {COVIDX_DIR}")
    return COVIDX_DIR
