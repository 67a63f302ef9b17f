"""embeddings.py: saved embedding sets (load checks, save, meta schema, model identity, align) and the
list-order embedding loop, on hand-made arrays and a tiny conv model over the generated demo images.

Run as a script, this file is the torchrun worker of test_embed_dataset_two_torchrun_ranks.
"""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # torchrun worker: conftest.py did not run
    sys.path.insert(0, str(ROOT))

import embeddings as E  # noqa: E402

NAMES = ["normal", "pneumonia", "COVID-19"]


def hand_set(n=5, d=4, names=NAMES, ids=None):
    """Rows i = (i, i + 1, ...) / norm, label i % 3, image id img<i>, patient p<i // 2>."""
    emb = np.arange(n * d, dtype=np.float32).reshape(n, d) + 1
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = np.array([f"img{i}" for i in range(n)] if ids is None else ids)
    return E.EmbeddingSet(emb, np.arange(n, dtype=np.int64) % 3, ids, np.array([f"p{i // 2}" for i in range(n)]),
                          list(names) if names is not None else None, {})


def write_raw(stem, s, meta=None):
    """Files as a script of today writes them (np.save, json), without embeddings.save."""
    np.save(f"{stem}.npy", s.embeddings)
    np.save(f"{stem}_labels.npy", s.labels)
    np.save(f"{stem}_image_ids.npy", s.image_ids)
    np.save(f"{stem}_patient_ids.npy", s.patient_ids)
    if meta is not None:
        Path(f"{stem}_meta.json").write_text(json.dumps(meta))
    return Path(f"{stem}.npy")


# ----------------------------------------------------------------------------- round trip

def test_round_trip_keeps_arrays_and_writes_one_meta_schema(tmp_path):
    s = hand_set()
    ckpt = tmp_path / "head.pth"
    ckpt.write_bytes(b"weights of a trained head")
    meta = E.make_meta(model_name="fusion", model_args={"backbone": "fusion-mlp:4,4", "embedding_dim": 4},
                       embedding_dim=4, checkpoint=ckpt, list_file="lists/test.txt", image_dir="img",
                       dataset="covid", class_names=NAMES, seed=7, epoch=3)
    E.save(tmp_path / "x.npy", E.EmbeddingSet(s.embeddings, s.labels, s.image_ids, s.patient_ids, NAMES, meta))
    got = E.load(tmp_path / "x.npy")
    np.testing.assert_array_equal(got.embeddings, s.embeddings)
    np.testing.assert_array_equal(got.labels, [0, 1, 2, 0, 1])
    assert got.embeddings.dtype == np.float32 and got.labels.dtype == np.int64
    assert list(got.image_ids) == ["img0", "img1", "img2", "img3", "img4"]
    assert list(got.patient_ids) == ["p0", "p0", "p1", "p1", "p2"]
    assert got.class_names == NAMES and (got.n, got.dim) == (5, 4)
    m = got.meta
    import hashlib
    assert m["model_source"] == {"checkpoint": str(ckpt),
                                 "sha256": hashlib.sha256(b"weights of a trained head").hexdigest()}
    assert (m["model_name"], m["embedding_dim"], m["num_images"], m["seed"], m["epoch"]) == ("fusion", 4, 5, 7, 3)
    assert (m["list_file"], m["image_dir"], m["class_names"]) == ("lists/test.txt", "img", NAMES)
    assert m["meta_version"] == 1 and m["git"] and m["created_utc"].endswith("+00:00")
    assert got.model_identity == f"fusion checkpoint sha256:{m['model_source']['sha256']}"


def test_patient_ids_are_optional_and_labels_can_be_given_elsewhere(tmp_path):
    path = write_raw(tmp_path / "x", hand_set())
    os.remove(tmp_path / "x_patient_ids.npy")
    np.save(tmp_path / "other_labels.npy", np.array([2, 2, 1, 1, 0]))
    got = E.load(path, labels=tmp_path / "other_labels.npy")
    assert got.patient_ids is None and got.class_names is None and got.meta == {}
    np.testing.assert_array_equal(got.labels, [2, 2, 1, 1, 0])


# ----------------------------------------------------------------------------- malformed sets

def _corrupt(stem, what):
    n = 5
    if what == "short labels":
        np.save(f"{stem}_labels.npy", np.zeros(n - 1, np.int64))
    elif what == "long patient ids":
        np.save(f"{stem}_patient_ids.npy", np.array(["p"] * (n + 1)))
    elif what == "float labels":
        np.save(f"{stem}_labels.npy", np.zeros(n, np.float32))
    elif what == "int embeddings":
        np.save(f"{stem}.npy", np.ones((n, 4), np.int64))
    elif what == "1-d embeddings":
        np.save(f"{stem}.npy", np.ones(n, np.float32))
    elif what == "no rows":
        np.save(f"{stem}.npy", np.ones((0, 4), np.float32))
    elif what in ("nan row", "inf row"):
        e = np.load(f"{stem}.npy")
        e[3 if what == "nan row" else 1, 2] = np.nan if what == "nan row" else np.inf
        np.save(f"{stem}.npy", e)
    elif what == "duplicated ids":
        np.save(f"{stem}_image_ids.npy", np.array(["img0", "img1", "img2", "img1", "img4"]))
    elif what == "label out of range":
        np.save(f"{stem}_labels.npy", np.array([0, 1, 2, 3, 0]))
    elif what == "negative label":
        np.save(f"{stem}_labels.npy", np.array([0, -1, 2, 0, 0]))
    elif what == "duplicate class names":
        Path(f"{stem}_meta.json").write_text(json.dumps({"class_names": ["a", "b", "a"]}))
    elif what == "meta dim differs":
        Path(f"{stem}_meta.json").write_text(json.dumps({"class_names": NAMES, "embedding_dim": 8}))
    elif what == "meta not json":
        Path(f"{stem}_meta.json").write_text("{not json")
    elif what in ("no labels file", "no ids file", "no embeddings file"):
        os.remove({"no labels file": f"{stem}_labels.npy", "no ids file": f"{stem}_image_ids.npy",
                   "no embeddings file": f"{stem}.npy"}[what])
    elif what == "pickled ids":
        np.save(f"{stem}_image_ids.npy", np.array(["img0", 1, 2, 3, 4], dtype=object), allow_pickle=True)


# (corruption, the file the error must name, words the error must contain)
MALFORMED = [
    ("short labels", "x_labels.npy", "4 entries"),
    ("long patient ids", "x_patient_ids.npy", "6 entries"),
    ("float labels", "x_labels.npy", "integer class ids"),
    ("int embeddings", "x.npy", "float array"),
    ("1-d embeddings", "x.npy", "2-D"),
    ("no rows", "x.npy", "non-empty"),
    ("nan row", "x.npy", "rows 3 (img3)"),
    ("inf row", "x.npy", "rows 1 (img1)"),
    ("duplicated ids", "x_image_ids.npy", "repeat (img1)"),
    ("label out of range", "x_labels.npy", "first bad at row 3"),
    ("negative label", "x_labels.npy", "row 1"),
    ("duplicate class names", "x_meta.json", "repeat ['a']"),
    ("meta dim differs", "x_meta.json", "embedding_dim 8"),
    ("meta not json", "x_meta.json", "JSON"),
    ("no labels file", "x_labels.npy", "not found"),
    ("no ids file", "x_image_ids.npy", "not found"),
    ("no embeddings file", "x.npy", "not found"),
    ("pickled ids", "x_image_ids.npy", "plain .npy"),
]


@pytest.mark.parametrize("what, file, words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_set_is_refused_naming_the_file(tmp_path, what, file, words):
    path = write_raw(tmp_path / "x", hand_set(), meta={"class_names": NAMES})
    _corrupt(tmp_path / "x", what)
    with pytest.raises(ValueError) as e:
        E.load(path, flag="--embeddings")
    assert str(tmp_path / file) in str(e.value) and words in str(e.value), str(e.value)


def test_ids_file_may_be_optional_for_a_caller_that_does_not_match_rows(tmp_path):
    path = write_raw(tmp_path / "x", hand_set())
    os.remove(tmp_path / "x_image_ids.npy")
    assert E.load(path, required=("labels",)).image_ids is None


# ----------------------------------------------------------------------------- old meta formats, identity

OLD_EXTRACT = {"model_name": "convnextv2", "model_args": {"convnext_backbone": "convnextv2_atto", "pretrained": True},
               "embedding_dim": 4, "resume": "ckpt/convnext_best_ckpt.pth", "image_list": "test.txt",
               "image_dir": "img", "dataset": "covid", "class_names": NAMES, "num_images": 5, "world_size": 1,
               "seed": 0, "git": "abc1234"}


def fusion_meta(ckpt):  # train_fusion.py --apply of today: the head's path under "checkpoint"
    return {"model_name": "fusion", "model_args": {"backbone": "fusion-mlp:4,4", "embedding_dim": 4},
            "checkpoint": ckpt, "epoch": 2, "inputs": ["a.npy", "b.npy"], "class_names": NAMES, "seed": 0}


OLD_FORMATS = [
    ("extract with resume", OLD_EXTRACT, "convnextv2 checkpoint ckpt/convnext_best_ckpt.pth"),
    ("extract untrained", dict(OLD_EXTRACT, resume=None, model_args={"pretrained": False}, seed=3),
     'convnextv2 {"pretrained": false} seed 3'),
    ("extract pretrained, no checkpoint", dict(OLD_EXTRACT, resume=None, model_args={"pretrained": True}),
     'convnextv2 {"pretrained": true}'),
    ("fusion apply", fusion_meta("runs/a/fusion_mlp_best_ckpt.pth"),
     "fusion checkpoint runs/a/fusion_mlp_best_ckpt.pth"),
    ("no meta", None, None),
]


@pytest.mark.parametrize("what, meta, identity", OLD_FORMATS, ids=[m[0] for m in OLD_FORMATS])
def test_sets_of_todays_writers_load_and_name_their_model(tmp_path, what, meta, identity):
    got = E.load(write_raw(tmp_path / "x", hand_set(), meta=meta))
    assert got.class_names == (None if meta is None else NAMES)
    assert got.model_identity == identity


def test_two_fusion_heads_of_the_same_shape_are_two_models(tmp_path):
    a = E.load(write_raw(tmp_path / "a", hand_set(), meta=fusion_meta("runs/a/best.pth")))
    b = E.load(write_raw(tmp_path / "b", hand_set(), meta=fusion_meta("runs/b/best.pth")))
    assert a.meta["model_args"] == b.meta["model_args"] and a.model_identity != b.model_identity
    # current schema: told apart by the checkpoint's bytes, the same file under another path is the same model
    for name, data in (("h1.pth", b"head one"), ("h2.pth", b"head two"), ("copy_of_h1.pth", b"head one")):
        (tmp_path / name).write_bytes(data)
    ident = {n: E.model_identity(E.make_meta(model_name="fusion", model_args=a.meta["model_args"],
                                             checkpoint=tmp_path / n)) for n in ("h1.pth", "h2.pth", "copy_of_h1.pth")}
    assert ident["h1.pth"] != ident["h2.pth"] and ident["h1.pth"] == ident["copy_of_h1.pth"]


def test_untrained_models_differ_by_seed_and_pretrained_ones_by_weights():
    args = {"backbone": "resnet18", "pretrained": False}
    seed0, seed1 = (E.model_identity(E.make_meta(model_name="timm", model_args=args, seed=s)) for s in (0, 1))
    assert seed0 != seed1
    rad = E.make_meta(model_name="timm", model_args={"pretrained": True}, weights="microsoft/rad-dino")
    assert rad["model_source"] == {"weights": "microsoft/rad-dino"}
    assert E.make_meta(model_name="timm", model_args={"backbone": "resnet18", "pretrained": True}
                       )["model_source"] == {"weights": "backbone=resnet18"}


# ----------------------------------------------------------------------------- align

def test_align_reorders_rows_by_id_and_relabels_classes_by_name():
    a = hand_set(4)  # ids img0..img3, labels 0 1 2 0 under NAMES
    order = [2, 0, 3, 1]  # b holds a's rows in this order, its class list reversed
    rev = NAMES[::-1]
    b = E.EmbeddingSet(a.embeddings[order] * 2, np.array([0, 2, 2, 1]), a.image_ids[order], a.patient_ids[order],
                       rev, {})
    got = E.align(a, b)
    # row i of the result is a's image i: b's row holding img0 is b row 1, img1 -> 3, img2 -> 0, img3 -> 2
    np.testing.assert_array_equal(got.embeddings, b.embeddings[[1, 3, 0, 2]])
    assert list(got.image_ids) == ["img0", "img1", "img2", "img3"]
    np.testing.assert_array_equal(got.embeddings, a.embeddings * 2)
    # b's labels [0, 2, 2, 1] name [COVID-19, normal, normal, pneumonia] for img2, img0, img3, img1
    np.testing.assert_array_equal(got.labels, [0, 1, 2, 0])
    assert got.class_names == NAMES


ALIGN_ERRORS = [
    ("other images", dict(ids=["img0", "img1", "img9", "img3"]), "only in a.npy: ['img2']"),
    ("fewer images", dict(n=3), "only in a.npy: ['img3']"),
    ("a class a lacks", dict(names=["normal", "pneumonia", "effusion"]), "only in b.npy: ['effusion']"),
    ("no class names", dict(names=None), "has none"),
]


@pytest.mark.parametrize("what, kw, words", ALIGN_ERRORS, ids=[m[0] for m in ALIGN_ERRORS])
def test_align_refuses_sets_that_do_not_match(what, kw, words):
    a = replace(hand_set(4), path=Path("a.npy"))
    b = replace(hand_set(kw.get("n", 4), names=kw.get("names", NAMES), ids=kw.get("ids")), path=Path("b.npy"))
    with pytest.raises(ValueError) as e:
        E.align(a, b)
    assert words in str(e.value) and "a.npy" in str(e.value) and "b.npy" in str(e.value), str(e.value)


def test_align_refuses_an_image_with_another_class():
    a = replace(hand_set(4), path=Path("a.npy"))
    b = replace(a, labels=np.array([0, 1, 1, 0]), path=Path("b.npy"))
    with pytest.raises(ValueError, match=r"disagree on 1 of 4 images \(first img2: 'COVID-19' vs 'pneumonia'\)"):
        E.align(a, b)


# ----------------------------------------------------------------------------- save refuses

def with_meta(s):
    return replace(s, meta=E.make_meta(model_name="timm", model_args={"backbone": "resnet18"}, seed=0))


def test_save_refuses_to_overwrite_and_leaves_files_intact(tmp_path):
    path = tmp_path / "x.npy"
    E.save(path, with_meta(hand_set()))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["x.npy", "x_image_ids.npy", "x_labels.npy", "x_meta.json", "x_patient_ids.npy"]
    other = with_meta(replace(hand_set(), embeddings=-hand_set().embeddings))
    with pytest.raises(ValueError, match="already exist.*--overwrite"):
        E.save(path, other)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    E.save(path, replace(other, patient_ids=None), overwrite=True)
    got = E.load(path)
    np.testing.assert_array_equal(got.embeddings, other.embeddings)
    assert got.patient_ids is None  # the old patient ids file is not read as the new set's


def test_save_checks_the_set_before_writing_anything(tmp_path):
    bad = hand_set()
    bad.embeddings[2, 0] = np.nan
    with pytest.raises(ValueError, match="rows 2 \\(img2\\)"):
        E.save(tmp_path / "out" / "x.npy", with_meta(bad))
    with pytest.raises(ValueError, match="make_meta"):  # one meta schema: a hand-made meta is refused
        E.save(tmp_path / "out" / "x.npy", replace(hand_set(), meta={"resume": "ckpt.pth"}))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("meta, expected", [
    ({"meta_version": 1, "model_source": {"checkpoint": "ck/a.pth", "sha256": "ab"}}, ("ck/a.pth", "ab")),
    ({"meta_version": 1, "model_source": {"weights": "random init"}}, (None, None)),
    ({"model_name": "hybrid", "resume": "ck/b.pth"}, ("ck/b.pth", None)),        # extract_embeddings.py, older
    ({"model_name": "fusion", "checkpoint": "ck/f.pth"}, ("ck/f.pth", None)),    # train_fusion.py --apply, older
    ({"model_name": "x"}, (None, None)),
    (None, (None, None)),
])
def test_source_checkpoint_of_every_meta_format(meta, expected):
    assert E.source_checkpoint(meta) == expected


# ----------------------------------------------------------------------------- one owner of the file names

SIDECAR_NAMES = ("_labels.npy", "_image_ids.npy", "_patient_ids.npy", "_meta.json")


def test_sidecar_file_names_appear_in_embeddings_py_only():
    users = {p.name: [s for s in SIDECAR_NAMES if s in p.read_text(encoding="utf-8")]
             for pattern in ("*.py", "bench/*.py", "data/*.py")
             for p in sorted(ROOT.glob(pattern)) if p.name != "embeddings.py"}
    assert {k: v for k, v in users.items() if v} == {}


# ----------------------------------------------------------------------------- embedding a list in list order

def tiny_model():
    import torch
    from torch import nn

    class Tiny(nn.Module):
        embedding_dim = 8

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 5, stride=4)

        def forward(self, x):
            return nn.functional.normalize(self.conv(x).mean((2, 3)), dim=1)

    torch.manual_seed(0)
    return Tiny().eval()


def shuffled_dataset(demo_data, out_dir):
    """The demo training list in a seeded random order, as 32 px tensors."""
    from dataset import ImageListDataset, build_transform
    lines = (Path(demo_data) / "train_split.txt").read_text().splitlines()
    lines = [lines[i] for i in np.random.default_rng(1).permutation(len(lines))]
    lst = Path(out_dir) / "shuffled.txt"
    lst.write_text("\n".join(lines) + "\n")
    tf = build_transform(32, [0.5] * 3, [0.25] * 3)
    return ImageListDataset(lst, Path(demo_data) / "train", transform=tf)


def per_image_rows(model, ds):
    import torch
    with torch.no_grad():
        return np.stack([model(ds[i][0][None])[0].numpy() for i in range(len(ds))])


def test_embed_dataset_gives_list_order_rows(demo_data, tmp_path):
    import torch
    ds = shuffled_dataset(demo_data, tmp_path)
    model = tiny_model()
    expected = per_image_rows(model, ds)
    rows = E.embed_dataset(model, ds, torch.device("cpu"), batch_size=4)  # 27 images: a last batch of 3
    assert rows.shape == (27, 8) and rows.dtype == np.float32
    np.testing.assert_allclose(rows, expected, atol=1e-5)
    pick = [20, 3, 7]
    np.testing.assert_allclose(E.embed_dataset(model, ds, "cpu", batch_size=2, indices=pick), expected[pick], atol=1e-5)


def test_embed_dataset_refuses_items_without_their_index():
    import torch

    class NoIndex(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(3, 16, 16), 0, 0  # every item claims to be item 0

    with pytest.raises(ValueError, match="own index"):
        E.embed_dataset(tiny_model(), NoIndex(), "cpu", batch_size=2)


def test_embed_dataset_two_torchrun_ranks(demo_data, tmp_path):
    """Each of 2 gloo ranks embeds about half the list; both get every row, in list order."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(demo_data), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ds = shuffled_dataset(demo_data, tmp_path)
    expected = per_image_rows(tiny_model(), ds)
    seen = []
    for rank in (0, 1):
        with np.load(tmp_path / f"rank{rank}.npz") as z:
            np.testing.assert_allclose(z["rows"], expected, atol=1e-5)
            assert int(z["world"]) == 2
            seen.append(int(z["images"]))
    assert seen == [14, 13]  # strided shards of 27 images: no image embedded twice


def _worker(demo_data, out_dir):
    import torch

    import utils
    assert utils.init_distributed()
    model = tiny_model()
    images = []
    model.register_forward_hook(lambda m, i, o: images.append(len(o)))
    ds = shuffled_dataset(demo_data, Path(out_dir) / f"list{utils.get_rank()}")
    rows = E.embed_dataset(model, ds, torch.device("cpu"), batch_size=4)
    np.savez(Path(out_dir) / f"rank{utils.get_rank()}.npz", rows=rows, world=utils.get_world_size(),
             images=sum(images))
    utils.cleanup_distributed(sync=True)


if __name__ == "__main__":
    for r in (0, 1):
        Path(sys.argv[2], f"list{r}").mkdir(exist_ok=True)
    _worker(sys.argv[1], sys.argv[2])
