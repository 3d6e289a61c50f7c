"""The global data position: a run stopped on N ranks and resumed on M ranks (or with another batch
size) sees every sample of the epoch exactly once across the interruption (``pipeline.py``)."""
from collections import Counter

import pytest

from fasttips.data.loader import build_loader, dali_available

from data_helpers import tiny_cfg

N_SAMPLES = 24                                       # the tiny_shards fixture
LOADERS = ["pytorch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                    reason="nvidia-dali not installed"))]


def keys_of(loaders, rounds):
    """Keys taken by ``rounds`` steps of every rank (each rank one batch per step, as in training)."""
    keys = []
    for _ in range(rounds):
        for loader in loaders:
            keys += next(loader)["keys"]
    return keys


def ranks(cfg, world):
    return [build_loader(cfg, rank=r, world_size=world) for r in range(world)]


@pytest.mark.parametrize("before, after", [((2, 4, 2), (1, 4, 2)),    # 2 → 1 ranks
                                           ((1, 4, 2), (2, 4, 2)),    # 1 → 2 ranks
                                           ((2, 2, 3), (3, 4, 1)),    # 2 → 3 ranks, batch 2 → 4
                                           ((3, 2, 1), (2, 3, 3))])   # 3 → 2 ranks, batch 2 → 3
@pytest.mark.parametrize("kind", LOADERS)
def test_every_sample_once_across_a_change_of_ranks(tiny_shards, before, after, kind):
    (w0, b0, steps0), (w1, b1, steps1) = before, after
    assert w0 * b0 * steps0 + w1 * b1 * steps1 == N_SAMPLES          # the cases cover one epoch exactly
    first = ranks(tiny_cfg(tiny_shards, f"data.loader={kind}", f"data.batch_size={b0}"), w0)
    seen = keys_of(first, steps0)
    saved = [loader.state_dict() for loader in first]
    assert {s["position"] for s in saved} == {w0 * b0 * steps0}       # one global position, every rank
    second = ranks(tiny_cfg(tiny_shards, f"data.loader={kind}", f"data.batch_size={b1}"), w1)
    for loader in second:
        loader.resume_at(first[0].position_state())
    seen += keys_of(second, steps1)
    assert Counter(seen) == Counter(f"s{i:04d}" for i in range(N_SAMPLES))
    # the next epoch starts after it, again every sample once
    assert sorted(keys_of(second, N_SAMPLES // (w1 * b1))) == sorted(seen)


@pytest.mark.parametrize("kind", LOADERS)
def test_a_rank_state_of_another_layout_resumes_at_the_global_position(tiny_shards, kind):
    """load_state_dict with a saved batch size other than this loader's goes through the position."""
    a = ranks(tiny_cfg(tiny_shards, f"data.loader={kind}", "data.batch_size=2"), 1)
    seen = keys_of(a, 3)
    b = ranks(tiny_cfg(tiny_shards, f"data.loader={kind}", "data.batch_size=3"), 1)
    b[0].load_state_dict(a[0].state_dict())
    seen += keys_of(b, 6)
    assert Counter(seen) == Counter(f"s{i:04d}" for i in range(N_SAMPLES))


@pytest.mark.parametrize("kind", LOADERS)
def test_a_resume_on_the_same_layout_continues_after_an_earlier_change(tiny_shards, kind):
    """After a change of layout (start > 0), a same-layout checkpoint restores start and batches."""
    cfg = tiny_cfg(tiny_shards, f"data.loader={kind}", "data.batch_size=2")
    one = ranks(cfg, 1)
    keys_of(one, 2)
    two = ranks(cfg, 2)
    for loader in two:
        loader.resume_at(one[0].position_state())
    keys_of(two, 1)
    state = [loader.state_dict() for loader in two]
    expected = keys_of(two, 2)
    again = ranks(cfg, 2)
    for loader, st in zip(again, state):
        loader.load_state_dict(st)
    assert keys_of(again, 2) == expected


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
@pytest.mark.parametrize("before, after", [("pytorch", "dali"), ("dali", "pytorch")])
def test_a_position_of_one_loader_resumes_in_the_other_on_another_layout(tiny_shards, before, after):
    """Both loaders read the same stream: 2 ranks of one stop, 1 rank of the other continues."""
    first = ranks(tiny_cfg(tiny_shards, f"data.loader={before}", "data.batch_size=2"), 2)
    seen = keys_of(first, 3)
    second = ranks(tiny_cfg(tiny_shards, f"data.loader={after}", "data.batch_size=4"), 1)
    second[0].resume_at(first[1].position_state())
    seen += keys_of(second, 3)
    assert Counter(seen) == Counter(f"s{i:04d}" for i in range(N_SAMPLES))
