"""End to end through ``python -m fasttips.train``: a damaged newest checkpoint and a truncated
metrics.jsonl do not block ``--resume`` (it falls back to the newest intact checkpoint, bitwise), and a
second run in a run directory that is in use is refused, while kill -9 leaves no stale lock.
(The unit tests in test_checkpoint.py and test_startup.py cover the modules themselves.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fasttips.distributed.checkpoint import MARKER, complete_checkpoints

pytestmark = pytest.mark.slow

SMALL = ["vision.depth=1", "text.depth=1", "text.max_len=8", "heads.hidden=64", "heads.bottleneck=32",
         "heads.prototypes=64", "data.batch_size=4", "data.global_size=28", "data.local_size=14",
         "data.n_local=2", "optim.warmup_steps=2", "loss.teacher_temp_warmup_steps=3", "train.steps=4",
         "train.keep_ckpts=2", "train.ckpt_every=2"]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _train(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "fasttips.train", "--no-progress", *SMALL, f"train.run_dir={run_dir}"]


def _resume(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "fasttips.train", "--no-progress", "--resume", str(run_dir)]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_resume_falls_back_past_a_damaged_checkpoint_and_a_truncated_metrics_line(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(_train(run_dir), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = _losses(run_dir)
    assert [s for s, _ in complete_checkpoints(run_dir / "checkpoints")] == [2, 4]
    newest = run_dir / "checkpoints" / "step_00000004"
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')                               # a write cut short by a crash

    resumed = subprocess.run(_resume(run_dir), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"step_00000004 is damaged: {shard.name}" in resumed.stderr, resumed.stderr
    assert "metrics.jsonl" in resumed.stderr and "(step 2)" in resumed.stdout
    assert _losses(run_dir) == expected                          # steps 3 and 4 again, bit for bit
    assert (run_dir / "checkpoints" / "damaged-step_00000004" / shard.name).is_file()
    assert (newest / MARKER).is_file() and (newest / "MANIFEST.json").is_file()   # written afresh


def test_a_second_run_in_a_busy_run_dir_is_refused_and_kill9_frees_it(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(_train(run_dir) + ["--fault-pause-in-checkpoint=2"], env=_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while "PAUSED_IN_CHECKPOINT" not in first.stdout.readline():
            assert first.poll() is None and time.time() - t0 < 240, "the first run never reached step 2"
        second = subprocess.run(_resume(run_dir), env=_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert f"in use by another fasttips run (pid {first.pid} " in second.stderr, second.stderr
    finally:
        first.kill()                                             # kill -9 mid-checkpoint
        first.wait(timeout=60)
    third = subprocess.run(_resume(run_dir), env=_env(), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr                   # no stale lock


class _Touch:
    """Unpickling this runs ``os.system("touch MARKER")`` (pickled as posix.system)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _reseal(ckpt: Path) -> None:
    """The manifest rewritten to match the files as they are now (what whoever swapped a file in would
    do: checksums guard against damage, not tampering)."""
    from fasttips.distributed.checkpoint import build_manifest
    (ckpt / "MANIFEST.json").unlink()
    (ckpt / "MANIFEST.json").write_text(json.dumps(build_manifest(ckpt)))


def test_resume_passes_over_every_kind_of_damage_naming_it_and_runs_no_code(tmp_path):
    """Newest first: a deleted marker, a .metadata pickle payload, a rank-file pickle payload, a lost
    manifest with a flipped shard byte; resume takes the intact step-1 checkpoint, bit for bit."""
    import pickle

    import torch
    run_dir = tmp_path / "run"
    done = subprocess.run(_train(run_dir) + ["train.steps=5", "train.ckpt_every=1", "train.keep_ckpts=5"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = _losses(run_dir)
    ckpts = {step: path for step, path in complete_checkpoints(run_dir / "checkpoints")}
    assert sorted(ckpts) == [1, 2, 3, 4, 5]
    marker = tmp_path / "pwned"
    (ckpts[5] / MARKER).unlink()
    (ckpts[4] / ".metadata").write_bytes(pickle.dumps(_Touch(marker)))
    _reseal(ckpts[4])
    torch.save({"rng": _Touch(marker)}, ckpts[3] / "rank_00000.pt")
    _reseal(ckpts[3])
    (ckpts[2] / "MANIFEST.json").unlink()
    shard = next(ckpts[2].glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x5A
    shard.write_bytes(bytes(data))

    resumed = subprocess.run(_resume(run_dir), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not marker.exists(), "resume ran a pickle payload"
    err = resumed.stderr
    for needle in ("step_00000005 is damaged: no COMPLETE marker",
                   "step_00000004 is damaged: .metadata: asks to unpickle posix.system",
                   "step_00000003 is damaged: rank_00000.pt: asks to unpickle posix.system",
                   "step_00000002 is damaged: MANIFEST.json: missing"):
        assert needle in err, err
    assert "(step 1)" in resumed.stdout
    assert _losses(run_dir) == expected                          # steps 2..5 again, bit for bit
    for step in (2, 3, 4, 5):
        assert (run_dir / "checkpoints" / f"damaged-step_{step:08d}").is_dir()
