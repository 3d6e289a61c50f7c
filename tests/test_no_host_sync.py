"""No host-device synchronisation on the training step's device-side paths.

On a GPU, reading a tensor's value on the host (``bool(t)``, ``float(t)``, ``.item()``, ``.tolist()``)
waits for every queued kernel. These CPU tests make such reads raise inside the code under test, so a
read-back that slips into it fails here without a GPU. (The GPU test of a whole step under
``torch.cuda.set_sync_debug_mode("error")`` is marked ``gpu``.)
"""
from __future__ import annotations

import contextlib
import traceback

import pytest
import torch

from fasttips.losses import Centering


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads():
    """Make every host read of a tensor's value raise ``HostRead`` while the block runs."""
    def refuse(name):
        def method(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]      # where the read is, for the failure message
            raise HostRead(f"host read of a tensor value: Tensor.{name} in {caller.name} "
                           f"({caller.filename}:{caller.lineno})")
        return method
    names = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_the_guard_catches_a_host_read():
    t = torch.ones(2)
    with pytest.raises(HostRead), no_host_reads():
        bool(t.sum() > 0)
    with pytest.raises(HostRead), no_host_reads():
        t.sum().item()
    assert bool(t.sum() > 0)                      # restored afterwards


def _reference_center(stats_per_step, momentum, dim):
    """Plain-Python centering: one update per step with the mean of the step's present statistics."""
    center = torch.zeros(dim)
    for stats in stats_per_step:
        present = [s for s in stats if s is not None]
        if present:
            center = momentum * center + (1 - momentum) * torch.stack(present).mean(0)
    return center


@pytest.mark.parametrize("stepwise", [True, False])
def test_centering_runs_without_host_reads(stepwise, seed):
    dim, momentum = 7, 0.8
    g = torch.Generator().manual_seed(seed)
    # steps of micro-batch statistics; None = this rank had no teacher rows
    steps = [[torch.randn(dim, generator=g)], [None], [torch.randn(dim, generator=g), None,
             torch.randn(dim, generator=g)], [torch.randn(dim, generator=g)]]
    if not stepwise:                               # one statistic per step without begin_step
        steps = [s[:1] for s in steps]
    centering = Centering(dim, momentum=momentum)
    with no_host_reads():
        for stats in steps:
            if stepwise:
                centering.begin_step()
            for stat in stats:
                centering.current()
                centering.update(stat)
        if stepwise:
            centering.begin_step()
        final = centering.current().clone()
    torch.testing.assert_close(final, _reference_center(steps, momentum, dim), atol=1e-6, rtol=1e-6)


def test_a_nan_left_in_the_pending_buffer_never_reaches_the_center():
    centering = Centering(3, momentum=0.5)
    centering.pending.fill_(float("nan"))          # e.g. restored after a skipped non-finite step
    centering.begin_step()
    assert torch.equal(centering.current(), torch.zeros(3))
    centering.update(torch.ones(3))
    centering.begin_step()
    torch.testing.assert_close(centering.current(), torch.full((3,), 0.5))
