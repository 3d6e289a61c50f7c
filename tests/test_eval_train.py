"""Evaluation of checkpoints written by real (very short) training runs: ``fasttips eval``, periodic
evaluation and the ``fasttips ablate ibot-vs-ibotpp`` driver, on the embedded demo data."""
from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from fasttips import config as config_mod

SMALL = ["vision.depth=1", "text.depth=1", "heads.hidden=64", "heads.bottleneck=32", "heads.prototypes=64",
         "data.batch_size=4", "data.global_size=56", "data.local_size=28", "data.n_local=1",
         "optim.warmup_steps=1", "loss.teacher_temp_warmup_steps=2", "train.device=cpu", "eval.n_images=8"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Demo data and tokenizer caches in the session's temp folder (shared with the data tests)."""
    d = tmp_path_factory.getbasetemp() / "fasttips-data-cache"
    old = os.environ.get("FASTTIPS_DATA_DIR")
    os.environ["FASTTIPS_DATA_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("FASTTIPS_DATA_DIR", None)
    else:
        os.environ["FASTTIPS_DATA_DIR"] = old


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    from fasttips import train
    run_dir = tmp_path_factory.mktemp("eval_train") / "run"
    assert train.main(["--no-progress", *SMALL, "train.steps=2", "eval.every=2", f"train.run_dir={run_dir}"]) == 0
    return run_dir


def test_training_logs_periodic_evaluation(trained_run):
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/seg/miou" in r]
    assert [r["step"] for r in evals] == [2]                     # eval.every=2 over 2 steps
    assert evals[0]["eval/n_images"] == 8 and 0.0 <= evals[0]["eval/ret/cls1_alt/i2t_r5"] <= 1.0
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


def test_fasttips_eval_on_a_trained_checkpoint(trained_run, tmp_path, capsys):
    from fasttips.eval import cli
    out = tmp_path / "eval"
    assert cli.main([str(trained_run), "--n-images", "6", "--out", str(out), "--pca-images", "3"]) == 0
    printed = capsys.readouterr().out
    assert "seg mIoU" in printed and "R@1" in printed
    result = json.loads((out / "eval.json").read_text())
    assert result["n_images"] == 6 and result["checkpoint"].endswith("step_00000002")
    for key in ("seg/miou", "seg/pixel_acc", "cls/cls1_acc", "cls/cls2_acc", "ret/cls1_alt/i2t_r1",
                "ret/cls1_alt/t2i_r5", "ret/cls2_short/i2t_r1", "ret/cls2_long/t2i_r1"):
        assert 0.0 <= result[key] <= 1.0, key
    assert set(result["seg/iou_per_class"]) == {"background", "circle", "square", "triangle", "star", "diamond"}
    # PCA picture: one row per image, [image | PCA map] at the model's input size (56 px)
    assert Image.open(out / "pca.png").size == (2 * 56, 3 * 56)


def test_fasttips_eval_rejects_a_folder_without_checkpoints(tmp_path, capsys):
    from fasttips.eval import cli
    assert cli.main([str(tmp_path)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_periodic_evaluation(trained_run):
    from fasttips.eval.loading import load_for_eval
    from fasttips.eval.periodic import maybe_evaluate
    model, tokenizer, cfg, _ = load_for_eval(trained_run)
    model.train()
    cfg.eval.every, cfg.eval.n_images = 2, 4
    assert maybe_evaluate(3, model, tokenizer, cfg) is None
    record = maybe_evaluate(4, model, tokenizer, cfg)
    assert model.training
    assert record["eval/n_images"] == 4 and 0.0 <= record["eval/seg/miou"] <= 1.0
    assert all(k.startswith("eval/") for k in record)
    assert maybe_evaluate(4, model, None, cfg) is None          # synthetic data: nothing to prompt
    cfg.eval.every = 0
    assert maybe_evaluate(4, model, tokenizer, cfg) is None


def test_ablate_trains_two_runs_differing_only_in_ibot_tokens(data_dir, tmp_path, capsys):
    from fasttips import ablate
    out = tmp_path / "ablate"
    argv = ["ibot-vs-ibotpp", "--seeds", "3", "--steps", "1", "--out", str(out), "--n-images", "4", *SMALL]
    assert ablate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "iBOT s3" in printed and "iBOT++ s3" in printed and "diff" in printed
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["seeds"] == [3]
    masked, every = summary["runs"]
    assert (masked["ibot_tokens"], every["ibot_tokens"]) == ("masked", "all")
    cfgs = [config_mod.to_dict(config_mod.load(out / f"seed3-{t}" / "config.yaml")) for t in ("masked", "all")]
    for c in cfgs:
        c["loss"].pop("ibot_tokens")
        c["train"].pop("run_dir")
    assert cfgs[0] == cfgs[1], "the two runs must differ only in loss.ibot_tokens"
    # rerunning finds the finished runs and only evaluates
    assert ablate.main(argv) == 0
    assert "already trained" in capsys.readouterr().out


def test_ablate_rejects_bad_seeds(capsys):
    from fasttips import ablate
    assert ablate.main(["ibot-vs-ibotpp", "--seeds", "0,x"]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_eval_writes_beside_the_checkpoints_and_prints_chance_levels(trained_run, capsys):
    """Default output folder RUN_DIR/eval/step_N: outside the checkpoint, which pruning deletes."""
    from fasttips.eval import cli
    assert cli.main([str(trained_run), "--n-images", "6", "--pca-images", "0"]) == 0
    printed = capsys.readouterr().out
    out = trained_run / "eval" / "step_00000002"
    assert (out / "eval.json").is_file()
    assert not any((trained_run / "checkpoints").glob("*/eval"))
    header = printed.splitlines()[1]
    assert "value" in header and "chance" in header
    r5 = next(line for line in printed.splitlines() if "alt-text  image->text R@5" in line)
    assert r5.split()[-1] == f"{100 * 5 / 6:.1f}"             # R@5 among 6 candidates


def test_chance_levels_of_segmentation_follow_the_pixel_counts():
    import torch

    from fasttips.eval.evaluate import EvalSet
    from fasttips.eval.report import chance_levels
    masks = torch.zeros(2, 4, 4, dtype=torch.long)           # 3/4 background, 1/4 "circle"
    masks[:, :2, :2] = 1
    eval_set = EvalSet(torch.zeros(2, 3, 4, 4), {}, ["background", "circle"], masks)
    chance = chance_levels({"n_images": 2, "seg/miou": 0.0, "seg/miou_fg": 0.0}, eval_set)
    # uniform guesses over 2 classes: IoU_bg = (12/2) / (16/2 + 12 - 12/2) = 6/14, IoU_circle = 2/10
    assert chance["seg/miou"] == pytest.approx((6 / 14 + 2 / 10) / 2)
    assert chance["seg/pixel_acc"] == pytest.approx(0.5)
    assert chance["seg/miou_fg"] == pytest.approx(1.0)      # one object class: a guess is always right
