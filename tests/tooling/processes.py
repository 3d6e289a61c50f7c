"""Waiting on a training subprocess in the fault tests."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 180.0) -> None:
    """Poll ``predicate`` until it holds; fail with the process's output if it exits first, and kill it
    (its whole process group when it leads one, as under ``start_new_session``) on a timeout."""
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        if time.time() - t0 > timeout:
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)
