"""The training loop: data in, ``Training.train_step`` per step, metrics out, checkpoints, resume.

    trainer = Trainer(cfg, ctx, run_dir, resuming=False, evaluate=None, faults=Faults())
    code = trainer.run()                           # an exit code (EXIT_*)

``fasttips.train`` (the CLI) builds one and hands it its evaluator. Checkpoints are written in the
background (``train.async_checkpoint``) except the last one and a stop's, which are waited for.
Faults: SIGTERM/SIGINT finish the step, wait for a checkpoint write in flight, checkpoint and exit 0. A non-finite loss or gradient skips the step and is counted;
``train.max_nonfinite`` consecutive ones stop the run with a checkpoint of the last good state
(exit 3). A CUDA OOM exits 4 with the memory options (``fasttips.train``). Remote data that stays
unavailable past ``data.outage_deadline_s`` stops the run at a step that never happens: no rank
updates anything, the checkpoint holds the state (data position and RNG included) from before that
step, and the run exits 5; ``--resume`` continues with the samples not yet seen.
"""
from __future__ import annotations

import contextlib
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from fasttips import config as config_lib
from fasttips.config import ConfigError
from fasttips.data.batch import synthetic_batch, to_device
from fasttips.data.pipeline import mix_seed
from fasttips.data.storage import DataStop
from fasttips.distributed import fsdp
from fasttips.distributed.checkpoint import (CheckpointManager, async_checkpoint_problem, latest_checkpoint,
                                             restore_training_state, training_state)
from fasttips.distributed.signals import StopRequest
from fasttips.flops import flop_model, mfu, peak_flops
from fasttips.kernels import dispatch as kernel_dispatch
from fasttips.distributed.run_lock import RunLock
from fasttips.distributed.startup import startup_phase
from fasttips.runlog import MetricsWriter, ProgressBar, drop_metrics_after, plot_loss_curve
from fasttips.safe_io import write_atomic
from fasttips.schedules import Schedules, StepValues
from fasttips.step import TERMS
from fasttips.training import StepOutcome, build_training, seed_everything

EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE, EXIT_OOM, EXIT_DATA_OUTAGE = 0, 2, 3, 4, 5
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


class Tokenizer(Protocol):
    def serialized(self) -> bytes: ...


@runtime_checkable
class Loader(Protocol):
    """What the trainer needs of a data loader (``fasttips.data.loader.build_loader``'s three kinds)."""
    kind: str                       # "pytorch", "dali" or "synthetic" (for the start-up line)
    batch_size: int                 # images per batch on this rank
    tokenizer: Tokenizer | None     # saved with each checkpoint; None for synthetic data
    stats: dict[str, int]           # samples skipped so far, by reason

    def __iter__(self) -> Iterator[dict]: ...

    def __next__(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    # Optional, for a resume on another number of ranks: ``position_state()`` (a layout-free
    # position, saved in meta.json) and ``resume_at(position_state)``; without them the data restart.


# evaluate(step, model, tokenizer) → metrics to log at this step, or None (every rank calls it).
Evaluator = Callable[[int, torch.nn.Module, Tokenizer | None], dict | None]


@dataclass(frozen=True)
class Faults:
    """Fault injection, for the crash tests (``fasttips train --fault-...``); nothing by default.

    ``nan_steps``: the loss of these (0-based) steps is made NaN. ``pause_in_checkpoint``: the write
    of this step's checkpoint stops after its shards and before its completion marker (printing
    ``PAUSED_IN_CHECKPOINT step=N``) until the process is killed. ``pause_in_startup``: see
    :meth:`startup_pause`. ``slow_checkpoint``: every checkpoint write sleeps this many seconds at
    the same place (printing ``SLOW_CHECKPOINT step=N``): a write that stays in flight a while."""
    nan_steps: frozenset[int] = frozenset()
    pause_in_checkpoint: int | None = None
    pause_in_startup: float = 0.0
    slow_checkpoint: float = 0.0

    def startup_pause(self) -> None:
        """``pause_in_startup``: sleep that long while the data starts up, after saying so, so a test
        can signal the process there."""
        if self.pause_in_startup > 0:
            print("fasttips: test pause in data start-up", flush=True)
            time.sleep(self.pause_in_startup)

    def checkpoint_hook(self) -> Callable[[int], None] | None:
        if self.pause_in_checkpoint is None and self.slow_checkpoint <= 0:
            return None
        wanted, slow = self.pause_in_checkpoint, self.slow_checkpoint

        def pause(step: int) -> None:
            if slow > 0:
                print(f"SLOW_CHECKPOINT step={step}", flush=True)
                time.sleep(slow)
            if step == wanted:
                print(f"PAUSED_IN_CHECKPOINT step={step}", flush=True)
                while True:
                    time.sleep(1)
        return pause


class Trainer:
    """One training run in ``run_dir`` on the process group of ``ctx`` (see the module docstring)."""

    def __init__(self, cfg: config_lib.Config, ctx: fsdp.DistContext, run_dir: Path, *, resuming: bool = False,
                 progress: bool = True, evaluate: Evaluator | None = None, faults: Faults = Faults(),
                 stop: StopRequest | None = None):
        self.cfg, self.ctx, self.run_dir, self.resuming = cfg, ctx, Path(run_dir), resuming
        self.progress, self.evaluate, self.faults = progress, evaluate, faults
        # Every rank finds the same answer, so every rank stops alike (before any collective).
        problem = async_checkpoint_problem() if cfg.train.async_checkpoint else None
        if problem:
            raise ConfigError(f"train.async_checkpoint: {problem}; set train.async_checkpoint=false")
        # The caller's installed StopRequest (the command installs one before start-up, so a signal
        # there exits at once); without one, run() installs its own for the loop.
        self.stop = stop
        self.is_main = ctx.is_main
        # train.init_from: other weights are copied in once the model exists on the device, before the
        # teacher copies it and the optimiser is built; a resumed run has them in its checkpoint already.
        self.training = build_training(cfg, ctx, load_weights=self._warm_start if self._warm(cfg) else None)
        # The lr rule scales with the images per optimiser step: processes × accumulated batches.
        self.schedules = Schedules(cfg, world_size=ctx.world_size * cfg.optim.accum_steps)
        seed_everything(cfg.train.seed + 1000 * ctx.rank)   # per-rank streams (masks, drop path)
        self.loader: Loader = self._build_loader()
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_ckpts, ctx,
                                      asynchronous=cfg.train.async_checkpoint)
        self.run_lock: RunLock | None = None   # held by rank 0 from prepare_run_dir() to the end
        self.step = 0                      # optimiser steps completed
        self.nonfinite_total = 0           # skipped steps over the whole run
        self.nonfinite_run = 0             # consecutive skipped steps
        self.data_stop: DataStop | None = None   # why this rank's data stopped (next_batches), if it did
        self.batches_this_step = 0         # real batches the current step took from the loader
        self.global_batch = cfg.data.batch_size * cfg.optim.accum_steps * ctx.world_size
        self.flops = flop_model(cfg, cfg.data.batch_size * ctx.world_size)
        self.kernels_record: list[dict] | None = None   # the ops' implementations, for metrics.jsonl
        self.peak = peak_flops(ctx.device, ctx.param_dtype)

    def _warm(self, cfg) -> bool:
        return bool(cfg.train.init_from) and not (
            self.resuming and latest_checkpoint(self.run_dir / "checkpoints") is not None)

    def _warm_start(self, model: torch.nn.Module) -> None:
        from fasttips.interop import init_from
        self.say(init_from(model, self.cfg.train.init_from, self.cfg).summary())

    def say(self, *parts) -> None:
        if self.is_main:
            print(*parts, flush=True)

    def _build_loader(self) -> Loader:
        from fasttips.data.loader import build_loader, effective_source, startup_line
        cfg = self.cfg
        # Indexing the shards, and on a first run building the demo data and training a tokenizer,
        # takes tens of seconds: say so before the silence.
        source = self.data_source = effective_source(cfg.data)
        line = startup_line(cfg)
        if line:
            self.say(line)
        t0 = time.perf_counter()
        # A rank that cannot start (no usable sample, a bad path) stops every rank with its message
        # instead of leaving the others at the next collective.
        with startup_phase(self.ctx, "data"):
            self.faults.startup_pause()
            loader = build_loader(cfg, self.ctx.rank, self.ctx.world_size)
        if source != "synthetic":
            self.say(f"data: ready in {time.perf_counter() - t0:.1f} s")
            warning = batch_warning(loader.batch_size, loader.num_samples, self.ctx.rank)
            if warning:
                print(f"fasttips train: warning: {warning}", file=sys.stderr, flush=True)
        return loader

    # -- run directory and resume ---------------------------------------------------------------
    def prepare_run_dir(self) -> None:
        # Every rank checks (before anyone writes), so every rank fails alike: no rank left waiting.
        with startup_phase(self.ctx, "run dir"), _naming_run_dir(self.run_dir):
            if self.is_main:     # one run per run directory: a second one is refused while this one lives
                self.run_lock = RunLock.acquire(self.run_dir)
            if not self.resuming and latest_checkpoint(self.run_dir / "checkpoints"):
                raise ConfigError(f"train.run_dir: {self.run_dir} already holds a run; continue it with "
                                  f"--resume {self.run_dir} or choose another train.run_dir=...")
            if self.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                if not self.resuming:
                    config_lib.save(self.cfg, self.run_dir / CONFIG_FILE)
                    (self.run_dir / METRICS_FILE).unlink(missing_ok=True)
        self.ctx.barrier()

    def release_run_dir(self) -> None:
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def resume(self) -> None:
        """Continue from the newest complete checkpoint, or from step 0 when there is none; either way
        the metrics logged after that point are forgotten (those steps run again)."""
        found = self.ckpt.latest_intact()          # damaged newer ones are set aside, with a warning
        if found is None:
            self.say(f"resume: no intact checkpoint in {self.run_dir}/checkpoints; starting at step 0")
        else:
            self._load_checkpoint(found[1])
        if self.is_main:
            drop_metrics_after(self.run_dir / METRICS_FILE, self.step)

    def _load_checkpoint(self, path: Path) -> None:
        state = self._sharded_state()
        rank_state, meta = self.ckpt.load(path, state)
        restore_training_state(state, self.training.model, self.training.optimizer,
                               **self.training.stateful_modules())
        self.step = meta["step"]
        self.nonfinite_total = meta.get("nonfinite_total", 0)
        if rank_state is not None:
            set_rng_state(rank_state["rng"], self.ctx.device)
            if rank_state.get("data") is not None:
                self.loader.load_state_dict(rank_state["data"])
        else:
            self._resume_elsewhere(path, meta)
        saved_mesh = meta.get("mesh")
        if saved_mesh and saved_mesh[0] != self.ctx.replicas and self.ctx.sharded:
            self.say(f"resume: {path} was written as {fsdp.mesh_text(meta['world_size'], saved_mesh[0])}, now "
                     f"{self.ctx.describe_mesh()}; DCP reshards parameters, optimiser state and teacher")
        self._check_tokenizer(path)
        self.say(f"resume: from {path} (step {self.step})")

    def _resume_elsewhere(self, path: Path, meta: dict) -> None:
        """A checkpoint of another number of ranks (DCP has resharded the tensors): each rank's RNG
        streams start from (seed, step, rank), so the new layout is reproducible, and the data continue
        at the saved global position (no sample of the epoch repeated or skipped)."""
        seed_everything(mix_seed(self.cfg.train.seed, self.step, self.ctx.rank))
        data = meta.get("data")
        was = f"{path} was written by {meta.get('world_size')} ranks, now {self.ctx.world_size}"
        if data and hasattr(self.loader, "resume_at"):
            self.loader.resume_at(data)
            where = f"global sample {data['position']}" if "position" in data else f"batch {data['batches']}"
            self.say(f"resume: {was}; the data continue at {where}, RNG streams restart from "
                     f"(train.seed, step, rank)")
        else:
            why = (f"the {self.loader.kind} loader cannot move its position to another number of ranks"
                   if not hasattr(self.loader, "resume_at") else
                   "the checkpoint holds no global data position (an earlier fasttips, or its DALI loader)")
            self.say(f"resume: {was}; {why}, so the data positions restart (this epoch may repeat "
                     f"samples); RNG streams restart from (train.seed, step, rank)")
        if meta.get("global_batch") not in (None, self.global_batch):
            self.say(f"resume: the global batch changes from {meta['global_batch']} to {self.global_batch} "
                     f"images (the lr follows the new one, optim.lr's sqrt rule)")

    def _check_tokenizer(self, path: Path) -> None:
        """The text tower learned ids of the tokenizer saved with the checkpoint: insist on it."""
        saved, tokenizer = path / "tokenizer.model", self.loader.tokenizer
        if saved.is_file() and tokenizer is not None and tokenizer.serialized() != saved.read_bytes():
            raise ConfigError(f"--resume: the data's tokenizer differs from the one saved in {saved}; "
                              f"resume with data.tokenizer={saved}")

    # -- checkpoints ----------------------------------------------------------------------------
    def _sharded_state(self) -> dict:
        return training_state(self.training.model, self.training.optimizer, **self.training.stateful_modules())

    def save_checkpoint(self, reason: str = "", wait: bool = False) -> Path:
        """Checkpoint the state after ``self.step``; ``wait``: return only once it is complete (the
        last checkpoint of a run), else a write may go on in the background (train.async_checkpoint)."""
        rank_state = {"rng": rng_state(self.ctx.device), "data": self.loader.state_dict()}
        files = {CONFIG_FILE: _config_bytes(self.cfg)}
        if self.loader.tokenizer is not None:
            files["tokenizer.model"] = self.loader.tokenizer.serialized()
        meta = {"nonfinite_total": self.nonfinite_total, "reason": reason, "global_batch": self.global_batch,
                "mesh": [self.ctx.replicas, self.ctx.shard_size], "data": self._data_position()}
        if wait and self.ckpt.writing is not None:
            self.say(f"checkpoint: waiting for the write of {self.ckpt.writing.name} in flight")
        return self.ckpt.save(self.step, self._sharded_state(), rank_state, files, meta,
                              before_commit=self.faults.checkpoint_hook(), wait=wait)

    def _data_position(self) -> dict | None:
        """Where the data stand, for any layout of ranks (meta.json, written by rank 0; every rank has
        taken as many batches): the global index of the next sample, the batch counter, the epoch size.
        None for a loader without ``position_state`` (every loader of fasttips has one now)."""
        position_state = getattr(self.loader, "position_state", None)
        return position_state() if position_state is not None else None

    # -- the loop -------------------------------------------------------------------------------
    def next_batches(self, iterator: list[Iterator[dict]]) -> list[dict]:
        """``optim.accum_steps`` batches on the device (a finite loader starts its next epoch). When the
        data storage stays unavailable or refuses access (``DataStop``), ``data_stop`` says why and the rest are
        stand-ins, so this rank still meets the step's collectives; the step then updates nothing."""
        batches = []
        self.batches_this_step = 0
        for _ in range(self.cfg.optim.accum_steps):
            if self.data_stop is None:
                try:
                    try:
                        batch = next(iterator[0])
                    except StopIteration:
                        iterator[0] = iter(self.loader)
                        batch = next(iterator[0])
                    self.batches_this_step += 1
                except DataStop as exc:
                    self.data_stop = exc
                    print(f"fasttips train: rank {self.ctx.rank}: data: {exc}", file=sys.stderr, flush=True)
            if self.data_stop is not None:
                batch = self._stand_in_batch()
            batches.append(to_device(batch, self.ctx.device))
        return batches

    def _data_stop_reason(self) -> str:
        stop, deadline = self.data_stop, self.cfg.data.outage_deadline_s
        if stop is None:
            return "the data storage failed on another rank (its log says why)"
        if stop.kind == "denied":
            return f"the data storage refused access ({stop})"
        return f"the data storage stayed unavailable past data.outage_deadline_s={deadline:g} s ({stop})"

    def _data_stop_remedy(self) -> str:
        if self.data_stop is not None and self.data_stop.kind == "denied":
            return "once access is restored (e.g. renewed credentials)"
        return "once the storage answers"

    def _stand_in_batch(self) -> dict:
        """A batch of the right shapes for a step that will not update anything (next_batches)."""
        d, c = self.cfg.data, self.cfg
        return synthetic_batch(d.batch_size, d.global_size, d.local_size, d.n_global, d.n_local,
                               c.vision.patch_size, c.text.max_len, c.text.vocab_size,
                               mask_ratio=sum(d.mask_ratio) / 2, generator=torch.Generator().manual_seed(0))

    def _undo_step(self, torch_rng: dict) -> None:
        """Put back what a step that never happened (``StepOutcome.data_failed``) moved: the loader's
        position (by the batches it took; the loaders that read remote data keep only that counter)
        and the torch RNG its forward drew from, so the checkpoint resumes exactly before it."""
        state = self.loader.state_dict()
        if self.batches_this_step and "batches" in state:
            state["batches"] -= self.batches_this_step
            self.loader.load_state_dict(state)
        set_torch_rng_state(torch_rng, self.ctx.device)

    def model_origin(self) -> str:
        """The start-up line's model: the preset, or what train.init_from loaded (its architecture
        replaced the preset's)."""
        if not self.cfg.train.init_from:
            return f"preset {self.cfg.preset}"
        from fasttips.interop.warmstart import architecture
        return f"model from train.init_from={self.cfg.train.init_from} ({architecture(self.cfg)})"

    def run(self) -> int:
        """Train from ``self.step`` to ``train.steps``; returns the exit code."""
        cfg, ctx = self.cfg, self.ctx
        total = cfg.train.steps
        self.say(f"fasttips train: run dir {self.run_dir}, {self.model_origin()}, device {ctx.device} × "
                 f"{ctx.world_size}, {ctx.describe_mesh() + ', ' if ctx.sharded else ''}"
                 f"{str(ctx.param_dtype).replace('torch.', '')}, "
                 f"global batch {self.global_batch}, steps {self.step}→{total}")
        self.say(f"model: {sum(p.numel() for p in self.training.model.parameters()) / 1e6:.2f} M parameters; "
                 f"FLOPs: {self.flops.describe()}")
        self.say(f"data: {self.data_source} through the {self.loader.kind} loader, "
                 f"{cfg.data.batch_size} images per process")
        self.say(kernel_dispatch.describe(ctx.device.type))
        writer = MetricsWriter(self.run_dir, enabled=self.is_main, cfg=cfg)   # + W&B when train.wandb_project
        bar = ProgressBar(total, self.step, enabled=self.is_main, redraw=self.progress,
                          every=max(1, total // 20))
        iterator = [iter(self.loader)]
        code, message = EXIT_OK, None
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(self.ckpt.close)     # a write in flight ends before the run does, whatever happens
            stop = self.stop if self.stop is not None else cleanup.enter_context(StopRequest())
            stop.started()                   # from here a signal finishes the step and checkpoints
            while self.step < total:
                values = self.schedules(self.step)
                torch_rng = torch_rng_state(ctx.device)   # (cheap: put back if the step never happens)
                batches = self.next_batches(iterator)
                deciding = not self.training.kernels_decided
                out = self.training.train_step(batches, values, stop_requested=stop.requested,
                                               inject_nan=self.step in self.faults.nan_steps,
                                               data_failed=self.data_stop is not None)
                if out.data_failed:             # no rank updated anything: checkpoint the state before it
                    self._undo_step(torch_rng)
                    path = self.save_checkpoint("data outage")
                    code = EXIT_DATA_OUTAGE
                    message = (f"stopped before step {self.step + 1}: {self._data_stop_reason()}; no sample was "
                               f"skipped; checkpoint {path}; {self._data_stop_remedy()}, continue with: "
                               f"fasttips train --resume {self.run_dir}")
                    break
                if deciding and self.training.kernels_decided:
                    self._report_kernels()
                self.step += 1
                self.nonfinite_total += out.skipped
                self.nonfinite_run = self.nonfinite_run + 1 if out.skipped else 0
                self.log_step(writer, bar, values, out)
                if out.skipped and self.nonfinite_run >= cfg.train.max_nonfinite:
                    path = self.save_checkpoint("non-finite", wait=True)
                    code = EXIT_NONFINITE
                    message = (f"stopped: {self.nonfinite_run} consecutive non-finite losses (limit "
                               f"train.max_nonfinite={cfg.train.max_nonfinite}); the last good state is in {path}")
                    break
                if out.stop:
                    path = self.save_checkpoint(stop.signal_name or "signal", wait=True)
                    message = (f"stopped by {stop.signal_name or 'a signal on another rank'} after step "
                               f"{self.step}; checkpoint {path}; continue with: fasttips train --resume {self.run_dir}")
                    break
                if self.step % cfg.train.ckpt_every == 0 or self.step == total:
                    self.save_checkpoint(wait=self.step == total)
                if self.evaluate is not None:   # every rank evaluates (sharded forwards); rank 0 logs
                    record = self.evaluate(self.step, self.training.model, self.loader.tokenizer)
                    if record:
                        writer.write(self.step, record)
        bar.close()
        writer.close()
        self._report(code, message)
        return code

    def _report(self, code: int, message: str | None) -> None:
        skipped = {k: v for k, v in self.loader.stats.items() if v}
        if skipped:   # bad samples never stop a run, but they are always reported
            print(f"fasttips train: data samples skipped and counted on rank {self.ctx.rank}: "
                  + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())), flush=True)
        if not self.is_main:
            return
        png = plot_loss_curve(self.run_dir / METRICS_FILE, self.run_dir / "loss_curve.png")
        if message:
            print(f"fasttips train: {message}", file=sys.stderr if code else sys.stdout, flush=True)
            return
        latest = latest_checkpoint(self.run_dir / "checkpoints")
        outputs = [f"  metrics     {self.run_dir / METRICS_FILE} (one JSON line per logged step)"]
        if png:
            outputs.append(f"  loss curve  {png} (each term, smoothed)")
        if latest:
            outputs.append(f"  checkpoint  {latest[1]}")
        print(f"fasttips train: done, {self.step} steps ({self.nonfinite_total} skipped as non-finite); "
              f"run dir {self.run_dir}\n" + "\n".join(outputs) + "\n"
              f"next: fasttips eval {self.run_dir}   (zero-shot retrieval, classification, segmentation)",
              flush=True)

    def _report_kernels(self) -> None:
        """After the step that decided them: which implementation each op runs and why, on the terminal,
        in the next metrics row and as a comment block at the end of config.yaml."""
        self.kernels_record = kernel_dispatch.report_records()
        lines = kernel_dispatch.report_lines()
        self.say("\n".join(lines))
        if self.is_main:
            record_kernels_in_config(self.run_dir / CONFIG_FILE, lines)

    def log_step(self, writer: MetricsWriter, bar: ProgressBar, values: StepValues, out: StepOutcome) -> None:
        step = self.step                              # steps completed
        per_device = out.images / out.seconds if out.seconds > 0 else 0.0
        record = {"loss": out.loss, **{(f"loss/{k}" if k in TERMS else k): v for k, v in out.terms.items()},
                  **{f"grad_norm/{k}": v for k, v in out.grad_norms.items()},
                  **{k: float(v) for k, v in asdict(values).items() if not isinstance(v, bool)},
                  "images_per_s": per_device * self.ctx.world_size, "step_time_s": out.seconds,
                  "peak_mem_gb": _peak_memory_gb(self.ctx.device),
                  "mfu": mfu(self.flops.per_image, per_device, self.peak),
                  "hfu": mfu(self.flops.hardware_per_image, per_device, self.peak),   # + recomputation
                  "skipped": out.skipped, "nonfinite_total": self.nonfinite_total}
        if step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps or out.skipped:
            if self.kernels_record is not None:     # the first row written after the decisions
                record["kernels"], self.kernels_record = self.kernels_record, None
            writer.write(step, record)
        terms = {k: v for k, v in out.terms.items() if k in TERMS}
        bar.update(step - 1, out.loss, terms, record["images_per_s"])


@contextlib.contextmanager
def _naming_run_dir(run_dir: Path):
    """An OS error while creating the run directory (a file in its way, no permission, a full disk)
    becomes a config error naming train.run_dir: the config checked the path before the data start-up,
    but the disk may have changed since."""
    try:
        yield
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(run_dir) else ""
        raise ConfigError(f"train.run_dir: cannot create the run directory {run_dir}{where}: "
                          f"{exc.strerror or exc}; choose another path") from None


def batch_warning(batch_size: int, samples: int, rank: int) -> str | None:
    """What to say when one batch holds more images than this rank's share of the data."""
    if samples >= batch_size:
        return None
    return (f"data.batch_size={batch_size} is larger than the {samples} usable samples of rank {rank}: "
            f"every batch repeats samples (lower data.batch_size or add data)")


# ----------------------------------------------------------------------------------------------
# Per-rank RNG state (checkpointed so that a resumed run draws the same masks and drop paths)
# ----------------------------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def torch_rng_state(device: torch.device) -> dict:
    """The torch generators alone (what a training step draws from), cheap enough for every step."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_torch_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20    # peak RSS (Linux: KiB)


KERNELS_MARK = "# kernels: the implementation each op runs, decided at the first step (not read back):"


def record_kernels_in_config(path: Path, lines: list[str]) -> None:
    """Put ``lines`` as a comment block at the end of config.yaml (replacing an earlier block), so the
    resolved config says what ran; YAML ignores comments, so a resume reads the same config."""
    if not path.is_file():
        return
    text = path.read_text()
    text = text.split("\n" + KERNELS_MARK)[0].rstrip("\n") + "\n"
    block = "\n".join([KERNELS_MARK] + [f"#   {line.removeprefix('kernels: ')}" for line in lines])
    write_atomic(path, (text + "\n" + block + "\n").encode())


def _config_bytes(cfg) -> bytes:
    import yaml
    return yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False).encode()
