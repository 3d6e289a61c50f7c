"""No host-device synchronisation in the training step (issue 18, item 3).

On the CPU: ``compute_losses`` (forward and backward) at the tiny preset with every host read of a
tensor value refused (``no_host_reads`` from tests/test_no_host_sync.py names the file and function of
a read that slips in).
On a GPU (``-m gpu``): a micro-batch's forward + backward, then a whole ``Training.train_step``, in
bf16 under ``torch.cuda.set_sync_debug_mode("error")`` after a warm-up step (which fills the
packing caches and autotunes), failing on any synchronisation.

The whole-step GPU test is a strict xfail naming the step's own two reads (the skip/stop flags and the
logged scalars).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from fasttips import config
from fasttips.data.batch import synthetic_batch, to_device
from fasttips.distributed import fsdp
from fasttips.models import build_model
from fasttips.schedules import Schedules
from fasttips.step import LossState, compute_losses
from fasttips.teacher import Teacher
from fasttips.training import build_training
from test_no_host_sync import no_host_reads

# The loss path reads nothing back; train_step itself reads back twice by design (training.py, Training.train_step):
# the all-reduced {non-finite, stop} flags (`ctx.all_max(flags).tolist()`, to decide whether to skip
# the optimiser step) and the logged scalars (`torch.cat([...]).tolist()`).
KNOWN_STEP = ("fasttips/training.py Training.train_step: the skip/stop flags .tolist() and the logged "
              "scalars .tolist()")


def tiny(device: str = "cpu", *overrides):
    return config.load(None, ["preset=tiny", "data.source=synthetic", "data.batch_size=4",
                              f"train.device={device}", *overrides])


def batch_of(cfg, seed: int = 0) -> dict:
    d = cfg.data
    return synthetic_batch(d.batch_size, d.global_size, d.local_size, n_global=d.n_global, n_local=d.n_local,
                           max_len=cfg.text.max_len, vocab_size=cfg.text.vocab_size,
                           generator=torch.Generator().manual_seed(seed))


def losses_and_backward(cfg):
    model = build_model(cfg)
    teacher, state = Teacher(model, cfg), LossState(cfg)
    batch = batch_of(cfg)
    compute_losses(model, teacher, state, batch, 0.05, cfg)["loss"].backward()   # warm-up (caches)
    state.begin_step()
    return lambda: compute_losses(model, teacher, state, batch, 0.05, cfg)["loss"].backward()


def test_the_loss_path_reads_nothing_back(seed):
    step = losses_and_backward(tiny())
    with no_host_reads():
        step()


# ------------------------------------------------------------------------------------------------
# On a GPU: synchronisations, whatever causes them (host reads, blocking copies, stream syncs)
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def sync_is_an_error():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def cuda_training():
    cfg = tiny("cuda", "train.precision=bf16")
    training = build_training(cfg, fsdp.init_distributed(cfg))
    device = torch.device("cuda")
    batches = [[to_device(batch_of(cfg, seed), device)] for seed in (0, 1)]
    values = Schedules(cfg)(5)
    training.train_step(batches[0], values)                # warm-up: caches, autotuning, optimiser state
    torch.cuda.synchronize()
    return cfg, training, batches[1], values


@pytest.mark.gpu
def test_micro_batch_forward_backward_never_syncs_on_cuda():
    cfg, training, batch, values = cuda_training()
    with sync_is_an_error():
        losses = training.loss_forward(training.teacher, training.loss_state, batch[0], values.teacher_temp, cfg)
        losses["loss"].backward()


@pytest.mark.gpu
@pytest.mark.xfail(strict=True, raises=RuntimeError, reason=KNOWN_STEP)
def test_train_step_never_syncs_on_cuda():
    _, training, batch, values = cuda_training()
    with sync_is_an_error():
        training.train_step(batch, values)


@pytest.mark.gpu
def test_the_per_step_rng_snapshot_never_syncs_on_cuda():
    """The trainer snapshots the torch generators before every step (to undo a step a data outage
    left unfed, trainer._undo_step); on CUDA that must be a host-side copy of the generator's seed and
    offset, not a wait for the device. The device is kept busy so that a sync would have to wait."""
    from fasttips.trainer import set_torch_rng_state, torch_rng_state
    device = torch.device("cuda")
    x = torch.randn(4096, 4096, device=device)
    torch.cuda.synchronize()
    with sync_is_an_error():
        for _ in range(8):
            x = x @ x.T / 4096                          # queued work: the snapshot must not wait for it
        state = torch_rng_state(device)
        drawn = torch.rand(8, device=device)
        set_torch_rng_state(state, device)
        again = torch.rand(8, device=device)
    assert torch.equal(drawn, again)                    # (the check reads back, outside the sync guard)
