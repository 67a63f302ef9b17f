"""Small shared helpers: seeding, device choice, distributed set-up, atomic file writes, progress.

Kept deliberately small: model code lives in model.py, data code in dataset.py, metrics in metrics.py.
"""
import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
import time
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


def cleanup_distributed(sync=False):
    """Leave the process group. sync=True on the success path: a barrier first, so that no rank tears down its
    connections while another still reads from them (gloo then aborts that rank at exit: "terminate called
    without an active exception"). Not on an error path, where the other ranks may never reach the barrier."""
    if is_dist():
        if sync:
            dist.barrier()
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
        # mkstemp creates the file 0600 and the rename keeps that: give it the mode a plain open() would,
        # so colleagues on a shared server can read results as the user's umask allows
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def current_umask():
    """The process umask (os.umask can only be read by setting it, so set it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_torch_save(obj, path):
    _atomic_replace(path, lambda f: torch.save(obj, f))


def atomic_np_save(path, array):
    _atomic_replace(path, lambda f: np.save(f, array, allow_pickle=False))


def atomic_write_text(path, text):
    _atomic_replace(path, lambda f: f.write(text.encode("utf-8")))


def save_json(obj, path):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def save_figure(fig, path, dpi=100):
    """Save a matplotlib figure atomically (PNG, or the format of the suffix) and close it: a reader never
    sees a half-written image, and a failed save leaves the previous file in place."""
    import matplotlib.pyplot as plt

    fmt = Path(path).suffix.lstrip(".") or "png"
    try:
        _atomic_replace(path, lambda f: fig.savefig(f, dpi=dpi, format=fmt))
    finally:
        plt.close(fig)


def check_writable_dir(path, flag="--save-dir"):
    """Check that `path` is (or could be created as) a writable folder, creating nothing.

    Scripts call this before any work and create the folder only when they write, so a run that fails
    on bad input leaves no empty folder behind.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a folder; choose a folder path")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write there ({probe} is not a writable folder); "
                         f"choose a writable folder")
    return path


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


# ----------------------------------------------------------------------------- machine and progress

def available_cpus():
    """CPU cores this process may run on (its affinity mask, e.g. a cluster job's share), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # macOS, Windows
        return max(os.cpu_count() or 1, 1)


def default_workers(cap=4):
    """Data-loader workers: up to `cap`, never more than the cores this process has (torch warns above)."""
    return min(cap, available_cpus())


PROGRESS_EVERY_S = 30  # without a terminal: one progress line at most this often


class Progress:
    """Progress of a long loop a person can follow: a tqdm bar on a terminal, else a line every
    PROGRESS_EVERY_S seconds (logs, nohup, a batch job), so a slow run never looks hung.

    for batch in Progress(loader, desc="epoch 3", total=len(loader)): ...
    bar.set_postfix(loss=...) is kept and shown in the next line.
    """

    def __init__(self, iterable, desc="", total=None, unit="it", enabled=True, every_s=None, stream=None):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.postfix = {}
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = None
        if self.tty:
            from tqdm import tqdm
            self._bar = tqdm(iterable, desc=desc, total=self.total, unit=unit, file=self.stream)

    def set_postfix(self, **kw):
        self.postfix = kw
        if self._bar is not None:
            self._bar.set_postfix(**kw)

    def _line(self, done, t0):
        el = time.time() - t0
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        eta = f", ~{el / done * (self.total - done):.0f} s left" if self.total and done else ""
        extra = "".join(f"  {k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {done}{of} {self.unit}{pct}, {el:.0f} s elapsed{eta}{extra}", file=self.stream, flush=True)

    def __iter__(self):
        if self._bar is not None:
            yield from self._bar
            return
        t0 = last = time.time()
        done = 0
        for item in self.iterable:
            yield item
            done += 1
            now = time.time()
            if self.enabled and now - last >= self.every_s and (self.total is None or done < self.total):
                self._line(done, t0)
                last = now


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


# ----------------------------------------------------------------------------- command line

def run_main(run, args, prog):
    """The one CLI error wrapper: main(args) of every entry point is `return run_main(run, args, "PROG.py")`.
    Bad input (ValueError, FileNotFoundError: raised before any work) becomes one readable line,
    `PROG.py: error: ...`, and exit code 2, never a traceback; anything else is a bug and keeps its traceback."""
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2


def one_line(e):
    """An exception's message on one line (library messages sometimes span several)."""
    return " ".join(str(e).split())


AMP_CHOICES = ("off", "bf16", "fp16", "auto")


def get_runtime_parser(flags=("device", "amp", "eval_batch_size", "chunk_size")):
    """Parent parser of the runtime flags several scripts take: one type, one default and one help each.

    --device: None = cuda when available, else cpu. --amp: autocast precision, off by default so that printed
    numbers are fp32 unless asked; `--amp` alone = auto = bf16 on a CUDA GPU that supports it, else off (what
    the eval scripts' old switch did on such GPUs); bf16 also on CPU when named; fp16 only on CUDA.
    --eval-batch-size: images per batch when embedding. --chunk-size: query rows per similarity block
    (memory grows with it, never N x M); None = the metric's own default.
    """
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("runtime")
    if "device" in flags:
        g.add_argument("--device", default=None, help="cuda, cuda:1 or cpu; not given: cuda when available")
    if "amp" in flags:
        g.add_argument("--amp", choices=AMP_CHOICES, nargs="?", const="auto", default="off",
                       help="autocast precision; --amp alone = auto = bf16 on CUDA, off on CPU")
    if "eval_batch_size" in flags:
        g.add_argument("--eval-batch-size", type=int, default=32, help="images per batch when embedding")
    if "chunk_size" in flags:
        g.add_argument("--chunk-size", type=int, default=None,
                       help="query rows per similarity block (memory grows with it); not given: automatic")
    return p


def resolve_amp(amp, device):
    """--amp value -> autocast dtype or None (fp32). `True`/`False` from older args.json files still work."""
    if amp is True:
        amp = "bf16"
    if amp in (False, None):
        amp = "off"
    if amp == "auto":  # bf16 where the GPU has it (Ampere and later); fp32 elsewhere, never a silent fp16
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (its GradScaler exists for GPU fp16); use --amp bf16 or off")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, said once: not where the help line already explains it ("(default: ...)"),
    and not for a default that says nothing or misleads (None: the flag is simply not given; the True or False
    behind a switch such as --no-mxa, whose "(default: True)" reads as if the switch were on)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default is None or (isinstance(action.default, bool) and action.nargs == 0):
            return text
        return super()._get_help_string(action)
