"""``fasttips train --dry-run``: the mesh, the batches, the memory estimate and the checkpoint plan,
without training; a layout that cannot be built is one config-error line and exit code 2."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from fasttips import config as config_lib
from fasttips.plan import (activation_values_per_image, checkpoint_bytes, count_parameters, describe_plan,
                           memory_estimate)
from fasttips.train import main


def _gib(text: str, row: str) -> float:
    value, unit = re.search(rf"^\s+{row}\s+([\d.]+) (GiB|MiB)", text, re.M).groups()
    return float(value) * (1 if unit == "GiB" else 1 / 1024)


def test_plan_for_an_hsdp_run_from_one_process(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["--dry-run", "--world-size", "16", "preset=vit-l", "dist.shard_size=8", "train.device=cuda",
            "train.precision=bf16", "data.batch_size=32", "optim.accum_steps=2", "train.steps=1000",
            "train.ckpt_every=300", "train.keep_ckpts=3", f"train.run_dir={run_dir}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert not run_dir.exists()                                       # nothing written
    assert "HSDP 2 replicas × 8-rank shard groups" in out and "shard groups: ranks 0–7, 8–15 " in out
    assert "32 images per rank per micro-batch × 2 micro-batch(es) × 16 rank(s) = global batch 1024" in out
    assert "cuda, bfloat16 compute" in out
    assert "every 300 steps (4 in the run)" in out and "the newest 3 kept" in out

    cfg = config_lib.load(None, args[3:], check_machine=False)
    counts = count_parameters(cfg)
    assert f"{counts.total / 1e6:.1f} M parameters" in out
    # fp32 state split over the 8 ranks of a shard group: 4 + 4 + 8 bytes per parameter
    assert _gib(out, "parameters") == pytest.approx(4 * counts.total / 8 / 2**30, abs=0.01)
    assert _gib(out, "optimiser") == pytest.approx(8 * counts.total / 8 / 2**30, abs=0.01)
    per_image = 2 * activation_values_per_image(cfg)                   # bf16 values
    assert _gib(out, "activations") == pytest.approx(32 * per_image / 2**30, abs=0.01)
    total = sum(checkpoint_bytes(cfg, counts).values())
    assert f"each {total / 2**30:.2f} GiB" in out


def test_the_estimate_follows_the_shard_group_and_activation_checkpointing():
    cfg = config_lib.load(None, ["preset=vit-b"])
    counts = count_parameters(cfg)
    eight, two = (memory_estimate(cfg, counts, s, True, torch.bfloat16) for s in (8, 2))
    assert two.params == 4 * eight.params and two.optimizer == 4 * eight.optimizer
    assert two.activations == eight.activations                       # activations are per image, not sharded
    per_image = {}
    for policy in ("off", "selective", "every_k", "full"):
        cfg.train.activation_checkpointing = policy
        per_image[policy] = activation_values_per_image(cfg)
    assert per_image["full"] < per_image["off"] / 3
    assert per_image["full"] < per_image["every_k"] < per_image["off"]        # every 2nd block: about half
    assert per_image["every_k"] < per_image["selective"] < per_image["off"]   # selective keeps the matmul outputs


@pytest.mark.parametrize("world, shard, message", [
    (6, 4, "dist.shard_size: 4 does not divide the 6 ranks of this run; choose one of [1, 2, 3, 6]"),
    (2, 4, "dist.shard_size: 4 is larger than the 2 rank(s) of this run; choose one of [1, 2]")])
def test_a_layout_that_cannot_be_built_is_one_line_and_exit_2(capsys, world, shard, message):
    assert main(["--dry-run", "--world-size", str(world), f"dist.shard_size={shard}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fasttips train: config error: {message}")


def test_world_size_only_with_dry_run(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--world-size", "4"])
    assert exc.value.code == 2 and "--dry-run" in capsys.readouterr().err


def test_resume_plan_names_the_checkpoint_and_the_new_layout(tmp_path):
    import json
    ckpt = tmp_path / "checkpoints" / "step_00000040"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("40\n")
    (ckpt / "meta.json").write_text(json.dumps({"step": 40, "world_size": 8, "data": {"position": 5120}}))
    from fasttips.train import _resume_plan
    line = _resume_plan(tmp_path, 16)
    assert "step 40, written by 8 rank(s)" in line and "16 rank(s) now" in line and "global sample 5120" in line


def test_only_rank_0_prints_the_plan(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["--dry-run"]) == 0 and capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["--dry-run"]) == 0 and "FSDP2 over 2 rank(s)" in capsys.readouterr().out


def test_a_rank_process_stops_on_a_bad_layout_with_one_line_and_exit_2(tmp_path):
    """A process with the environment torchrun gives rank 1 of 2 (every rank runs the same check before
    any process group exists; torchrun itself would stop the other ranks as soon as one exits)."""
    env = dict(os.environ, WORLD_SIZE="2", RANK="1", LOCAL_RANK="1")
    done = subprocess.run([sys.executable, "-m", "fasttips.train", "--dry-run", "dist.shard_size=3",
                           f"train.run_dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["fasttips train: config error: dist.shard_size: 3 is larger than the 2 "
                                        "rank(s) of this run; choose one of [1, 2] (ranks per shard group) or 0 "
                                        "(all ranks)"]


def test_plan_text_for_one_process_and_how_checkpoints_are_written():
    text = describe_plan(config_lib.load(None, []), 1)
    assert "one process, unsharded" in text and "gathered" in text
    assert "written in the background while the steps go on" in text            # train.async_checkpoint default
    text = describe_plan(config_lib.load(None, ["train.async_checkpoint=false"]), 1)
    assert "written synchronously: the step loop waits for each write" in text
