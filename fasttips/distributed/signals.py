"""SIGTERM / SIGINT become a polite request: finish the step, checkpoint, exit 0.

The handler only sets a flag; the training loop reads it once per step and all-reduces it (MAX)
so every rank stops after the same step. A second SIGINT (Ctrl-C twice) stops at once.
"""
from __future__ import annotations

import signal
import threading


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")
        self.signal_name = name

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():   # signals only reach the main thread
            for signum in (signal.SIGTERM, signal.SIGINT):
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


__all__ = ["StopRequest"]
