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
and :func:`check_checkpoint` (eval, import, ``train.init_from``) verify them before anything is read,
and a damaged checkpoint is passed over for the newest intact one with a warning naming the file.
``meta.json`` and ``COMPLETE`` record that a manifest was written, so a checkpoint that lost its
manifest is damaged, not mistaken for one of an older fasttips (which wrote none: those still load,
after a structural check against DCP's own record of its shard sizes, with a note). A ``step_*``
folder without ``COMPLETE`` (a deleted marker) is passed over with a warning too.

Nothing in a checkpoint is unpickled as code, so a run taken from someone else is data. Per-rank
state (``rank_*.pt``: RNG streams, data position) is stored as tensors and plain containers (numpy
arrays become tagged byte tensors) and loads with ``torch.load(weights_only=True)``. DCP's
``.metadata`` is a pickle of DCP's own records: :class:`SafeReader` reads it with an unpickler that
admits only those classes (``fasttips.safe_io.load_restricted_pickle``), and :class:`SafeLoadPlanner`
reads DCP's non-tensor items (optimiser hyper-parameters) with ``weights_only=True`` where DCP itself
would unpickle anything. A refused file is damage: passed over on resume, one line in eval.

Asynchronous writes (``CheckpointManager(asynchronous=True)``, ``train.async_checkpoint``): ``save``
copies the sharded state into host memory (pinned on a GPU), hands the write to DCP's ``async_save``
and returns; a writer thread then writes the per-rank files, agrees with the other ranks that every
write succeeded, builds the manifest, and only then writes ``COMPLETE`` and renames the folder. The
protocol is the synchronous one, so a crash during an asynchronous write also leaves the previous
checkpoint as the newest complete one. At most one write is in flight: the next ``save`` (and
:meth:`CheckpointManager.wait`) waits for it. The writer's collectives run on a gloo process group of
their own, so they never interleave with the training collectives of the step loop.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import re
import shutil
import sys
import time
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from fasttips.safe_io import UnreadableFileError, load_restricted_pickle, unsafe_globals, write_atomic

MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
META = "meta.json"
DCP_METADATA = ".metadata"
DAMAGED_PREFIX = "damaged-"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_PREFIX = ".tmp-"
_CHUNK = 8 << 20

# DCP warns on every save and load without a process group; a single-process run is intended, not an
# accident. A filter for the whole process, since the asynchronous writer saves from its own thread
# (catch_warnings is not thread-safe), and one around the calls of the main thread for the tests
# (pytest replaces the process's filters around each test).
_NO_GROUP_WARNING = "torch.distributed is disabled"
warnings.filterwarnings("ignore", message=_NO_GROUP_WARNING)


def _stager_spent(stager) -> bool:
    """True for a ``DefaultStager`` that closed itself after staging once: torch 2.11's does (its deep-copy
    table is cleared, and a second checkpoint fails with ``KeyError: <class 'type'>``), later versions
    keep it for reuse. A spent stager is replaced by a new one (its pinned buffers are then not reused)."""
    table = getattr(getattr(stager, "_state_dict_stager", None), "_deepcopy_dispatch", None)
    return isinstance(table, dict) and not table


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


class CheckpointWriteError(RuntimeError):
    """A checkpoint write failed on some rank; nothing was committed (the previous checkpoint stands)."""


class CheckpointManager:
    """Atomic DCP save/load under ``ckpt_root``, keeping the last ``keep`` complete checkpoints.
    ``asynchronous``: writes continue in the background (see the module docstring); creating such a
    manager is collective (every rank creates the writer's process group)."""

    def __init__(self, ckpt_root: str | Path, keep: int, ctx, asynchronous: bool = False):
        if keep < 1:
            raise ValueError(f"train.keep_ckpts: must be >= 1, got {keep}")
        self.root = Path(ckpt_root)
        self.keep = keep
        self.ctx = ctx
        self.asynchronous = asynchronous
        self._verified: set[Path] = set()     # checked by latest_intact: load need not read them again
        self._group = None                    # the process group of the commit protocol (None: default)
        self._stager = None                   # async: the host copy of the state, reused from save to save
        self._writer: ThreadPoolExecutor | None = None
        self._in_flight: tuple[Path, Future] | None = None
        if asynchronous:
            problem = async_checkpoint_problem()
            if problem:
                raise ValueError(f"asynchronous checkpoints: {problem}")
            self._group = _writer_group()

    # -- save -----------------------------------------------------------------------------------
    def save(self, step: int, sharded_state: dict, rank_state: dict, files: dict[str, bytes],
             meta: dict, before_commit=None, wait: bool = False) -> Path:
        """Write checkpoint ``step``: ``sharded_state`` through DCP (collective), ``rank_state`` per
        rank with torch.save (as tensors and plain containers, see :func:`to_plain_state`), ``files``
        (name → bytes) and ``meta`` by rank 0; then the manifest, the marker and the rename.

        Synchronous: returns once the checkpoint is complete. Asynchronous: returns once the state is
        copied to host memory while the write goes on in the background (``wait=True``: once it is
        complete); a write still in flight is waited for first. ``before_commit(step)``, if given,
        runs once every file but the manifest and the marker is written (fault injection: a crash test
        pauses there; in the writer thread when asynchronous)."""
        self.wait()                       # one write in flight at most; its host copy is reused below
        ctx = self.ctx
        final = self.root / step_dir_name(step)
        tmp = self.root / f"{_TMP_PREFIX}{step_dir_name(step)}"
        if (final / MARKER).is_file():
            return final                               # this exact state is already on disk
        rank_bytes = _torch_bytes(to_plain_state(rank_state))   # refuses non-plain state before any write
        if ctx.is_main:
            meta = {**meta, "step": step, "world_size": ctx.world_size, "time": time.time(), "manifest": MANIFEST}
            files = {**files, META: json.dumps(meta, indent=2).encode()}
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)     # a write that died earlier
            tmp.mkdir(parents=True)
        else:
            files = {}
        ctx.barrier()

        def commit(write_error: str | None = None) -> None:
            self._commit(step, tmp, final, rank_bytes, files, before_commit, write_error)

        if not self.asynchronous:
            with _one_process_is_fine():
                dcp.save(sharded_state, checkpoint_id=str(tmp))
            commit()
            return final
        with _one_process_is_fine():
            started = dcp.async_save(sharded_state, storage_writer=dcp.FileSystemWriter(str(tmp)),
                                     process_group=self._group, async_stager=self._host_stager())
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fasttips-checkpoint")
        self._in_flight = (final, self._writer.submit(_after_dcp_write, started, commit))
        if wait:
            self.wait()
        return final

    def _commit(self, step: int, tmp: Path, final: Path, rank_bytes: bytes, files: dict[str, bytes],
                before_commit, write_error: str | None) -> None:
        """Everything after DCP's shards: the per-rank and rank-0 files, agreement that every rank
        wrote its part, the manifest, the marker, the rename (collective on the writer's group)."""
        ctx, group = self.ctx, self._group
        error = write_error
        if error is None:
            try:
                write_atomic(tmp / f"rank_{ctx.rank:05d}.pt", rank_bytes)
                for name, data in files.items():
                    write_atomic(tmp / name, data)
                if ctx.is_main:                        # readable by the reader every load uses
                    read_dcp_metadata(tmp / DCP_METADATA)
            except (OSError, DamagedCheckpoint) as exc:
                error = f"{type(exc).__name__}: {exc}"
        if before_commit is not None:
            before_commit(step)
        # every rank's shards are on disk, or some rank says why not (and then no rank commits)
        failures = [f"rank {rank}: {e}" for rank, e in enumerate(_gather(error, ctx, group)) if e]
        if failures:
            raise CheckpointWriteError(f"checkpoint {final.name} was not written (the previous one stands): "
                                       + "; ".join(failures[:3]))
        manifest = build_manifest(tmp, ctx, group)    # collective: each rank checksums a share
        if ctx.is_main:
            write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
            write_atomic(tmp / MARKER, f"{step}\n{MANIFEST}\n".encode())   # says a manifest exists
            _fsync_dir(tmp)
            if final.exists():                         # an unmarked leftover of the same step
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        _barrier(ctx, group)

    def _host_stager(self):
        """DCP's stager into host memory (pinned on a GPU), kept so that its buffers are reused (where
        the installed torch allows: ``_stager_spent``)."""
        if self._stager is None or _stager_spent(self._stager):
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
            self._stager = DefaultStager(StagingOptions(
                use_pinned_memory=self.ctx.device.type == "cuda", use_shared_memory=False,
                use_async_staging=False, use_non_blocking_copy=False))
        return self._stager

    @property
    def writing(self) -> Path | None:
        """The checkpoint folder a background write is producing right now (None: no write in flight)."""
        if self._in_flight is None or self._in_flight[1].done():
            return None
        return self._in_flight[0]

    def wait(self) -> Path | None:
        """Block until the write in flight, if any, is complete (re-raising its error); its folder."""
        if self._in_flight is None:
            return None
        path, future = self._in_flight
        self._in_flight = None
        future.result()
        return path

    def close(self) -> None:
        """Wait for the write in flight; release the writer thread and the host copy."""
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            if self._stager is not None:
                self._stager.close()
                self._stager = None

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
        every rank). Damaged ones, and newer step folders without the marker, are reported, renamed
        ``damaged-step_*`` (so that a later save of the same step writes a fresh one) and passed over;
        None when there is no complete checkpoint. Raises DamagedCheckpoint when there are complete
        checkpoints but every one is damaged."""
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
        _drop_unstepped_optimizer_state(sharded_state, saved_keys(path))
        load_dcp(sharded_state, path)
        rank_file = path / f"rank_{self.ctx.rank:05d}.pt"
        rank_state = None
        if rank_file.is_file() and meta.get("world_size") == self.ctx.world_size:
            rank_state = load_rank_state(rank_file)
        return rank_state, meta


def _after_dcp_write(started, commit) -> None:
    """The writer thread: wait for DCP's asynchronous write, then run the commit protocol (which is
    collective, so a failed DCP write is reported to it rather than raised: the ranks stay in step)."""
    try:
        getattr(started, "upload_completion", started).result()
        error = None
    except BaseException as exc:                 # DCP's CheckpointException is a BaseException
        error = f"DCP write: {_dcp_failure(exc)}"
    commit(error)


def async_checkpoint_problem() -> str | None:
    """Why asynchronous checkpoints cannot run in this process (None: they can). Supported: a single
    process without a process group (CPU or GPU), and process groups of the gloo or NCCL backend
    (the writer's own collectives then use a separate gloo group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    backend = str(dist.get_backend()).lower()
    kinds = {part.rpartition(":")[2] for part in backend.split(",")}     # e.g. "cpu:gloo,cuda:nccl"
    if not kinds <= {"gloo", "nccl"}:
        return f"the process group's backend is {backend!r}, and they support gloo and nccl"
    if not dist.is_gloo_available():
        return "they need the gloo backend for the writer's own process group, and this PyTorch has none"
    return None


def _writer_group():
    """A gloo group of every rank for the writer thread's collectives (None: no process group). The
    training collectives of the step loop run on the default group at the same time; one group used
    by two threads would interleave their collectives differently on different ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.new_group(backend="gloo")


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


def build_manifest(folder: str | Path, ctx=None, group=None) -> dict:
    """{"format", "checksum", "files": {name: {"size", "crc32"}}} of the files in ``folder``
    (collective on ``group`` when ``ctx`` spans several ranks: each rank checksums every
    world_size-th file)."""
    folder = Path(folder)
    names = _from_main(lambda: _manifest_names(folder), ctx, group)
    mine = {name: {"size": (folder / name).stat().st_size, "crc32": file_checksum(folder / name)}
            for name in _my_share(names, ctx)}
    files = {}
    for part in _gather(mine, ctx, group):
        files.update(part)
    return {"format": 1, "checksum": "crc32", "files": dict(sorted(files.items()))}


def _manifest_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and p.name not in (MARKER, MANIFEST) and not p.name.endswith(".part"))


def check_checkpoint(path: str | Path, ctx=None) -> Verdict:
    """Compare ``path``'s files with its manifest (sizes, then checksums) and check that what load
    will unpickle is admitted (``.metadata``, DCP's non-tensor items, the rank files); without a
    manifest (an older fasttips), check DCP's record of shard sizes instead. Collective when ``ctx``
    spans several ranks (each rank reads a share of the files; every rank gets the same verdict).
    Never raises for a damaged file: it reports it."""
    path = Path(path)
    manifest = _from_main(lambda: _read_manifest(path), ctx)
    if manifest is None:
        if _from_main(lambda: _manifest_expected(path), ctx):
            return Verdict(path, [f"{MANIFEST}: missing (its writer recorded one in {MARKER} or {META})"])
        problems = _from_main(lambda: _structural_problems(path), ctx)     # an older fasttips
        return Verdict(path, problems, verified=False)
    if isinstance(manifest, str):                        # the manifest itself is damaged
        return Verdict(path, [manifest])
    names = sorted(manifest)
    mine = [p for name in _my_share(names, ctx)
            if (p := _file_problem(path / name, manifest[name]) or _content_problem(path, name))]
    if _is_main(ctx):
        mine += _meta_problems(path)
    problems = [p for part in _gather(mine, ctx) for p in part]
    return Verdict(path, problems)


def _manifest_expected(path: Path) -> bool:
    """Whether the checkpoint's writer recorded that it wrote a manifest (in the marker or meta.json;
    fasttips versions before that wrote none)."""
    try:
        if MANIFEST in (path / MARKER).read_text(errors="replace").split():
            return True
    except OSError:
        pass
    try:
        return read_meta(path).get("manifest") == MANIFEST
    except DamagedCheckpoint:
        return False


def _content_problem(path: Path, name: str) -> str | None:
    """What a load would refuse in file ``name`` (checked beyond its checksum: a file swapped by
    someone who also rewrote the manifest is refused here, before anything is loaded)."""
    try:
        if name == DCP_METADATA:
            check_dcp_items(path, read_dcp_metadata(path / name))
        elif _RANK_FILE.match(name):
            load_rank_state(path / name)
    except DamagedCheckpoint as exc:
        return _in_folder(exc, path)
    return None


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
    record of where its tensors end, meta.json readable, rank files and DCP's non-tensor items
    loadable."""
    problems = _meta_problems(path)
    try:
        metadata = read_dcp_metadata(path / DCP_METADATA)
    except FileNotFoundError:
        return problems + [f"{DCP_METADATA}: missing"]
    except DamagedCheckpoint as exc:
        return problems + [_in_folder(exc, path)]
    need: dict[str, int] = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), int(info.offset) + int(info.length))
    for name, end in sorted(need.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{name}: missing")
        elif file.stat().st_size < end:
            problems.append(f"{name}: {file.stat().st_size} bytes, but DCP's metadata places data up to "
                            f"byte {end} (truncated)")
    if not problems:
        problems += [p for p in (_content_problem(path, f.name) for f in sorted(path.glob("rank_*.pt"))) if p]
        try:
            check_dcp_items(path, metadata)
        except DamagedCheckpoint as exc:
            problems.append(_in_folder(exc, path))
    return problems


def unmarked_checkpoints(ckpt_root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``step_*`` folder without the marker, oldest first. A write in progress
    or one that died is a ``.tmp-`` folder, so these lost their marker afterwards (or a person made
    them): never loaded, always reported."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), child) for child in root.iterdir()
                  if (m := _STEP_DIR.match(child.name)) and child.is_dir() and not (child / MARKER).is_file())


def newest_intact(ckpt_root: str | Path, ctx=None, on_damaged=None) -> tuple[int, Path, Verdict] | None:
    """(step, folder, verdict) of the newest complete checkpoint that passes :func:`check_checkpoint`;
    ``on_damaged(path, verdict)`` is called for each newer one that does not, and for each newer
    ``step_*`` folder without the marker. None when there is no complete checkpoint;
    DamagedCheckpoint when every complete checkpoint is damaged."""
    unmarked = _from_main(lambda: unmarked_checkpoints(ckpt_root), ctx)
    found = _from_main(lambda: complete_checkpoints(ckpt_root), ctx)
    damaged = []
    for step, path in reversed(sorted(found + unmarked)):
        if (step, path) in unmarked:
            if on_damaged is not None:
                on_damaged(path, Verdict(path, [f"no {MARKER} marker (deleted after the write, or never "
                                                f"written by fasttips); not loaded"]))
            continue
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
    wanted = set(unsafe_globals(file))      # empty when it cannot tell: the load below then fails
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
# DCP's files without running code: .metadata and the non-tensor items are pickles
# ----------------------------------------------------------------------------------------------
_DCP_METADATA_CLASSES = ("Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "TensorProperties",
                         "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
_RANK_FILE = re.compile(r"^rank_\d{5}\.pt$")


def _dcp_metadata_globals() -> dict[str, object]:
    """Every global DCP's own ``.metadata`` names: its record classes, torch.Size, the dtype, layout
    and memory-format values, and the pathlib class of the checkpoint id. Called with any arguments,
    each only builds a record or looks a value up by name."""
    from torch.distributed.checkpoint import filesystem, metadata
    allowed = {f"{metadata.__name__}.{name}": getattr(metadata, name)
               for name in _DCP_METADATA_CLASSES if hasattr(metadata, name)}
    allowed[f"{filesystem.__name__}._StorageInfo"] = filesystem._StorageInfo
    allowed["torch.Size"] = torch.Size
    allowed["torch.serialization._get_layout"] = torch.serialization._get_layout
    allowed.update({f"torch.{name}": value for name, value in vars(torch).items()
                    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format))})
    allowed.update({f"pathlib.{name}": getattr(pathlib, name)
                    for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")})
    return allowed


def read_dcp_metadata(file: str | Path) -> Metadata:
    """A DCP ``.metadata`` file through an unpickler that admits only DCP's own record classes; its
    shard names must be files of the checkpoint folder. DamagedCheckpoint naming the file when it
    is damaged or asks for anything else (``FileNotFoundError`` when it is missing)."""
    file = Path(file)
    try:
        metadata = load_restricted_pickle(file, _dcp_metadata_globals(), "a DCP checkpoint's metadata")
    except UnreadableFileError as exc:          # refused (UnsafeFileError) or garbled
        raise DamagedCheckpoint(str(exc)) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) \
            or not isinstance(metadata.storage_data, dict):
        raise DamagedCheckpoint(f"{file}: not DCP checkpoint metadata (it holds a {type(metadata).__name__})")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise DamagedCheckpoint(f"{file}: names a shard {name!r} outside the checkpoint folder; refused")
    return metadata


def saved_keys(path: str | Path) -> set[str]:
    """The state-dict keys a checkpoint holds (from its ``.metadata``, read safely)."""
    return set(read_dcp_metadata(Path(path) / DCP_METADATA).state_dict_metadata)


def _load_item(stream, where: str):
    """One of DCP's non-tensor items (``torch.save`` bytes) with ``weights_only=True``."""
    try:
        return torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        stream.seek(0)
        wanted = unsafe_globals(stream)
        what = ", ".join(wanted) if wanted else "Python objects beyond tensors and plain containers"
        raise DamagedCheckpoint(f"{where}: asks to unpickle {what}, which fasttips never writes there; "
                                "refused (unpickling can run code)") from None
    except Exception as exc:
        raise DamagedCheckpoint(f"{where}: unreadable ({type(exc).__name__}: {_first_line(exc)})") from None


def check_dcp_items(path: str | Path, metadata: Metadata) -> None:
    """Load every non-tensor item of the checkpoint (optimiser hyper-parameters: a few bytes each) as a
    DCP load would, so that one it refuses is found before anything is loaded. DamagedCheckpoint."""
    path = Path(path)
    kinds = metadata.state_dict_metadata
    by_file: dict[str, list] = {}
    for index, info in metadata.storage_data.items():
        if isinstance(kinds.get(index.fqn), BytesStorageMetadata) and not info.transform_descriptors:
            by_file.setdefault(info.relative_path, []).append((index.fqn, info))
    for name, items in sorted(by_file.items()):
        try:
            with open(path / name, "rb") as f:
                for fqn, info in items:
                    f.seek(info.offset)
                    _load_item(io.BytesIO(f.read(info.length)), f"{path / name} (item {fqn})")
        except OSError as exc:
            raise DamagedCheckpoint(f"{path / name}: unreadable ({exc.strerror or exc})") from None


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, with ``.metadata`` read by :func:`read_dcp_metadata` instead of ``pickle``."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_dcp_metadata(Path(str(self.path)) / DCP_METADATA)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, with the non-tensor items loaded ``weights_only`` (DCP unpickles them in
    full). Tensors are read by DCP itself, already ``weights_only``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element
        fqn = read_item.dest_index.fqn
        obj = _load_item(value, f"item {fqn}")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def load_dcp(state: dict, path: str | Path) -> None:
    """``dcp.load(state)`` from the checkpoint folder ``path`` through :class:`SafeReader` and
    :class:`SafeLoadPlanner` (no process group needed: shards are reassembled for any world size).
    DamagedCheckpoint, one line naming the folder, when DCP cannot (or may not) read it."""
    try:
        with _one_process_is_fine():
            dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())
    except CheckpointException as exc:
        raise DamagedCheckpoint(f"{path}: {_dcp_failure(exc)}") from None


def _dcp_failure(exc: BaseException) -> str:
    """One line for DCP's exception (a CheckpointException carries each rank's own one)."""
    failures = getattr(exc, "failures", None)
    if failures:
        rank, (inner, _trace) = next(iter(sorted(failures.items(), key=lambda kv: kv[0])))
        text = str(inner) if isinstance(inner, DamagedCheckpoint) else f"{type(inner).__name__}: {_first_line(inner)}"
        return f"{text} (rank {rank})" if len(failures) > 1 or rank else text
    return f"{type(exc).__name__}: {_first_line(exc)}"


# ----------------------------------------------------------------------------------------------
# Collectives used by save/verify (no-ops on one process)
# ----------------------------------------------------------------------------------------------
def _several(ctx) -> bool:
    return (ctx is not None and ctx.world_size > 1 and dist.is_available() and dist.is_initialized())


def _is_main(ctx) -> bool:
    return ctx is None or ctx.rank == 0


def _my_share(names: list[str], ctx) -> list[str]:
    return names[ctx.rank::ctx.world_size] if _several(ctx) else names


def _from_main(compute, ctx, group=None):
    """``compute()`` on rank 0, its result on every rank (one answer, even if a shared file system
    shows the ranks slightly different views). ``group``: the process group (None: the default)."""
    if not _several(ctx):
        return compute()
    box = [compute() if ctx.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _gather(obj, ctx, group=None) -> list:
    if not _several(ctx):
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def _barrier(ctx, group=None) -> None:
    if _several(ctx):
        dist.barrier(group=group)


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


@contextmanager
def _one_process_is_fine():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_GROUP_WARNING)
        yield


def _torch_bytes(obj) -> bytes:
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


__all__ = ["CheckpointManager", "training_state", "restore_training_state", "complete_checkpoints",
           "latest_checkpoint", "newest_intact", "unmarked_checkpoints", "check_checkpoint", "build_manifest",
           "file_checksum", "read_meta", "load_rank_state", "to_plain_state", "from_plain_state", "Verdict",
           "DamagedCheckpoint", "CheckpointWriteError", "step_dir_name", "read_dcp_metadata", "saved_keys",
           "check_dcp_items", "load_dcp", "SafeReader", "SafeLoadPlanner", "async_checkpoint_problem",
           "MARKER", "MANIFEST"]
