"""Per-step hyper-parameter schedules (docs/loss_math.md §4; DESIGN.md defaults).

``cosine_schedule`` is DINOv2's CosineScheduler as an array:
    freeze zeros ++ linspace(start_warmup, base, warmup)  (both ends included)
    ++ final + ½(base − final)(1 + cos(π·i/n)),  i = 0..n−1,  n = total − warmup − freeze;
indexing at or past ``total`` returns ``final``. ``Schedules(cfg)`` turns the config into the values
one training step needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def cosine_schedule(base: float, final: float, total: int, warmup: int = 0, start_warmup: float = 0.0,
                    freeze: int = 0) -> np.ndarray:
    if total < 0 or warmup < 0 or freeze < 0:
        raise ValueError(f"cosine_schedule: total={total}, warmup={warmup}, freeze={freeze} must be >= 0")
    if warmup + freeze > total:
        raise ValueError(f"cosine_schedule: warmup ({warmup}) + freeze ({freeze}) exceed total ({total})")
    n = total - warmup - freeze
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * np.arange(n) / max(n, 1)))
    return np.concatenate([np.zeros(freeze), np.linspace(start_warmup, base, warmup), cosine])


def linear_then_constant(start: float, end: float, warmup: int, total: int) -> np.ndarray:
    """linspace(start, end, warmup) (both ends included), then ``end`` up to ``total``.

    The ramp keeps its slope even when ``warmup > total`` (the array is then ``warmup`` long)."""
    if warmup < 0 or total < 0:
        raise ValueError(f"linear_then_constant: warmup={warmup} and total={total} must be >= 0")
    return np.concatenate([np.linspace(start, end, warmup), np.full(max(total - warmup, 0), end)])


def value_at(schedule: np.ndarray, step: int, final: float) -> float:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return float(schedule[step]) if step < len(schedule) else float(final)


@dataclass(frozen=True)
class StepValues:
    lr: float
    weight_decay: float
    momentum: float               # teacher EMA momentum
    teacher_temp: float
    freeze_prototypes: bool       # prototype layers get no update this step
    freeze_backbone: bool = False  # towers and logit scales get no update this step (warm-start warm-up)


class Schedules:
    """All per-step values from a ``fasttips.config.Config``.

    The peak lr is ``optim.lr · sqrt(global_batch / 1024)`` with global_batch = data.batch_size ·
    world_size (config comment, DINOv2 rule). ``world_size`` counts the batches per optimiser step:
    the trainer passes processes × ``optim.accum_steps``.
    """

    def __init__(self, cfg, world_size: int = 1):
        total = cfg.train.steps
        o, lo, t = cfg.optim, cfg.loss, cfg.teacher
        self.peak_lr = o.lr * math.sqrt(cfg.data.batch_size * world_size / 1024)
        self.total = total
        self._lr = cosine_schedule(self.peak_lr, o.min_lr, total, warmup=min(o.warmup_steps, total))
        self._wd = cosine_schedule(o.weight_decay, o.weight_decay_final, total)
        if t.schedule == "cosine":
            self._momentum = cosine_schedule(t.momentum, t.momentum_final, total)
            self._momentum_final = t.momentum_final
        else:
            self._momentum = np.full(total, t.momentum)
            self._momentum_final = t.momentum
        self._temp = linear_then_constant(lo.teacher_temp, lo.teacher_temp_final,
                                          lo.teacher_temp_warmup_steps, total)
        self._finals = dict(lr=o.min_lr, wd=o.weight_decay_final, temp=lo.teacher_temp_final)
        self.freeze_prototypes_steps = o.freeze_prototypes_steps
        self.freeze_backbone_steps = o.freeze_backbone_steps

    def __call__(self, step: int) -> StepValues:
        return StepValues(
            lr=value_at(self._lr, step, self._finals["lr"]),
            weight_decay=value_at(self._wd, step, self._finals["wd"]),
            momentum=value_at(self._momentum, step, self._momentum_final),
            teacher_temp=value_at(self._temp, step, self._finals["temp"]),
            freeze_prototypes=step < self.freeze_prototypes_steps,
            freeze_backbone=step < self.freeze_backbone_steps,
        )
