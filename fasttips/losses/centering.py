"""Softmax centering with DINOv2 semantics (docs/loss_math.md §2.2).

The teacher targets of batch i are ``softmax((l_t − c)/τ_t)`` with the center ``c`` built from batches
≤ i−1. After the targets are computed the batch statistic (mean teacher logit over this rank's rows)
is all-reduced *asynchronously*; the next ``current()`` call waits for it and applies
``c ← m·c + (1−m)·mean_over_ranks(stat)``. The initial center is 0. A rank without teacher rows
(``update(None)``, e.g. masked-only iBOT with no masked patch) joins the all-reduce but is left out of
the mean; when no rank has a row the center does not move.

The center and the pending statistic are buffers, so the state checkpoints exactly; a checkpoint taken
between ``update`` and the next ``current`` keeps the pending statistic and applies it on resume.

Gradient accumulation: once ``begin_step()`` has been called (the training loop calls it at the start
of every optimiser step), the center changes only there. The micro-batches of one step are all centred
with the same center and their statistics are averaged into one update, so accumulating k micro-batches
gives the same center as one batch of k times the size (not a momentum of 0.9^k).
Sinkhorn-Knopp centering uses no center; it is done inside ``fasttips.kernels.prototype_cross_entropy``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized()


class Centering(nn.Module):
    def __init__(self, dim: int, momentum: float = 0.9, group=None):
        super().__init__()
        if dim < 1:
            raise ValueError(f"Centering: dim must be >= 1, got {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"Centering: momentum must be in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.group = group
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("pending", torch.zeros(dim))          # mean statistic not yet applied
        self.register_buffer("has_pending", torch.zeros(1, dtype=torch.bool))
        self.register_buffer("n_pending", torch.zeros(1))          # micro-batches averaged in pending
        self._work = None                                          # in-flight all-reduce, if any
        self._reducing = None                                      # its [Σ stat, ranks with rows]
        self._stepwise = False                                     # set by begin_step()
        self._updates_this_step = 0                                # host-side count, since begin_step()

    def _wait(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None
            reduced, self._reducing = self._reducing, None
            self._fold_reduced(reduced)

    # Everything below runs on the device without reading a value back to the host (no sync in the
    # training step): "is a statistic pending" and "did any rank have rows" are device tensors used
    # as 0/1 weights, never Python branches.
    @torch.no_grad()
    def _fold_reduced(self, reduced: torch.Tensor) -> None:
        """``reduced`` = [Σ_ranks stat, number of ranks that had rows]: fold the mean over those
        ranks into ``pending``; nothing when no rank had a row (such a batch must not move the center)."""
        ranks = reduced[-1:]
        self._fold(reduced[:-1] / ranks.clamp(min=1.0), present=(ranks > 0).to(reduced.dtype))

    @torch.no_grad()
    def _fold(self, stat: torch.Tensor, present: torch.Tensor | None = None) -> None:
        """Queue ``stat`` (``present`` = 0 means "no rows on any rank": nothing is queued). Within one
        optimiser step (after ``begin_step``) it is averaged into the statistic already queued."""
        present = torch.ones_like(self.n_pending) if present is None else present.to(self.n_pending)
        # Without begin_step a new statistic replaces the queued one; an absent one keeps it.
        queued = self.n_pending if self._stepwise else self.n_pending * (1.0 - present)
        total = queued + present
        # torch.where, not multiplication by 0/1, so that a NaN left in a buffer never leaks through.
        kept = torch.where(queued > 0, self.pending * queued, torch.zeros_like(self.pending))
        added = torch.where(present > 0, stat * present, torch.zeros_like(self.pending))
        self.pending.copy_(torch.where(total > 0, (kept + added) / total.clamp(min=1.0), self.pending))
        self.n_pending.copy_(total)
        self.has_pending.copy_(total > 0)

    @torch.no_grad()
    def _apply_pending(self) -> None:
        self._wait()
        moved = self.center * self.momentum + self.pending * (1.0 - self.momentum)
        self.center.copy_(torch.where(self.has_pending, moved, self.center))
        self.has_pending.zero_()
        self.n_pending.zero_()
        self._updates_this_step = 0

    @torch.no_grad()
    def begin_step(self) -> None:
        """Start of an optimiser step: apply the previous step's (averaged) statistic. From the first
        call on, ``current()`` no longer applies anything itself (see the module docstring)."""
        self._stepwise = True
        self._apply_pending()

    @torch.no_grad()
    def current(self) -> torch.Tensor:
        """The center to use for this batch (applies the previous batch's statistic first, unless
        the loop marks steps with ``begin_step``)."""
        if self._stepwise:
            self._wait()
        else:
            self._apply_pending()
        return self.center

    @torch.no_grad()
    def update(self, batch_mean: torch.Tensor | None) -> None:
        """Queue this batch's statistic (mean teacher logit over this rank's rows, shape [K]).

        ``None`` means this rank had no teacher rows (e.g. no masked patch). Across ranks the
        statistic is the mean over the ranks that had rows (every rank still joins the all-reduce,
        a rank without rows with weight 0); a batch without rows on any rank leaves the center as it is.
        """
        self._wait()
        if batch_mean is not None and batch_mean.numel() != self.center.numel():
            raise ValueError(f"Centering.update: batch_mean must have {self.center.numel()} entries, "
                             f"got shape {list(batch_mean.shape)}")
        first_of_step = self._updates_this_step == 0
        self._updates_this_step += 1
        if not _distributed(self.group):
            if batch_mean is not None:
                self._fold(batch_mean.detach().reshape(-1).float())
            return
        # [stat, 1] from a rank with rows, [0, 0] from one without: the SUM gives the sum over the
        # ranks with rows and their count (DINOv2's mean of per-rank means when every rank has rows).
        packed = torch.zeros(self.center.numel() + 1, dtype=torch.float32, device=self.center.device)
        if batch_mean is not None:
            packed[:-1] = batch_mean.detach().reshape(-1).float()
            packed[-1] = 1.0
        if self._stepwise and not first_of_step:
            # Another micro-batch of the same step: reduced at once (only the step's first
            # statistic overlaps its all-reduce with the backward).
            dist.all_reduce(packed, group=self.group)
            self._fold_reduced(packed)
            return
        self._reducing = packed
        self._work = dist.all_reduce(packed, group=self.group, async_op=True)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._wait()                      # never checkpoint a half-reduced statistic
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        self._wait()                      # an in-flight all-reduce must not overwrite loaded values
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"dim={self.center.numel()}, momentum={self.momentum}"
