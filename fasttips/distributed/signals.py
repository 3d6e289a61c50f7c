"""SIGTERM / SIGINT become a polite request: finish the step, checkpoint, exit 0.

The handler only sets a flag; the training loop reads it once per step and all-reduces it (MAX)
so every rank stops after the same step. A second SIGINT (Ctrl-C twice) stops at once.

Two more cases, because SLURM, systemd and torchrun signal the whole process group:

- Start-up (demo data build, shard indexing, tokenizer training, model build) has nothing to save,
  so there a signal ends the process at once with exit code 0 and one line saying so
  (``StopRequest(startup=True)`` until ``started()``; ``startup_guard()`` for code that runs
  without a trainer, e.g. ``build_loader``). ``StartupInterrupted`` is a ``SystemExit(0)``, so
  ``finally`` blocks and context managers still clean up (temporary folders, open files).
- Data-loading worker processes get the group's signal too. They must not die of it (the trainer
  would then crash without a checkpoint): ``ignore_stop_signals`` is their ``worker_init_fn``, and
  they ignore the first SIGTERM/SIGINT. They still end when the trainer shuts them down (a second
  signal is obeyed), or when it dies (PyTorch's worker watchdog).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STARTUP_MESSAGE = "stopped during start-up by {name}, nothing to save"


class StartupInterrupted(SystemExit):
    """A stop signal during start-up: exit code 0 (nothing was trained, nothing is lost)."""

    def __init__(self, signal_name: str):
        super().__init__(0)
        self.signal_name = signal_name

    def __str__(self) -> str:
        return STARTUP_MESSAGE.format(name=self.signal_name)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()   # signals only reach the main thread


class StopRequest:
    """Turns SIGTERM/SIGINT into ``requested`` (see module docstring).

    With ``startup=True`` a signal raises ``StartupInterrupted`` instead, until ``started()`` is
    called (the training loop begins): one handler for the whole run, so no signal falls between
    start-up and the loop.
    """

    def __init__(self, startup: bool = False, prog: str = "fasttips train"):
        self.signal_name: str | None = None
        self.starting = startup
        self.prog = prog
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def started(self) -> "StopRequest":
        """From now on a signal only sets the flag (the loop checkpoints and exits)."""
        self.starting = False
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.starting:
            exc = StartupInterrupted(name)
            print(f"{self.prog}: {exc}", file=sys.stderr, flush=True)
            raise exc
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")
        self.signal_name = name

    def install(self) -> "StopRequest":
        if _in_main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()


def _unhandled(signum) -> bool:
    """True when nobody in Python handles ``signum`` yet (default action, or Python's Ctrl-C default)."""
    handler = signal.getsignal(signum)
    return handler in (signal.SIG_DFL, None, signal.default_int_handler)


@contextlib.contextmanager
def startup_guard(prog: str = "fasttips"):
    """Inside the block, SIGTERM/SIGINT end the process cleanly (``StartupInterrupted``, exit 0)
    unless a handler is already installed (a trainer's ``StopRequest`` then decides). Used around
    the data start-up (demo build, indexing, tokenizer training), which can take minutes."""
    if not _in_main_thread():
        yield
        return
    previous = {}
    guard = StopRequest(startup=True, prog=prog)
    for signum in STOP_SIGNALS:
        if _unhandled(signum):
            previous[signum] = signal.signal(signum, guard._handle)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _worker_signal(signum, frame):
    """A data worker's SIGTERM/SIGINT: the first is the process group's stop request, meant for the
    trainer (which finishes the step, checkpoints and shuts the workers down): ignore it. A second one
    is obeyed as the default action would be: it is the trainer's own shutdown (``terminate()`` after a
    join timeout, or multiprocessing's clean-up at exit), or a repeated Ctrl-C / SIGTERM that asks to
    stop at once."""
    global _worker_signals_seen
    _worker_signals_seen += 1
    if _worker_signals_seen > 1:
        signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)


_worker_signals_seen = 0


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """``worker_init_fn`` of data-loading worker processes: they outlive the process group's first
    SIGTERM/SIGINT, so the trainer can stop cleanly (see ``_worker_signal``)."""
    global _worker_signals_seen
    _worker_signals_seen = 0
    for signum in STOP_SIGNALS:
        signal.signal(signum, _worker_signal)


__all__ = ["StopRequest", "StartupInterrupted", "startup_guard", "ignore_stop_signals"]
