"""The README's SLURM script for HSDP runs: as a 2-node job on this machine (stand-ins for ``srun`` and
``scontrol``; one CPU rank per "node", c10d rendezvous on 127.0.0.1), with ``--dry-run`` so nothing
trains. Once for a new run directory (the fresh command line, 2 nodes) and once for one holding a run
(the ``--resume`` branch, 1 node). What it shows: the script is valid bash, torchrun accepts its options, the agents
meet, the world is nodes × GPUs per node and the mesh is one shard group per node.
"""
from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fasttips import config as config_lib

pytestmark = pytest.mark.dist
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

FAKE_SRUN = """#!/bin/bash
# one copy of the command per node, all at once, as srun --ntasks-per-node=1 does
pids=()
for i in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
for i in $(seq 1 "$SLURM_NNODES"); do echo 127.0.0.1; done
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbatch(tmp_path: Path, run_dir: Path, nodes: int) -> str:
    script = re.search(r"<!-- slurm-hsdp:start -->\n```bash\n(.*?)```\n<!-- slurm-hsdp:end -->", README, re.S)
    assert script, "README lost its SLURM script block"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _executable(bin_dir / "srun", FAKE_SRUN)
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    job = _executable(tmp_path / "tips_hsdp.sbatch", script.group(1))
    env = dict(os.environ, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               SLURM_NNODES=str(nodes), SLURM_JOB_ID=str(_free_port()), SLURM_JOB_NODELIST="node[1-2]",
               RUN_DIR=str(run_dir), GPUS_PER_NODE="1", RDZV_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(["bash", str(job), "--dry-run"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert done.stdout.count("the plan of this run") == 1, done.stdout      # rank 0 only
    return done.stdout


def test_the_readme_slurm_script_starts_and_resumes_a_two_node_hsdp_job(tmp_path):
    run_dir = tmp_path / "run"
    fresh = _sbatch(tmp_path, run_dir, nodes=2)
    assert "preset vit-g" in fresh and "HSDP 2 replicas × 1-rank shard groups" in fresh
    assert "× 2 rank(s) = global batch" in fresh
    assert not run_dir.exists()                                           # a dry run writes nothing

    run_dir.mkdir()                                                       # a run that stopped before a checkpoint
    config_lib.save(config_lib.load(None, ["dist.shard_size=1", f"train.run_dir={run_dir}"]),
                    run_dir / "config.yaml")
    resumed = _sbatch(tmp_path, run_dir, nodes=1)                         # (one node: half the start-up)
    assert "preset tiny" in resumed and f"no complete checkpoint in {run_dir}/checkpoints" in resumed
