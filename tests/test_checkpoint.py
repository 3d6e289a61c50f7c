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


# ----------------------------------------------------------------------------------------------
# Per-rank state loads with weights_only=True (no pickled classes)
# ----------------------------------------------------------------------------------------------
def _rng_like_rank_state():
    import random

    import numpy as np
    return {"rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            "data": {"kind": "pytorch", "batches": 12, "dali_checkpoint": "YWJj", "sizes": np.arange(3)}}


def test_rank_state_is_weights_only_and_restores_rng_streams_exactly(tmp_path, seed):
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    model, opt, _ = _objects(seed)
    state = _rng_like_rank_state()
    path = CheckpointManager(tmp_path, keep=1, ctx=CTX).save(1, training_state(model, opt), state, {}, {})
    raw = torch.load(path / "rank_00000.pt", weights_only=True)      # the point: no unpickling of classes
    assert isinstance(raw["rng"]["numpy"][1], dict)                   # the ndarray travelled as a tensor
    expected = (random.random(), np.random.rand(4).tolist(), torch.rand(3))
    loaded, _ = CheckpointManager(tmp_path, keep=1, ctx=CTX).load(path, training_state(model, opt))
    random.setstate(loaded["rng"]["python"])
    np.random.set_state(loaded["rng"]["numpy"])
    torch.set_rng_state(loaded["rng"]["torch"])
    assert (random.random(), np.random.rand(4).tolist()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])
    assert loaded["data"]["batches"] == 12 and loaded["data"]["dali_checkpoint"] == "YWJj"
    assert loaded["data"]["sizes"].dtype == np.arange(3).dtype and loaded["data"]["sizes"].tolist() == [0, 1, 2]


def test_rank_state_that_would_need_pickling_is_refused_at_save(tmp_path, seed):
    model, opt, _ = _objects(seed)
    with pytest.raises(TypeError, match=r"rank_state\['data'\]\['when'\]: .*cannot be stored"):
        CheckpointManager(tmp_path, keep=1, ctx=CTX).save(1, training_state(model, opt),
                                                          {"data": {"when": object()}}, {}, {})


def test_older_rank_files_with_pickled_numpy_still_load(tmp_path):
    from fasttips.distributed.checkpoint import load_rank_state
    state = _rng_like_rank_state()
    torch.save(state, tmp_path / "rank_00000.pt")                     # what older versions wrote
    loaded = load_rank_state(tmp_path / "rank_00000.pt")
    assert loaded["rng"]["numpy"][0] == "MT19937"
    assert (loaded["rng"]["numpy"][1] == state["rng"]["numpy"][1]).all()


class _WritesMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _reseal(path):
    """Rewrite the manifest to match the files as they are now: what someone who swapped a file in
    would do (the checksums guard against damage, not tampering)."""
    from fasttips.distributed.checkpoint import build_manifest
    (path / "MANIFEST.json").unlink()
    (path / "MANIFEST.json").write_text(json.dumps(build_manifest(path)))


def _as_written_by_an_older_fasttips(path):
    """No manifest, and no record that there was one (fasttips before the manifest)."""
    (path / "MANIFEST.json").unlink()
    (path / MARKER).write_text(path.name.split("_")[1].lstrip("0") + "\n")
    meta = json.loads((path / "meta.json").read_text())
    del meta["manifest"]
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("manifest", ["resealed", "older fasttips"])
def test_a_rank_file_whose_unpickling_runs_code_is_refused(tmp_path, seed, manifest):
    from fasttips.distributed.checkpoint import DamagedCheckpoint
    model, opt, _ = _objects(seed)
    manager = CheckpointManager(tmp_path / "ckpt", keep=2, ctx=CTX)
    path = manager.save(1, training_state(model, opt), {"rng": torch.get_rng_state()}, {}, {})
    marker = tmp_path / "pwned"
    torch.save({"rng": _WritesMarker(marker)}, path / "rank_00000.pt")   # swapped in by someone
    _reseal(path) if manifest == "resealed" else _as_written_by_an_older_fasttips(path)
    with pytest.raises(DamagedCheckpoint, match=r"rank_00000.pt: asks to unpickle .*open.*refused"):
        CheckpointManager(tmp_path / "ckpt", keep=2, ctx=CTX).load(path, training_state(model, opt))
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints: verified before they are trusted, the newest intact one is used
# ----------------------------------------------------------------------------------------------
def _two_checkpoints(tmp_path, seed):
    model, opt, buffers = _objects(seed)
    manager = CheckpointManager(tmp_path / "ckpt", keep=3, ctx=CTX)
    manager.save(2, training_state(model, opt, centers=buffers), {"rng": torch.get_rng_state()},
                 {"config.yaml": b"a: 1\n"}, {})
    newest = manager.save(4, training_state(model, opt, centers=buffers), {"rng": torch.get_rng_state()},
                          {"config.yaml": b"a: 1\n"}, {})
    return model, opt, buffers, newest


def _damage(file, how):
    data = file.read_bytes()
    if how == "truncate":
        file.write_bytes(data[: len(data) // 2])
    else:                                               # same size, one byte flipped
        i = len(data) // 2
        file.write_bytes(data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:])


@pytest.mark.parametrize("how", ["truncate", "corrupt"])
@pytest.mark.parametrize("victim", ["distcp", ".metadata", "rank_00000.pt", "meta.json"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, seed, capfd, victim, how):
    model, opt, buffers, newest = _two_checkpoints(tmp_path, seed)
    manifest = json.loads((newest / "MANIFEST.json").read_text())["files"]
    assert {"config.yaml", "meta.json", ".metadata", "rank_00000.pt"} <= set(manifest)
    file = next(newest.glob("*.distcp")) if victim == "distcp" else newest / victim
    _damage(file, how)

    manager = CheckpointManager(tmp_path / "ckpt", keep=3, ctx=CTX)
    step, path = manager.latest_intact()
    assert step == 2 and path.name == "step_00000002"
    err = capfd.readouterr().err
    assert "step_00000004 is damaged" in err and file.name in err, err
    assert ("truncated" if how == "truncate" else "checksum") in err, err
    # set aside, so that the step-4 checkpoint the resumed run writes is a fresh one
    assert not newest.exists() and (tmp_path / "ckpt" / "damaged-step_00000004" / file.name).exists()
    target = training_state(model, opt, centers=buffers)
    manager.load(path, target)
    assert manager.save(4, training_state(model, opt, centers=buffers), {}, {}, {}) == newest
    assert (newest / MARKER).is_file() and manager.latest_intact()[0] == 4


def test_every_checkpoint_damaged_is_an_error_naming_them(tmp_path, seed):
    from fasttips.distributed.checkpoint import DamagedCheckpoint
    _, _, _, newest = _two_checkpoints(tmp_path, seed)
    _damage(newest / "rank_00000.pt", "truncate")
    (newest.parent / "step_00000002" / ".metadata").unlink()
    with pytest.raises(DamagedCheckpoint, match=r"every complete checkpoint is damaged: step_00000004 "
                                                r"\(rank_00000.pt.*step_00000002 \(.metadata: missing"):
        CheckpointManager(tmp_path / "ckpt", keep=3, ctx=CTX).latest_intact()


def test_load_verifies_a_checkpoint_it_was_handed_directly(tmp_path, seed):
    from fasttips.distributed.checkpoint import DamagedCheckpoint
    model, opt, _, newest = _two_checkpoints(tmp_path, seed)
    _damage(next(newest.glob("*.distcp")), "corrupt")
    with pytest.raises(DamagedCheckpoint, match=r"step_00000004 is damaged: __.*\.distcp: contents differ"):
        CheckpointManager(tmp_path / "ckpt", keep=3, ctx=CTX).load(newest, training_state(model, opt))


def test_a_damaged_manifest_marks_the_checkpoint_damaged(tmp_path, seed, capfd):
    _, _, _, newest = _two_checkpoints(tmp_path, seed)
    _damage(newest / "MANIFEST.json", "truncate")
    assert CheckpointManager(tmp_path / "ckpt", keep=3, ctx=CTX).latest_intact()[0] == 2
    assert "MANIFEST.json: unreadable" in capfd.readouterr().err


def test_checkpoints_without_manifest_load_with_a_note_and_a_structural_check(tmp_path, seed, capfd):
    from fasttips.distributed.checkpoint import check_checkpoint
    model, opt, buffers, newest = _two_checkpoints(tmp_path, seed)
    for path in (newest, newest.parent / "step_00000002"):
        _as_written_by_an_older_fasttips(path)
    manager = CheckpointManager(tmp_path / "ckpt", keep=3, ctx=CTX)
    assert manager.latest_intact()[0] == 4
    assert "no MANIFEST.json" in capfd.readouterr().err
    manager.load(newest, training_state(model, opt, centers=buffers))
    # no checksums, but DCP's record of where each tensor ends still catches a truncated shard
    shard = next(newest.glob("*.distcp"))
    _damage(shard, "truncate")
    verdict = check_checkpoint(newest)
    assert not verdict.verified and shard.name in verdict.describe() and "truncated" in verdict.describe()
    assert manager.latest_intact()[0] == 2


def test_meta_json_with_missing_fields_falls_back_to_the_folder_name(tmp_path):
    from fasttips.distributed.checkpoint import DamagedCheckpoint, read_meta
    ckpt = tmp_path / "step_00000012"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text("{}")
    assert read_meta(ckpt) == {"step": 12, "world_size": None}
    (ckpt / "meta.json").write_text('{"step": 1')
    with pytest.raises(DamagedCheckpoint, match=r"step_00000012/meta.json: unreadable"):
        read_meta(ckpt)


# ----------------------------------------------------------------------------------------------
# Two gloo ranks: the checksums are split over the ranks, and every rank reaches the same verdict
# ----------------------------------------------------------------------------------------------
def _two_rank_worker(rank: int, port: int, root: str, out: str) -> None:
    import os
    from pathlib import Path

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ctx = DistContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"), mesh=None,
                      param_dtype=torch.float32)
    model, opt, _ = _objects(0)
    manager = CheckpointManager(root, keep=3, ctx=ctx)
    for step in (2, 4):
        manager.save(step, training_state(model, opt), {"rng": torch.get_rng_state(), "rank": rank}, {}, {})
    dist.barrier()
    if rank == 1:                                       # rank 1 damages its own file of the newest
        file = Path(root) / "step_00000004" / "rank_00001.pt"
        file.write_bytes(file.read_bytes()[:-3])
    dist.barrier()
    step, path = manager.latest_intact()
    rank_state, meta = manager.load(path, training_state(model, opt))
    Path(out, f"rank{rank}.json").write_text(json.dumps({"step": step, "rank": rank_state["rank"],
                                                         "world": meta["world_size"]}))
    dist.destroy_process_group()


def test_two_ranks_agree_on_the_newest_intact_checkpoint(tmp_path, capfd):
    import socket
    import time

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = mp.start_processes(_two_rank_worker, args=(port, str(tmp_path / "ckpt"), str(tmp_path)),
                               nprocs=2, join=False, start_method="fork")
    deadline = time.time() + 120
    while not procs.join(timeout=1):
        assert time.time() < deadline, "ranks hung"
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results == [{"step": 2, "rank": 0, "world": 2}, {"step": 2, "rank": 1, "world": 2}]
    manifest = json.loads((tmp_path / "ckpt" / "step_00000002" / "MANIFEST.json").read_text())["files"]
    assert {"rank_00000.pt", "rank_00001.pt", ".metadata"} <= set(manifest)
    err = capfd.readouterr().err
    assert err.count("step_00000004 is damaged: rank_00001.pt") == 1, err     # said once, by rank 0


# ----------------------------------------------------------------------------------------------
# Nothing in a checkpoint runs code: DCP's .metadata and non-tensor items are read restricted
# ----------------------------------------------------------------------------------------------
class _Touch:
    """Unpickling this runs ``os.system("touch MARKER")`` (pickled as posix.system)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def _plant_in_metadata(path, marker, where):
    """Replace ``path``'s .metadata by a pickle that runs code: the whole file, or one object inside
    a genuine Metadata record (where a check of the outer type alone would not look)."""
    import pickle

    from fasttips.distributed.checkpoint import read_dcp_metadata
    if where == "whole file":
        payload = _Touch(marker)
    else:
        payload = read_dcp_metadata(path / ".metadata")
        payload.planner_data = {"x": _Touch(marker)}
    (path / ".metadata").write_bytes(pickle.dumps(payload))


@pytest.mark.parametrize("where", ["whole file", "inside the record"])
def test_a_metadata_pickle_that_would_run_code_is_refused_and_passed_over(tmp_path, seed, capfd, where):
    from fasttips.distributed.checkpoint import DamagedCheckpoint, check_checkpoint
    model, opt, buffers, newest = _two_checkpoints(tmp_path, seed)
    marker = tmp_path / "pwned"
    _plant_in_metadata(newest, marker, where)
    _reseal(newest)
    verdict = check_checkpoint(newest)
    assert ".metadata: asks to unpickle posix.system" in verdict.describe() and "refused" in verdict.describe()
    with pytest.raises(DamagedCheckpoint, match=r"\.metadata: asks to unpickle posix\.system"):
        CheckpointManager(tmp_path / "ckpt", keep=3, ctx=CTX).load(newest, training_state(model, opt))
    manager = CheckpointManager(tmp_path / "ckpt", keep=3, ctx=CTX)
    assert manager.latest_intact()[0] == 2                     # resume: the previous checkpoint
    assert "step_00000004 is damaged: .metadata: asks to unpickle posix.system" in capfd.readouterr().err
    manager.load(tmp_path / "ckpt" / "step_00000002", training_state(model, opt, centers=buffers))
    assert not marker.exists()


def test_a_metadata_naming_a_file_outside_the_checkpoint_is_refused(tmp_path, seed):
    import pickle

    from fasttips.distributed.checkpoint import DamagedCheckpoint, read_dcp_metadata
    _, _, _, newest = _two_checkpoints(tmp_path, seed)
    metadata = read_dcp_metadata(newest / ".metadata")
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../step_00000002/" + info.relative_path
    (newest / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(DamagedCheckpoint, match=r"names a shard '\.\./step_00000002/.*' outside"):
        read_dcp_metadata(newest / ".metadata")


def test_a_non_tensor_item_that_would_run_code_is_refused(tmp_path, seed):
    """DCP stores non-tensor values (optimiser hyper-parameters) with torch.save and loads them with
    weights_only=False; fasttips loads them weights_only, before and during a load."""
    import torch.distributed.checkpoint as dcp

    from fasttips.distributed.checkpoint import DamagedCheckpoint, check_checkpoint, load_dcp
    model, opt, _, newest = _two_checkpoints(tmp_path, seed)
    marker = tmp_path / "pwned"
    state = training_state(model, opt)
    state["optim"]["param_groups"][0]["lr"] = _Touch(marker)
    for name in [".metadata", *(p.name for p in newest.glob("*.distcp"))]:
        (newest / name).unlink()
    dcp.save(state, checkpoint_id=str(newest))                  # DCP itself happily writes it
    _reseal(newest)
    verdict = check_checkpoint(newest)
    assert "item optim.param_groups.0.lr" in verdict.describe() and "posix.system" in verdict.describe()
    with pytest.raises(DamagedCheckpoint, match=r"item optim.param_groups.0.lr: asks to unpickle posix.system"):
        load_dcp(training_state(model, opt), newest)
    assert not marker.exists()
    assert CheckpointManager(tmp_path / "ckpt", keep=3, ctx=CTX).latest_intact()[0] == 2


def test_a_refused_rank_file_falls_back_to_the_previous_checkpoint(tmp_path, seed, capfd):
    model, opt, _, newest = _two_checkpoints(tmp_path, seed)
    marker = tmp_path / "pwned"
    torch.save({"rng": _WritesMarker(marker)}, newest / "rank_00000.pt")
    _reseal(newest)
    assert CheckpointManager(tmp_path / "ckpt", keep=3, ctx=CTX).latest_intact()[0] == 2
    err = capfd.readouterr().err
    assert "step_00000004 is damaged: rank_00000.pt: asks to unpickle" in err and "refused" in err, err
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# A lost manifest or marker is damage, not an older fasttips
# ----------------------------------------------------------------------------------------------
def test_a_checkpoint_that_lost_its_manifest_is_damaged(tmp_path, seed, capfd):
    from fasttips.distributed.checkpoint import check_checkpoint
    _, _, _, newest = _two_checkpoints(tmp_path, seed)
    assert "MANIFEST.json" in (newest / MARKER).read_text()
    assert json.loads((newest / "meta.json").read_text())["manifest"] == "MANIFEST.json"
    (newest / "MANIFEST.json").unlink()
    _damage(next(newest.glob("*.distcp")), "corrupt")          # same size: only a checksum sees it
    verdict = check_checkpoint(newest)
    assert verdict.verified and "MANIFEST.json: missing" in verdict.describe()
    assert CheckpointManager(tmp_path / "ckpt", keep=3, ctx=CTX).latest_intact()[0] == 2
    assert "step_00000004 is damaged: MANIFEST.json: missing" in capfd.readouterr().err


@pytest.mark.parametrize("record", ["COMPLETE", "meta.json"])
def test_either_record_of_the_manifest_is_enough(tmp_path, seed, record):
    from fasttips.distributed.checkpoint import check_checkpoint
    _, _, _, newest = _two_checkpoints(tmp_path, seed)
    (newest / "MANIFEST.json").unlink()
    if record == "COMPLETE":                       # meta.json lost its record; the marker still says so
        (newest / "meta.json").write_text("{}")
    else:
        (newest / MARKER).write_text("4\n")
    assert "MANIFEST.json: missing" in check_checkpoint(newest).describe()


def test_a_step_folder_without_its_marker_is_reported_and_set_aside(tmp_path, seed, capfd):
    _, _, _, newest = _two_checkpoints(tmp_path, seed)
    (newest / MARKER).unlink()
    assert CheckpointManager(tmp_path / "ckpt", keep=3, ctx=CTX).latest_intact()[0] == 2
    err = capfd.readouterr().err
    assert "step_00000004 is damaged: no COMPLETE marker" in err and "moved to damaged-step_00000004" in err, err
    assert (tmp_path / "ckpt" / "damaged-step_00000004" / "MANIFEST.json").is_file()


# ----------------------------------------------------------------------------------------------
# Asynchronous writes: the caller goes on while the files are written; the protocol stays atomic
# ----------------------------------------------------------------------------------------------
def _held_hook(started, release):
    """A before_commit hook that says it started and then waits for ``release`` (a write in flight)."""
    def hook(step):
        started.set()
        assert release.wait(60), "the test never released the write"
    return hook


def test_an_async_save_returns_while_the_write_goes_on_and_holds_the_state_of_the_call(tmp_path, seed):
    import threading
    model, opt, buffers = _objects(seed)
    manager = CheckpointManager(tmp_path / "ckpt", keep=3, ctx=CTX, asynchronous=True)
    started, release = threading.Event(), threading.Event()
    path = manager.save(3, training_state(model, opt, centers=buffers), {"rng": torch.get_rng_state()},
                        {"config.yaml": b"a: 1\n"}, {}, before_commit=_held_hook(started, release))
    assert started.wait(60)
    assert manager.writing == path and not path.exists()        # in flight, not complete
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():                                          # the step loop goes on meanwhile
        for p in model.parameters():
            p.add_(1.0)
        buffers.center.mul_(2)
    second = threading.Thread(target=manager.save, args=(4, training_state(model, opt), {}, {}, {}))
    second.start()                                                 # waits for the write in flight
    second.join(0.5)
    assert second.is_alive() and not (tmp_path / "ckpt" / ".tmp-step_00000004").exists()
    release.set()
    second.join(60)
    assert manager.wait() == tmp_path / "ckpt" / "step_00000004" and manager.writing is None
    assert [s for s, _ in complete_checkpoints(tmp_path / "ckpt")] == [3, 4]
    other, other_opt, other_buffers = _objects(seed + 1)
    target = training_state(other, other_opt, centers=other_buffers)
    manager.load(path, target)
    restore_training_state(target, other, other_opt, centers=other_buffers)
    for k, v in other.state_dict().items():                        # the state when save was called
        assert torch.equal(v, saved[k]), k
    assert torch.equal(other_buffers.center, buffers.center / 2)
    manager.close()


def test_a_failed_async_write_commits_nothing_and_is_raised_by_the_next_wait(tmp_path, seed):
    from fasttips.distributed.checkpoint import CheckpointWriteError
    model, opt, _ = _objects(seed)
    manager = CheckpointManager(tmp_path / "ckpt", keep=3, ctx=CTX, asynchronous=True)
    manager.save(2, training_state(model, opt), {}, {}, {}, wait=True)
    manager.save(4, training_state(model, opt), {}, {"x" * 300 + ".txt": b"x"}, {})   # a write that fails
    with pytest.raises(CheckpointWriteError, match=r"step_00000004 was not written \(the previous one stands\): "
                                                   r"rank 0: OSError.*File name too long"):
        manager.wait()
    assert latest_checkpoint(tmp_path / "ckpt")[0] == 2
    assert manager.save(6, training_state(model, opt), {}, {}, {}, wait=True).name == "step_00000006"
    assert not (tmp_path / "ckpt" / ".tmp-step_00000004").exists()     # pruned by the next commit
    manager.close()


@pytest.mark.parametrize("backend, problem", [("gloo", None), ("nccl", None), ("cpu:gloo,cuda:nccl", None),
                                              ("mpi", "backend is 'mpi'"), ("fake", "backend is 'fake'")])
def test_async_checkpoints_are_supported_on_gloo_and_nccl(monkeypatch, backend, problem):
    from fasttips.distributed import checkpoint
    monkeypatch.setattr(checkpoint.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(checkpoint.dist, "get_backend", lambda group=None: backend)
    found = checkpoint.async_checkpoint_problem()
    assert found is None if problem is None else problem in found


def test_an_unsupported_backend_for_async_checkpoints_is_one_line_and_exit_2(tmp_path, capsys):
    """A caller's own process group of another backend (here PyTorch's test backend "fake"): every
    rank stops at start-up with the field named, before any collective."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from fasttips.train import main
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    try:
        code = main([f"train.run_dir={tmp_path / 'run'}", "train.steps=1", "data.source=synthetic"])
    finally:
        dist.destroy_process_group()
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "config error: train.async_checkpoint: the process group's backend is 'fake'" in err
    assert "train.async_checkpoint=false" in err


def _sharded_objects(seed, mesh):
    """``_objects``' model and AdamW under FSDP2 (DTensor shards: what the trainer checkpoints)."""
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 5)).square().mean().backward()
    opt.step()
    return model, opt


def _two_rank_async_worker(rank: int, port: int, root: str, out: str) -> None:
    import os
    import threading
    from pathlib import Path

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    ctx = DistContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"), mesh=mesh,
                      param_dtype=torch.float32)
    model, opt = _sharded_objects(0, mesh)
    manager = CheckpointManager(root, keep=3, ctx=ctx, asynchronous=True)
    release = threading.Event()
    path = manager.save(2, training_state(model, opt), {"rng": torch.get_rng_state(), "rank": rank}, {}, {},
                        before_commit=lambda step: release.wait(60))
    saved = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    # the step loop's collectives on the default group, while the writer's run on its own group
    total = torch.zeros(1)
    for _ in range(20):
        one = torch.ones(1)
        dist.all_reduce(one)
        total += one
        with torch.no_grad():
            model[0].weight.add_(1.0)
    in_flight = manager.writing is not None
    release.set()
    manager.wait()
    other, other_opt = _sharded_objects(7, mesh)
    target = training_state(other, other_opt)
    rank_state, meta = manager.load(path, target)
    restore_training_state(target, other, other_opt)
    equal = all(torch.equal(v.full_tensor(), saved[k]) for k, v in other.state_dict().items())
    Path(out, f"rank{rank}.json").write_text(json.dumps({"in_flight": in_flight, "collectives": total.item(),
                                                         "equal": equal, "rank": rank_state["rank"]}))
    manager.close()
    dist.destroy_process_group()


def test_two_fsdp_ranks_write_asynchronously_while_their_step_loop_runs_collectives(tmp_path):
    import socket
    import time

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = mp.start_processes(_two_rank_async_worker, args=(port, str(tmp_path / "ckpt"), str(tmp_path)),
                               nprocs=2, join=False, start_method="fork")
    deadline = time.time() + 120
    while not procs.join(timeout=1):
        assert time.time() < deadline, "ranks hung"
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results == [{"in_flight": True, "collectives": 40.0, "equal": True, "rank": r} for r in range(2)]
    assert [s for s, _ in complete_checkpoints(tmp_path / "ckpt")] == [2]


@pytest.mark.gpu
def test_an_async_checkpoint_on_cuda_goes_through_pinned_memory_and_restores_bitwise(tmp_path):
    """One GPU in bf16 as training runs it (FSDP2 on an NCCL group; the writer on its own gloo group):
    the parameters change on the device right after save returns, and the checkpoint still holds the
    state of the call."""
    from fasttips import config
    from fasttips.distributed import fsdp
    from fasttips.training import build_training
    cfg = config.load(None, ["preset=tiny", "train.device=cuda", "train.precision=bf16"])
    ctx = fsdp.init_distributed(cfg)
    try:
        def build():
            training = build_training(cfg, ctx)
            for p in training.model.parameters():
                p.grad = torch.zeros_like(p)
            training.optimizer.step()
            return training, lambda: training_state(training.model, training.optimizer,
                                                    **training.stateful_modules())

        training, state = build()
        saved = {k: v.full_tensor().clone() for k, v in training.model.state_dict().items()}
        manager = CheckpointManager(tmp_path / "ckpt", keep=1, ctx=ctx, asynchronous=True)
        path = manager.save(1, state(), {"rng": torch.get_rng_state()}, {}, {})
        with torch.no_grad():
            for p in training.model.parameters():
                p.add_(1.0)
        staged = list(manager._stager._state_dict_stager._cached_storage_mapping.values())
        assert staged and all(s.device.type == "cpu" for s in staged)
        assert any(s.is_pinned() for s in staged)
        assert manager.wait() == path and (path / MARKER).is_file()
        manager.close()
        other, other_state = build()
        with torch.no_grad():                      # other weights, so that only the load restores them
            for p in other.model.parameters():
                p.mul_(0.5).add_(3.0)
        target = other_state()
        CheckpointManager(tmp_path / "ckpt", keep=1, ctx=ctx).load(path, target)
        restore_training_state(target, other.model, other.optimizer, **other.stateful_modules())
        for k, v in other.model.state_dict().items():
            assert torch.equal(v.full_tensor(), saved[k]), k
    finally:
        fsdp.shutdown(ctx)


def test_a_stager_that_closed_itself_is_replaced_before_the_next_async_save(tmp_path, seed, monkeypatch):
    """torch 2.11's DefaultStager clears its deep-copy table after one stage(), so the second async
    checkpoint of a run failed there (KeyError: <class 'type'>). Here the torch in use may keep its stager
    reusable, so the first stager is made to close itself as 2.11's does: three saves must still work."""
    from torch.distributed.checkpoint.staging import DefaultStager
    staged_by = []
    real_stage = DefaultStager.stage

    def stage_then_close(self, state_dict, **kw):
        staged_by.append(self)                           # (kept alive: their ids stay distinct)
        out = real_stage(self, state_dict, **kw)
        self._state_dict_stager.close()                  # what torch 2.11's DefaultStager.stage does
        return out
    monkeypatch.setattr(DefaultStager, "stage", stage_then_close)
    model, opt, _ = _objects(seed)
    manager = CheckpointManager(tmp_path / "ckpt", keep=3, ctx=CTX, asynchronous=True)
    for step in (1, 2, 3):
        manager.save(step, training_state(model, opt), {}, {}, {}, wait=True)
    manager.close()
    assert [s for s, _ in complete_checkpoints(tmp_path / "ckpt")] == [1, 2, 3]
    assert len({id(s) for s in staged_by}) == 3              # a new stager for each save after a close
