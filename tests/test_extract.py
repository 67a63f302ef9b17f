"""extract_embeddings.py on the demo data with a tiny model: list order, dtypes, checkpoint rebuild (torchrun: tests/test_encoders.py)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import embeddings
import extract_embeddings as ee
from dataset import load_image, read_image_list
from model import build_model, get_transform, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "convnextv2", "--convnext-backbone", "convnextv2_atto", "--no-pretrained", "--img-size", "64"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("convnextv2", convnext_backbone="convnextv2_atto", pretrained=False, img_size=64,
                        embedding_dim=32)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_ckpt.pth"
    torch.save(make_checkpoint(model, epoch=1), path)
    return path, model.eval()


def run(demo_data, output, *flags):
    """ee.run: bad input raises (ee.main turns it into one line and exit code 2, tested below)."""
    args = ee.get_args_parser().parse_args(
        ["--dataset-dir", str(demo_data), "--test-image-list", str(demo_data / "test_split.txt"),
         "--output", str(output), "--workers", "0", "--device", "cpu", *flags])
    return ee.run(args)


def load(output):
    s = embeddings.load(output, required=("labels", "image_ids", "patient_ids"))
    return s.embeddings, s.labels, s.image_ids, s.patient_ids


@pytest.fixture(scope="module")
def single(demo_data, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "emb.npy"
    assert run(demo_data, out, "--resume", str(tiny_ckpt[0]), "--batch-size", "7") == 0
    return out


def test_rows_in_list_order_whatever_the_batch_size(demo_data, tiny_ckpt, single, tmp_path):
    emb7, labels, ids, pids = load(single)
    assert run(demo_data, tmp_path / "b1.npy", "--resume", str(tiny_ckpt[0]), "--batch-size", "1") == 0
    emb1, labels1, ids1, pids1 = load(tmp_path / "b1.npy")
    np.testing.assert_allclose(emb1, emb7, atol=1e-5)
    records = read_image_list(demo_data / "test_split.txt")
    assert ids.tolist() == [Path(r.filename).stem for r in records] == ids1.tolist()
    assert labels.tolist() == [r.label for r in records] and pids.tolist() == [r.patient_id for r in records]
    assert emb7.dtype == np.float32 and labels.dtype == np.int64 and emb7.shape == (len(records), 32)
    np.testing.assert_allclose(np.linalg.norm(emb7, axis=1), 1.0, atol=1e-6)
    # row 3 is the model (rebuilt from the checkpoint) applied to image 3 with the model's eval transform
    model = tiny_ckpt[1]
    x = get_transform(model)(load_image(demo_data / "test" / records[3].filename))[None]
    with torch.no_grad():
        np.testing.assert_allclose(emb7[3], model(x)[0].numpy(), atol=1e-5)
    meta = json.loads((tmp_path / "b1_meta.json").read_text())
    assert meta["model_name"] == "convnextv2" and meta["class_names"] == ["normal", "pneumonia", "COVID-19"]


def test_untrained_warning_and_no_overwrite(demo_data, tmp_path, capsys):
    out = tmp_path / "u.npy"
    assert run(demo_data, out, *TINY, "--batch-size", "16") == 0
    assert "UNTRAINED" in capsys.readouterr().err
    before = np.load(out)
    with pytest.raises(ValueError, match=r"u\.npy.*--overwrite"):
        run(demo_data, out, *TINY)
    np.testing.assert_array_equal(np.load(out), before)


def test_missing_images_reported_before_any_work(demo_data, tmp_path, monkeypatch):
    lines = (demo_data / "test_split.txt").read_text().splitlines()
    bad = tmp_path / "list.txt"
    bad.write_text("\n".join(lines + ["p99 gone1.png normal", "p99 gone2.png COVID-19"]) + "\n")
    monkeypatch.setattr(ee, "build", lambda *a: pytest.fail("the model was built before the list was checked"))
    args = ee.get_args_parser().parse_args(
        ["--dataset-dir", str(demo_data), "--test-image-list", str(bad), "--output", str(tmp_path / "x.npy"),
         *TINY])
    with pytest.raises(FileNotFoundError, match=r"2 of \d+ images .*missing"):
        ee.run(args)
    assert not (tmp_path / "x.npy").exists()


def test_resume_with_wrong_model_is_an_error(demo_data, tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="holds model 'convnextv2'"):
        run(demo_data, tmp_path / "w.npy", "--resume", str(tiny_ckpt[0]), "--model", "vit")


def test_untrained_model_is_seeded_and_the_seed_recorded(demo_data, tmp_path):
    a, b, c = tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "c.npy"
    assert run(demo_data, a, *TINY) == 0
    assert run(demo_data, b, *TINY) == 0
    assert run(demo_data, c, *TINY, "--seed", "1") == 0
    assert np.array_equal(np.load(a), np.load(b)) and not np.array_equal(np.load(a), np.load(c))
    assert json.loads((tmp_path / "a_meta.json").read_text())["seed"] == 0


def test_unknown_backbone_leaves_no_output_folder(demo_data, tmp_path):
    out = tmp_path / "new" / "x.npy"
    # refused by model.check_weights before any work, as a typo (not as missing weights)
    with pytest.raises(ValueError, match="unknown timm model .no_such_net_v9"):
        run(demo_data, out, "--model", "timm", "--backbone", "no_such_net_v9")
    assert not out.parent.exists()


def test_fusion_checkpoint_is_one_clear_error_before_any_output(demo_data, tmp_path, capsys):
    # a train_fusion.py head embeds embeddings, not images: the same *_best_ckpt.pth naming makes the mix-up easy
    head = build_model("fusion", backbone="fusion-concat:32,16", embedding_dim=8)
    path = tmp_path / "fusion_best_ckpt.pth"
    torch.save(make_checkpoint(head, epoch=3, class_names=["normal", "pneumonia", "COVID-19"]), path)
    out = tmp_path / "new" / "x.npy"
    for dataset in ("covid", "generic"):  # generic reads the checkpoint's class names first
        with pytest.raises(ValueError, match=r"fusion") as e:
            run(demo_data, out, "--resume", str(path), "--dataset", dataset)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
        assert not out.parent.exists() and capsys.readouterr().out == ""   # refused before the arguments print


def test_help_lines_do_not_repeat_their_default():
    # ArgumentDefaultsHelpFormatter appends "(default: ...)"; a help text that says its own default repeats it.
    # The extraction and data flags (model.py's model flags are checked with model.py)
    parser = ee.get_args_parser()
    fmt = parser._get_formatter()
    groups = [g for g in parser._action_groups if g.title in ("extraction", "data")]
    assert len(groups) == 2
    for action in (a for g in groups for a in g._group_actions):
        text = fmt._expand_help(action)  # the line --help prints
        assert text.lower().count("default") <= 1, f"{action.option_strings}: {text}"


# ----------------------------------------------------------------------------- issue 20: one embedding-set writer

def test_set_meta_names_the_checkpoint_by_hash_and_its_excluded_classes(demo_data, tmp_path):
    torch.manual_seed(0)
    model = build_model("convnextv2", convnext_backbone="convnextv2_atto", pretrained=False, img_size=64,
                        embedding_dim=8)
    ckpt = tmp_path / "excl_ckpt.pth"
    torch.save(make_checkpoint(model, epoch=2, args={"exclude_classes": ["COVID-19"]}), ckpt)
    assert run(demo_data, tmp_path / "a.npy", "--resume", str(ckpt)) == 0
    assert run(demo_data, tmp_path / "b.npy", "--resume", str(ckpt), "--batch-size", "3") == 0
    a, b = embeddings.load(tmp_path / "a.npy"), embeddings.load(tmp_path / "b.npy")
    assert a.meta["model_source"] == {"checkpoint": str(ckpt), "sha256": embeddings.file_sha256(ckpt)}
    assert a.meta["exclude_classes"] == ["COVID-19"]  # what ood.py reads instead of the checkpoint
    assert a.meta["list_file"] == str(demo_data / "test_split.txt") and a.meta["dataset"] == "covid"
    assert a.meta["image_dir"] == str(demo_data / "test") and a.meta["seed"] == 0 and a.meta["world_size"] == 1
    assert a.model_identity == b.model_identity and a.model_identity.endswith(embeddings.file_sha256(ckpt))
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)
    # no checkpoint: the weights say where the model came from; nothing was excluded in training
    assert run(demo_data, tmp_path / "u.npy", *TINY) == 0
    u = embeddings.load(tmp_path / "u.npy")
    assert u.meta["model_source"] == {"weights": "random init", "seed": 0} and "exclude_classes" not in u.meta
    assert u.model_identity != a.model_identity


def test_batch_size_is_the_eval_batch_size_flag():
    parse = lambda *f: ee.get_args_parser().parse_args(["--output", "x.npy", *f])  # noqa: E731
    assert parse().eval_batch_size == 32
    assert parse("--batch-size", "5").eval_batch_size == parse("--eval-batch-size", "5").eval_batch_size == 5
    assert parse().amp == "off" and parse("--amp").amp == "auto"  # --amp alone: bf16 on CUDA, off on CPU


def test_main_bad_input_is_one_line_and_exit_code_2(demo_data, tmp_path, capsys):
    out = tmp_path / "x.npy"
    np.save(out, np.zeros((1, 1), np.float32))
    args = ee.get_args_parser().parse_args(["--dataset-dir", str(demo_data), "--test-image-list",
                                            str(demo_data / "test_split.txt"), "--output", str(out), *TINY])
    assert ee.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("extract_embeddings.py: error: --output") and "--overwrite" in err and "\n" not in err


def test_missing_weights_are_reported_before_any_work(demo_data, tmp_path, monkeypatch, capsys):
    import model as model_mod
    seen = []

    def no_weights(name, model_args):
        seen.append((name, model_args["convnext_backbone"]))
        raise model_mod.WeightsUnavailableError(f"the pretrained weights of {model_args['convnext_backbone']} "
                                                f"are not on this machine")
    monkeypatch.setattr(ee, "check_weights", no_weights)
    monkeypatch.setattr(ee, "build", lambda *a: pytest.fail("the model was built before its weights were checked"))
    out = tmp_path / "new" / "x.npy"
    args = ee.get_args_parser().parse_args(["--dataset-dir", str(demo_data), "--test-image-list",
                                            str(demo_data / "test_split.txt"), "--output", str(out),
                                            "--model", "convnextv2", "--convnext-backbone", "convnextv2_atto"])
    assert ee.main(args) == 2
    assert seen == [("convnextv2", "convnextv2_atto")]
    captured = capsys.readouterr()
    assert captured.err.strip() == ("extract_embeddings.py: error: the pretrained weights of convnextv2_atto are not "
                                    "on this machine") and captured.out == "" and not out.parent.exists()
