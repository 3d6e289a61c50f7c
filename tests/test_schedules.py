"""Schedules against hand-computed values (docs/loss_math.md §4)."""
import math

import numpy as np
import pytest

from fasttips import config
from fasttips.schedules import Schedules, StepValues, cosine_schedule, linear_then_constant, value_at


def test_cosine_schedule_by_hand():
    # freeze 1 ++ linspace(0.5, 1, 2) ++ cosine over n = 6 - 2 - 1 = 3 steps from 1 to 0
    got = cosine_schedule(base=1.0, final=0.0, total=6, warmup=2, start_warmup=0.5, freeze=1)
    want = [0.0, 0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert value_at(got, 6, final=0.0) == 0.0            # index >= total returns final
    assert value_at(got, 10_000, final=0.0) == 0.0


def test_cosine_without_warmup_starts_at_base_and_approaches_final():
    got = cosine_schedule(0.04, 0.2, total=5)
    np.testing.assert_allclose(got, [0.2 + 0.5 * (0.04 - 0.2) * (1 + math.cos(math.pi * i / 5))
                                     for i in range(5)], atol=1e-15)
    assert got[0] == pytest.approx(0.04) and got[-1] < 0.2


def test_linear_then_constant_by_hand():
    np.testing.assert_allclose(linear_then_constant(0.04, 0.07, 4, 6),
                               [0.04, 0.05, 0.06, 0.07, 0.07, 0.07], atol=1e-12)
    # a warm-up longer than the run keeps its slope
    np.testing.assert_allclose(linear_then_constant(0.0, 3.0, 4, 2), [0.0, 1.0, 2.0, 3.0], atol=1e-12)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="exceed total"):
        cosine_schedule(1.0, 0.0, total=3, warmup=2, freeze=2)
    with pytest.raises(ValueError, match="must be >= 0"):
        cosine_schedule(1.0, 0.0, total=-1)
    with pytest.raises(ValueError, match="step must be >= 0"):
        value_at(np.zeros(3), -1, 0.0)


def tiny(**over):
    return config.load(None, [f"{k}={v}" for k, v in over.items()])


def test_schedules_from_config_by_hand():
    cfg = tiny(**{"train.steps": 10, "optim.lr": 0.004, "optim.min_lr": 1e-6, "optim.warmup_steps": 3,
                  "data.batch_size": 64, "optim.weight_decay": 0.04, "optim.weight_decay_final": 0.4,
                  "teacher.momentum": 0.99, "teacher.momentum_final": 1.0,
                  "loss.teacher_temp": 0.04, "loss.teacher_temp_final": 0.07,
                  "loss.teacher_temp_warmup_steps": 4, "optim.freeze_prototypes_steps": 2})
    s = Schedules(cfg, world_size=4)
    peak = 0.004 * math.sqrt(64 * 4 / 1024)                # = 0.002
    assert s.peak_lr == pytest.approx(0.002)
    v0, v2, v3, v5 = s(0), s(2), s(3), s(5)
    assert isinstance(v0, StepValues)
    assert (v0.lr, v2.lr, v3.lr) == pytest.approx((0.0, peak, peak))            # inclusive linspace
    assert v5.lr == pytest.approx(1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * 2 / 7)))
    assert v0.weight_decay == pytest.approx(0.04)
    assert v5.weight_decay == pytest.approx(0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * 5 / 10)))
    assert v5.momentum == pytest.approx(1.0 + 0.5 * (0.99 - 1.0) * (1 + math.cos(math.pi * 5 / 10)))
    assert [s(i).teacher_temp for i in range(6)] == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07, 0.07])
    assert [s(i).freeze_prototypes for i in range(4)] == [True, True, False, False]
    end = s(10)
    assert (end.lr, end.weight_decay, end.momentum, end.teacher_temp) == pytest.approx(
        (1e-6, 0.4, 1.0, 0.07))


def test_constant_momentum():
    s = Schedules(tiny(**{"teacher.schedule": "constant", "teacher.momentum": 0.996}))
    assert s(0).momentum == s(37).momentum == s(10_000).momentum == 0.996
