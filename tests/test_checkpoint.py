"""CheckpointManager on one process: atomic layout, last-N pruning, what counts as complete."""
from __future__ import annotations

import json

import pytest
import torch

from fasttips.distributed.checkpoint import (MARKER, CheckpointManager, complete_checkpoints,
                                             latest_checkpoint, restore_training_state, training_state)
from fasttips.distributed.fsdp import DistContext

CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None,
                  param_dtype=torch.float32)


def _objects(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 5)).square().mean().backward()
    opt.step()
    buffers = torch.nn.Module()
    buffers.register_buffer("center", torch.randn(11))
    return model, opt, buffers


def test_roundtrip_is_bitwise_and_layout_is_complete(tmp_path, seed):
    model, opt, buffers = _objects(seed)
    manager = CheckpointManager(tmp_path / "ckpt", keep=3, ctx=CTX)
    rng = torch.get_rng_state()
    path = manager.save(7, training_state(model, opt, centers=buffers), {"rng": rng},
                        {"config.yaml": b"a: 1\n"}, {"note": "x"})
    assert path.name == "step_00000007"
    for name in (MARKER, ".metadata", "rank_00000.pt", "config.yaml", "meta.json"):
        assert (path / name).is_file(), name
    assert json.loads((path / "meta.json").read_text())["note"] == "x"

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_state = {k: {s: t.clone() if torch.is_tensor(t) else t for s, t in v.items()}
                   for k, v in opt.state_dict()["state"].items()}
    other, other_opt, other_buffers = _objects(seed + 1)              # different weights, same shapes
    target = training_state(other, other_opt, centers=other_buffers)
    rank_state, meta = manager.load(path, target)
    restore_training_state(target, other, other_opt, centers=other_buffers)
    assert meta["step"] == 7 and torch.equal(rank_state["rng"], rng)
    for k, v in other.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert torch.equal(other_buffers.center, buffers.center)
    for k, v in other_opt.state_dict()["state"].items():
        for s, t in v.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(saved_state[k][s])), (k, s)


def test_keeps_the_last_n_and_ignores_incomplete_folders(tmp_path, seed):
    model, opt, _ = _objects(seed)
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root, keep=2, ctx=CTX)
    for step in (1, 2, 3):
        manager.save(step, training_state(model, opt), {}, {}, {})
    assert [s for s, _ in complete_checkpoints(root)] == [2, 3]

    # A crash mid-write leaves a temporary, or (renamed by hand, say) a step folder without marker.
    (root / ".tmp-step_00000009").mkdir()
    fake = root / "step_00000010"
    fake.mkdir()
    (fake / ".metadata").write_bytes(b"")
    assert latest_checkpoint(root)[0] == 3
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        manager.load(fake, training_state(model, opt))
    manager.save(4, training_state(model, opt), {}, {}, {})
    assert [s for s, _ in complete_checkpoints(root)] == [3, 4]
    assert not (root / ".tmp-step_00000009").exists()
    assert fake.exists()        # newer than the newest complete one: left for a person to inspect


def test_saving_the_same_step_twice_is_a_no_op(tmp_path, seed):
    model, opt, _ = _objects(seed)
    manager = CheckpointManager(tmp_path, keep=1, ctx=CTX)
    first = manager.save(5, training_state(model, opt), {}, {}, {})
    stamp = (first / MARKER).stat().st_mtime_ns
    assert manager.save(5, training_state(model, opt), {}, {}, {}) == first
    assert (first / MARKER).stat().st_mtime_ns == stamp


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_ckpts"):
        CheckpointManager(tmp_path, keep=0, ctx=CTX)
