"""SIGTERM/SIGINT to the whole process group (what SLURM, systemd and a terminal's Ctrl-C send):
data-loading workers outlive it, the trainer checkpoints and exits 0; during start-up the process
exits 0 at once with one line ('nothing to save')."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fasttips.distributed.signals import StartupInterrupted, StopRequest, ignore_stop_signals, startup_guard
from tooling.processes import wait_for

SMALL = ["vision.depth=1", "text.depth=1", "text.max_len=8", "text.vocab_size=200",
         "heads.hidden=64", "heads.bottleneck=32", "heads.prototypes=64", "data.batch_size=4",
         "data.global_size=28", "data.local_size=14", "data.n_local=2", "optim.warmup_steps=2",
         "loss.teacher_temp_warmup_steps=3", "train.steps=10000", "train.ckpt_every=10000"]


def _start(tmp_path: Path, shards, *args: str, **env) -> tuple[subprocess.Popen, Path]:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "fasttips.train", "--no-progress", *SMALL, "data.source=shards",
           f"data.path={shards}", f"train.run_dir={run_dir}", *args]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)        # its own process group, as under SLURM
    return proc, run_dir


def _finish(proc: subprocess.Popen, timeout: float = 120.0) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the run did not stop after the signal:\n{out}\n{err}")
    return proc.returncode, out, err


def test_group_sigterm_with_dataloader_workers_checkpoints_and_exits_0(tmp_path, tiny_shards):
    signum = signal.SIGTERM
    proc, run_dir = _start(tmp_path, tiny_shards, "data.loader=pytorch", "data.num_workers=2")
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, proc, "the first step")
    os.killpg(proc.pid, signum)                            # the trainer and its two workers
    code, out, err = _finish(proc)
    name = signal.Signals(signum).name
    assert code == 0, f"exit {code}\n{out}\n{err}"
    assert f"stopped by {name}" in out and "killed by signal" not in err
    done = [p for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file()]
    assert done, f"no complete checkpoint in {run_dir}: {out}\n{err}"


def test_group_sigterm_during_data_start_up_exits_0_with_one_line(tmp_path, tiny_shards):
    proc, run_dir = _start(tmp_path, tiny_shards, "data.loader=pytorch", "--fault-pause-in-startup=120")
    lines: list[str] = []
    wait_for(lambda: "test pause in data start-up" in (lines.append(proc.stdout.readline()) or lines[-1]),
              proc, "the data start-up")
    os.killpg(proc.pid, signal.SIGTERM)
    code, out, err = _finish(proc, timeout=60)
    assert code == 0, f"exit {code}\n{out}\n{err}"
    assert "stopped during start-up by SIGTERM, nothing to save" in err
    assert "Traceback" not in err
    assert not list((run_dir / "checkpoints").glob("step_*"))


def test_stop_request_raises_during_start_up_then_sets_the_flag():
    with StopRequest(startup=True) as stop:
        with pytest.raises(StartupInterrupted) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)                                  # the handler runs before this returns
        assert info.value.code == 0 and "nothing to save" in str(info.value)
        stop.started()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_startup_guard_defers_to_an_installed_handler():
    with StopRequest() as stop, startup_guard():
        os.kill(os.getpid(), signal.SIGTERM)               # the trainer's handler: a flag, no exit
        time.sleep(0.01)
    assert stop.requested


def _worker(conn):
    ignore_stop_signals(0)
    os.kill(os.getpid(), signal.SIGTERM)                   # the group's signal: survived
    time.sleep(0.05)
    conn.send("alive")
    time.sleep(30)                                         # a second SIGTERM ends it


def test_a_worker_survives_the_first_signal_and_obeys_the_second():
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_worker, args=(child,), daemon=True)
    p.start()
    assert parent.poll(30) and parent.recv() == "alive"
    p.terminate()
    p.join(10)
    assert p.exitcode == -signal.SIGTERM


def test_sigterm_to_torchrun_leaves_a_checkpoint_from_every_rank(tmp_path, tiny_shards):
    """torchrun forwards the signal to its ranks (each in its own session): they finish the step,
    checkpoint together and exit 0. torchrun itself then exits 1 with its SignalException (torch's)."""
    pytest.importorskip("torch.distributed.run")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fasttips.train", "--no-progress", *SMALL, "data.source=shards", f"data.path={tiny_shards}",
           "data.loader=pytorch", "data.num_workers=0", f"train.run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, proc, "the first step")
    os.killpg(proc.pid, signal.SIGTERM)                    # the agent's group (the ranks have their own)
    code, out, err = _finish(proc)
    assert "stopped by SIGTERM" in out, f"exit {code}\n{out}\n{err}"
    assert "ChildFailedError" not in err and "killed by signal" not in err
    (ckpt,) = [p for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file()]
    assert {p.name for p in ckpt.glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}


@pytest.mark.parametrize("command", [["-m", "fasttips.train"], ["-m", "fasttips.cli", "train"]])
def test_sigterm_while_importing_exits_0_with_one_line(tmp_path, command):
    """The first seconds of `fasttips train` are imports (torch): a SIGTERM there gets the start-up line
    and exit 0 too, not a silent 143. A stand-in torch that blocks on import holds the process there."""
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import time\nprint('importing torch', flush=True)\ntime.sleep(120)\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, *command, f"train.run_dir={tmp_path / 'run'}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    wait_for(lambda: "importing torch" in (lines.append(proc.stdout.readline()) or lines[-1]), proc,
             "the import of torch", timeout=60)
    os.killpg(proc.pid, signal.SIGTERM)
    code, out, err = _finish(proc, timeout=60)
    assert code == 0, f"exit {code}\n{out}\n{err}"
    assert err.strip() == "fasttips train: stopped during start-up by SIGTERM, nothing to save", err
