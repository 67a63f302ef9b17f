"""train.py: param groups, outputs and checkpoint keys, bit-exact resume, bad input, demo split."""
import hashlib
import json
import math
import re
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


def test_resume_is_bit_exact(two_epochs, demo_data, tmp_path, monkeypatch, capsys):
    # the same 2-epoch command, killed during epoch 2, then resumed from its _last_ checkpoint
    # (after the global RNGs were disturbed), must end bit for bit where the uninterrupted run ended
    real_epoch = train.train_one_epoch

    def interrupted(*a, **kw):
        if a[-2] == 2:  # the epoch argument
            raise KeyboardInterrupt
        return real_epoch(*a, **kw)

    monkeypatch.setattr(train, "train_one_epoch", interrupted)
    capsys.readouterr()
    # Ctrl-C: exit 130 and one hint with the exact resume command, no traceback
    assert run(demo_data, tmp_path, "--epochs", "2") == 130
    err = capsys.readouterr().err
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    last = tmp_path / STEM / f"{STEM}_last_ckpt.pth"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    assert "Traceback" not in err and f"the last checkpoint is {last} (epoch 1 done)" in err
    command = err.strip().splitlines()[-1].split()
    assert command[:2] == ["python", "train.py"] and command[-2:] == ["--resume", str(last)]
    torch.manual_seed(1234)
    # the printed command itself resumes the run
    assert train.main(train.parse_args(command[2:])) == 0
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


# ---------------------------------------------------------------- resume semantics, refusals, outputs

def _copy_run(two_epochs, tmp_path):
    dst = tmp_path / "save"
    shutil.copytree(two_epochs.parent, dst)
    return dst, dst / STEM


def test_resume_with_more_epochs_rebuilds_the_schedule(two_epochs, demo_data, tmp_path, capsys):
    save, run_dir = _copy_run(two_epochs, tmp_path)
    last = run_dir / f"{STEM}_last_ckpt.pth"
    # the finished 2-epoch run left lr = 1e-3 * 0.5 * (1 + cos(pi)) = 0 for a next epoch; --epochs 4 must not train at 0
    assert torch.load(last, weights_only=True)["optimizer"]["param_groups"][-1]["lr"] == pytest.approx(0, abs=1e-12)
    assert run(demo_data, save, "--epochs", "4", "--resume", str(last)) == 0
    assert "cosine schedule is rebuilt for 4 epochs from epoch 3" in capsys.readouterr().out
    rows = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    # new horizon: lr(e) = 1e-3 * 0.5 * (1 + cos(pi * (e - 1) / 4)) for the "new" group (the logged one)
    assert rows[2]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))  # 5e-4
    assert rows[3]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert json.loads((run_dir / "args.json").read_text())["epochs"] == 4


def test_resume_refuses_changed_optimisation_flags(two_epochs, demo_data, tmp_path, capsys):
    save, run_dir = _copy_run(two_epochs, tmp_path)
    last = run_dir / f"{STEM}_last_ckpt.pth"
    before = snapshot(save)
    for extra, msg in [(["--lr", "5e-4"], "--lr 0.001 (checkpoint) vs 0.0005 (now)"),
                       (["--weight-decay", "0.1"], "--weight-decay 0.0 (checkpoint) vs 0.1 (now)"),
                       (["--backbone-lr-mult", "1"], "--backbone-lr-mult 0.1 (checkpoint) vs 1.0 (now)"),
                       (["--margin", "0.3"], "--margin 0.2 (checkpoint) vs 0.3 (now)"),
                       (["--mining", "batch_all"], "--mining 'batch_hard' (checkpoint) vs 'batch_all' (now)"),
                       (["-k", "3"], "-k/--samples-per-label 4 (checkpoint) vs 3 (now)"),
                       (["--accum-steps", "2"], "--accum-steps 1 (checkpoint) vs 2 (now)"),
                       ([], "already trained 2 epochs and --epochs is 2")]:
        assert run(demo_data, save, "--epochs", "2" if not extra else "3", "--resume", str(last), *extra) == 2
        assert msg in capsys.readouterr().err, extra
    assert snapshot(save) == before  # args.json and the checkpoints still say what was used


def test_resume_without_amp_keeps_the_runs_own_amp(two_epochs, demo_data, tmp_path, capsys):
    # a run started when train.py's --amp defaulted to auto (now off): resumed without --amp, it keeps auto
    save, run_dir = _copy_run(two_epochs, tmp_path)
    last = run_dir / f"{STEM}_last_ckpt.pth"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["args"]["amp"] == "off"  # today's default
    torch.save(dict(ckpt, args=dict(ckpt["args"], amp="auto")), last)
    before = snapshot(save)
    assert run(demo_data, save, "--epochs", "3", "--resume", str(last), "--amp", "off") == 2  # typed: checked
    assert "--amp 'auto' (checkpoint) vs 'off' (now)" in capsys.readouterr().err
    assert snapshot(save) == before
    assert run(demo_data, save, "--epochs", "3", "--resume", str(last)) == 0
    assert json.loads((run_dir / "args.json").read_text())["amp"] == "auto"
    assert torch.load(last, weights_only=True)["args"]["amp"] == "auto" and "_amp_given" not in ckpt["args"]


def test_resume_from_epoch_file_tests_its_own_best_not_a_later_one(two_epochs, demo_data, tmp_path, capsys):
    save, run_dir = _copy_run(two_epochs, tmp_path)
    first = torch.load(run_dir / f"{STEM}_epoch_1_ckpt.pth", weights_only=True)
    # an abandoned continuation left a _best_ file from a later epoch (5) with other weights
    stale = dict(first, epoch=5, model={k: v + 1 if v.is_floating_point() else v for k, v in first["model"].items()})
    torch.save(stale, run_dir / f"{STEM}_best_ckpt.pth")
    # the resumed history's best (epoch 1) can no longer be beaten: epoch 2 will not become the best
    resumed = dict(first, best_metric=2.0)
    torch.save(resumed, run_dir / f"{STEM}_epoch_1_ckpt.pth")
    assert run(demo_data, save, "--epochs", "2", "--resume", str(run_dir / f"{STEM}_epoch_1_ckpt.pth")) == 0
    out = capsys.readouterr().out
    res = json.loads((run_dir / "results.json").read_text())
    assert res["epoch"] == 1 and res["checkpoint"] == f"{STEM}_best_ckpt.pth"
    assert f"testing {run_dir / (STEM + '_best_ckpt.pth')} (epoch 1" in out
    kept = torch.load(run_dir / f"{STEM}_stale_best_epoch_5_ckpt.pth", weights_only=True)  # kept, not destroyed
    assert kept["epoch"] == 5
    best = torch.load(run_dir / f"{STEM}_best_ckpt.pth", weights_only=True)
    assert all(torch.equal(best["model"][k], first["model"][k]) for k in first["model"])
    assert not set(train.RESUME_KEYS) & set(best)  # rewritten from the epoch file: still weights only


def test_refusals_leave_no_folder(demo_data, tmp_path, capsys):
    save = tmp_path / "never"
    cases = [
        (["--resume", str(tmp_path / "missing.pth")], "--resume"),
        (["--model", "vit", "--vit-backbone", "vit_tiny_patch16_224", "--freeze-backbone", "--embedding-dim", "0"],
         "--embedding-dim must be >= 1"),
        (["--model", "timm", "--backbone", "no_such_net_v9"], "unknown timm model"),
    ]
    for extra, msg in cases:
        argv = [a for a in TINY if a not in ("--embedding-dim", "32")] if "--embedding-dim" in extra else TINY
        args = train.parse_args(argv + ["--dataset-dir", str(demo_data), "--train-image-list",
                                        str(demo_data / "train_split.txt"), "--save-dir", str(save), *extra])
        assert train.main(args) == 2
        assert msg in capsys.readouterr().err, extra
        assert not save.exists(), extra
    # a frozen backbone with no trainable head: refused, naming what would make it trainable
    args = train.parse_args(["--model", "vit", "--vit-backbone", "vit_tiny_patch16_224", "--img-size", "64",
                             "--no-pretrained", "--freeze-backbone", "--device", "cpu", "--workers", "0",
                             "--dataset-dir", str(demo_data), "--train-image-list", str(demo_data / "train_split.txt"),
                             "--save-dir", str(save)])
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "no trainable parameters" in err and "--embedding-dim" in err and "extract_embeddings.py" in err
    assert not save.exists()


def test_generic_class_order_is_the_training_lists_and_is_stored(demo_data, tmp_path):
    # a test list without one class must still number the others as the training list does
    lines = (demo_data / "test_split.txt").read_text().splitlines()
    partial = tmp_path / "test_no_covid.txt"
    partial.write_text("\n".join(l for l in lines if l.split()[2] != "COVID-19") + "\n")
    args = train.parse_args(TINY + ["--dataset", "generic", "--dataset-dir", str(demo_data), "--train-image-list",
                                    str(demo_data / "train_split.txt"), "--test-image-list", str(partial),
                                    "--save-dir", str(tmp_path / "s")])
    _, _, _, _, train_set, val_set, test_set, *_ = train.setup(args)
    assert train_set.class_names == test_set.class_names == ["COVID-19", "normal", "pneumonia"]
    first = [l.split() for l in partial.read_text().splitlines()][0]
    assert test_set.labels[0] == ["COVID-19", "normal", "pneumonia"].index(first[2])


def test_progress_lines_without_a_terminal(demo_data, tmp_path, capsys, monkeypatch):
    import utils
    monkeypatch.setattr(utils, "PROGRESS_EVERY_S", 0)  # a line after every step instead of every 30 s
    assert run(demo_data, tmp_path, "--epochs", "1", "--iters-per-epoch", "3") == 0
    err = capsys.readouterr().err
    assert "epoch 1: 1/3 steps (33%)" in err and "epoch 1: 2/3 steps (67%)" in err


def test_training_curves_are_labelled_and_mark_the_best_epoch(tmp_path, monkeypatch):
    import matplotlib.figure
    seen = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: (seen.append(self), real(self, *a, **k)))
    history = [dict(epoch=e, loss=0.2 / e, active_fraction=0.5, **{"val_R@1": v, "val_mAP": v})
               for e, v in ((1, 0.5), (2, 1.0), (3, 0.9))]
    train.plot_curves(history, tmp_path / "c.png", best_epoch=2, title="RUN")
    (fig,) = seen
    left, right = fig.axes
    assert left.get_ylabel() and right.get_ylabel() and left.get_title() and right.get_title()
    assert right.get_ylim()[1] > 1.0  # a curve at 1.0 is not drawn on the frame
    vlines = [l for l in right.get_lines() if list(l.get_xdata()) == [2, 2]]
    assert vlines and "epoch 2" in vlines[0].get_label()


# ---------------------------------------------------------------- issue 19: checkpoint sizes, X-MIR, help, offline

def test_best_checkpoint_holds_weights_without_optimizer_state(two_epochs, demo_data, tmp_path, capsys):
    best_path, last_path = two_epochs / f"{STEM}_best_ckpt.pth", two_epochs / f"{STEM}_last_ckpt.pth"
    best = torch.load(best_path, weights_only=True)
    assert not set(train.RESUME_KEYS) & set(best)
    assert {"model", "model_args", "epoch", "best_epoch", "args", "class_names"} <= set(best)
    for tag in ("last", "epoch_1", "epoch_2"):  # the files --resume takes keep everything
        assert set(train.RESUME_KEYS) <= set(torch.load(two_epochs / f"{STEM}_{tag}_ckpt.pth", weights_only=True))
    # Adam keeps two moments per trainable weight, so a file without them is about a third of one with them
    assert best_path.stat().st_size < 0.5 * last_path.stat().st_size
    same_epoch = torch.load(two_epochs / f"{STEM}_epoch_{best['epoch']}_ckpt.pth", weights_only=True)
    assert all(torch.equal(best["model"][k], same_epoch["model"][k]) for k in same_epoch["model"])
    # resuming from it is refused, naming the file that can resume the run; nothing changes
    save, run_dir = _copy_run(two_epochs, tmp_path)
    before = snapshot(save)
    assert run(demo_data, save, "--epochs", "3", "--resume", str(run_dir / best_path.name)) == 2
    err = capsys.readouterr().err
    assert "no optimizer state" in err and f"--resume {run_dir / last_path.name}" in err and "Traceback" not in err
    assert snapshot(save) == before


def test_exclude_classes_says_what_it_left_out(demo_data, tmp_path, capsys):
    count = lambda lst: sum(l.split()[2] == "COVID-19" for l in (demo_data / lst).read_text().splitlines())
    assert run(demo_data, tmp_path, "--epochs", "1", "-p", "2", "--exclude-classes", "COVID-19") == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("--exclude-classes"))
    m = re.fullmatch(r"--exclude-classes COVID-19: images left out of training: train COVID-19 (\d+); "
                     r"validation COVID-19 (\d+); the test list keeps its (\d+) images of them .*", line)
    assert m, line
    # every COVID-19 image of the training list is in the training or the validation part, none is trained on
    assert int(m[1]) + int(m[2]) == count("train_split.txt") and int(m[3]) == count("test_split.txt") > 0
    ckpt = torch.load(tmp_path / STEM / f"{STEM}_last_ckpt.pth", weights_only=True)
    assert ckpt["args"]["exclude_classes"] == ["COVID-19"] and "COVID-19" in ckpt["class_names"]


def test_help_says_each_default_once():
    text = " ".join(train.get_args_parser().format_help().split())  # argparse wraps lines
    for empty in ("(default: None)", "(default: True)", "(default: False)"):
        assert empty not in text, empty  # --no-mxa "(default: True)" read as if the switch were on
    # --device, --amp, --eval-batch-size: utils.get_runtime_parser's shared wording and defaults
    assert "not given: cuda when available" in text and "(default: cuda" not in text
    assert "--amp alone = auto = bf16 on CUDA, off on CPU (default: off)" in text
    assert "--epochs EPOCHS training epochs (cosine lr schedule over them) (default: 30)" in text


def test_offline_without_weights_is_one_line_before_any_work(demo_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(M, "build_model", lambda *a, **k: pytest.fail("a model was built before the weights check"))
    argv = [a for a in TINY if a != "--no-pretrained"] + [
        "--dataset-dir", str(demo_data), "--train-image-list", str(demo_data / "train_split.txt"),
        "--save-dir", str(tmp_path / "save")]
    assert train.main(train.parse_args(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("train.py: error:"), err
    for part in ("'convnextv2_atto'", "--pretrained-weights FILE", "--no-pretrained", "network"):
        assert part in err, part
    assert not (tmp_path / "save").exists()
