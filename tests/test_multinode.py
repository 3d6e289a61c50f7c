"""Two "nodes" on 127.0.0.1: two torchrun agents of one process each, joined by the c10d rendezvous
(what a multi-node SLURM job runs), train to a checkpoint, and a second job resumes from it for more
steps; every loss must match the same two jobs run as single-node torchrun jobs of the same two ranks
(tests/test_fsdp.py checks those ranks against one process). Both sides stop and resume the same way
because the schedules depend on ``train.steps``.

The runs are real ``fasttips.train`` processes on the shrunken tiny preset and synthetic data (CPU, fp32,
gloo).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

SMALL = ["vision.depth=1", "text.depth=1", "text.max_len=8", "heads.hidden=64", "heads.bottleneck=32",
         "heads.prototypes=64", "data.source=synthetic", "data.batch_size=2", "data.global_size=28",
         "data.local_size=14", "data.n_local=2", "optim.warmup_steps=2", "loss.teacher_temp_warmup_steps=3",
         "train.device=cpu", "train.precision=fp32", "train.ckpt_every=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _train_args(run_dir: Path, steps: int, resume: bool) -> list[str]:
    if resume:
        return ["-m", "fasttips.train", "--no-progress", "--resume", str(run_dir), f"train.steps={steps}"]
    return ["-m", "fasttips.train", "--no-progress", *SMALL, f"train.steps={steps}", f"train.run_dir={run_dir}"]


def _two_nodes(run_dir: Path, steps: int, resume: bool = False) -> None:
    """Two agents (one per "node"), one process each, meeting at a c10d rendezvous on 127.0.0.1."""
    port = _free_port()
    rdzv = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
            f"--rdzv_id=fasttips-test-{port}", "--max_restarts=0"]
    nodes = [subprocess.Popen(_torchrun(*rdzv, *_train_args(run_dir, steps, resume)), env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            pytest.fail("two-node run timed out")
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, f"a node exited {node.returncode}:\n{out[-4000:]}"


def _one_node(run_dir: Path, steps: int, resume: bool = False) -> None:
    cmd = _torchrun("--standalone", "--nproc_per_node=2", *_train_args(run_dir, steps, resume))
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _losses(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows}


def test_two_nodes_stop_resume_and_match_one_node(tmp_path):
    nodes_dir, node_dir = tmp_path / "two-nodes", tmp_path / "one-node"
    _two_nodes(nodes_dir, steps=2)                       # stops after the checkpoint at step 2
    assert sorted(_losses(nodes_dir)) == [1, 2]
    _two_nodes(nodes_dir, steps=4, resume=True)          # the next job resumes from it
    _one_node(node_dir, steps=2)
    _one_node(node_dir, steps=4, resume=True)

    resumed, reference = _losses(nodes_dir), _losses(node_dir)
    assert sorted(resumed) == sorted(reference) == [1, 2, 3, 4]
    for step in reference:
        for key, value in reference[step].items():
            if key.startswith("loss"):
                assert resumed[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)
