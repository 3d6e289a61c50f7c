"""Elastic resume: a run on 1 process is stopped, resumed on 2 ranks (gloo), stopped again and resumed
on 1 process; across both interruptions the samples trained on are every sample of the epoch exactly
once (the global data position is kept; DCP reshards model, optimiser and teacher both ways).

Each phase is a real ``fasttips train`` (``main``) on tiny shards; this file, run as a script, wraps it
to record the keys of the batches each rank trains on. One epoch is 24 samples: 1 rank × 2 images ×
4 steps, then 2 × 2 × 2, then 1 × 2 × 4. (1 → 2 → 1 rather than 2 → 1 → 2: one 2-rank start-up fewer.)
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "data"))
from data_helpers import write_shards  # noqa: E402

pytestmark = pytest.mark.dist
N_SAMPLES = 24
MODEL = ["vision.depth=1", "text.depth=1", "text.max_len=8", "text.vocab_size=200", "heads.hidden=64",
         "heads.bottleneck=32", "heads.prototypes=64", "data.global_size=28", "data.local_size=14",
         "data.n_local=1", "data.batch_size=2", "data.num_workers=0",
         "train.device=cpu", "train.precision=fp32", "train.ckpt_every=100", "eval.every=0"]


def _env(cache: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", FASTTIPS_DATA_DIR=str(cache))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _phase(ranks: int, run_dir: Path, env: dict, *args: str) -> str:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 else [sys.executable])
    done = subprocess.run([*launcher, __file__, str(run_dir), *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


@pytest.mark.parametrize("loader", ["pytorch", pytest.param("dali", marks=pytest.mark.skipif(
    importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None,
    reason="nvidia-dali not installed"))])
def test_one_to_two_to_one_ranks_sees_every_sample_once(tmp_path, loader):
    shards = tmp_path / "shards"
    write_shards(shards, N_SAMPLES, 8)
    run_dir, env = tmp_path / "run", _env(tmp_path / "cache")
    _phase(1, run_dir, env, *MODEL, f"data.loader={loader}", f"data.path={shards}", f"train.run_dir={run_dir}",
           "train.steps=4")
    out = _phase(2, run_dir, env, "--resume", str(run_dir), "train.steps=6")
    assert "written by 1 ranks, now 2; the data continue at global sample 8" in out
    out = _phase(1, run_dir, env, "--resume", str(run_dir), "train.steps=10")
    assert "written by 2 ranks, now 1; the data continue at global sample 16" in out

    seen = [key for file in sorted(run_dir.glob("keys-*.jsonl"))
            for line in file.read_text().splitlines() for key in json.loads(line)["keys"]]
    assert Counter(seen) == Counter(f"s{i:04d}" for i in range(N_SAMPLES))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


# ------------------------------------------------------------------------------------------------
# The wrapped trainer (run as a script: python tests/test_elastic.py RUN_DIR ARGS...)
# ------------------------------------------------------------------------------------------------
def _record_keys_and_train(run_dir: Path, argv: list[str]) -> int:
    from fasttips import trainer
    from fasttips.train import main

    next_batches = trainer.Trainer.next_batches

    def recording(self, iterator):
        batches = next_batches(self, iterator)
        with open(run_dir / f"keys-w{self.ctx.world_size}-r{self.ctx.rank}.jsonl", "a") as f:
            for batch in batches:
                f.write(json.dumps({"step": self.step, "keys": batch["keys"]}) + "\n")
        return batches

    trainer.Trainer.next_batches = recording
    return main(["--no-progress", *argv])


if __name__ == "__main__":
    sys.exit(_record_keys_and_train(Path(sys.argv[1]), sys.argv[2:]))
