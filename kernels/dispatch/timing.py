"""First-use timing of one candidate: ``timer(name, fn, give_up_ms, site) -> [ms, ...]``.

``cuda_samples`` (the default on CUDA): the first call is untimed (it compiles, autotunes, builds cuDNN
plans), then each timed call is bracketed by its own pair of CUDA events after a short warm-up; the
number of repeats comes from the first timed call (about ``TARGET_MS`` of work, REPEATS bounds), and a
candidate whose first timed call is already slower than ``give_up_ms`` (``GIVE_UP`` × the best median
so far) stops there: it cannot win, and a slow one would eat the budget. Dispatch takes the median.

``cpu_samples``: a few calls on the wall clock, for the CPU smoke pass of ``fasttips bench dispatch``.
Plain measured dispatch never times anything on the CPU.

Tests inject their own timer (``dispatch.configure(timer=...)``).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable

import torch

GIVE_UP = 3.0          # stop timing a candidate whose first timed call is this many times the best
WARMUP = 2             # untimed calls after the first (compiling) one
REPEATS = (5, 25)      # timed calls: at least, at most
TARGET_MS = 100.0      # timed work per candidate, when REPEATS allows
CPU_REPEATS = 3        # the CPU smoke pass: a few calls are enough to see it work


def _repeats(one_ms: float) -> int:
    return int(min(max(TARGET_MS / max(one_ms, 1e-3), REPEATS[0]), REPEATS[1]))


def cuda_samples(name: str, fn: Callable[[], object], give_up_ms: float | None = None, site=None) -> list[float]:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    one = start.elapsed_time(end)
    if give_up_ms is not None and one > give_up_ms:
        return [one]
    for _ in range(WARMUP):
        fn()
    reps = _repeats(one)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def cpu_samples(name: str, fn: Callable[[], object], give_up_ms: float | None = None, site=None) -> list[float]:
    fn()
    t0 = time.perf_counter()
    fn()
    one = (time.perf_counter() - t0) * 1e3
    if give_up_ms is not None and one > give_up_ms:
        return [one]
    samples = [one]
    for _ in range(CPU_REPEATS - 1):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


@contextlib.contextmanager
def own_autograd(grad: bool):
    """Grad mode for a timed call, and its autograd graph keeping its saved tensors itself: timing
    may run inside an activation-checkpointed forward, whose saved-tensor hooks would otherwise take
    them over (and then count them against the recomputation)."""
    with torch.enable_grad() if grad else torch.no_grad():
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            yield


def median(samples: list[float]) -> float:
    return float(statistics.median(samples))
