"""data/make_demo_data.py: COVIDx layout, determinism, patient-disjoint lists, CLI overwrite rule."""
import numpy as np
import pytest
from PIL import Image

from dataset import ImageListDataset, shared_between, test_image_dir, train_image_dir
from make_demo_data import FINDING_LEVEL, _patient_params, _render, finding_boxes, get_args_parser, main, make_demo_data

SMALL = dict(num_patients=6, images_per_patient=2, size=48)


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_lists_and_patient_disjoint(tmp_path):
    info = make_demo_data(tmp_path, num_patients=9, images_per_patient=3, size=48, seed=0)
    # 3 patients per class: 1 test (round(0.25 * 3)), 2 train
    assert info["num_train"] == 18 and info["num_test"] == 9
    assert info["class_counts"]["test"] == {"normal": 3, "pneumonia": 3, "COVID-19": 3}
    train = ImageListDataset(info["train_list"], train_image_dir(tmp_path))
    test = ImageListDataset(info["test_list"], test_image_dir(tmp_path))
    assert train_image_dir(tmp_path) == tmp_path / "train"
    assert np.bincount(train.labels).tolist() == [6, 6, 6]
    assert shared_between(train, test) == (set(), set())
    assert set(train.sources) == {"demo"}
    line = info["train_list"].read_text().splitlines()[0].split()
    assert len(line) == 4  # patient_id filename label source
    img = Image.open(train.paths[0])
    assert img.mode == "L" and img.size == (48, 48)
    # a patient's images differ (pose, contrast, noise) but are the same patient
    same = [p for p, pid in zip(train.paths, train.patient_ids) if pid == train.patient_ids[0]]
    assert len(same) == 3 and not np.array_equal(np.asarray(Image.open(same[0])), np.asarray(Image.open(same[1])))


def test_same_seed_same_bytes(tmp_path):
    make_demo_data(tmp_path / "a", seed=5, **SMALL)
    make_demo_data(tmp_path / "b", seed=5, **SMALL)
    make_demo_data(tmp_path / "c", seed=6, **SMALL)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    # images, their finding masks, two lists, concept_labels.csv, finding_boxes.csv
    assert a == b and len(a) == 6 * 2 * 2 + 4
    assert a != c


def test_pathology_is_in_the_lungs_one_side_or_both():
    # render each patient with and without its pathology (same pose and noise): the difference is
    # zero for normal, on one side for pneumonia, on both sides for COVID-19, and never negative
    size = 64
    for label in range(3):
        for i in range(4):
            params = _patient_params(np.random.default_rng([0, i]), label)
            with_p = _render(params, size, np.random.default_rng([0, i, 0])).astype(int)
            without = _render({**params, "blobs": []}, size, np.random.default_rng([0, i, 0])).astype(int)
            diff = with_p - without
            assert diff.min() >= 0
            left, right = (diff[:, : size // 2] > 20).sum(), (diff[:, size // 2:] > 20).sum()
            if label == 0:
                assert diff.max() == 0
            elif label == 1:
                assert min(left, right) == 0 and max(left, right) >= 20  # one focal consolidation
            else:
                assert min(left, right) >= 2  # bilateral


def test_refuses_non_empty_folder_unless_forced(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("user file")
    with pytest.raises(FileExistsError, match="not empty.*--force"):
        make_demo_data(tmp_path, **SMALL)
    assert not (tmp_path / "train").exists()
    args = get_args_parser().parse_args(["--out", str(tmp_path), "--num-patients", "6", "--images-per-patient", "1",
                                         "--size", "40"])
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    args.force = True
    assert main(args) == 0
    assert (tmp_path / "keep.txt").read_text() == "user file"
    assert len(list((tmp_path / "train").glob("*.png"))) + len(list((tmp_path / "test").glob("*.png"))) == 6
    # forcing a smaller set removes the old demo images, so lists and folders agree
    args.num_patients = 6
    args.images_per_patient = 2
    assert main(args) == 0
    assert len(list((tmp_path / "train").glob("*.png"))) + len(list((tmp_path / "test").glob("*.png"))) == 12


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least 6"):
        make_demo_data(tmp_path / "x", num_patients=5)


def test_conftest_fixture_dataset(demo_data):
    train = ImageListDataset(demo_data / "train_split.txt", train_image_dir(demo_data))
    test = ImageListDataset(demo_data / "test_split.txt", test_image_dir(demo_data))
    assert len(train) + len(test) == 36 and np.bincount(test.labels).tolist() == [3, 3, 3]
    assert not shared_between(train, test)[0]


def test_finding_masks_and_boxes(tmp_path):
    # the mask is where the planted opacity is visible: rendering without the pathology (same pose, noise)
    # differs there by about FINDING_LEVEL or more and nowhere else by much; normal images have empty masks
    info = make_demo_data(tmp_path, seed=0, **SMALL)
    lines = [line.split() for line in info["test_list"].read_text().splitlines() + info["train_list"].read_text().splitlines()]
    rows = [r.split(",") for r in info["boxes"].read_text().splitlines()]
    assert rows[0] == ["image_id", "x", "y", "w", "h"]
    boxes = {}
    for r in rows[1:]:
        boxes.setdefault(r[0], []).append(tuple(int(v) for v in r[1:]))
    for pid, name, label, _ in lines:
        stem = name[:-4]
        mask = np.asarray(Image.open(info["mask_dir"] / name)) > 0
        assert mask.shape == (SMALL["size"],) * 2
        if label == "normal":
            assert not mask.any() and stem not in boxes
            continue
        assert mask.any() and stem in boxes
        covered = np.zeros_like(mask)
        for x, y, w, h in boxes[stem]:
            covered[y:y + h, x:x + w] = True
        assert covered[mask].all()  # every finding pixel lies in a box
    # finding_boxes on a hand-made mask: two regions
    m = np.zeros((10, 12), bool)
    m[1:3, 2:5] = True
    m[6:9, 8:12] = True
    assert sorted(finding_boxes(m)) == [(2, 1, 3, 2), (8, 6, 4, 3)]
    params = _patient_params(np.random.default_rng([0, 1]), 1)
    img, finding = _render(params, 64, np.random.default_rng([0, 1, 0]), return_finding=True)
    without = _render({**params, "blobs": []}, 64, np.random.default_rng([0, 1, 0])).astype(int)
    assert np.array_equal(img, _render(params, 64, np.random.default_rng([0, 1, 0])))  # same bytes as before
    diff = img.astype(int) - without
    assert np.median(diff[finding]) >= 255 * FINDING_LEVEL * 0.8 and np.median(diff[~finding]) <= 2


def test_the_class_lives_only_in_the_finding_mask():
    # masking the finding out (its pixels taken from the same image rendered without pathology) leaves the
    # image without pathology, byte for byte: outside its mask a finding adds nothing (no faint tail), so no
    # class cue is left outside the mask (issue 22; bench/bench_explain_demo.py trains on this (data_masked): chance)
    for label in (1, 2):
        for i in range(3):
            params = _patient_params(np.random.default_rng([0, i]), label)
            img, finding = _render(params, 64, np.random.default_rng([0, i, 1]), return_finding=True)
            without = _render({**params, "blobs": []}, 64, np.random.default_rng([0, i, 1]))
            assert finding.any() and np.array_equal(np.where(finding, without, img), without)
