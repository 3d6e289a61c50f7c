"""``fasttips train``: the command line of the training engine.

    python -m fasttips.train [--config FILE] [--resume RUN_DIR] [key=value ...]
    torchrun --nproc_per_node=N -m fasttips.train [...]
    python -m fasttips.train --dry-run [--world-size N] [key=value ...]     (the plan, no training)

With no arguments it trains the ``tiny`` preset on the embedded demo data on CPU. This module reads
the arguments and the config, joins the process group, hands the trainer its evaluator
(``eval.every``) and maps failures to exit codes; the loop is ``fasttips.trainer``, the step
``fasttips.training``.
"""
from __future__ import annotations

if __name__ == "__main__":
    # python -m fasttips.train (and torchrun): the imports below take seconds (torch). Catch a stop
    # signal from the first line on, so one there ends the run like one during start-up (exit 0, one
    # line), not silently by the default action (exit 143). train() installs the run's own handler.
    from fasttips.distributed.signals import StopRequest as _EarlyStop
    _EarlyStop(startup=True).install()

import argparse
import sys
from pathlib import Path

import torch

from fasttips import config as config_lib
from fasttips.config import ConfigError
from fasttips.distributed import fsdp
from fasttips.distributed.signals import StartupInterrupted, StopRequest
from fasttips.trainer import CONFIG_FILE, EXIT_CONFIG, EXIT_OK, EXIT_OOM, Faults, Trainer


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
                "loss_curve.png (one smoothed panel per loss term), tensorboard/ (when tensorboard is\n"
                "installed). Next: fasttips eval RUN_DIR.\n\n"
                "exit codes: 0 done or stopped by SIGTERM/SIGINT with a checkpoint; 2 bad config;\n"
                "3 too many consecutive non-finite losses; 4 CUDA out of memory; 5 remote data unavailable\n"
                "past data.outage_deadline_s (checkpointed first; --resume continues).\n\n"
                f"config fields (key=value; defaults before the preset, presets: {', '.join(config_lib.PRESETS)}):\n"
                + config_lib.describe()))
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. preset=vit-s train.steps=200 data.batch_size=64")
    parser.add_argument("--config", metavar="FILE", help="YAML file of config sections (see fields below)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last complete checkpoint, with its "
                             "saved config (key=value overrides still apply, e.g. train.steps=...)")
    parser.add_argument("--no-progress", action="store_true",
                        help="plain progress lines (one per 5%% of the steps) instead of a redrawn bar")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the device mesh, the batch per rank and the global batch, a memory "
                             "estimate per rank and the checkpoint plan, then exit without training "
                             "(the number of ranks: torchrun's WORLD_SIZE, or --world-size)")
    parser.add_argument("--world-size", metavar="N", type=int, default=None,
                        help="with --dry-run: plan for N ranks from one process (e.g. 64 for 8 nodes "
                             "of 8 GPUs; add train.device=cuda to plan a GPU run on a machine without one)")
    faults = parser.add_argument_group("fault injection (for crash tests; never needed for training)")
    faults.add_argument("--fault-nan-steps", metavar="S1,S2", type=_steps, default=frozenset(),
                        help="make the loss of these 0-based steps NaN (the step is skipped and counted)")
    faults.add_argument("--fault-pause-in-checkpoint", metavar="STEP", type=int, default=None,
                        help="stop inside the write of checkpoint STEP, after its shards and before its "
                             "completion marker, until killed (prints PAUSED_IN_CHECKPOINT step=STEP)")
    faults.add_argument("--fault-slow-checkpoint", metavar="SECONDS", type=float, default=0.0,
                        help="make every checkpoint write sleep SECONDS at the same place (prints "
                             "SLOW_CHECKPOINT step=STEP), so that a write stays in flight a while")
    faults.add_argument("--fault-pause-in-startup", metavar="SECONDS", type=float, default=0.0,
                        help="sleep SECONDS while the data starts up (prints a line first), so a test can "
                             "signal the process there")
    return parser


def _steps(text: str) -> frozenset[int]:
    try:
        return frozenset(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step numbers like 2,3, got {text!r}") from None


def resolve_config(args) -> tuple[config_lib.Config, Path, bool]:
    """(config, run_dir, resuming) from the parsed arguments."""
    check_machine = not getattr(args, "dry_run", False)     # a dry run may plan for another machine
    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / CONFIG_FILE
        if not saved.is_file():
            raise ConfigError(f"--resume: {run_dir} holds no {CONFIG_FILE}; is it a fasttips run directory?")
        if args.config:
            raise ConfigError("--resume uses the run's saved config; pass key=value overrides instead of --config")
        cfg = config_lib.load(saved, args.overrides, check_machine=check_machine)
        cfg.train.run_dir = str(run_dir)
        return cfg, run_dir, True
    cfg = config_lib.load(args.config, args.overrides, check_machine=check_machine)
    if cfg.train.init_from:      # the architecture comes from the weights and overrides the preset
        from fasttips.interop import resolve_init_config
        try:
            cfg, changes = resolve_init_config(cfg, cfg.train.init_from,
                                               explicit=config_lib.explicit_keys(args.config, args.overrides))
        except (ValueError, OSError) as exc:
            raise ConfigError(f"train.init_from: {exc}") from None
        config_lib.validate(cfg)
        for change in changes:
            print(f"train.init_from: {change}", flush=True)
    return cfg, Path(cfg.train.run_dir), False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.world_size is not None and not args.dry_run:
        parser.error("--world-size plans a run: use it with --dry-run (torchrun sets the ranks of a real run)")
    try:
        cfg, run_dir, resuming = resolve_config(args)
        if args.dry_run:
            return dry_run(cfg, run_dir if resuming else None, args.world_size)
        evaluate = evaluator(cfg)
    except ConfigError as exc:
        print(f"fasttips train: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return train(cfg, run_dir, resuming=resuming, progress=not args.no_progress, evaluate=evaluate,
                 faults=Faults(args.fault_nan_steps, args.fault_pause_in_checkpoint, args.fault_pause_in_startup,
                               args.fault_slow_checkpoint))


def dry_run(cfg: config_lib.Config, resume_dir: Path | None = None, world_size: int | None = None) -> int:
    """``--dry-run``: rank 0 prints the plan (``fasttips.plan``); nothing is trained or written. A bad
    layout raises the ConfigError a real start would, on every rank."""
    import os

    from fasttips.plan import describe_plan
    if world_size is not None and world_size < 1:
        raise ConfigError(f"--world-size: must be >= 1, got {world_size}")
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    text = describe_plan(cfg, world, resume=_resume_plan(resume_dir, world) if resume_dir else None)
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, flush=True)
    return EXIT_OK


def _resume_plan(run_dir: Path, world_size: int) -> str:
    """What --resume would start from (without verifying the files: that is the real start's job)."""
    from fasttips.distributed.checkpoint import latest_checkpoint, read_meta
    found = latest_checkpoint(run_dir / "checkpoints")
    if found is None:
        return f"no complete checkpoint in {run_dir}/checkpoints: the run would start at step 0"
    meta = read_meta(found[1])
    saved_world = meta.get("world_size")
    line = f"from {found[1]} (step {found[0]}, written by {saved_world} rank(s))"
    if saved_world not in (None, world_size):
        position = (meta.get("data") or {}).get("position")
        line += (f"; {world_size} rank(s) now: DCP reshards the tensors"
                 + (f", the data continue at global sample {position}" if position is not None else ""))
    return line


def evaluator(cfg):
    """Evaluation during training (``eval.every > 0``), or None. With ``eval.suites``, their names and
    dataset layouts are checked now (ConfigError), not at the first evaluation hours into the run."""
    if cfg.eval.every <= 0:
        return None
    from fasttips.eval.periodic import check_suites, maybe_evaluate
    check_suites(cfg)
    return lambda step, model, tokenizer: maybe_evaluate(step, model, tokenizer, cfg)


def train(cfg: config_lib.Config, run_dir: Path, *, resuming: bool = False, progress: bool = True,
          evaluate=None, faults: Faults = Faults()) -> int:
    """One training run (every rank calls it); returns the exit code."""
    # Installed before anything slow: a SIGTERM/SIGINT during start-up (process group, data, model)
    # ends the run at once with exit 0 (nothing to save); once the loop runs it means "checkpoint".
    stop = StopRequest(startup=True).install()
    ctx, trainer = None, None
    try:
        try:
            ctx = fsdp.init_distributed(cfg)
            trainer = Trainer(cfg, ctx, run_dir, resuming=resuming, progress=progress, evaluate=evaluate,
                              faults=faults, stop=stop)
            trainer.prepare_run_dir()
            if resuming:
                trainer.resume()
        except StartupInterrupted:               # the handler already said "stopped during start-up"
            return EXIT_OK
        except ConfigError as exc:
            print(f"fasttips train: config error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except (ValueError, OSError, ImportError) as exc:   # bad data path or URL, tokenizer mismatch, ...
            print(f"fasttips train: cannot start: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        try:
            return trainer.run()
        except torch.OutOfMemoryError:
            d = cfg.data
            print(f"fasttips train: CUDA out of memory at data.batch_size={d.batch_size} per GPU "
                  f"(global batch {trainer.global_batch}). Options: lower data.batch_size and raise "
                  f"optim.accum_steps to keep the global batch; train.activation_checkpointing=selective (or full); "
                  f"more GPUs (FSDP2 shards parameters, gradients and optimiser state); fewer or smaller "
                  f"crops (data.n_local, data.local_size, data.global_size); train.precision=bf16.",
                  file=sys.stderr)
            return EXIT_OOM
    finally:
        if trainer is not None:
            trainer.release_run_dir()
        if ctx is not None:
            fsdp.shutdown(ctx)
        stop.uninstall()


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy, so there is one fasttips.train.
    from fasttips.train import main as _main
    sys.exit(_main())
