"""Sharded checkpoints that are either complete or invisible.

Layout of ``<run_dir>/checkpoints``::

    step_00000030/          a complete checkpoint (it holds COMPLETE)
        .metadata, *.distcp     DCP: model, optimiser, teacher heads, centers (sharded tensors)
        rank_00000.pt ...       per-rank state: RNG streams, data position
        config.yaml, tokenizer.model, meta.json   (written by rank 0)
        MANIFEST.json           size and CRC-32 of every file above (written after them)
        COMPLETE                written last
    .tmp-step_00000060/     a write in progress, or one that died (ignored, removed later)
    damaged-step_00000090/  a complete checkpoint that failed verification on --resume (kept for a person)

A checkpoint is written into a temporary folder; when every rank has finished, rank 0 writes the
``COMPLETE`` marker, syncs, and renames the folder to its final name. A crash at any moment
therefore leaves either the previous complete checkpoints or a new complete one, never a folder
that looks valid but is not. Only folders holding the marker are ever loaded.

A marked checkpoint can still be damaged later (a disk error, a truncated copy). ``MANIFEST.json``
records each file's size and checksum at write time; :meth:`CheckpointManager.latest_intact` (resume)
and :func:`check_checkpoint` (eval) verify them before anything is read, and a damaged checkpoint is
passed over for the newest intact one with a warning naming the file. Checkpoints of older fasttips
versions have no manifest: they still load, after a structural check (DCP's own record of its shard
sizes), with a note.

Per-rank state (``rank_*.pt``: RNG streams, data position) is stored as tensors and plain containers
(numpy arrays become tagged byte tensors), so it loads with ``torch.load(weights_only=True)``: no
pickled classes. The DCP ``.metadata`` file is itself a pickle, so a checkpoint stays trusted input.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
import time
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
META = "meta.json"
DAMAGED_PREFIX = "damaged-"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_PREFIX = ".tmp-"
_CHUNK = 8 << 20


class DamagedCheckpoint(ValueError):
    """A checkpoint's files do not match what was recorded when it was written."""


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
        self._verified: set[Path] = set()     # checked by latest_intact: load need not read them again

    # -- save -----------------------------------------------------------------------------------
    def save(self, step: int, sharded_state: dict, rank_state: dict, files: dict[str, bytes],
             meta: dict, before_commit=None) -> Path:
        """Write checkpoint ``step``: ``sharded_state`` through DCP (collective), ``rank_state`` per
        rank with torch.save (as tensors and plain containers, see :func:`to_plain_state`), ``files``
        (name → bytes) and ``meta`` by rank 0; then the manifest, the marker and the rename.
        ``before_commit(step)``, if given, runs once every file but the manifest and the marker is
        written (fault injection: a crash test pauses there)."""
        ctx = self.ctx
        final = self.root / step_dir_name(step)
        tmp = self.root / f"{_TMP_PREFIX}{step_dir_name(step)}"
        if (final / MARKER).is_file():
            return final                               # this exact state is already on disk
        rank_bytes = _torch_bytes(to_plain_state(rank_state))   # refuses non-plain state before any write
        if ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)     # a write that died earlier
            tmp.mkdir(parents=True)
        ctx.barrier()
        with _one_process_is_fine():
            dcp.save(sharded_state, checkpoint_id=str(tmp))
        _write_file_atomic(tmp / f"rank_{ctx.rank:05d}.pt", rank_bytes)
        if ctx.is_main:
            for name, data in files.items():
                _write_file_atomic(tmp / name, data)
            meta = {**meta, "step": step, "world_size": ctx.world_size, "time": time.time()}
            _write_file_atomic(tmp / META, json.dumps(meta, indent=2).encode())
        if before_commit is not None:
            before_commit(step)
        ctx.barrier()                                  # every rank's shards are on disk
        manifest = build_manifest(tmp, ctx)            # collective: each rank checksums a share
        if ctx.is_main:
            _write_file_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
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
    def latest_intact(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint whose files match their manifest (collective: call it on
        every rank). Damaged ones are reported, renamed ``damaged-step_*`` (so that a later save of
        the same step writes a fresh one) and passed over; None when there is no complete checkpoint.
        Raises DamagedCheckpoint when there are complete checkpoints but every one is damaged."""
        say = _stderr if self.ctx.is_main else (lambda _msg: None)

        def aside(path: Path, verdict: "Verdict") -> None:
            moved = _move_aside(path) if self.ctx.is_main else None
            say(f"checkpoint: {path.name} is damaged: {verdict.describe()}; "
                + (f"moved to {moved.name}; " if moved else "") + "trying the previous checkpoint")
            self.ctx.barrier()

        found = newest_intact(self.root, self.ctx, on_damaged=aside)
        if found is not None:
            step, path, verdict = found
            self._verified.add(path)
            if not verdict.verified:
                say(f"checkpoint: {path.name} has no {MANIFEST} (written by an older fasttips): its files "
                    f"are not checksummed, only checked for size against DCP's own record")
            return step, path
        return None

    def load(self, path: str | Path, sharded_state: dict) -> tuple[dict | None, dict]:
        """Fill ``sharded_state`` in place from ``path``; return (this rank's rank_state or None, meta).
        A checkpoint that :meth:`latest_intact` has not just verified is verified first."""
        path = Path(path)
        if not (path / MARKER).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
        if path not in self._verified:
            verdict = check_checkpoint(path, self.ctx)
            if verdict.problems:
                raise DamagedCheckpoint(f"{path} is damaged: {verdict.describe()}")
        meta = read_meta(path)
        _drop_unstepped_optimizer_state(sharded_state, _saved_keys(path))
        with _one_process_is_fine():
            dcp.load(sharded_state, checkpoint_id=str(path))
        rank_file = path / f"rank_{self.ctx.rank:05d}.pt"
        rank_state = None
        if rank_file.is_file() and meta.get("world_size") == self.ctx.world_size:
            rank_state = load_rank_state(rank_file)
        return rank_state, meta


# ----------------------------------------------------------------------------------------------
# Verification: a manifest of sizes and checksums, written before the marker
# ----------------------------------------------------------------------------------------------
@dataclass
class Verdict:
    """What :func:`check_checkpoint` found. ``problems`` name a file each; ``verified`` is False for
    a checkpoint without a manifest (older fasttips), which only had a structural check."""
    path: Path
    problems: list[str] = field(default_factory=list)
    verified: bool = True

    def describe(self, limit: int = 3) -> str:
        more = len(self.problems) - limit
        return "; ".join(self.problems[:limit]) + (f"; and {more} more" if more > 0 else "")


def file_checksum(path: Path) -> str:
    """CRC-32 of a file, streamed in 8 MiB chunks (constant memory for multi-GB shards).

    CRC-32 catches truncation and bit rot, which is what this guards against (not tampering: anyone who
    can edit a shard can edit the manifest). It costs one read of the file: zlib's CRC-32 runs at a few
    GB/s per core on a server (about 4x blake2b; on this project's busy 2-core CI box 0.37 vs 0.08
    GB/s), and the files of a checkpoint are split over the ranks, so each rank reads 1/world_size of
    the checkpoint once at save (just written: usually still in the page cache) and once at resume.
    """
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def build_manifest(folder: str | Path, ctx=None) -> dict:
    """{"format", "checksum", "files": {name: {"size", "crc32"}}} of the files in ``folder``
    (collective when ``ctx`` spans several ranks: each rank checksums every world_size-th file)."""
    folder = Path(folder)
    names = _from_main(lambda: _manifest_names(folder), ctx)
    mine = {name: {"size": (folder / name).stat().st_size, "crc32": file_checksum(folder / name)}
            for name in _my_share(names, ctx)}
    files = {}
    for part in _gather(mine, ctx):
        files.update(part)
    return {"format": 1, "checksum": "crc32", "files": dict(sorted(files.items()))}


def _manifest_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and p.name not in (MARKER, MANIFEST) and not p.name.endswith(".part"))


def check_checkpoint(path: str | Path, ctx=None) -> Verdict:
    """Compare ``path``'s files with its manifest (sizes, then checksums); without a manifest, check
    DCP's record of shard sizes. Collective when ``ctx`` spans several ranks (each rank reads a share
    of the files; every rank gets the same verdict). Never raises for a damaged file: it reports it."""
    path = Path(path)
    manifest = _from_main(lambda: _read_manifest(path), ctx)
    if manifest is None:                                 # an older fasttips: structure only
        problems = _from_main(lambda: _structural_problems(path), ctx)
        return Verdict(path, problems, verified=False)
    if isinstance(manifest, str):                        # the manifest itself is damaged
        return Verdict(path, [manifest])
    names = sorted(manifest)
    mine = [p for name in _my_share(names, ctx) if (p := _file_problem(path / name, manifest[name]))]
    if _is_main(ctx):
        mine += _meta_problems(path)
    problems = [p for part in _gather(mine, ctx) for p in part]
    return Verdict(path, problems)


def _read_manifest(path: Path):
    """The manifest's file table, None when there is none, or a problem string when it is damaged."""
    file = path / MANIFEST
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_text())
        files = data["files"]
        if not all(isinstance(v.get("size"), int) and isinstance(v.get("crc32"), str) for v in files.values()):
            raise ValueError("an entry lacks size or crc32")
        return files
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{MANIFEST}: unreadable ({type(exc).__name__}: {exc})"


def _file_problem(file: Path, record: dict) -> str | None:
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        return f"{file.name}: missing"
    if size != record["size"]:
        how = "truncated" if size < record["size"] else "grown"
        return f"{file.name}: {size} bytes, {record['size']} recorded ({how})"
    try:
        crc = file_checksum(file)
    except OSError as exc:
        return f"{file.name}: unreadable ({exc.strerror or exc})"
    if crc != record["crc32"]:
        return f"{file.name}: contents differ from the recorded checksum (corrupted)"
    return None


def _meta_problems(path: Path) -> list[str]:
    try:
        read_meta(path)
    except DamagedCheckpoint as exc:
        return [_in_folder(exc, path)]
    return []


def _in_folder(exc: Exception, folder: Path) -> str:
    """An error message naming a file of ``folder`` by its bare name (the folder is said once)."""
    return str(exc).replace(f"{folder}{os.sep}", "", 1)


def _structural_problems(path: Path) -> list[str]:
    """A checkpoint without manifest: .metadata readable, every shard at least as long as DCP's own
    record of where its tensors end, meta.json readable, rank files loadable."""
    problems = _meta_problems(path)
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except FileNotFoundError:
        return problems + [".metadata: missing"]
    except Exception as exc:                       # DCP raises what unpickling a damaged file raises
        return problems + [f".metadata: unreadable ({type(exc).__name__}: {exc})"]
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if name is not None:
            need[name] = max(need.get(name, 0), int(info.offset) + int(info.length))
    for name, end in sorted(need.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{name}: missing")
        elif file.stat().st_size < end:
            problems.append(f"{name}: {file.stat().st_size} bytes, but DCP's metadata places data up to "
                            f"byte {end} (truncated)")
    for rank_file in sorted(path.glob("rank_*.pt")):
        try:
            load_rank_state(rank_file)
        except DamagedCheckpoint as exc:
            problems.append(_in_folder(exc, path))
    return problems


def newest_intact(ckpt_root: str | Path, ctx=None, on_damaged=None) -> tuple[int, Path, Verdict] | None:
    """(step, folder, verdict) of the newest complete checkpoint that passes :func:`check_checkpoint`;
    ``on_damaged(path, verdict)`` is called for each newer one that does not. None when there is no
    complete checkpoint; DamagedCheckpoint when every complete checkpoint is damaged."""
    found = complete_checkpoints(ckpt_root)
    damaged = []
    for step, path in reversed(found):
        verdict = check_checkpoint(path, ctx)
        if not verdict.problems:
            return step, path, verdict
        damaged.append(f"{path.name} ({verdict.describe(1)})")
        if on_damaged is not None:
            on_damaged(path, verdict)
    if damaged:
        raise DamagedCheckpoint(f"{ckpt_root}: every complete checkpoint is damaged: {', '.join(damaged)}")
    return None


def read_meta(path: str | Path) -> dict:
    """A checkpoint's meta.json; DamagedCheckpoint naming the file when it cannot be parsed. Missing
    fields (or a missing file) fall back: ``step`` to the folder name, ``world_size`` to None (per-rank
    state then restarts)."""
    file = Path(path) / META
    try:
        meta = json.loads(file.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON object was expected, found {type(meta).__name__}")
    except FileNotFoundError:      # a checkpoint with a manifest that lost it is caught by the manifest
        meta = {}
    except (OSError, ValueError) as exc:
        raise DamagedCheckpoint(f"{file}: unreadable ({exc})") from None
    match = _STEP_DIR.match(Path(path).name)
    if not isinstance(meta.get("step"), int) and match:
        meta["step"] = int(match.group(1))
    meta.setdefault("world_size", None)
    return meta


def _move_aside(path: Path) -> Path | None:
    target = path.with_name(DAMAGED_PREFIX + path.name)
    n = 1
    while target.exists():
        target = path.with_name(f"{DAMAGED_PREFIX}{path.name}.{n}")
        n += 1
    try:
        os.rename(path, target)
    except OSError:
        (path / MARKER).unlink(missing_ok=True)        # at least it no longer counts as complete
        return None
    _fsync_dir(path.parent)
    return target


def _stderr(message: str) -> None:
    print(f"fasttips: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Per-rank state in a weights_only-loadable form
# ----------------------------------------------------------------------------------------------
_NDARRAY = "__fasttips_ndarray__"
_PLAIN = (str, int, float, bool, type(None))


def to_plain_state(obj, where: str = "rank_state"):
    """``obj`` with numpy arrays turned into tagged uint8 tensors (exact bytes, dtype and shape) and
    numpy scalars into Python numbers: what ``torch.load(weights_only=True)`` accepts. Anything else
    that is not a tensor or a plain container is refused here, at save time, naming where it is."""
    if torch.is_tensor(obj) or isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"{where}: a numpy object array cannot be stored without pickling")
        raw = np.ascontiguousarray(obj)
        return {_NDARRAY: raw.dtype.str, "shape": list(raw.shape),
                "data": torch.from_numpy(raw.reshape(-1).view(np.uint8).copy())}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_plain_state(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"{where}: {type(obj).__name__} cannot be stored in per-rank checkpoint state "
                    "(tensors, numpy arrays, numbers, strings and dict/list/tuple only)")


def from_plain_state(obj):
    """Inverse of :func:`to_plain_state`."""
    if isinstance(obj, dict):
        if _NDARRAY in obj:
            raw = obj["data"].numpy().tobytes()
            return np.frombuffer(raw, dtype=np.dtype(obj[_NDARRAY])).reshape(obj["shape"]).copy()
        return {k: from_plain_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(from_plain_state(v) for v in obj)
    return obj


# numpy's array reconstruction: what rank files of older fasttips versions (pickled numpy RNG state)
# need beyond weights_only; plain arrays only (these globals cannot call anything else).
_LEGACY_NUMPY = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                 "numpy.ndarray", "numpy.dtype"}


def load_rank_state(file: str | Path) -> dict:
    """A ``rank_*.pt`` file through ``torch.load(weights_only=True)``; DamagedCheckpoint naming the
    file when it is damaged or asks for anything but tensors, plain containers and (older files)
    numpy arrays."""
    file = Path(file)
    try:
        return from_plain_state(torch.load(file, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError:
        pass                                            # maybe an older file with numpy arrays
    except Exception as exc:
        raise DamagedCheckpoint(f"{file}: unreadable ({type(exc).__name__}: {_first_line(exc)})") from None
    try:
        from torch.serialization import get_unsafe_globals_in_checkpoint
        wanted = set(get_unsafe_globals_in_checkpoint(str(file)))
    except Exception as exc:
        raise DamagedCheckpoint(f"{file}: unreadable ({type(exc).__name__}: {_first_line(exc)})") from None
    allowed = {name for name in wanted if name in _LEGACY_NUMPY or name.startswith("numpy.dtypes.")}
    if wanted - allowed:
        raise DamagedCheckpoint(f"{file}: asks to unpickle {', '.join(sorted(wanted - allowed))}, which "
                                "fasttips never writes there; refused (unpickling can run code)")
    # unpickling an array BUILDs its dtype, so the numeric dtype classes must be allowed too
    numeric = [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"]
    with torch.serialization.safe_globals([_resolve(name) for name in sorted(allowed)] + numeric):
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DamagedCheckpoint(f"{file}: unreadable ({type(exc).__name__}: {_first_line(exc)})") from None


def _resolve(name: str):
    import importlib
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------
# Collectives used by save/verify (no-ops on one process)
# ----------------------------------------------------------------------------------------------
def _several(ctx) -> bool:
    return (ctx is not None and ctx.world_size > 1 and dist.is_available() and dist.is_initialized())


def _is_main(ctx) -> bool:
    return ctx is None or ctx.rank == 0


def _my_share(names: list[str], ctx) -> list[str]:
    return names[ctx.rank::ctx.world_size] if _several(ctx) else names


def _from_main(compute, ctx):
    """``compute()`` on rank 0, its result on every rank (one answer, even if a shared file system
    shows the ranks slightly different views)."""
    if not _several(ctx):
        return compute()
    box = [compute() if ctx.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj, ctx) -> list:
    if not _several(ctx):
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


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


__all__ = ["CheckpointManager", "training_state", "restore_training_state", "complete_checkpoints",
           "latest_checkpoint", "newest_intact", "check_checkpoint", "build_manifest", "file_checksum",
           "read_meta", "load_rank_state", "to_plain_state", "from_plain_state", "Verdict",
           "DamagedCheckpoint", "step_dir_name", "MARKER", "MANIFEST"]
