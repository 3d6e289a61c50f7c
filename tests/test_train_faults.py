"""Faults lose nothing: resume is bitwise, SIGTERM checkpoints and exits 0, kill -9 during a checkpoint
write leaves the previous checkpoint as the one to resume from, a NaN loss is skipped, and a bad
config fails with a message naming the field.

The runs are real ``python -m fasttips.train`` processes on a shrunken tiny preset with the embedded
demo data (one process each, CPU, fp32), compared through their metrics.jsonl; bitwise equality
therefore also covers the data position and the RNG streams. The uninterrupted reference writes its
checkpoints synchronously; the interrupted runs use the default asynchronous writes (except where a
test says otherwise), so their bitwise resumes also compare asynchronous with synchronous checkpoints.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fasttips.distributed.checkpoint import MARKER, complete_checkpoints, latest_checkpoint
from tooling.processes import wait_for

STEPS = 6
SMALL = ["vision.depth=1", "text.depth=1", "text.max_len=8",
         "heads.hidden=64", "heads.bottleneck=32", "heads.prototypes=64", "data.batch_size=4",
         "data.global_size=28", "data.local_size=14", "data.n_local=2", "optim.warmup_steps=2",
         "loss.teacher_temp_warmup_steps=3", f"train.steps={STEPS}", "train.keep_ckpts=2"]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _cmd(run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "fasttips.train", "--no-progress", *SMALL, f"train.run_dir={run_dir}", *args]


def _resume_cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "fasttips.train", "--no-progress", "--resume", str(run_dir)]


def _run(cmd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """An uninterrupted run: the losses every interrupted run must reproduce bit for bit."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = _run(_cmd(run_dir, "train.ckpt_every=2", "train.async_checkpoint=false"))
    assert done.returncode == 0, done.stderr
    (run_dir / "stdout.txt").write_text(done.stdout)
    assert "step 6/6 [" in done.stderr and "\r" not in done.stderr     # --no-progress: plain lines
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [s for s, _ in complete_checkpoints(run_dir / "checkpoints")] == [4, 6]   # keep_ckpts=2
    return run_dir, losses


def test_run_directory_contents(reference_run):
    run_dir, _ = reference_run
    done = (run_dir / "stdout.txt").read_text()
    assert f"next: fasttips eval {run_dir}" in done and "checkpoints/step_00000006" in done
    for name in ("config.yaml", "metrics.jsonl", "loss_curve.png"):
        assert (run_dir / name).is_file(), name
    ckpt = run_dir / "checkpoints" / "step_00000006"
    for name in (MARKER, ".metadata", "meta.json", "rank_00000.pt", "config.yaml"):
        assert (ckpt / name).is_file(), name
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("lr", "weight_decay", "momentum", "images_per_s", "step_time_s", "peak_mem_gb", "mfu", "hfu"):
        assert key in record, key
    assert any(k.startswith("grad_norm/") for k in record)
    assert any(k.startswith("loss/") for k in record)


def test_sigterm_checkpoints_and_resume_is_bitwise(reference_run, tmp_path):
    _, expected = reference_run
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run_dir, "train.ckpt_every=100"), env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, proc, "step 2")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in out
    stopped_at, _ = latest_checkpoint(run_dir / "checkpoints")
    assert 2 <= stopped_at < STEPS, "SIGTERM arrived too late to test anything"
    assert sorted(_losses(run_dir)) == list(range(1, stopped_at + 1))

    resumed = _run(_resume_cmd(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {stopped_at}" in resumed.stdout
    assert _losses(run_dir) == expected          # every step, bit for bit


def test_sigterm_during_an_async_write_waits_for_it_then_checkpoints(reference_run, tmp_path):
    _, expected = reference_run
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run_dir, "train.ckpt_every=2", "--fault-slow-checkpoint=6"), env=_env(),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while "SLOW_CHECKPOINT step=2" not in proc.stdout.readline():      # the write of step 2 is in flight
        assert proc.poll() is None and time.time() - t0 < 180, "the run never wrote checkpoint 2"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    # The stop's checkpoint waited for the write in flight (step 2's, or step 4's when the signal
    # arrived while the periodic save of step 4 was itself waiting for step 2's), then was written.
    waited = re.search(r"checkpoint: waiting for the write of step_(\d{8}) in flight", out)
    assert waited, out
    stopped_at, _ = latest_checkpoint(run_dir / "checkpoints")
    assert "stopped by SIGTERM" in out and int(waited.group(1)) < stopped_at < STEPS, out
    assert [s for s, _ in complete_checkpoints(run_dir / "checkpoints")] == [int(waited.group(1)), stopped_at]

    resumed = _run(_resume_cmd(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert f"(step {stopped_at})" in resumed.stdout
    assert _losses(run_dir) == expected


def _kill9_in_checkpoint(run_dir: Path, step: int, *args: str, logged: int = 0) -> Path:
    """Train until the write of checkpoint ``step`` has every file but its marker (and, with
    ``logged``, until metrics.jsonl holds that many steps), then kill -9."""
    proc = subprocess.Popen(_cmd(run_dir, "train.ckpt_every=2", f"--fault-pause-in-checkpoint={step}", *args),
                            env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    partial = run_dir / "checkpoints" / f".tmp-step_{step:08d}"
    wait_for(lambda: (partial / ".metadata").is_file() and (partial / "rank_00000.pt").is_file(),
             proc, "the paused checkpoint write")
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: len(metrics.read_text().splitlines()) >= logged, proc, f"step {logged}")
    # The pause comes after every file but the marker: kill -9 at the worst moment.
    time.sleep(0.2)
    proc.kill()
    proc.wait(timeout=30)
    assert partial.is_dir() and not (partial / MARKER).exists()
    return partial


def test_kill9_during_an_async_checkpoint_write_resumes_from_last_complete(reference_run, tmp_path):
    """The write of checkpoint 4 stops before its marker; the step loop goes on (steps 5 and 6 are
    logged while it is in flight) until the last checkpoint waits for it; then kill -9."""
    _, expected = reference_run
    run_dir = tmp_path / "run"
    partial = _kill9_in_checkpoint(run_dir, 4, logged=STEPS)
    assert latest_checkpoint(run_dir / "checkpoints")[0] == 2
    assert sorted(_losses(run_dir)) == list(range(1, STEPS + 1))      # not blocked by the write
    assert not (run_dir / "checkpoints" / ".tmp-step_00000006").exists()   # one write in flight at most

    resumed = _run(_resume_cmd(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "(step 2)" in resumed.stdout
    assert _losses(run_dir) == expected
    assert not partial.exists(), "the dead temporary should be cleaned up"


def test_kill9_before_the_first_checkpoint_then_resume_logs_each_step_once(reference_run, tmp_path):
    """No checkpoint to load: the run starts over, and the rows it had logged are not kept twice."""
    _, expected = reference_run
    run_dir = tmp_path / "run"
    _kill9_in_checkpoint(run_dir, 2, "train.async_checkpoint=false")
    assert latest_checkpoint(run_dir / "checkpoints") is None
    assert sorted(_losses(run_dir)) == [1, 2]              # a synchronous write stops the step loop
    resumed = _run(_resume_cmd(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "starting at step 0" in resumed.stdout
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert _losses(run_dir) == expected


def test_nonfinite_loss_is_skipped_then_stops_with_last_good_state(reference_run, tmp_path):
    _, expected = reference_run
    one = tmp_path / "one"
    done = _run(_cmd(one, "train.ckpt_every=100", "--fault-nan-steps=2"))
    assert done.returncode == 0, done.stderr
    records = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["skipped"]] == [3]
    assert records[-1]["nonfinite_total"] == 1
    assert records[2]["loss"] == "nan"
    assert [r["loss"] for r in records[:2]] == [expected[1], expected[2]]   # identical until the fault

    many = tmp_path / "many"
    stopped = _run(_cmd(many, "train.ckpt_every=2", "train.keep_ckpts=5", "train.max_nonfinite=2",
                        "--fault-nan-steps=2,3"))
    assert stopped.returncode == 3, stopped.stderr
    assert "consecutive non-finite" in stopped.stderr
    assert [s for s, _ in complete_checkpoints(many / "checkpoints")] == [2, 4]
    # Steps 3 and 4 were skipped, so the stop checkpoint holds exactly the state after step 2.
    after_2, stop_state = (_load_checkpoint(many / "checkpoints" / f"step_0000000{s}", tmp_path)
                           for s in (2, 4))
    for section in ("model", "loss_state", "teacher"):
        assert after_2[section].keys() == stop_state[section].keys()
        for key, value in after_2[section].items():
            assert torch.equal(value, stop_state[section][key]), f"{section}.{key}"


def _load_checkpoint(path: Path, tmp_path: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = tmp_path / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    return torch.load(out, weights_only=False)


def test_bad_config_fails_with_a_clear_message(tmp_path, capsys):
    from fasttips.train import main
    for override, words in [("data.batch_size=0", "data.batch_size"),
                            ("vision.heads=7", "vision.heads"),
                            ("optim.nonsense=1", "nonsense"),
                            ("train.device=tpu", "train.device")]:
        code = main([override, f"train.run_dir={tmp_path / 'bad'}"])
        err = capsys.readouterr().err
        assert code == 2, override
        assert "config error" in err and words in err, err
    assert main(["--resume", str(tmp_path / "nowhere")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["data.source=shards", f"data.path={tmp_path / 'no-shards'}", f"train.run_dir={tmp_path / 'x'}"]) == 2
    assert "data.path" in capsys.readouterr().err
