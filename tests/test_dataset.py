"""dataset.py: list parsing (real COVIDx lists and bad input), image loading, transforms, dirs, splits, cache."""
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from dataset import (LABEL_MAPS, ImageListDataset, build_transform, class_names, load_image,
                     patient_split, read_image_list, shared_between, test_image_dir, train_image_dir)

COVIDX = Path(__file__).resolve().parents[2] / "shared/data/covidx"
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def write(path, text):
    path.write_text(text)
    return path


def gray_png(path, value=128, size=(8, 8)):
    Image.new("L", size, value).save(path)
    return path


# ---------------------------------------------------------------- real COVIDx lists


@pytest.fixture(scope="module")
def covidx():
    if not COVIDX.is_dir():
        pytest.skip(f"COVIDx lists not found at {COVIDX}")
    train = ImageListDataset(COVIDX / "train_split.txt", "/nonexistent", check_files=False)
    test = ImageListDataset(COVIDX / "test_COVIDx4.txt", "/nonexistent", check_files=False)
    return train, test


def test_covidx_counts_and_classes(covidx):
    train, test = covidx
    assert len(train) == 13_935 and len(test) == 300
    assert train.class_names == ["normal", "pneumonia", "COVID-19"]
    assert np.bincount(train.labels).tolist() == [7_966, 5_464, 505]
    assert np.bincount(test.labels).tolist() == [100, 100, 100]
    assert train.labels.dtype == np.int64


def test_covidx_columns_and_names(covidx):
    train, test = covidx
    assert sum(s is None for s in test.sources) == 197  # 3-column lines
    assert sum(s is not None for s in test.sources) == 103
    assert all(s is not None for s in train.sources)
    i = test.filenames.index("COVID-19(70).png")
    assert test.image_ids[i] == "COVID-19(70)" and test.patient_ids[i] == "COVID-19(70)"
    assert test.labels[i] == 2 and test.sources[i] == "sirm"
    assert test.paths[i] == Path("/nonexistent/COVID-19(70).png")
    first = read_image_list(COVIDX / "train_split.txt")[0]
    assert first == ("3", "SARS-10.1148rg.242035193-g04mr34g0-Fig8a-day0.jpeg", 1, "cohen")


def test_covidx_lists_share_nothing(covidx):
    patients, files = shared_between(*covidx)
    assert patients == set() and files == set()


# ---------------------------------------------------------------- label modes and bad input


def test_comments_blank_lines_and_label_modes(tmp_path):
    f = write(tmp_path / "l.txt", "# header\n\np1 a.png positive src\n  \np2 b.png negative\n")
    recs = read_image_list(f, "covidx-cxr2")
    assert recs == [("p1", "a.png", 1, "src"), ("p2", "b.png", 0, None)]
    assert class_names("covidx-cxr2") == ["negative", "positive"]
    assert class_names("covid") == ["normal", "pneumonia", "COVID-19"]
    assert LABEL_MAPS["covid"] == {"normal": 0, "pneumonia": 1, "COVID-19": 2}


def test_generic_mode_sorted_and_reused(tmp_path):
    f = write(tmp_path / "l.txt", "p1 a.png zebra\np2 b.png cat\np3 c.png mouse\n")
    ds = ImageListDataset(f, tmp_path, dataset="generic", check_files=False)
    assert ds.class_names == ["cat", "mouse", "zebra"]
    assert ds.labels.tolist() == [2, 0, 1]
    # a test list takes the training list's classes, even when it lacks one of them
    g = write(tmp_path / "t.txt", "q1 d.png zebra\n")
    assert read_image_list(g, "generic", class_names=ds.class_names)[0].label == 2
    h = write(tmp_path / "u.txt", "q1 d.png dog\n")
    with pytest.raises(ValueError, match=r"u\.txt:1: unknown label 'dog'.*cat, mouse, zebra"):
        read_image_list(h, "generic", class_names=ds.class_names)


def test_malformed_line_names_file_and_line(tmp_path):
    f = write(tmp_path / "l.txt", "# c\np1 a.png normal\n\np2 b.png\n")
    with pytest.raises(ValueError, match=r"l\.txt:4: expected 3 or 4 .*got 2"):
        read_image_list(f)
    g = write(tmp_path / "m.txt", "p1 a.png normal src extra\n")
    with pytest.raises(ValueError, match=r"m\.txt:1: .*got 5"):
        read_image_list(g)


def test_unknown_label_lists_allowed(tmp_path):
    f = write(tmp_path / "l.txt", "p1 a.png normal\np2 b.png covid\n")
    with pytest.raises(ValueError, match=r"l\.txt:2: unknown label 'covid'.*normal, pneumonia, COVID-19"):
        read_image_list(f)
    with pytest.raises(ValueError, match="allowed labels: negative, positive"):
        read_image_list(f, "covidx-cxr2")


def test_empty_list_and_missing_list(tmp_path):
    f = write(tmp_path / "l.txt", "# only a comment\n\n")
    with pytest.raises(ValueError, match="has no images"):
        read_image_list(f)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_image_list(tmp_path / "nope.txt")


def test_duplicate_file_is_an_error(tmp_path):
    f = write(tmp_path / "l.txt", "p1 a.png normal\np2 a.png normal\n")
    with pytest.raises(ValueError, match=r"l\.txt:2: file 'a.png' already listed on line 1"):
        read_image_list(f)


def test_missing_images_counted_before_work(tmp_path):
    lines = "".join(f"p{i} img{i}.png normal\n" for i in range(8))
    f = write(tmp_path / "l.txt", lines)
    for i in (0, 3, 5):  # 5 of 8 missing
        gray_png(tmp_path / f"img{i}.png")
    with pytest.raises(FileNotFoundError, match=r"5 of 8 images .*missing") as e:
        ImageListDataset(f, tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "img1.png") in msg and str(tmp_path / "img7.png") in msg  # first 5 listed
    with pytest.raises(FileNotFoundError, match="image folder .* does not exist"):
        ImageListDataset(f, tmp_path / "absent")


def test_unreadable_image_names_path(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    good = gray_png(tmp_path / "good.png")
    Image.open(good).save(tmp_path / "cut.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "cut.jpg").read_bytes()[:40])  # truncated
    f = write(tmp_path / "l.txt", "p1 good.png normal\np2 bad.png normal\np3 cut.jpg normal\n")
    ds = ImageListDataset(f, tmp_path)
    assert ds[0][1:] == (0, 0)
    for i, name in ((1, "bad.png"), (2, "cut.jpg")):
        with pytest.raises(ValueError, match=f"cannot read image .*{name}"):
            ds[i]


def test_subset_keeps_attributes(tmp_path):
    f = write(tmp_path / "l.txt", "p1 a.png normal\np1 b.png normal\np2 c.png COVID-19\n")
    for n in "abc":
        gray_png(tmp_path / f"{n}.png")
    ds = ImageListDataset(f, tmp_path)
    sub = ds.subset([2, 0])
    assert len(sub) == 2 and sub.labels.tolist() == [2, 0] and sub.patient_ids == ["p2", "p1"]
    assert sub.image_ids == ["c", "a"] and sub.paths == [tmp_path / "c.png", tmp_path / "a.png"]
    assert sub[0][1:] == (2, 0) and sub.class_names == ds.class_names and len(ds) == 3


# ---------------------------------------------------------------- image loading


def test_16bit_png_scaled_by_own_range(tmp_path):
    arr = np.array([[1000, 2000], [3000, 1500]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "a.png")  # 16-bit grayscale PNG
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB"
    # (v - 1000) * 255 / 2000, rounded half up: 0, 127.5 -> 128, 255, 63.75 -> 64
    assert np.asarray(img)[..., 0].tolist() == [[0, 128], [255, 64]]
    assert (np.asarray(img)[..., 0] == np.asarray(img)[..., 2]).all()
    # signed pixels (CT-like DICOM): -1024..3071, 0 -> 1024 * 255 / 4095 = 63.8 -> 64; constant -> 0
    assert dataset._scale_to_uint8(np.array([-1024, 0, 3071], dtype=np.int16)).tolist() == [0, 64, 255]
    assert dataset._scale_to_uint8(np.array([0.25, 0.5, 1.25])).tolist() == [0, 64, 255]
    assert dataset._scale_to_uint8(np.full((2, 2), 7, dtype=np.uint16)).tolist() == [[0, 0], [0, 0]]


def test_8bit_gray_kept_rgb_palette_rgba_jpeg(tmp_path):
    arr = np.array([[10, 200], [30, 40]], dtype=np.uint8)
    Image.fromarray(arr, mode="L").save(tmp_path / "g.png")
    assert np.asarray(load_image(tmp_path / "g.png"))[..., 1].tolist() == arr.tolist()  # not stretched
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    assert np.asarray(load_image(tmp_path / "a.png")).tolist() == [[[200, 100, 50], [0, 0, 0]]]  # on black
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png")
    assert np.asarray(load_image(tmp_path / "p.png")).tolist() == [[[0, 0, 0], [10, 20, 30]]]
    Image.new("L", (16, 12), 90).save(tmp_path / "j.jpg", quality=95)
    j = load_image(tmp_path / "j.jpg")
    assert j.mode == "RGB" and j.size == (16, 12) and abs(int(np.asarray(j).mean()) - 90) <= 2


def _write_dicom(path, pixels, photometric, slope=1.0, intercept=0.0):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def test_dicom_monochrome_and_rescale(tmp_path):
    px = np.array([[0, 100], [200, 400]])
    d2 = _write_dicom(tmp_path / "m2.dcm", px, "MONOCHROME2")
    # min..max of 0..400: 0, 63.75 -> 64, 127.5 -> 128, 255
    assert np.asarray(load_image(d2))[..., 0].tolist() == [[0, 64], [128, 255]]
    d1 = _write_dicom(tmp_path / "m1.dcm", px, "MONOCHROME1")
    assert np.asarray(load_image(d1))[..., 0].tolist() == [[255, 191], [127, 0]]
    # slope -2, intercept 1000 -> 1000, 800, 600, 200: reversed order, min..max 200..1000
    ds = _write_dicom(tmp_path / "s.dcm", px, "MONOCHROME2", slope=-2.0, intercept=1000.0)
    assert np.asarray(load_image(ds))[..., 0].tolist() == [[255, 191], [128, 0]]
    # found by the DICM magic even without the .dcm suffix
    os.rename(d2, tmp_path / "noext")
    assert np.asarray(load_image(tmp_path / "noext"))[..., 0].tolist() == [[0, 64], [128, 255]]


def test_dicom_without_pydicom_says_install(tmp_path, monkeypatch):
    d = _write_dicom(tmp_path / "m.dcm", np.array([[0, 1]]), "MONOCHROME2")
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match="pip install pydicom"):
        load_image(d)


# ---------------------------------------------------------------- transforms and dirs


def test_crop_transform_sizes_and_values(tmp_path):
    img = Image.new("RGB", (80, 160), (255, 255, 255))
    ev = build_transform(64, MEAN, STD)
    assert ev.transforms[0].size == 72  # int(1.125 * 64)
    out = ev(img)
    assert out.shape == (3, 64, 64) and torch.allclose(out, torch.ones_like(out))  # (1 - 0.5) / 0.5
    assert build_transform(64, MEAN, STD, train=True)(img).shape == (3, 64, 64)
    assert build_transform(64, MEAN, STD, train=True, rand_resize=True)(img).shape == (3, 64, 64)
    sq = build_transform(48, MEAN, STD, resize_mode="squash")
    assert sq.transforms[0].size == (48, 48) and sq(img).shape == (3, 48, 48)
    with pytest.raises(ValueError, match="resize_mode"):
        build_transform(64, MEAN, STD, resize_mode="pad")


def test_eval_transform_is_deterministic_and_the_same_everywhere():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8))
    a = build_transform(32, MEAN, STD)(img)
    torch.manual_seed(1)
    b = build_transform(32, MEAN, STD)(img)
    assert torch.equal(a, b)
    # crop mode train without rand_resize = eval up to the flip
    torch.manual_seed(0)
    t = build_transform(32, MEAN, STD, train=True)(img)
    assert torch.equal(t, a) or torch.equal(t, a.flip(-1))


def test_image_dir_rule(tmp_path):
    assert train_image_dir(tmp_path) == tmp_path and test_image_dir(tmp_path) == tmp_path
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    assert train_image_dir(tmp_path) == tmp_path / "train"
    assert test_image_dir(tmp_path) == tmp_path / "test"
    assert test_image_dir(tmp_path, tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert test_image_dir(str(tmp_path)) == tmp_path / "test"


def test_data_parser_defaults(monkeypatch):
    args = dataset.get_data_parser().parse_args([])
    assert args.dataset == "covid" and args.cache_dir is None
    # workers: up to 4, never more than the cores this process may use (torch warns above that)
    import utils
    monkeypatch.setattr(utils.os, "sched_getaffinity", lambda pid: {0, 1})
    assert dataset.get_data_parser().parse_args([]).workers == 2
    monkeypatch.setattr(utils.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert dataset.get_data_parser().parse_args([]).workers == 4
    # a script gets only the list flags it reads
    only_test = dataset.get_data_parser(lists=("test",))
    assert only_test.parse_args([]).test_image_list is None
    with pytest.raises(SystemExit):
        only_test.parse_args(["--train-image-list", "t.txt"])
    assert args.dataset_dir is None and args.train_image_list is None and args.test_dataset_dir is None
    a = dataset.get_data_parser().parse_args(["--dataset", "generic", "--val-image-list", "v.txt"])
    assert a.dataset == "generic" and a.val_image_list == Path("v.txt")


# ---------------------------------------------------------------- patient split and overlap


def test_patient_split_disjoint_stratified_seeded():
    # 40 patients: 20 normal x 3 images, 10 pneumonia x 2, 10 COVID-19 x 1
    pids, labels = [], []
    for p in range(40):
        label, n = (0, 3) if p < 20 else (1, 2) if p < 30 else (2, 1)
        pids += [f"p{p}"] * n
        labels += [label] * n
    tr, va = patient_split(pids, labels, 0.2, seed=0)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(pids)))
    assert not {pids[i] for i in tr} & {pids[i] for i in va}
    # target 20% of each class's images: 12 of 60, 4 of 20, 2 of 10
    assert np.bincount(np.asarray(labels)[va], minlength=3).tolist() == [12, 4, 2]
    tr2, va2 = patient_split(pids, labels, 0.2, seed=0)
    assert np.array_equal(va, va2) and not np.array_equal(va, patient_split(pids, labels, 0.2, seed=1)[1])


def test_patient_split_tiny_and_errors():
    # 0.1 of 4 images is closer to 0 than to a 2-image patient: still one patient goes to validation
    tr, va = patient_split(["a", "a", "b", "b"], [0, 0, 0, 0], 0.1, seed=0)
    assert len(va) == 2 and len(tr) == 2
    tr, va = patient_split(["a", "b"], [0, 1], 0.0, seed=0)
    assert tr.tolist() == [0, 1] and va.tolist() == []
    with pytest.raises(ValueError, match="1 patient"):
        patient_split(["a", "a"], [0, 1], 0.5, seed=0)
    with pytest.raises(ValueError, match="val-fraction"):
        patient_split(["a", "b"], [0, 1], 1.0, seed=0)


def test_overlap_warning(tmp_path):
    a = ImageListDataset(write(tmp_path / "a.txt", "p1 x.png normal\np2 y.png normal\n"), tmp_path, check_files=False)
    b = ImageListDataset(write(tmp_path / "b.txt", "p2 z.png normal\np3 x.png normal\n"), tmp_path, check_files=False)
    assert shared_between(a, b) == ({"p2"}, {"x.png"})
    with pytest.warns(UserWarning, match="share 1 patients and 1 files"):
        dataset.overlap_warning(a, b)
    c = ImageListDataset(write(tmp_path / "c.txt", "p9 q.png normal\n"), tmp_path, check_files=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataset.overlap_warning(a, c) is None


# ---------------------------------------------------------------- resized-image cache


@pytest.fixture
def cache_data(tmp_path):
    rng = np.random.default_rng(0)
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    lines = []
    for i in range(4):
        if i == 1:  # 16-bit grayscale
            Image.fromarray(rng.integers(500, 4000, (70, 90), dtype=np.uint16)).save(img_dir / f"{i}.png")
        elif i == 2:  # colour
            Image.fromarray(rng.integers(0, 256, (80, 60, 3), dtype=np.uint8)).save(img_dir / f"{i}.png")
        else:
            Image.fromarray(rng.integers(0, 256, (100, 75), dtype=np.uint8), mode="L").save(img_dir / f"{i}.png")
        lines.append(f"p{i} {i}.png {['normal', 'pneumonia', 'COVID-19'][i % 3]}")
    return write(tmp_path / "l.txt", "\n".join(lines) + "\n"), img_dir


@pytest.mark.parametrize("train,rand_resize", [(False, False), (True, False), (True, True)])
def test_cache_gives_identical_tensors(cache_data, tmp_path, train, rand_resize):
    list_file, img_dir = cache_data
    tf = build_transform(40, MEAN, STD, train=train, rand_resize=rand_resize)
    plain = ImageListDataset(list_file, img_dir, transform=tf)
    cached = ImageListDataset(list_file, img_dir, transform=tf, cache_dir=tmp_path / "cache")
    for epoch in range(2):  # epoch 0 fills the cache, epoch 1 reads it
        for i in range(len(plain)):
            torch.manual_seed(100 * epoch + i)
            a = plain[i][0]
            torch.manual_seed(100 * epoch + i)
            b = cached[i][0]
            assert torch.equal(a, b), (epoch, i)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 4
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_cache_reused_across_runs_and_invalidated(cache_data, tmp_path, monkeypatch):
    list_file, img_dir = cache_data
    tf = build_transform(32, MEAN, STD)
    first = ImageListDataset(list_file, img_dir, transform=tf, cache_dir=tmp_path / "c")
    x0 = first[0][0]
    entry = first.cache.entry(img_dir / "0.png")
    assert np.load(entry).shape == (48, 36)  # shorter side int(1.125 * 32) = 36: 75x100 -> 36x48, one channel
    # a new run reads the cache without decoding the source
    again = ImageListDataset(list_file, img_dir, transform=tf, cache_dir=tmp_path / "c")
    monkeypatch.setattr(dataset, "load_image", lambda p: pytest.fail("decoded the source again"))
    assert torch.equal(again[0][0], x0)
    monkeypatch.undo()
    entry.write_bytes(b"damaged")  # e.g. a disk error: rebuilt from the source
    assert torch.equal(again[0][0], x0) and np.load(entry).shape == (48, 36)
    # the source changes: new entry, new pixels
    Image.new("L", (75, 100), 255).save(img_dir / "0.png")
    os.utime(img_dir / "0.png", ns=(1, 1))
    assert first.cache.entry(img_dir / "0.png") != entry
    assert torch.allclose(again[0][0], torch.ones(3, 32, 32))
    # another image size is another entry
    other = ImageListDataset(list_file, img_dir, transform=build_transform(16, MEAN, STD), cache_dir=tmp_path / "c")
    assert other[0][0].shape == (3, 16, 16)


def test_cache_needs_a_resize_transform(cache_data, tmp_path):
    list_file, img_dir = cache_data
    with pytest.raises(ValueError, match="cache-dir"):
        ImageListDataset(list_file, img_dir, transform=None, cache_dir=tmp_path / "c")
