"""One checkpoint's stall of the step loop: synchronous against asynchronous writes.

    python bench/bench_checkpoint.py [--quick] [--reps 3] [--dir DIR] [key=value ...]

The state is what ``fasttips train`` checkpoints (model, AdamW moments, teacher heads, loss state:
``Trainer._sharded_state``) of a model built from the config on this machine's device, on one
process, as training builds it (``init_distributed``: FSDP2 on a GPU). Default config: the ``vit-s``
widths with 4,096 prototypes, 6 vision and 2 text blocks, about half a GB on disk (``--quick``: the
``tiny`` preset). Each mode writes ``--reps`` checkpoints after one unmeasured warm-up write (the
asynchronous mode's first save allocates its host copy):

- ``ms`` (p20/p80): how long ``CheckpointManager.save`` keeps its caller, the step loop, waiting;
- ``write_ms``: from the call until the checkpoint is complete (manifest, marker, rename).

``sync`` (``train.async_checkpoint=false``, the baseline) stalls for the whole write; ``async``
stalls for the copy of the state into host memory (pinned on a GPU) and DCP's planning, and a thread
writes the files while the steps go on. Not measured here: how much that thread slows the steps it
overlaps (on a GPU it uses none of the device; on a small CPU it shares the cores with the step).
Checkpoints go to a temporary folder under ``--dir`` (default: the system's), removed afterwards.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from harness import Bench  # noqa: E402

BASELINE = "sync"
DEFAULT = ["preset=vit-s", "heads.prototypes=4096", "vision.depth=6", "text.depth=2"]
QUICK = ["preset=tiny"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def build(overrides: list[str]):
    """(cfg, ctx, training) with AdamW's moments allocated (one step of zero gradients)."""
    from fasttips import config
    from fasttips.distributed import fsdp
    from fasttips.training import build_training
    cfg = config.load(None, overrides)
    ctx = fsdp.init_distributed(cfg)
    training = build_training(cfg, ctx)
    for p in training.model.parameters():
        p.grad = torch.zeros_like(p)
    training.optimizer.step()
    training.optimizer.zero_grad(set_to_none=True)
    return cfg, ctx, training


def measure(ctx, training, asynchronous: bool, reps: int, folder: str) -> dict:
    from fasttips.distributed.checkpoint import CheckpointManager, latest_checkpoint, training_state
    root = tempfile.mkdtemp(prefix="fasttips-bench-ckpt-", dir=folder)
    try:
        manager = CheckpointManager(root, keep=1, ctx=ctx, asynchronous=asynchronous)
        stalls, writes = [], []
        for rep in range(reps + 1):
            state = training_state(training.model, training.optimizer, **training.stateful_modules())
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            t0 = time.perf_counter()
            manager.save(rep + 1, state, {"rng": torch.get_rng_state()}, {"config.yaml": b"bench: 1\n"}, {})
            t1 = time.perf_counter()
            manager.wait()
            t2 = time.perf_counter()
            if rep:                                   # the first write is the warm-up
                stalls.append((t1 - t0) * 1e3)
                writes.append((t2 - t0) * 1e3)
        size = sum(f.stat().st_size for f in latest_checkpoint(root)[1].iterdir())
        manager.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"timing": {"ms": _percentile(stalls, 0.5), "p20": _percentile(stalls, 0.2),
                       "p80": _percentile(stalls, 0.8), "n": reps},
            "write_ms": _percentile(writes, 0.5), "checkpoint_bytes": size}


def run(quick: bool = False, results_dir: str | None = None, reps: int | None = None,
        overrides: list[str] | None = None, folder: str | None = None) -> Bench:
    overrides = list(overrides if overrides is not None else (QUICK if quick else DEFAULT))
    reps = reps or (2 if quick else 3)
    cfg, ctx, training = build(overrides)
    bench = Bench("checkpoint", quick=quick, device=ctx.device, results_dir=results_dir,
                  measure_device_ceilings=False)
    n_params = sum(p.numel() for p in training.model.parameters())
    case = {"overrides": overrides, "params_m": round(n_params / 1e6, 2), "world_size": ctx.world_size,
            "sharded": ctx.sharded}
    try:
        for impl, asynchronous in (("sync", False), ("async", True)):
            result = measure(ctx, training, asynchronous, reps, folder)
            row = bench.add(case=case, impl=impl, timing=result["timing"], write_ms=result["write_ms"],
                            checkpoint_bytes=result["checkpoint_bytes"])
            print(f"{impl:>5}: stall {row['ms']:.0f} ms (p20 {row['p20']:.0f}, p80 {row['p80']:.0f}), complete "
                  f"after {row['write_ms']:.0f} ms, {row['checkpoint_bytes'] / 1e6:.0f} MB", flush=True)
    finally:
        from fasttips.distributed import fsdp
        fsdp.shutdown(ctx)
    return bench


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"the model's config (default: {' '.join(DEFAULT)})")
    parser.add_argument("--quick", action="store_true", help=f"{' '.join(QUICK)}, 2 writes per mode")
    parser.add_argument("--reps", type=int, default=None, help="measured writes per mode (default 3)")
    parser.add_argument("--dir", default=None, help="folder for the temporary checkpoints")
    parser.add_argument("--no-write", action="store_true", help="print, but write no JSON row")
    args = parser.parse_args(argv)
    bench = run(args.quick, reps=args.reps, overrides=args.overrides or None, folder=args.dir)
    bench.report(baseline=BASELINE)
    if not args.no_write:
        print(f"wrote {bench.write()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
