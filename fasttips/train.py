"""``fasttips train``: the training engine.

    python -m fasttips.train [--config FILE] [--resume RUN_DIR] [key=value ...]
    torchrun --nproc_per_node=N -m fasttips.train [...]

With no arguments it trains the ``tiny`` preset on the embedded demo data on CPU. One step:

    schedules(step) → lr / wd / momentum / teacher temperature for this step
    accum_steps × (batch → compute_losses → backward)     gradient sync only on the last micro-batch
    per-module clip → one all-reduce of {non-finite, stop requested} → AdamW → head EMA
    metrics → (checkpoint every train.ckpt_every, at the end, and when asked to stop)

Faults: SIGTERM/SIGINT finish the step, checkpoint and exit 0. A non-finite loss or gradient skips
the step (no optimiser, EMA or center update) and is counted; ``train.max_nonfinite`` consecutive
ones stop the run with a checkpoint of the last good state (exit 3). A CUDA OOM exits 4 with the
memory options. A bad config exits 2 with the field and what it allows.

Test hooks (environment, used by tests/test_train_faults.py): ``FASTTIPS_TEST_NAN_STEPS=2,3`` makes
the loss of those (0-based) steps NaN; ``FASTTIPS_TEST_PAUSE_IN_CHECKPOINT=4`` stops inside the
write of checkpoint 4, after the shards and before the completion marker, so a test can kill -9 there.
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fasttips import config as config_lib
from fasttips.config import ConfigError
from fasttips.data.batch import to_device
from fasttips.distributed import fsdp
from fasttips.distributed.checkpoint import (CheckpointManager, latest_checkpoint, restore_training_state,
                                             training_state)
from fasttips.distributed.signals import StopRequest
from fasttips.eval.periodic import maybe_evaluate
from fasttips.metrics import (MetricsWriter, ProgressBar, flop_model, head_params, mfu, peak_flops,
                              plot_loss_curve, text_mlp_hidden)
from fasttips.optim import (build_optimizer, clamp_logit_scale_, clip_gradients, clip_modules, is_prototype,
                            set_hyperparameters)

EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE, EXIT_OOM = 0, 2, 3, 4
CONFIG_FILE = "config.yaml"


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fasttips train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train a TIPSv2-style image-text model. With no arguments: the 'tiny' preset on the\n"
            "embedded demo data, on CPU, in a few minutes. Multi-GPU / multi-node:\n"
            "  torchrun --nproc_per_node=8 -m fasttips.train preset=vit-l data.source=shards data.path=...\n"
            "Settings come from the preset, then --config, then key=value overrides (later wins)."),
        epilog=("run directory (train.run_dir): config.yaml (resolved), metrics.jsonl (one line per step),\n"
                "checkpoints/step_NNNNNNNN/ (the last train.keep_ckpts; complete ones hold COMPLETE),\n"
                "loss_curve.png, tensorboard/ (when tensorboard is installed).\n\n"
                "exit codes: 0 done or stopped by SIGTERM/SIGINT with a checkpoint; 2 bad config;\n"
                "3 too many consecutive non-finite losses; 4 CUDA out of memory.\n\n"
                f"config fields (key=value; defaults before the preset, presets: {', '.join(config_lib.PRESETS)}):\n"
                + config_lib.describe()))
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. preset=vit-s train.steps=200 data.batch_size=64")
    parser.add_argument("--config", metavar="FILE", help="YAML file of config sections (see fields below)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last complete checkpoint, with its "
                             "saved config (key=value overrides still apply, e.g. train.steps=...)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still logged)")
    return parser


def resolve_config(args) -> tuple[config_lib.Config, Path, bool]:
    """(config, run_dir, resuming) from the parsed arguments."""
    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / CONFIG_FILE
        if not saved.is_file():
            raise ConfigError(f"--resume: {run_dir} holds no {CONFIG_FILE}; is it a fasttips run directory?")
        if args.config:
            raise ConfigError("--resume uses the run's saved config; pass key=value overrides instead of --config")
        cfg = config_lib.load(saved, args.overrides)
        cfg.train.run_dir = str(run_dir)
        return cfg, run_dir, True
    cfg = config_lib.load(args.config, args.overrides)
    return cfg, Path(cfg.train.run_dir), False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        cfg, run_dir, resuming = resolve_config(args)
    except ConfigError as exc:
        print(f"fasttips train: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return Trainer(cfg, run_dir, resuming, progress=not args.no_progress).run()


# ----------------------------------------------------------------------------------------------
# Pieces written elsewhere in the package, imported when a run starts
# ----------------------------------------------------------------------------------------------
def _components():
    from fasttips.models import build_model
    from fasttips.schedules import Schedules
    from fasttips.step import LossState, compute_losses
    from fasttips.teacher import Teacher
    return build_model, Teacher, LossState, compute_losses, Schedules


def build_data(cfg, rank: int, world_size: int):
    """This rank's loader (demo, shards or synthetic): iterable, with state_dict() (data position)."""
    from fasttips.data.loader import build_loader
    return build_loader(cfg, rank, world_size)


# ----------------------------------------------------------------------------------------------
# RNG state (per rank)
# ----------------------------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def estimate_params(cfg) -> int:
    """Rough parameter count from the config (decides meta-device initialisation)."""
    v = cfg.vision
    vision_block = 4 * v.width ** 2 + (3 if v.ffn == "swiglu" else 2) * v.width * v.mlp_hidden
    text_block = 4 * v.width ** 2 + 2 * v.width * text_mlp_hidden(cfg)
    heads = (1 if cfg.heads.shared else 2) * head_params(cfg)
    return v.depth * vision_block + cfg.text.depth * text_block + cfg.text.vocab_size * v.width + heads


META_INIT_PARAMS = 100_000_000


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------
@dataclass
class StepOutcome:
    loss: float
    terms: dict
    grad_norms: dict
    skipped: bool
    stop: bool
    seconds: float
    images: int


@dataclass
class Trainer:
    cfg: config_lib.Config
    run_dir: Path
    resuming: bool = False
    progress: bool = True

    # -- set-up -----------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.ctx = ctx = fsdp.init_distributed(cfg)
        self.say = (lambda *a: print(*a, flush=True)) if ctx.is_main else (lambda *a: None)
        build_model, Teacher, LossState, self.compute_losses, Schedules = _components()

        seed_everything(cfg.train.seed)          # same weights on every rank before sharding
        meta = ctx.sharded and estimate_params(cfg) > META_INIT_PARAMS
        model = build_model(cfg, device="meta" if meta else "cpu")
        teacher = Teacher(model, cfg)
        if not meta:                             # small models: whole on the device, then sharded
            model.to(ctx.device)
            teacher.to(ctx.device)
        self.teacher_modules = teacher.modules_to_shard()
        self.loss_forward = fsdp.parallelize(model, self.teacher_modules, ctx, cfg, self.compute_losses)
        self.gather_modules = [m for m in self.teacher_modules if fsdp.needs_gathering(m)]
        if meta:                                 # allocate the local shards, then initialise them
            model.to_empty(device=ctx.device)
            model.init_weights()
            for module in self.teacher_modules:
                module.to_empty(device=ctx.device)
            copy_into_teacher(teacher, model)    # teacher heads start as copies of the student's
        self.model, self.teacher = model, teacher
        self.loss_state = LossState(cfg, group=_world_group(ctx)).to(ctx.device)
        self.optimizer = build_optimizer(model, cfg, ctx.device)
        self.units = clip_modules(model)
        self.prototype_params = [p for n, p in model.named_parameters() if is_prototype(n)]
        # The lr rule scales with the images per optimiser step: processes × accumulated batches.
        self.schedules = Schedules(cfg, world_size=ctx.world_size * cfg.optim.accum_steps)
        seed_everything(cfg.train.seed + 1000 * ctx.rank)   # per-rank streams (masks, drop path)
        self.loader = build_data(cfg, ctx.rank, ctx.world_size)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_ckpts, ctx)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.global_batch = cfg.data.batch_size * cfg.optim.accum_steps * ctx.world_size
        self.flops = flop_model(cfg, cfg.data.batch_size * ctx.world_size)
        self.peak = peak_flops(ctx.device, ctx.param_dtype)
        self.loss_terms = set(getattr(sys.modules.get("fasttips.step"), "TERMS", ()))
        self.nan_steps = {int(s) for s in os.environ.get("FASTTIPS_TEST_NAN_STEPS", "").split(",") if s}

    def prepare_run_dir(self) -> None:
        # Every rank checks (before anyone writes), so every rank fails alike: no rank left waiting.
        if not self.resuming and latest_checkpoint(self.run_dir / "checkpoints"):
            raise ConfigError(f"train.run_dir: {self.run_dir} already holds a run; continue it with "
                              f"--resume {self.run_dir} or choose another train.run_dir=...")
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not self.resuming:
                config_lib.save(self.cfg, self.run_dir / CONFIG_FILE)
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        self.ctx.barrier()

    def resume(self) -> None:
        found = latest_checkpoint(self.run_dir / "checkpoints")
        if found is None:
            self.say(f"resume: no complete checkpoint in {self.run_dir}/checkpoints; starting at step 0")
            return
        step, path = found
        state = self.sharded_state()
        rank_state, meta = self.ckpt.load(path, state)
        self.load_sharded_state(state)
        self.step = meta["step"]
        self.nonfinite_total = meta.get("nonfinite_total", 0)
        if rank_state is not None:
            set_rng_state(rank_state["rng"], self.ctx.device)
            if rank_state.get("data") is not None and hasattr(self.loader, "load_state_dict"):
                self.loader.load_state_dict(rank_state["data"])
        else:
            self.say(f"resume: {path} was written by {meta.get('world_size')} ranks, now "
                     f"{self.ctx.world_size}; RNG streams and data positions restart")
        self._check_tokenizer(path)
        self.say(f"resume: from {path} (step {self.step})")
        _drop_metrics_after(self.run_dir / "metrics.jsonl", self.step, self.ctx.is_main)

    def _check_tokenizer(self, path: Path) -> None:
        """The text tower learned ids of the tokenizer saved with the checkpoint: insist on it."""
        saved, tokenizer = path / "tokenizer.model", getattr(self.loader, "tokenizer", None)
        if saved.is_file() and tokenizer is not None and hasattr(tokenizer, "serialized"):
            if tokenizer.serialized() != saved.read_bytes():
                raise ConfigError(f"--resume: the data's tokenizer differs from the one saved in {saved}; "
                                  f"resume with data.tokenizer={saved}")

    # -- checkpoint state ---------------------------------------------------------------------------
    def stateful_modules(self) -> dict:
        """Checkpointed modules besides the model and optimiser (schedules are a function of the step)."""
        modules = {"loss_state": self.loss_state}
        if isinstance(self.teacher, torch.nn.Module):
            modules["teacher"] = self.teacher
        return modules

    def sharded_state(self) -> dict:
        return training_state(self.model, self.optimizer, **self.stateful_modules())

    def load_sharded_state(self, state: dict) -> None:
        restore_training_state(state, self.model, self.optimizer, **self.stateful_modules())

    def save_checkpoint(self, reason: str = "") -> Path:
        rank_state = {"rng": rng_state(self.ctx.device),
                      "data": self.loader.state_dict() if hasattr(self.loader, "state_dict") else None}
        files = {CONFIG_FILE: _config_bytes(self.cfg)}
        tokenizer = getattr(self.loader, "tokenizer", None)
        if tokenizer is not None and hasattr(tokenizer, "serialized"):
            files["tokenizer.model"] = tokenizer.serialized()
        meta = {"nonfinite_total": self.nonfinite_total, "reason": reason,
                "global_batch": self.global_batch}
        return self.ckpt.save(self.step, self.sharded_state(), rank_state, files, meta)

    # -- one step -----------------------------------------------------------------------------------
    def train_step(self, batches, values, stop: StopRequest) -> StepOutcome:
        cfg, ctx, model = self.cfg, self.ctx, self.model
        t0 = time.perf_counter()
        freeze = values.freeze_prototypes
        set_hyperparameters(self.optimizer, values.lr, values.weight_decay, freeze)
        # Saved before begin_step so that a skipped step leaves the centers exactly as they were.
        centers = {k: v.clone() for k, v in self.loss_state.state_dict().items()}
        self.loss_state.begin_step()          # one center update per optimiser step, not per micro-batch
        accum = len(batches)
        loss_sum, term_sums, images = None, {}, 0
        # The teacher heads are gathered once for all micro-batches (one all-gather per step, not
        # per micro-batch) and sharded again before the EMA update.
        with fsdp.gathered(self.gather_modules):
            for i, batch in enumerate(batches):
                if ctx.sharded:
                    self.loss_forward.set_requires_gradient_sync(i == accum - 1)
                losses = self.loss_forward(self.teacher, self.loss_state, batch, values, cfg)
                loss = losses["loss"]
                if self.step in self.nan_steps:
                    loss = loss * float("nan")                      # fault injection (tests)
                (loss / accum).backward()
                loss_sum = loss.detach() / accum if loss_sum is None else loss_sum + loss.detach() / accum
                for k, v in losses.items():
                    if k != "loss" and torch.is_tensor(v) and v.numel() == 1:
                        v = v.detach().float().reshape(()).to(loss.device)
                        term_sums[k] = term_sums.get(k, 0) + v / accum
                images += batch["alt_ids"].shape[0]
        if freeze:        # DINOv2 drops the frozen prototypes' gradient: no Adam moments either
            for p in self.prototype_params:
                p.grad = None
        norms = clip_gradients(self.units, cfg.optim.clip_grad)

        # One sync: did any rank see a non-finite loss/gradient, or a stop signal?
        finite = torch.isfinite(loss_sum.float()) & torch.stack(
            [torch.isfinite(n) for n in norms.values()] or [torch.tensor(True, device=loss_sum.device)]).all()
        flags = torch.stack([(~finite).float(), torch.tensor(float(stop.requested), device=finite.device)])
        skipped, stop_now = (bool(x) for x in ctx.all_max(flags).tolist())
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            self.loss_state.load_state_dict(centers)             # the step never happened
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            clamp_logit_scale_(model, cfg.loss.max_logit_scale)   # OpenCLIP's cap, on the parameter
            self.teacher.update(model, values.momentum)
        seconds = time.perf_counter() - t0
        # One more sync for everything logged: the loss terms (mean over ranks) and the grad norms
        # (already global), read back together rather than one .item() per norm.
        scalars = self._mean_over_ranks(torch.stack([loss_sum.float().reshape(())] + list(term_sums.values())))
        host = torch.cat([scalars] + [n.reshape(1).to(scalars) for n in norms.values()]).tolist()
        n_scalars = scalars.numel()
        return StepOutcome(host[0], dict(zip(term_sums, host[1:n_scalars])),
                           dict(zip(norms, host[n_scalars:])), skipped, stop_now, seconds, images)

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        if self.ctx.world_size > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.ctx.world_size
        return values

    def next_batches(self, iterator):
        batches = []
        for _ in range(self.cfg.optim.accum_steps):
            try:
                batch = next(iterator[0])
            except StopIteration:                    # a finite loader: next epoch
                iterator[0] = iter(self.loader)
                batch = next(iterator[0])
            batches.append(to_device(batch, self.ctx.device))
        return batches

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> int:
        try:
            self.setup()
            self.prepare_run_dir()
            if self.resuming:
                self.resume()
        except ConfigError as exc:
            print(f"fasttips train: config error: {exc}", file=sys.stderr)
            fsdp.shutdown(getattr(self, "ctx", None))
            return EXIT_CONFIG
        except (ValueError, FileNotFoundError) as exc:   # bad data path, tokenizer/vocab mismatch, ...
            print(f"fasttips train: cannot start: {exc}", file=sys.stderr)
            fsdp.shutdown(getattr(self, "ctx", None))
            return EXIT_CONFIG
        try:
            return self._run()
        except torch.OutOfMemoryError:
            d = self.cfg.data
            print(f"fasttips train: CUDA out of memory at data.batch_size={d.batch_size} per GPU "
                  f"(global batch {self.global_batch}). Options: lower data.batch_size and raise "
                  f"optim.accum_steps to keep the global batch; train.activation_checkpointing=true; "
                  f"more GPUs (FSDP2 shards parameters, gradients and optimiser state); fewer or smaller "
                  f"crops (data.n_local, data.local_size, data.global_size); train.precision=bf16.",
                  file=sys.stderr)
            return EXIT_OOM
        finally:
            fsdp.shutdown(self.ctx)

    def _run(self) -> int:
        cfg, ctx = self.cfg, self.ctx
        total = cfg.train.steps
        self.say(f"fasttips train: run dir {self.run_dir}, preset {cfg.preset}, device {ctx.device} × "
                 f"{ctx.world_size}, {'FSDP2 ' if ctx.sharded else ''}{str(ctx.param_dtype).replace('torch.', '')}, "
                 f"global batch {self.global_batch}, steps {self.step}→{total}")
        self.say(f"model: {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M parameters; "
                 f"FLOPs: {self.flops.describe()}")
        self.say(f"data: {cfg.data.source} through the {getattr(self.loader, 'kind', 'synthetic')} loader, "
                 f"{cfg.data.batch_size} images per process")
        writer = MetricsWriter(self.run_dir, enabled=ctx.is_main)
        bar = ProgressBar(total, self.step, enabled=self.progress and ctx.is_main,
                          every=max(1, total // 20))
        iterator = [iter(self.loader)]
        code, message = EXIT_OK, None
        with StopRequest() as stop:
            while self.step < total:
                values = self.schedules(self.step)
                batches = self.next_batches(iterator)
                out = self.train_step(batches, values, stop)
                self.step += 1
                if out.skipped:
                    self.nonfinite_total += 1
                    self.nonfinite_run += 1
                else:
                    self.nonfinite_run = 0
                self.log_step(writer, bar, values, out)
                if out.skipped and self.nonfinite_run >= cfg.train.max_nonfinite:
                    path = self.save_checkpoint("non-finite")
                    code = EXIT_NONFINITE
                    message = (f"stopped: {self.nonfinite_run} consecutive non-finite losses (limit "
                               f"train.max_nonfinite={cfg.train.max_nonfinite}); the last good state is in {path}")
                    break
                if out.stop:
                    path = self.save_checkpoint(stop.signal_name or "signal")
                    message = (f"stopped by {stop.signal_name or 'a signal on another rank'} after step "
                               f"{self.step}; checkpoint {path}; continue with: fasttips train --resume {self.run_dir}")
                    break
                if self.step % cfg.train.ckpt_every == 0 or self.step == total:
                    self.save_checkpoint()
                # eval.every: every rank evaluates (sharded forwards); rank 0's writer logs it
                record = maybe_evaluate(self.step, self.model, getattr(self.loader, "tokenizer", None), cfg)
                if record:
                    writer.write(self.step, record)
        bar.close()
        writer.close()
        skipped = {k: v for k, v in dict(getattr(self.loader, "stats", {}) or {}).items() if v}
        if skipped:   # bad samples never stop a run, but they are always reported
            print(f"fasttips train: data samples skipped and counted on rank {ctx.rank}: "
                  + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())), flush=True)
        if ctx.is_main:
            png = plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png")
            if message:
                print(f"fasttips train: {message}", file=sys.stderr if code else sys.stdout, flush=True)
            else:
                print(f"fasttips train: done, {self.step} steps ({self.nonfinite_total} skipped as "
                      f"non-finite); run dir {self.run_dir}" + (f"; loss curve {png}" if png else ""), flush=True)
        return code

    def log_step(self, writer: MetricsWriter, bar: ProgressBar, values, out: StepOutcome) -> None:
        step = self.step                              # steps completed
        per_device = out.images / out.seconds if out.seconds > 0 else 0.0
        record = {"loss": out.loss, **{(f"loss/{k}" if k in self.loss_terms else k): v
                                       for k, v in out.terms.items()},
                  **{f"grad_norm/{k}": v for k, v in out.grad_norms.items()},
                  **{k: float(v) for k, v in asdict(values).items() if not isinstance(v, bool)},
                  "images_per_s": per_device * self.ctx.world_size, "step_time_s": out.seconds,
                  "peak_mem_gb": _peak_memory_gb(self.ctx.device),
                  "mfu": mfu(self.flops.per_image, per_device, self.peak),
                  "skipped": out.skipped, "nonfinite_total": self.nonfinite_total}
        if step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps or out.skipped:
            writer.write(step, record)
        terms = {k: v for k, v in out.terms.items() if k in self.loss_terms} or out.terms
        bar.update(step - 1, out.loss, terms, record["images_per_s"])


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def copy_into_teacher(teacher, model) -> None:
    """Teacher EMA tensors ← the student's, exactly (``to_empty`` memory may hold NaN, which a
    momentum-0 lerp would keep)."""
    for t, s in zip(*teacher.ema_tensors(model)):
        t.copy_(s)


def _world_group(ctx):
    import torch.distributed as dist
    return dist.group.WORLD if ctx.world_size > 1 else None


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20    # peak RSS (Linux: KiB)


def _config_bytes(cfg) -> bytes:
    import yaml
    return yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False).encode()


def _drop_metrics_after(path: Path, step: int, is_main: bool) -> None:
    """On resume, forget metrics logged after the checkpoint (those steps are run again)."""
    if not is_main or not path.is_file():
        return
    import json
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy, so there is one fasttips.train.
    from fasttips.train import main as _main
    sys.exit(_main())
