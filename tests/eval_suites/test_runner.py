"""The runner: suite parsing, several suites under one --data-root, one table, suites.json, and the
options it adds to ``fasttips eval``'s parser."""
import argparse
import json

import numpy as np
import pytest

from fasttips.eval.suites import DEFAULT_DIRS, add_arguments, parse_suites, run_from_args
from suite_helpers import colour, save_image
from test_retrieval import write_karpathy
from test_segmentation import write_ade


def eval_parser():
    """``fasttips eval``'s own parser with the suite options (added here until the CLI registers them;
    either way they must not clash with the command's own options)."""
    from fasttips.eval.cli import _configure
    parser = _configure(argparse.ArgumentParser(prog="fasttips eval"))
    return parser if "--suite" in parser._option_string_actions else add_arguments(parser)


def test_parse_suites():
    assert parse_suites("imagenet, coco") == ["imagenet", "coco"]
    assert parse_suites("all") == list(DEFAULT_DIRS)
    with pytest.raises(ValueError, match="unknown suite 'cifar'"):
        parse_suites("imagenet,cifar")


def test_three_suites_under_one_data_root(tmp_path, tiny, capsys):
    model, tok, cfg = tiny
    root = tmp_path / "data"
    for c, name in enumerate(("cat", "dog")):           # not ImageNet wnids: 2-way, 160 prompts, not 80,000
        save_image(root / "imagenet" / "val" / name / "a.JPEG", colour(c))
    (root / "imagenet" / "classnames.txt").write_text("cat\ndog\n")
    write_karpathy(root / "coco", "coco", n_test=2)
    write_ade(root / "ADEChallengeData2016", np.random.default_rng(0), n=1)
    out = tmp_path / "out"
    args = eval_parser().parse_args(["RUN", "--suite", "imagenet,coco,ade20k", "--data-root", str(root),
                                     "--out", str(out), "--image-size", "28", "--seg-size", "28",
                                     "--seg-stride", "14", "--workers", "0", "--batch-size", "2"])
    assert run_from_args(args, model, tok, cfg, default_out=tmp_path / "unused") == 0
    printed = capsys.readouterr()
    assert "chance %" in printed.out and "wrote" in printed.out
    for line in ("imagenet  zero-shot CLS#1 top-1 acc", "coco      CLS#2 text->image R@10", "ade20k    mIoU"):
        assert line in printed.out, printed.out
    assert "[coco] batch 1/1" in printed.err
    saved = json.loads((out / "suites.json").read_text())
    assert list(saved["suites"]) == ["imagenet", "coco", "ade20k"]
    assert saved["settings"]["image_size"] == 28
    assert saved["suites"]["ade20k"]["metrics"]["mIoU"] is not None


def test_a_wrong_layout_stops_before_any_suite_runs(tmp_path, tiny, capsys):
    model, tok, cfg = tiny
    root = tmp_path / "data"
    write_karpathy(root / "coco", "coco", n_test=2)              # coco is fine, imagenet is missing
    args = eval_parser().parse_args(["RUN", "--suite", "coco,imagenet", "--data-root", str(root),
                                     "--out", str(tmp_path / "out")])
    assert run_from_args(args, model, tok, cfg, default_out=tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fasttips eval: imagenet: missing folder {root / 'imagenet' / 'val'} "
                   "(expected val/<wnid>/*.JPEG, or val/*.JPEG and a labels file)"]
    assert not (tmp_path / "out" / "suites.json").exists()


def test_suite_root_overrides_and_bad_values(tmp_path, tiny, capsys):
    model, tok, cfg = tiny
    write_karpathy(tmp_path / "elsewhere", "flickr30k", n_test=2)
    parser = eval_parser()
    args = parser.parse_args(["RUN", "--suite", "flickr30k", "--suite-root", f"flickr30k={tmp_path / 'elsewhere'}",
                              "--out", str(tmp_path / "o"), "--image-size", "28", "--workers", "0", "--json"])
    assert run_from_args(args, model, tok, cfg, default_out=tmp_path) == 0
    assert json.loads(capsys.readouterr().out)["suites"]["flickr30k"]["n_images"] == 2
    args = parser.parse_args(["RUN", "--suite", "coco"])
    assert run_from_args(args, model, tok, cfg, default_out=tmp_path) == 2
    assert "--data-root: needed for suite 'coco'" in capsys.readouterr().err
    args = parser.parse_args(["RUN", "--suite", "flickr30k", "--suite-root", f"flickr30k={tmp_path / 'elsewhere'}",
                              "--image-size", "30"])
    assert run_from_args(args, model, tok, cfg, default_out=tmp_path) == 2
    assert "--image-size: 30 is not a positive multiple of the patch size 14" in capsys.readouterr().err


def test_fasttips_eval_cli_runs_the_suites_on_a_checkpoint(tmp_path, capsys):
    """``fasttips eval CKPT --suite ... --data-root DIR`` end to end, once the CLI has the suite options."""
    import torch.distributed.checkpoint as dcp

    from fasttips import config as config_mod
    from fasttips.data.tokenizer import Tokenizer
    from fasttips.eval import cli
    from fasttips.models import build_model
    from suite_helpers import TINY

    if "--suite" not in cli._configure(argparse.ArgumentParser())._option_string_actions:
        pytest.skip("fasttips/eval/cli.py does not register the suite options yet (wiring pending)")
    cfg = config_mod.load(None, TINY + ["data.global_size=28"])
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    dcp.save({"model": build_model(cfg, device="cpu").state_dict()}, checkpoint_id=str(ckpt))
    config_mod.save(cfg, ckpt / "config.yaml")
    tok = Tokenizer.train(["a photo of a red circle", "the blue square"] * 20, vocab_size=40)
    (ckpt / "tokenizer.model").write_bytes(tok.serialized())
    (ckpt / "COMPLETE").write_text("1\n")
    root = tmp_path / "data"
    write_karpathy(root / "coco", "coco", n_test=2)
    rc = cli.main([str(tmp_path / "run"), "--suite", "coco", "--data-root", str(root), "--workers", "0",
                   "--out", str(tmp_path / "out")])
    assert rc == 0
    assert "CLS#1 image->text R@1" in capsys.readouterr().out
    assert "coco" in json.loads((tmp_path / "out" / "suites.json").read_text())["suites"]


def test_a_new_suite_plugs_in_through_the_registry(tmp_path, tiny, monkeypatch, capsys):
    """One SuiteSpec and a module with check_layout() and run(): --suite, --data-root, the layout check
    before any suite runs, the table (with notes) and suites.json all pick it up."""
    import sys
    import types

    from fasttips.eval.suites import DatasetLayoutError
    from fasttips.eval.suites.registry import REGISTRY, SuiteSpec

    module = types.ModuleType("fasttips.eval.suites.toy")

    def check_layout(root, suite):
        if not (root / "toy.txt").is_file():
            raise DatasetLayoutError(f"{suite}: missing file {root / 'toy.txt'}")

    def run(ctx, root, suite):
        return {"metrics": {"answer": 0.42}, "chance": {"answer": 0.1}, "n_images": 1, "notes": ["a note"]}

    module.check_layout, module.run = check_layout, run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(REGISTRY, "toy", SuiteSpec("toy", "toy", "toys", "a toy suite"))
    model, tok, cfg = tiny
    root = tmp_path / "data"
    args = eval_parser().parse_args(["RUN", "--suite", "toy", "--data-root", str(root), "--out", str(tmp_path / "o")])
    assert run_from_args(args, model, tok, cfg, default_out=tmp_path) == 2
    assert capsys.readouterr().err.strip() == f"fasttips eval: toy: missing file {root / 'toys' / 'toy.txt'}"
    (root / "toys").mkdir(parents=True)
    (root / "toys" / "toy.txt").write_text("")
    assert run_from_args(args, model, tok, cfg, default_out=tmp_path) == 0
    out = capsys.readouterr().out
    assert "toy    answer" in out and "42.00" in out and "toy: a note" in out
    assert json.loads((tmp_path / "o" / "suites.json").read_text())["suites"]["toy"]["metrics"] == {"answer": 0.42}
