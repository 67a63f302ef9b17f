"""test_hybrid_model.py through its main(): tiny backbones, and once the full 384 px paper model
(about 40 s on 2 CPU cores)."""


import test_hybrid_model

TINY = ["--convnext-backbone", "test_convnext", "--vit-backbone", "test_vit", "--img-size", "64"]


def run(argv):
    return test_hybrid_model.main(test_hybrid_model.get_args_parser().parse_args(argv))


def test_tiny_hybrid_passes(capsys):
    assert run(TINY) == 0
    out = capsys.readouterr().out
    assert out.count("\u2713") == 8
    assert "forward (2, 3, 64, 64) -> (2, 1024)" in out
    assert out.rstrip().splitlines()[-1].startswith("All tests passed!")


def test_failure_exits_non_zero(capsys):
    assert run(["--convnext-backbone", "no_such_model", "--img-size", "64"]) == 1
    captured = capsys.readouterr()
    assert "All tests passed!" not in captured.out and "no_such_model" in captured.err


def test_defaults_are_the_paper_model():
    args = test_hybrid_model.get_args_parser().parse_args([])
    assert (args.convnext_backbone, args.vit_backbone) == (
        "convnextv2_base.fcmae_ft_in22k_in1k_384", "vit_base_patch16_384")
    assert (args.img_size, args.embedding_dim, args.hub_pretrained) == (384, 1024, False)


def test_full_paper_hybrid(capsys):
    # The real default configuration (ConvNeXtV2-B + ViT-B/16 at 384 px): ~40 s on 2 CPU cores,
    # worth it since this is the model the paper reports.
    assert run([]) == 0
    assert "forward (2, 3, 384, 384) -> (2, 1024)" in capsys.readouterr().out
