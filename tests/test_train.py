"""train.py: param groups, outputs and checkpoint keys, bit-exact resume, bad input, demo split."""
import hashlib
import json
import shutil

import pytest
import torch

import model as M
import train
from dataset import ImageListDataset, train_image_dir

TINY = ["--model", "convnextv2", "--convnext-backbone", "convnextv2_atto", "--img-size", "64", "--no-pretrained",
        "--embedding-dim", "32", "-p", "3", "-k", "4", "--iters-per-epoch", "2", "--workers", "0",
        "--eval-batch-size", "16", "--save-freq", "1", "--device", "cpu", "--lr", "1e-3",
        "--val-fraction", "0.3"]
STEM = "covid_convnextv2_embed_32_seed_0"


def run(demo, save_dir, *extra):
    argv = TINY + ["--dataset-dir", str(demo), "--train-image-list", str(demo / "train_split.txt"),
                   "--test-image-list", str(demo / "test_split.txt"), "--save-dir", str(save_dir), *extra]
    return train.main(train.parse_args(argv))


def snapshot(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def two_epochs(demo_data, tmp_path_factory):
    """One uninterrupted 2-epoch run, shared by several tests."""
    out = tmp_path_factory.mktemp("straight")
    assert run(demo_data, out, "--epochs", "2") == 0
    return out / STEM


def test_param_groups_cover_every_trainable_parameter_once():
    model = M.build_model("hybrid_convnext_vit", convnext_backbone="convnextv2_atto", vit_backbone="vit_tiny_patch16_224",
                          img_size=64, embedding_dim=16, pretrained=False)
    groups = train.param_groups(model, lr=1e-3, backbone_lr_mult=0.1, weight_decay=0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    by_name = {g["name"]: g for g in groups}
    backbone = {id(p) for p in list(model.convnext.parameters()) + list(model.vit.parameters())}
    assert {id(p) for p in by_name["backbone"]["params"]} == backbone
    assert by_name["backbone"]["lr"] == pytest.approx(1e-4) and by_name["new"]["lr"] == 1e-3
    new_modules = {id(p) for p in list(model.mxa.parameters()) + list(model.fusion.parameters())}
    assert {id(p) for p in by_name["new"]["params"]} == new_modules
    frozen = M.build_model("convnextv2", convnext_backbone="convnextv2_atto", img_size=64, embedding_dim=16,
                           pretrained=False, freeze_backbone=True)
    (only,) = train.param_groups(frozen, 1e-3, 0.1, 0.0)
    assert only["name"] == "new" and {id(p) for p in only["params"]} == {
        id(p) for p in frozen.parameters() if p.requires_grad}


def test_outputs_and_checkpoint_keys(two_epochs):
    names = {p.name for p in two_epochs.iterdir()}
    for tag in ("last", "best", "epoch_1", "epoch_2"):
        assert f"{STEM}_{tag}_ckpt.pth" in names
    assert {"args.json", "log.jsonl", "training_curves.png", "results.json"} <= names
    ckpt = torch.load(two_epochs / f"{STEM}_last_ckpt.pth", weights_only=True)
    for key in ("format", "format_version", "model_name", "model_args", "model", "optimizer", "scaler", "scheduler",
                "epoch", "best_metric", "best_epoch", "args", "rng_states"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 2 and isinstance(ckpt["args"], dict) and ckpt["args"]["epochs"] == 2
    assert set(ckpt["rng_states"]) >= {"python", "numpy", "torch"}
    rows = [json.loads(l) for l in (two_epochs / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"loss", "active_fraction", "val_R@1", "val_mAP", "time_s", "peak_mem_mb", "lr"} <= set(rows[0])
    res = json.loads((two_epochs / "results.json").read_text())
    best = torch.load(two_epochs / f"{STEM}_best_ckpt.pth", weights_only=True)
    assert res["epoch"] == best["epoch"] and 0 <= res["mAP"] <= 1 and "R@1" in res
    model, _ = M.load_checkpoint(two_epochs / f"{STEM}_best_ckpt.pth", expected_model="convnextv2")
    assert model.embedding_dim == 32


def test_resume_is_bit_exact(two_epochs, demo_data, tmp_path, monkeypatch):
    # the same 2-epoch command, killed during epoch 2, then resumed from its _last_ checkpoint
    # (after the global RNGs were disturbed), must end bit for bit where the uninterrupted run ended
    real_epoch = train.train_one_epoch

    def interrupted(*a, **kw):
        if a[-2] == 2:  # the epoch argument
            raise KeyboardInterrupt
        return real_epoch(*a, **kw)

    monkeypatch.setattr(train, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(demo_data, tmp_path, "--epochs", "2")
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    last = tmp_path / STEM / f"{STEM}_last_ckpt.pth"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    torch.manual_seed(1234)
    assert run(demo_data, tmp_path, "--epochs", "2", "--resume", str(last)) == 0
    a = torch.load(two_epochs / f"{STEM}_last_ckpt.pth", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for s_a, s_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(s_a[k], s_b[k]) for k in s_a)
    drop = ("time_s", "train_time_s", "img_per_s", "peak_mem_mb")
    rows = lambda d: [{k: v for k, v in json.loads(l).items() if k not in drop}
                      for l in (d / "log.jsonl").read_text().splitlines()]
    assert rows(two_epochs) == rows(tmp_path / STEM)
    res = lambda d: json.loads((d / "results.json").read_text())
    assert res(two_epochs) == res(tmp_path / STEM)


def _list_with_singleton_class(demo, tmp_path):
    lines = (demo / "train_split.txt").read_text().splitlines()
    normal = [l for l in lines if l.split()[2] != "pneumonia"]
    one = next(l for l in lines if l.split()[2] == "pneumonia")
    path = tmp_path / "one_pneumonia.txt"
    path.write_text("\n".join(normal + [one]) + "\n")
    return path


def test_bad_input_fails_before_work_and_overwrites_nothing(two_epochs, demo_data, tmp_path, capsys):
    save = two_epochs.parent
    before = snapshot(save)
    truncated = tmp_path / "trunc.pth"
    data = (two_epochs / f"{STEM}_last_ckpt.pth").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    other = tmp_path / "other.pth"
    shutil.copy(two_epochs / f"{STEM}_last_ckpt.pth", other)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        (["-p", "4", "--overwrite"], "larger than the number of classes"),
        (["--val-fraction", "0", "--train-image-list", str(_list_with_singleton_class(demo_data, tmp_path)),
          "--overwrite"], "fewer than 2 images"),
        (["--resume", str(tmp_path / "missing.pth")], "not found"),
        (["--resume", str(truncated)], "truncated"),
        (["--resume", str(other), "--embedding-dim", "16"], "embedding_dim"),
        (["--resume", str(other), "--no-mxa"], "use_mxa"),
        (["--batch-size", "10", "--overwrite"], "not divisible"),
        (["--batch-size", "12", "-k", "3", "--overwrite"], "conflicts"),
        ([], "already holds a run"),
    ]
    for extra, msg in cases:
        assert run(demo_data, save, "--epochs", "2", *extra) == 2, extra
        err = capsys.readouterr().err
        assert msg in err, (extra, err)
        # the -p/-k flags come after TINY's, so argparse takes them; nothing in the run folder changed
        assert snapshot(save) == before, extra
    assert run(demo_data, blocker / "sub", "--epochs", "1") == 2
    assert "--save-dir" in capsys.readouterr().err and blocker.read_text() == "x"


def test_val_split_is_patient_disjoint_and_demo_flags(demo_data, tmp_path):
    args = train.parse_args(TINY + ["--dataset-dir", str(demo_data), "--train-image-list",
                                    str(demo_data / "train_split.txt"), "--save-dir", str(tmp_path), "--val-fraction", "0.3"])
    _, _, _, _, train_set, val_set, test_set, sampler, steps, run_dir, stem = train.setup(args)
    full = ImageListDataset(demo_data / "train_split.txt", train_image_dir(demo_data))
    assert len(val_set) > 0 and not set(train_set.patient_ids) & set(val_set.patient_ids)
    assert sorted(train_set.filenames + val_set.filenames) == sorted(full.filenames)
    assert test_set is None and stem == STEM and steps == 2 and not run_dir.exists()
    demo = train.parse_args(["--demo", "--epochs", "1", "--lr", "1e-4"])
    assert demo.epochs == 1 and demo.lr == 1e-4  # explicit flags win over the demo's defaults
    assert demo.model == train.DEMO["model"] and demo.img_size == train.DEMO["img_size"] and not demo.pretrained


def test_demo_smoke(demo_data, tmp_path, capsys):
    argv = ["--demo", "--dataset-dir", str(demo_data), "--save-dir", str(tmp_path), "--epochs", "1",
            "--iters-per-epoch", "1", "-k", "3", "--eval-batch-size", "16", "--device", "cpu"]
    assert train.main(train.parse_args(argv)) == 0
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and "R@5" in out
    res = json.loads(next(tmp_path.glob("*/results.json")).read_text())
    assert {"R@1", "R@5", "mAP"} <= set(res["before_training"])
    # the demo's patients have 3 near-identical images each: its metrics must not count them as matches
    assert res["exclude_same_patient"] is True and res["before_training"]["exclude_same_patient"] is True
