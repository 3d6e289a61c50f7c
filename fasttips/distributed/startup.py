"""Start-up phases that fail on every rank together, with the failing rank's message.

When one rank of a multi-process run fails while starting (no usable sample in its data share, a
missing file, a locked run directory, ...), the others would otherwise reach the next collective
alone: gloo raises a connection error that hides the cause, NCCL waits until its timeout. Wrap each
start-up phase that may fail on some ranks only::

    with startup_phase(ctx, "data"):
        loader = build_loader(cfg, ctx.rank, ctx.world_size)

At the end of the block every rank joins one all-reduce of an error flag (the cost of agreeing when
all went well). If any rank failed, the ranks exchange messages: a failing rank re-raises its own
exception, unchanged; every other rank raises :class:`PeerStartupError` (a ``ValueError``) quoting the
lowest failing rank's message, e.g. ``rank 1 failed during start-up (data): data.path: no usable
sample in /x``. A phase must not contain collectives of its own that a failing rank could skip (a
barrier, DCP, FSDP wrapping): put the boundaries between them. On one process it does nothing.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

__all__ = ["PeerStartupError", "startup_phase", "run_startup_phase"]


class PeerStartupError(ValueError):
    """Another rank failed during start-up; this rank stops too. ``rank`` and ``message`` say which
    and why."""

    def __init__(self, rank: int, phase: str, message: str):
        self.rank, self.phase, self.message = rank, phase, message
        super().__init__(f"rank {rank} failed during start-up ({phase}): {message}")


def _group_size(ctx) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return ctx.world_size if ctx is not None else dist.get_world_size()


def _flag_device(ctx) -> torch.device:
    if ctx is not None and getattr(ctx, "device", None) is not None:
        return torch.device(ctx.device)
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextmanager
def startup_phase(ctx=None, phase: str = "start-up"):
    """Run the block on every rank and agree on its success (see the module docstring). ``ctx`` is a
    DistContext (or None: the default process group)."""
    if _group_size(ctx) == 1:
        yield
        return
    failure: BaseException | None = None
    try:
        yield
    except BaseException as exc:          # KeyboardInterrupt included: the others must not wait
        failure = exc
    flag = torch.tensor([1.0 if failure is not None else 0.0], device=_flag_device(ctx))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        return
    rank = dist.get_rank()
    messages = [None] * dist.get_world_size()
    mine = None
    if failure is not None:              # bad-input errors speak for themselves; name anything else
        mine = _describe(failure) if isinstance(failure, (ValueError, OSError)) else \
            f"{type(failure).__name__}: {_describe(failure)}"
    dist.all_gather_object(messages, mine)
    if failure is not None:
        raise failure
    first = next(r for r, m in enumerate(messages) if m is not None)
    raise PeerStartupError(first, phase, messages[first] if first != rank else "?")


def run_startup_phase(ctx, fn, *args, phase: str = "start-up", **kwargs):
    """``fn(*args, **kwargs)`` inside :func:`startup_phase`; returns its result."""
    with startup_phase(ctx, phase):
        return fn(*args, **kwargs)
