"""audit_data.py: hash search against brute force, planted copies found, distinct images not paired, clean list."""
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import audit_data as A  # noqa: E402
from bench_audit import plant_copy, radiograph_like  # noqa: E402

# the copy kinds the default threshold is meant to catch (bench/bench_audit.py --calibrate: all at <= 8 bits)
KINDS = ("resize", "jpeg", "brightness", "crop1", "rotation")


def run_audit(*flags):
    return A.main(A.get_args_parser().parse_args([str(f) for f in flags] + ["--workers", "0"]))


# ----------------------------------------------------------------------------- hash search

def test_hamming_by_hand():
    a = np.array([0b0, 0b1011, 2**64 - 1], np.uint64)
    b = np.array([0b111, 0b1000, 0], np.uint64)
    assert A.hamming(a, b).tolist() == [3, 2, 64]


def test_hash_search_equals_brute_force():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**64, 600, dtype=np.uint64)
    for k in range(0, 600, 7):  # near-copies at 0..15 bits of another entry
        flips = rng.choice(64, k % 16, replace=False)
        h[k] = h[k + 1] ^ np.uint64(sum(1 << int(b) for b in flips))
    other = h[::3] ^ np.uint64(0b101)  # a second set: 2 bits from every third entry
    backends = ["mih"] + (["faiss"] if _has_faiss() else [])
    for t in (0, 2, 5, 8, 11, 14):
        for b in (None, other):
            want = A.hash_pairs_brute(h, b, threshold=t, block=97)
            bb = h if b is None else b
            # the reference itself against the full distance matrix
            full = A.hamming(h[:, None], bb[None, :])
            pairs = {(i, j) for i, j in zip(*np.nonzero(full <= t)) if b is not None or i < j}
            assert set(zip(want[0].tolist(), want[1].tolist())) == pairs
            runs = {name: A.HASH_SEARCH[name](h, b, threshold=t) for name in backends}
            runs.update({f"mih {m} blocks": A.hash_pairs_mih(h, b, threshold=t, blocks=m, query_block=50)
                         for m in (3, 4, 7)})
            for name, got in runs.items():
                for x, y in zip(want, got):
                    np.testing.assert_array_equal(x, y, err_msg=f"{name} t={t}")
    # the planted pairs are there: entry k and k+1 at k % 16 bits
    i, j, d = A.hash_pairs_mih(h, None, threshold=8)
    found = set(zip(i.tolist(), j.tolist()))
    assert {(k, k + 1) for k in range(0, 600, 7) if k % 16 <= 8} <= found
    assert len(A.hash_pairs_mih(h, other, threshold=2)[0]) >= len(other)


def test_brute_force_reference_on_a_hand_made_set():
    h = np.array([0, 1, 3, 7 << 61, 7], np.uint64)  # 0-1:1, 0-2:2, 1-2:1, 0-4:3, 1-4:2, 2-4:1, 3-*: >=3
    i, j, d = A.hash_pairs_brute(h, None, threshold=1)
    assert list(zip(i.tolist(), j.tolist(), d.tolist())) == [(0, 1, 1), (1, 2, 1), (2, 4, 1)]
    i, j, d = A.hash_pairs_mih(h, None, threshold=1)
    assert list(zip(i.tolist(), j.tolist(), d.tolist())) == [(0, 1, 1), (1, 2, 1), (2, 4, 1)]


def _has_faiss():
    try:
        import faiss  # noqa: F401
        return True
    except ImportError:
        return False


# ----------------------------------------------------------------------------- pHash on hand-made images

def test_planted_copies_found_and_distinct_not_paired_on_hand_made_images():
    imgs = [radiograph_like(np.random.default_rng([11, k])) for k in range(24)]
    h = np.array([A.phash64(im) for im in imgs], np.uint64)
    t = A.DEFAULT_PHASH_THRESHOLD
    for k, im in enumerate(imgs[:8]):
        for kind in KINDS:
            assert A.hamming(h[k], A.phash64(plant_copy(im, kind))) <= t, (k, kind)
    assert len(A.hash_pairs_mih(h, None, threshold=t)[0]) == 0  # 276 distinct pairs, none paired


# ----------------------------------------------------------------------------- the script on demo images

@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Demo images (12 patients, 256 px) with copies of training images planted in the test list.

    Returns (folder, test list, the planted test lines, {copy file: training file})."""
    from make_demo_data import make_demo_data
    d = tmp_path_factory.mktemp("planted")
    make_demo_data(d, num_patients=12, images_per_patient=1, size=256, seed=0)
    train = [line.split() for line in (d / "train_split.txt").read_text().splitlines()]
    test_lines = (d / "test_split.txt").read_text().splitlines()
    copies, planted_lines = {}, []
    for n, (kind, (pid, name, label, src)) in enumerate(zip(KINDS, train)):
        img = Image.open(d / "train" / name).convert("L")
        new = f"copy{n}.{'jpg' if kind == 'jpeg' else 'png'}"
        copy = plant_copy(img, kind)
        copy.save(d / "test" / new, **({"quality": 70} if kind == "jpeg" else {}))
        copies[new] = name
        planted_lines.append(f"X{n} {new} {label} other")  # new name, new patient id
    pid, name, label, _ = train[5]
    shutil.copy(d / "train" / name, d / "test" / "renamed.png")  # byte-identical under another name
    copies["renamed.png"] = name
    planted_lines.append(f"Y5 renamed.png {label} other")
    (d / "test" / "broken.png").write_bytes(b"not a png")  # unreadable: listed, skipped, counted
    shared_patient = f"{train[6][0]} {test_lines[0].split()[1]} {test_lines[0].split()[2]} demo"
    lines = [shared_patient] + test_lines[1:] + planted_lines + ["Z9 broken.png normal other"]
    test_list = d / "test_planted.txt"
    test_list.write_text("# planted copies\n" + "\n".join(lines) + "\n")
    return d, test_list, planted_lines, copies, train[6][0]


def test_main_finds_planted_copies_and_writes_a_clean_list(planted, tmp_path, capsys):
    d, test_list, planted_lines, copies, shared_pid = planted
    out, clean = tmp_path / "audit", tmp_path / "clean.txt"
    assert run_audit("--dataset-dir", d, "--train-image-list", d / "train_split.txt", "--test-image-list",
                     test_list, "--write-clean-list", clean, "--save-dir", out) == 0
    rep = json.loads((out / "audit.json").read_text())
    c = rep["counts"]["train-test"]
    assert c["patients"] == 1 and rep["shared_patients"]["train-test"] == [shared_pid]
    assert c["same_file"] == 0 and c["same_stem"] == 0 and c["identical_bytes"] == 1
    rows = list(csv.DictReader((out / "near_duplicates.csv").open()))
    cross = {(r["file_b"], r["file_a"]) for r in rows if r["list_a"] == "train" and r["method"] == "phash"}
    assert cross == set(copies.items())  # every planted copy, and no distinct pair
    assert all(int(r["distance"]) <= A.DEFAULT_PHASH_THRESHOLD for r in rows if r["method"] == "phash")
    assert c["images_with_a_copy"] == {"train": 6, "test": 6}
    # within the test list: copies of different training images are distinct images
    assert rep["counts"]["within-test"]["phash"] == 0
    assert rep["lists"]["test"]["unreadable_skipped"] == 1 and "broken.png" in rep["skipped_images"]["test"][0]
    captured = capsys.readouterr()
    assert "1 unreadable images" in captured.err
    # pHash pairs may be look-alikes: said on the console, beside each pHash row and in audit.json
    assert "different image that looks alike" in captured.out
    assert all("looks alike" in r["note"] for r in rows if r["method"] == "phash")
    assert "looks alike" in rep["notes"]["phash"]
    kept = clean.read_text().splitlines()
    assert [line for line in test_list.read_text().splitlines() if line not in kept] == planted_lines
    assert rep["clean_list"]["removed_lines"] == planted_lines
    assert (out / "closest_pairs.png").stat().st_size > 1000
    # outputs are kept without --overwrite
    assert run_audit("--dataset-dir", d, "--train-image-list", d / "train_split.txt", "--test-image-list",
                     test_list, "--save-dir", out) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_embeddings_dir_cosine_pairs(planted, tmp_path):
    from dataset import ImageListDataset
    d, test_list, _, copies, _ = planted
    emb = tmp_path / "emb"
    emb.mkdir()
    tr = ImageListDataset(d / "train_split.txt", d / "train", check_files=False)
    te = ImageListDataset(test_list, d / "test", check_files=False)
    # one-hot rows: every image its own direction, except the byte copy, which gets its original's row
    x_tr = np.eye(len(tr) + len(te), dtype=np.float32)[:len(tr)]
    x_te = np.eye(len(tr) + len(te), dtype=np.float32)[len(tr):]
    x_te[te.filenames.index("renamed.png")] = x_tr[tr.filenames.index(copies["renamed.png"])] * 0.6 + \
        x_te[te.filenames.index("renamed.png")] * 0.1  # cosine 0.6 / sqrt(0.37) = 0.986
    for name, x, ds in (("train", x_tr, tr), ("test", x_te, te)):
        order = np.arange(len(ds))[::-1]  # rows stored in another order: matched by image id
        np.save(emb / f"{name}.npy", x[order])
        np.save(emb / f"{name}_image_ids.npy", np.array(ds.image_ids)[order])
    out = tmp_path / "audit"
    assert run_audit("--dataset-dir", d, "--train-image-list", d / "train_split.txt", "--test-image-list",
                     test_list, "--embeddings-dir", emb, "--save-dir", out) == 0
    rows = [r for r in csv.DictReader((out / "near_duplicates.csv").open()) if r["method"] == "cosine"]
    assert [(r["file_a"], r["file_b"]) for r in rows] == [(copies["renamed.png"], "renamed.png")]
    assert float(rows[0]["distance"]) == pytest.approx(1 - 0.6 / np.sqrt(0.37), abs=1e-6)
    # the same from the embeddings alone, no image read
    assert run_audit("--no-images", "--train-image-list", d / "train_split.txt", "--test-image-list", test_list,
                     "--embeddings-dir", emb, "--save-dir", tmp_path / "no_images") == 0
    rep = json.loads((tmp_path / "no_images" / "audit.json").read_text())
    assert rep["checks"] == ["patients", "same_file", "same_stem", "cosine"]
    assert rep["counts"]["train-test"]["cosine"] == 1 and rep["counts"]["within-test"]["cosine"] == 0


def test_resume_embeds_and_pairs_the_byte_copy(planted, tmp_path):
    import torch

    from model import build_model, make_checkpoint
    d, test_list, _, copies, _ = planted
    torch.manual_seed(0)
    model = build_model("convnextv2", convnext_backbone="convnextv2_atto", pretrained=False, img_size=64,
                        embedding_dim=16)
    ckpt = tmp_path / "tiny.pth"
    torch.save(make_checkpoint(model, epoch=1), ckpt)
    out = tmp_path / "audit"
    assert run_audit("--dataset-dir", d, "--train-image-list", d / "train_split.txt", "--test-image-list",
                     test_list, "--resume", ckpt, "--device", "cpu", "--cosine-threshold", "0.99999",
                     "--save-dir", out) == 0
    rows = [r for r in csv.DictReader((out / "near_duplicates.csv").open()) if r["method"] == "cosine"
            and r["list_a"] == "train"]
    assert (copies["renamed.png"], "renamed.png") in {(r["file_a"], r["file_b"]) for r in rows}


# ----------------------------------------------------------------------------- bad input and lists only

def test_missing_images_are_named_before_any_work(planted, tmp_path, capsys):
    d, test_list, *_ = planted
    bad = tmp_path / "bad.txt"
    bad.write_text(test_list.read_text() + "Q1 not_here.png normal\n")
    out = tmp_path / "audit"
    assert run_audit("--dataset-dir", d, "--train-image-list", d / "train_split.txt", "--test-image-list", bad,
                     "--save-dir", out) == 2
    err = capsys.readouterr().err
    assert "1 of" in err and str(bad) in err and "not_here.png" in err
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--no-images", "--resume", "."], "--no-images reads no image"),
    (["--phash-threshold", "64"], "--phash-threshold"),
    ([], "--dataset-dir is needed"),
])
def test_bad_flags(planted, tmp_path, capsys, flags, message):
    d, test_list, *_ = planted
    assert run_audit("--train-image-list", d / "train_split.txt", "--test-image-list", test_list, *flags,
                     "--save-dir", tmp_path / "o") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_covidx_lists_without_images(covidx_dir, tmp_path, capsys):
    out = tmp_path / "audit"
    assert run_audit("--no-images", "--train-image-list", covidx_dir / "train_split.txt", "--test-image-list",
                     covidx_dir / "test_COVIDx4.txt", "--save-dir", out) == 0
    rep = json.loads((out / "audit.json").read_text())
    assert rep["lists"]["train"]["images"] == 13935 and rep["lists"]["test"]["images"] == 300
    # the shared README: no patient and no file in both lists
    assert rep["counts"]["train-test"]["patients"] == 0 and rep["counts"]["train-test"]["same_file"] == 0
    assert rep["counts"]["train-test"]["same_stem"] == 0
    assert rep["checks"] == ["patients", "same_file", "same_stem"] and not rep["images_read"]
    assert "--no-images: no byte or pHash check was made, no figure drawn" in capsys.readouterr().out


def test_list_only_checks_by_hand(tmp_path):
    train, test, val = tmp_path / "train.txt", tmp_path / "test.txt", tmp_path / "val.txt"
    train.write_text("p1 a.png normal\np2 b.png pneumonia\np3 c.jpg COVID-19\n")
    val.write_text("p9 v.png normal\np3 B.png normal\n")  # patient p3 of train; B.png: b.png's stem
    test.write_text("p1 x.png normal\nq2 b.png normal\nq3 C.png normal\nq4 d.png normal\nq5 d.jpg normal\n"
                    "p1 y.png normal\n")
    out, clean = tmp_path / "audit", tmp_path / "clean.txt"
    assert run_audit("--no-images", "--train-image-list", train, "--val-image-list", val, "--test-image-list", test,
                     "--write-clean-list", clean, "--save-dir", out) == 0
    rep = json.loads((out / "audit.json").read_text())
    tt, vt, tv = rep["counts"]["train-test"], rep["counts"]["val-test"], rep["counts"]["train-val"]
    assert (tt["patients"], tt["same_file"], tt["same_stem"]) == (1, 1, 1)  # p1; b.png; c.jpg ~ C.png
    assert (vt["patients"], vt["same_file"], vt["same_stem"]) == (0, 0, 1)  # B.png ~ b.png
    assert (tv["patients"], tv["same_file"], tv["same_stem"]) == (1, 0, 1)  # p3; b.png ~ B.png
    assert rep["shared_patients"] == {"train-val": ["p3"], "train-test": ["p1"], "val-test": []}
    assert rep["counts"]["within-test"]["same_stem"] == 1  # d.png ~ d.jpg, two patients
    # copies on the training side (train and val): b.png, C.png; the shared patient's x.png stays
    assert rep["clean_list"]["removed_lines"] == ["q2 b.png normal", "q3 C.png normal"]
    assert clean.read_text() == "p1 x.png normal\nq4 d.png normal\nq5 d.jpg normal\np1 y.png normal\n"


# ----------------------------------------------------------------------------- the clean list never replaces an input

def test_clean_list_never_replaces_an_input(tmp_path, capsys):
    train, val, test = tmp_path / "train.txt", tmp_path / "val.txt", tmp_path / "test.txt"
    train.write_text("p1 a.png normal\np2 b.png normal\n")
    val.write_text("p3 v.png normal\n")
    test.write_text("q1 b.png normal\nq2 c.png normal\n")  # b.png: a copy, so a clean list has lines to write
    link = tmp_path / "link.txt"
    link.symlink_to(val)
    before = {p: p.read_bytes() for p in (train, val, test)}
    for out, flag in ((train, "--train-image-list"), (link, "--val-image-list"),
                      (tmp_path / "sub" / ".." / "test.txt", "--test-image-list")):
        (tmp_path / "sub").mkdir(exist_ok=True)
        assert run_audit("--no-images", "--train-image-list", train, "--val-image-list", val, "--test-image-list",
                         test, "--write-clean-list", out, "--overwrite", "--save-dir", tmp_path / "audit") == 2
        err = capsys.readouterr().err
        assert f"is the same file as {flag}" in err and err.count("\n") == 1
        assert {p: p.read_bytes() for p in before} == before and not (tmp_path / "audit").exists()


def test_clean_list_never_replaces_an_embedding_set_file(tmp_path, capsys):
    import embeddings
    train, test, emb = tmp_path / "train.txt", tmp_path / "test.txt", tmp_path / "emb"
    train.write_text("p1 a.png normal\n")
    test.write_text("q1 a.png normal\n")
    emb.mkdir()
    for out in embeddings.sidecar_paths(emb / "test.npy").values():  # every file of the set, present or not
        assert run_audit("--no-images", "--train-image-list", train, "--test-image-list", test, "--embeddings-dir",
                         emb, "--write-clean-list", out, "--save-dir", tmp_path / "audit") == 2
        err = capsys.readouterr().err
        assert f"is the same file as --embeddings-dir ({out.name})" in err and err.count("\n") == 1, out


def test_batch_size_is_the_old_name_of_eval_batch_size():
    p = A.get_args_parser()
    for argv, n in (([], 32), (["--batch-size", "7"], 7), (["--eval-batch-size", "9"], 9),
                    (["--eval-batch-size", "9", "--batch-size", "5"], 5)):
        assert p.parse_args(argv + ["--save-dir", "x"]).eval_batch_size == n, argv


# ----------------------------------------------------------------------------- cosine pairs from embeddings by hand

def _embedding_audit(tmp_path, x_train, x_test, *flags):
    """Lists of one image per patient (t0.., s0..), --embeddings-dir with the given rows, --no-images; (rc, dir)."""
    from dataset import ImageListDataset
    train, test, emb = tmp_path / "train.txt", tmp_path / "test.txt", tmp_path / "emb"
    train.write_text("".join(f"p{k} t{k}.png normal\n" for k in range(len(x_train))))
    test.write_text("".join(f"q{k} s{k}.png normal\n" for k in range(len(x_test))))
    emb.mkdir()
    for name, lst, x in (("train", train, x_train), ("test", test, x_test)):
        np.save(emb / f"{name}.npy", np.asarray(x, np.float32))
        np.save(emb / f"{name}_image_ids.npy", np.array(ImageListDataset(lst, Path("."), check_files=False).image_ids))
    out = tmp_path / "audit"
    rc = run_audit("--no-images", "--train-image-list", train, "--test-image-list", test, "--embeddings-dir", emb,
                   "--save-dir", out, *flags)
    return rc, out


def _cosine_rows(out, list_a, list_b):
    """{(stem a, stem b): 1 - cos} of near_duplicates.csv's cosine rows between two lists."""
    return {(Path(r["file_a"]).stem, Path(r["file_b"]).stem): float(r["distance"])
            for r in csv.DictReader((out / "near_duplicates.csv").open())
            if r["method"] == "cosine" and (r["list_a"], r["list_b"]) == (list_a, list_b)}


def test_within_test_cosine_distance_is_the_pairs_own(tmp_path):
    # test images: s3 at cos 0.999 to s2, s5 at cos 0.99 to s2 (and 0.999 x 0.99 = 0.98901 to s3); all else
    # orthogonal. With --cosine-k 1, s5's nearest is s2 but s2's is s3: the pair (s2, s5) is found from s5 only.
    e = np.eye(16)
    x_test = e[4:12].copy()
    x_test[3] = 0.999 * e[6] + np.sqrt(1 - 0.999 ** 2) * e[12]
    x_test[5] = 0.99 * e[6] + np.sqrt(1 - 0.99 ** 2) * e[13]
    rc, out = _embedding_audit(tmp_path, e[:4], x_test, "--cosine-k", "1")
    assert rc == 0
    got = _cosine_rows(out, "test", "test")
    assert set(got) == {("s2", "s3"), ("s2", "s5")}
    assert got[("s2", "s3")] == pytest.approx(1 - 0.999, abs=1e-6)
    assert got[("s2", "s5")] == pytest.approx(1 - 0.99, abs=1e-6)


def _copies_of(rows, cosines, start):
    """Unit rows cos_k * rows[k] + sin_k * e_(start + k): each at the given cosine to its row."""
    d = start + len(rows)
    out = np.zeros((len(rows), d))
    for k, (r, c) in enumerate(zip(rows, cosines)):
        out[k, :len(r)] = c * r
        out[k, start + k] = np.sqrt(1 - c ** 2)
    return out


def _pad(x, d):
    return np.pad(x, ((0, 0), (0, d - x.shape[1])))


def test_cosine_check_searches_both_ways(tmp_path):
    # one training image (t0) with 12 test copies, --cosine-k 10: from t0 only 10 are in reach, from each copy t0 is
    # its nearest; 118 other test images orthogonal to all (12 of 130 = 9%, under --max-cosine-share)
    d = 10 + 118 + 12
    e = np.eye(d)
    x_train = e[:10]
    copies = _pad(_copies_of([e[0]] * 12, 0.99 + 0.0008 * np.arange(12), 128), d)
    x_test = np.concatenate([copies, e[10:128]])
    clean = tmp_path / "clean.txt"
    rc, out = _embedding_audit(tmp_path, x_train, x_test, "--cosine-k", "10", "--write-clean-list", clean)
    assert rc == 0
    got = _cosine_rows(out, "train", "test")
    assert set(got) == {("t0", f"s{k}") for k in range(12)}
    assert [line.split()[1] for line in clean.read_text().splitlines()] == [f"s{k}.png" for k in range(12, 130)]


def _class_embedding(rng, n, classes, sigma, d=64):
    """n rows: class centre e_(k % classes) plus Gaussian noise of sigma per dimension (1 - cos ~ sigma^2 d)."""
    return np.eye(d)[np.arange(n) % classes] + sigma * rng.standard_normal((n, d))


def test_cosine_calibration_removes_the_copy_not_the_class(tmp_path):
    # a metric-learning-like embedding: 3 tight classes (different patients at 1 - cos ~ 0.005-0.01, all under the
    # threshold's 0.02) and one planted copy of training image t7 at 1 - cos ~ 1e-7
    rng = np.random.default_rng(0)
    x_train = _class_embedding(rng, 60, 3, 0.011)
    x_test = _class_embedding(rng, 30, 3, 0.011)
    x_test = np.concatenate([x_test, x_train[7:8] + 1e-4 * rng.standard_normal((1, 64))])
    u = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cos = u(x_test) @ u(x_train).T
    assert (cos.max(1) >= 0.98).sum() == 31  # premise: the threshold alone calls every test image a copy
    clean = tmp_path / "clean.txt"
    rc, out = _embedding_audit(tmp_path, x_train, x_test, "--write-clean-list", clean)
    assert rc == 0
    assert set(_cosine_rows(out, "train", "test")) == {("t7", "s30")}
    assert [line.split()[1] for line in clean.read_text().splitlines()] == [f"s{k}.png" for k in range(30)]
    cal = json.loads((out / "audit.json").read_text())["cosine_calibration"]["train-test"]
    # the rule by hand: 1 - cos <= 0.1 x the median over the 31 test images (the smaller list) of the distance to
    # the nearest training image of another patient (every training image is another patient)
    median = np.median(1 - cos.max(1))
    assert cal["reference_median_distance"] == pytest.approx(median, rel=1e-5)
    assert cal["max_copy_distance"] == pytest.approx(0.1 * median, rel=1e-5)
    assert cal["copies"] == 1 and cal["rejected_by_calibration"] > 30


def test_cosine_removing_a_large_share_is_refused(tmp_path, capsys):
    # 12 of 40 test images (30%) are copies of different training images: more than --max-cosine-share 0.1
    d = 60 + 28 + 12
    e = np.eye(d)
    x_test = np.concatenate([_pad(_copies_of(list(e[:12]), [0.995] * 12, 88), d), e[60:88]])
    clean = tmp_path / "clean.txt"
    rc, out = _embedding_audit(tmp_path, e[:60], x_test, "--write-clean-list", clean)
    err = capsys.readouterr().err
    assert rc == 1 and not clean.exists()
    assert "12 of 40 test images (30%)" in err and "--max-cosine-share 1" in err
    rep = json.loads((out / "audit.json").read_text())
    assert rep["clean_list"]["written"] is False and rep["counts"]["train-test"]["cosine"] == 12
    # forced: written, without the 12
    assert run_audit("--no-images", "--train-image-list", tmp_path / "train.txt", "--test-image-list",
                     tmp_path / "test.txt", "--embeddings-dir", tmp_path / "emb", "--save-dir", out, "--overwrite",
                     "--write-clean-list", clean, "--max-cosine-share", "1") == 0
    assert len(clean.read_text().splitlines()) == 28


def test_figure_draws_the_pairs_that_remove_images():
    from types import SimpleNamespace as NS

    def lst(name, n):
        return NS(name=name, errors={}, ds=NS(filenames=[f"{name}{k}.png" for k in range(n)],
                                              patient_ids=[f"{name}-p{k}" for k in range(n)]))
    train, val, test = lst("train", 12), lst("val", 2), lst("test", 12)
    rows = [(train, k, test, k, "phash", float(k)) for k in range(10)]  # 10 pHash pairs at 0..9 bits
    rows += [(train, 10, test, 10, "identical_bytes", 0.0), (train, 0, test, 0, "cosine", 0.0005),
             (train, 11, test, 11, "cosine", 0.001), (train, 1, val, 0, "phash", 0.0)]  # the last removes nothing
    chosen, total, removal = A.figure_pairs(rows, 4)
    # methods take turns: bytes, the closest pHash pair (also a cosine pair), then the next cosine pair
    assert [(a.name, i, b.name, j) for a, i, b, j, _ in chosen] == [
        ("train", 10, "test", 10), ("train", 0, "test", 0), ("train", 11, "test", 11), ("train", 1, "test", 1)]
    assert chosen[1][4] == [("phash", 0.0), ("cosine", 0.0005)]
    assert total == 12 and removal
    # no test image with a copy: the other cross-list pairs, said so
    chosen, total, removal = A.figure_pairs(rows[-1:], 8)
    assert total == 1 and not removal


def test_fusion_checkpoint_is_refused_in_one_line(planted, tmp_path, capsys):
    import torch

    from model import FusionHead, fusion_spec, make_checkpoint
    d, test_list, *_ = planted
    ckpt = tmp_path / "fusion_best_ckpt.pth"
    torch.save(make_checkpoint(FusionHead(fusion_spec("concat", [8, 8]), 4), epoch=1), ckpt)
    out = tmp_path / "audit"
    assert run_audit("--dataset-dir", d, "--train-image-list", d / "train_split.txt", "--test-image-list",
                     test_list, "--resume", ckpt, "--device", "cpu", "--save-dir", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(ckpt) in err and not out.exists()
