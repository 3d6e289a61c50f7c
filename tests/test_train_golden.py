"""A recorded loss curve that the training engine must reproduce: a guard for refactors of the step.

A few steps of a small model on synthetic batches (fixed seed, fp32, CPU, one process), with gradient
accumulation, frozen prototypes on the first step and gradient clipping, so every part of the step
runs. Each logged step's total loss, every loss term and every gradient norm must match the values
recorded in ``tests/golden/train_loss_curve.json`` to a tight tolerance.

The curve was recorded before the training step was restructured. When the *numerics* change on
purpose (a new loss term, another initialisation), record it again and say why in the commit:

    python tests/test_train_golden.py --record
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path


GOLDEN = Path(__file__).parent / "golden" / "train_loss_curve.json"
STEPS = 4
OVERRIDES = ["data.source=synthetic", "vision.depth=1", "text.depth=1", "text.max_len=8",
             "heads.hidden=64", "heads.bottleneck=32", "heads.prototypes=64", "data.batch_size=4",
             "data.global_size=28", "data.local_size=14", "data.n_local=2", "optim.accum_steps=2",
             "optim.warmup_steps=2", "optim.freeze_prototypes_steps=1", "optim.clip_grad=1.0",
             "loss.koleo_weight=0.1", "loss.teacher_temp_warmup_steps=3", "train.device=cpu",
             "train.precision=fp32", "train.seed=7", f"train.steps={STEPS}", "train.ckpt_every=100",
             "eval.every=0"]
# Everything the step computes: the total, the terms, the gradient norms, the logit scales.
COMPARED = ("loss", "loss/", "grad_norm/", "logit_scale_")


def _compared(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items() if k.startswith(COMPARED) and isinstance(v, (int, float))}


def run_curve(run_dir: Path) -> dict[int, dict[str, float]]:
    import torch

    from fasttips.train import main
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # one summation order, whatever the machine
    try:
        code = main(["--no-progress", *OVERRIDES, f"train.run_dir={run_dir}"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: _compared(r) for r in map(json.loads, lines) if "loss" in r}


def test_training_reproduces_the_recorded_loss_curve(tmp_path):
    golden = {int(k): v for k, v in json.loads(GOLDEN.read_text())["steps"].items()}
    got = run_curve(tmp_path / "run")
    assert sorted(got) == sorted(golden) == list(range(1, STEPS + 1))
    for step, want in golden.items():
        assert set(got[step]) == set(want), f"step {step}: logged keys changed"
        assert sum(k.startswith("loss/") for k in want) == 5          # every term is compared
        for key, value in want.items():
            assert math.isclose(got[step][key], value, rel_tol=1e-5, abs_tol=1e-7), (
                f"step {step} {key}: {got[step][key]!r} != recorded {value!r}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_train_golden.py --record")
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        curve = run_curve(Path(tmp) / "run")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"overrides": OVERRIDES, "steps": curve}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
