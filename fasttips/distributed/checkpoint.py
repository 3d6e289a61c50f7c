"""Sharded checkpoints that are either complete or invisible.

Layout of ``<run_dir>/checkpoints``::

    step_00000030/          a complete checkpoint (it holds COMPLETE)
        .metadata, *.distcp     DCP: model, optimiser, teacher heads, centers (sharded tensors)
        rank_00000.pt ...       per-rank state: RNG streams, data position
        config.yaml, tokenizer.model, meta.json   (written by rank 0)
        COMPLETE                written last
    .tmp-step_00000060/     a write in progress, or one that died (ignored, removed later)

A checkpoint is written into a temporary folder; when every rank has finished, rank 0 writes the
``COMPLETE`` marker, syncs, and renames the folder to its final name. A crash at any moment
therefore leaves either the previous complete checkpoints or a new complete one, never a folder
that looks valid but is not. Only folders holding the marker are ever loaded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_PREFIX = ".tmp-"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_checkpoints(ckpt_root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(ckpt_root: str | Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(ckpt_root)
    return found[-1] if found else None


class CheckpointManager:
    """Atomic DCP save/load under ``ckpt_root``, keeping the last ``keep`` complete checkpoints."""

    def __init__(self, ckpt_root: str | Path, keep: int, ctx):
        if keep < 1:
            raise ValueError(f"train.keep_ckpts: must be >= 1, got {keep}")
        self.root = Path(ckpt_root)
        self.keep = keep
        self.ctx = ctx

    # -- save -----------------------------------------------------------------------------------
    def save(self, step: int, sharded_state: dict, rank_state: dict, files: dict[str, bytes],
             meta: dict, before_commit=None) -> Path:
        """Write checkpoint ``step``: ``sharded_state`` through DCP (collective), ``rank_state`` per
        rank with torch.save, ``files`` (name → bytes) and ``meta`` by rank 0; then mark and rename.
        ``before_commit(step)``, if given, runs once every file but the marker is written (fault
        injection: a crash test pauses there)."""
        ctx = self.ctx
        final = self.root / step_dir_name(step)
        tmp = self.root / f"{_TMP_PREFIX}{step_dir_name(step)}"
        if (final / MARKER).is_file():
            return final                               # this exact state is already on disk
        if ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)     # a write that died earlier
            tmp.mkdir(parents=True)
        ctx.barrier()
        with _one_process_is_fine():
            dcp.save(sharded_state, checkpoint_id=str(tmp))
        _write_file_atomic(tmp / f"rank_{ctx.rank:05d}.pt", _torch_bytes(rank_state))
        if ctx.is_main:
            for name, data in files.items():
                _write_file_atomic(tmp / name, data)
            meta = {**meta, "step": step, "world_size": ctx.world_size, "time": time.time()}
            _write_file_atomic(tmp / "meta.json", json.dumps(meta, indent=2).encode())
        if before_commit is not None:
            before_commit(step)
        ctx.barrier()                                  # every rank's shards are on disk
        if ctx.is_main:
            _write_file_atomic(tmp / MARKER, f"{step}\n".encode())
            _fsync_dir(tmp)
            if final.exists():                         # an unmarked leftover of the same step
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        ctx.barrier()
        return final

    def _prune(self) -> None:
        complete = complete_checkpoints(self.root)
        for _, path in complete[: max(0, len(complete) - self.keep)]:
            shutil.rmtree(path, ignore_errors=True)
        newest = complete[-1][0] if complete else -1
        for child in self.root.iterdir():
            # dead temporaries, and unmarked step folders older than the newest complete one
            match = _STEP_DIR.match(child.name)
            stale_step = match and not (child / MARKER).is_file() and int(match.group(1)) < newest
            if child.name.startswith(_TMP_PREFIX) or stale_step:
                shutil.rmtree(child, ignore_errors=True)

    # -- load -----------------------------------------------------------------------------------
    def load(self, path: str | Path, sharded_state: dict) -> tuple[dict | None, dict]:
        """Fill ``sharded_state`` in place from ``path``; return (this rank's rank_state or None, meta)."""
        path = Path(path)
        if not (path / MARKER).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
        _drop_unstepped_optimizer_state(sharded_state, _saved_keys(path))
        with _one_process_is_fine():
            dcp.load(sharded_state, checkpoint_id=str(path))
        meta = json.loads((path / "meta.json").read_text())
        rank_file = path / f"rank_{self.ctx.rank:05d}.pt"
        rank_state = None
        if rank_file.is_file() and meta.get("world_size") == self.ctx.world_size:
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
        return rank_state, meta


def training_state(model, optimizer, **modules) -> dict:
    """The sharded part of a checkpoint: model and optimiser (DCP's FQN-keyed state dicts, DTensor
    shards under FSDP2) plus the state dicts of ``modules`` (teacher heads, loss centers, ...)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, **{k: m.state_dict() for k, m in modules.items()}}


def restore_training_state(state: dict, model, optimizer, **modules) -> None:
    """Load a :func:`training_state` that ``CheckpointManager.load`` has filled."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    # strict=False only lets parameters that never had a gradient (no AdamW state yet) lack
    # optimiser state; every model key was already required by dcp.load.
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    for key, module in modules.items():
        module.load_state_dict(state[key])


@contextmanager
def _one_process_is_fine():
    """DCP warns when no process group exists; a single-process run is intended, not an accident."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _saved_keys(path: Path) -> set[str]:
    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def _drop_unstepped_optimizer_state(state: dict, saved: set[str], prefix: str = "") -> None:
    """Remove optimiser-state entries the checkpoint does not hold, in place.

    A parameter that never received a gradient (e.g. the SigLIP bias under a CLIP loss) has no
    AdamW state when saved, but the fresh optimiser's skeleton has one; leaving it out restores the
    saved optimiser exactly. Any other missing entry is a real mismatch and DCP reports it.
    """
    for key in list(state):
        path = f"{prefix}{key}"
        value = state[key]
        if isinstance(value, dict):
            _drop_unstepped_optimizer_state(value, saved, path + ".")
            if not value and path.startswith("optim.state."):
                del state[key]
        elif path.startswith("optim.state.") and path not in saved:
            del state[key]


def _torch_bytes(obj) -> bytes:
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


__all__ = ["CheckpointManager", "training_state", "restore_training_state", "complete_checkpoints", "latest_checkpoint", "step_dir_name", "MARKER"]
