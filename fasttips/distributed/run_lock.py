"""One run per run directory: an exclusive ``flock`` on ``RUN_DIR/.lock`` held for the run's life.

Two trainers writing the same metrics.jsonl and checkpoints would interleave their lines and prune
each other's checkpoints. The lock is taken by rank 0 (the ranks of one run share the directory) and
released by :meth:`RunLock.release` or, whatever happens, by the kernel when the process ends: a run
killed with ``kill -9`` leaves no stale lock. The file keeps the holder's pid and host so that the
refusal can say who holds it. (Forked DataLoader workers share the open file, so the lock outlives a
killed trainer only until its workers notice and exit, a few seconds.)

    lock = RunLock.acquire(run_dir)      # RunDirInUse (a ValueError) when another run holds it
    ...
    lock.release()

``flock`` works on local file systems and on NFSv4/Lustre mounts that support it; where the file
system refuses locks (some FUSE mounts) the run goes on with a warning rather than not at all.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
from pathlib import Path

__all__ = ["LOCK_FILE", "RunDirInUse", "RunLock"]

LOCK_FILE = ".lock"


class RunDirInUse(ValueError):
    """Another process holds the run directory's lock."""


class RunLock:
    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, run_dir: str | Path) -> "RunLock":
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirInUse(
                    f"train.run_dir: {run_dir} is in use by another fasttips run"
                    f"{f' ({holder})' if holder else ''}; wait for it to end, stop it, or choose another "
                    f"train.run_dir=...") from None
            os.close(fd)                               # ENOLCK, EOPNOTSUPP: no locking on this mount
            print(f"fasttips: warning: cannot lock {path} ({exc.strerror}); nothing stops a second run "
                  f"from writing into {run_dir}", file=sys.stderr, flush=True)
            return cls(path, None)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.ftruncate(fd, 0)                    # no stale pid for the next reader
            except OSError:
                pass
            os.close(fd)                               # closing the last descriptor drops the lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):                                 # an object dropped without release()
        try:
            self.release()
        except Exception:
            pass


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
