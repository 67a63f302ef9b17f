"""Small shared helpers: seeding, device choice, distributed set-up, atomic file writes.

Kept deliberately small: model code lives in model.py, data code in dataset.py, metrics in metrics.py.
"""
import datetime
import json
import os
import random
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------- seeding and device

def set_seed(seed):
    """Seed python, numpy and torch (all CUDA devices too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def get_device(name=None):
    """`None`/"auto" -> CUDA when present, else CPU; anything else is passed to torch.device."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def get_rng_states():
    """All RNG states as plain tensors/ints/lists so a checkpoint loads with weights_only=True."""
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    states = {
        "python": {"version": version, "state": list(keys), "gauss": gauss},
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    """Inverse of get_rng_states()."""
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = states["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = states["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ----------------------------------------------------------------------------- distributed

def init_distributed():
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set); else do nothing.

    Returns True when a process group is in use. NCCL on CUDA, gloo on CPU.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if dist.is_initialized():
        return True
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                            timeout=datetime.timedelta(minutes=30))
    return True


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def get_local_rank():
    return int(os.environ.get("LOCAL_RANK", 0)) if is_dist() else 0


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist():
        dist.barrier()


def all_gather_object(obj):
    """Gather a picklable object from every rank; [obj] for a single process."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup_distributed():
    if is_dist():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- files

def _atomic_replace(path, write):
    """Write to a temporary file in the target folder, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj, path):
    _atomic_replace(path, lambda f: torch.save(obj, f))


def atomic_np_save(path, array):
    _atomic_replace(path, lambda f: np.save(f, array, allow_pickle=False))


def atomic_write_text(path, text):
    _atomic_replace(path, lambda f: f.write(text.encode("utf-8")))


def save_json(obj, path):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def ensure_writable_dir(path, flag="--save-dir"):
    """Create `path` if needed and check that files can be written there; raise ValueError naming `flag`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write there ({e.strerror or e}); choose a writable folder") from e
    return path


# ----------------------------------------------------------------------------- run info

def git_revision():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        rev = out.stdout.strip()
        if out.returncode != 0 or not rev:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
        return rev + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_args(args):
    """Print the git revision and every argument, sorted, so a log says how it was made."""
    print(f"git: {git_revision()}")
    for key, value in sorted(vars(args).items()):
        print(f"  {key}: {value}")
