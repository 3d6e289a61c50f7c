"""bench/gpu_session.sh --dry-run: the GPU session's stages run on the CPU at tiny shapes, so the GPU
run cannot fail on a typo. The full dry run takes ~2 minutes on 2 busy cores; this test runs a subset
(env, profile, max_batch, ema, gpu_tests) under a budget that forces the time checks to skip the
stages whose estimate does not fit (attention, step: estimates above the budget; the steps of
bench_train_step and the attention/loss benches also run in tests/test_bench_cli.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_session.sh"
STAGES = ["env", "dispatch", "step_dispatch", "kernel_tests", "attention", "dino_loss", "step", "profile", "max_batch", "ema",
          "recompute", "gpu_tests"]


def test_dry_run_streams_rows_and_keeps_to_its_budget(tmp_path):
    out = tmp_path / "out"
    results_before = _results_state()
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, BUDGET_S="90",
               ONLY="env attention step profile ema gpu_tests")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "session.jsonl").read_text().splitlines()]
    status = {r["stage"]: r["status"] for r in lines}
    assert list(status) == STAGES                                   # every stage, in order, one line each
    assert status["attention"] == status["step"] == "skipped"       # estimates 100 and 170 s > 90 s
    assert status["dino_loss"] == status["max_batch"] == status["recompute"] == "skipped"  # not in ONLY
    assert status["dispatch"] == status["step_dispatch"] == "skipped"   # not in ONLY (tests/test_bench_cli.py)
    assert status["kernel_tests"] == "skipped"                          # not in ONLY
    assert status["env"] == "ok" and status["profile"] == "ok"
    assert all(s in ("ok", "skipped") for s in status.values())
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert {r["bench"] for r in rows} >= {"env", "profile_step"}
    assert any(r["bench"] == "env" and "ceilings" in r for r in rows)
    assert list((out / "results").glob("profile_step-*.jsonl")) and list((out / "results" / "plots").glob("*.png"))
    assert (out / "logs" / "env.log").stat().st_size > 0
    assert _results_state() == results_before                       # the checkout's results untouched


def _results_state():
    return {p: p.stat().st_size for p in (ROOT / "bench" / "results").rglob("*") if p.is_file()}


def test_unknown_argument_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "kernels"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, OUT=str(tmp_path)))
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="bash script")
def test_the_real_run_refuses_without_cuda_or_commit(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FASTTIPS_GIT_COMMIT"}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(env, OUT=str(tmp_path), PYTHON=sys.executable))
    assert proc.returncode == 2 and "FASTTIPS_GIT_COMMIT" in proc.stderr
