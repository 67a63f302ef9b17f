"""Fusion-head training time on synthetic embedding sets (two inputs, 256-d and 512-d, 3 classes).

    python bench/bench_fusion.py --n 10000 100000 --epochs 5 --head mlp
Prints seconds per run of train_fusion.main (loading, patient-disjoint split, training, validation, checkpoints).
"""
import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import embeddings as E  # noqa: E402
import train_fusion  # noqa: E402


def main():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[10000, 100000], help="images per run")
    p.add_argument("--epochs", type=int, default=5, help="training epochs")
    p.add_argument("--head", default="mlp", help="fusion head")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    for n in a.n:
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            y = rng.integers(0, 3, n)
            files = []
            ids, patients = np.array([f"i{i}" for i in range(n)]), np.array([f"p{i // 2}" for i in range(n)])
            for name, dim in (("a", 256), ("b", 512)):  # hand-made sets, written as every tool writes one
                e = rng.standard_normal((n, dim)).astype(np.float32) + y[:, None]
                E.save(d / f"{name}.npy", E.EmbeddingSet(e, y.astype(np.int64), ids, patients, ["0", "1", "2"],
                                                         E.make_meta(model_name=name)))
                files.append(str(d / f"{name}.npy"))
            args = train_fusion.get_args_parser().parse_args(
                ["--embeddings", *files, "--head", a.head, "--epochs", str(a.epochs), "--save-dir", str(d / "ck")])
            t = time.time()
            with contextlib.redirect_stdout(io.StringIO()):
                train_fusion.main(args)
            print(f"n={n} head={a.head} epochs={a.epochs}: {time.time() - t:.1f} s")


if __name__ == "__main__":
    main()
