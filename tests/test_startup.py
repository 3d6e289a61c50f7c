"""Start-up failures stop every rank with the failing rank's message (2 gloo ranks), one run per run
directory (a lock that dies with its process), and the run's logs never block a resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch.multiprocessing as mp

from fasttips.runlog import drop_metrics_after, read_metrics as read_jsonl
from fasttips.distributed.run_lock import RunDirInUse, RunLock


# ----------------------------------------------------------------------------------------------
# startup_phase on 2 gloo ranks
# ----------------------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from fasttips.distributed.startup import PeerStartupError, startup_phase
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = {}
    try:
        with startup_phase(None, "model"):            # fine everywhere: every rank goes on
            result["model"] = 10 + rank
        with startup_phase(None, "data"):             # rank 1 finds no usable sample
            if rank == 1:
                raise ValueError(f"data.path: no usable sample for rank {rank}")
        result["data"] = "went on"
    except PeerStartupError as exc:
        result.update(peer=str(exc), rank=exc.rank)
    except ValueError as exc:
        result["own"] = str(exc)
    finally:
        dist.barrier()                                 # the group is still usable afterwards
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.destroy_process_group()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_failure_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    # fork: the children reuse this process's imports (spawn would re-import torch: ~10 s more each)
    ctx = mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="fork")
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        assert time.time() < deadline, "ranks hung at start-up"
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert rank1 == {"model": 11, "own": "data.path: no usable sample for rank 1"}
    assert rank0 == {"model": 10, "rank": 1,
                     "peer": "rank 1 failed during start-up (data): data.path: no usable sample for rank 1"}


def test_one_process_runs_the_phase_plainly():
    from fasttips.distributed.startup import run_startup_phase, startup_phase
    assert run_startup_phase(None, lambda x: x + 1, 2) == 3
    with pytest.raises(KeyError):
        with startup_phase(None):
            raise KeyError("x")


# ----------------------------------------------------------------------------------------------
# One run per run directory
# ----------------------------------------------------------------------------------------------
_HOLDER = """
import sys, time
from fasttips.distributed.run_lock import RunLock
lock = RunLock.acquire(sys.argv[1])
print("LOCKED", flush=True)
time.sleep(120)
"""


def test_a_second_run_in_the_same_run_dir_is_refused_until_the_first_dies(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        with pytest.raises(RunDirInUse, match=rf"train.run_dir: .*run is in use by another fasttips run "
                                              rf"\(pid {holder.pid} on "):
            RunLock.acquire(run_dir)
    finally:
        holder.send_signal(signal.SIGKILL)            # kill -9: the kernel drops the lock
        holder.wait(timeout=30)
    with RunLock.acquire(run_dir) as lock:
        assert lock.held
        with pytest.raises(RunDirInUse):               # a second run in this very process, too
            RunLock.acquire(run_dir)
    RunLock.acquire(run_dir).release()                 # released: free again


# ----------------------------------------------------------------------------------------------
# metrics.jsonl cut short by a crash
# ----------------------------------------------------------------------------------------------
def test_a_truncated_metrics_line_does_not_block_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    path.write_text("\n".join(rows) + "\n" + rows[0][:9])      # killed mid-line
    warnings = []
    assert [r["step"] for r in read_jsonl(path, warn=warnings.append)] == [1, 2, 3, 4, 5]
    assert len(warnings) == 1 and str(path) in warnings[0] and "line 6" in warnings[0]
    assert drop_metrics_after(path, 3, warn=warnings.append) == 2
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    assert drop_metrics_after(tmp_path / "absent.jsonl", 3) == 0
