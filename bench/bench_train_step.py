"""The whole training step: images/s, MFU and peak memory, with and without the fasttips kernels.

    python bench/bench_train_step.py [--quick] [--preset vit-l] [--batch 128,96,64] [--kernels reference,auto]

One step is exactly what ``fasttips train`` runs (``Trainer.train_step``): the packed student pass
over the global, masked and local crops, the text tower, the CLIP, DINO and iBOT++ losses, backward,
per-module clipping, AdamW and the head EMA, on synthetic batches already on the device. On a GPU the
step runs under FSDP2 with the bf16 MixedPrecisionPolicy (one rank), as training does.

Implementations: ``torch-reference`` (FASTTIPS_KERNELS=reference: PyTorch attention, chunked
prototype cross-entropy, foreach EMA; the baseline) and ``fasttips`` (FASTTIPS_KERNELS=auto: the
Triton kernels on CUDA, the same references on CPU). ``--batch`` lists per-device batch sizes to try,
largest first; the first that fits is measured (a CUDA OOM moves to the next).
FLOPs come from the explicit model in ``fasttips.metrics.flop_model`` (matmul FLOPs, fwd + bwd);
MFU is against the device's nominal dense bf16 peak (``fasttips.metrics.PEAK_BF16_FLOPS``), and
``%peak`` in the table against the matmul ceiling the harness measured on this device.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from harness import Bench  # noqa: E402

BASELINE = "torch-reference"
IMPLS = {"reference": BASELINE, "auto": "fasttips"}
# (preset, per-device batch sizes to try, extra overrides) per device kind; quick runs shrink them.
CASES = {
    "cuda": [("vit-l", [256, 192, 128, 96, 64, 32], [])],
    "cpu": [("tiny", [16], []), ("vit-s", [4], ["data.n_local=2", "heads.prototypes=4096"])],
}
QUICK = {
    "cuda": [("vit-s", [64], [])],
    "cpu": [("tiny", [8], ["data.global_size=56", "data.local_size=28"])],
}


def build_trainer(preset: str, batch: int, overrides: list[str], run_dir: str):
    from fasttips import config as config_lib
    from fasttips.train import Trainer
    cfg = config_lib.load(None, [f"preset={preset}", "data.source=synthetic", f"data.batch_size={batch}",
                                 "train.steps=1000", f"train.run_dir={run_dir}", *overrides])
    trainer = Trainer(cfg, Path(run_dir), progress=False)
    trainer.setup()
    return trainer


def measure(bench: Bench, preset: str, batch: int, overrides: list[str], kernels: str) -> dict:
    """Time one (preset, batch, kernels) case and add its row; raises torch.OutOfMemoryError."""
    from fasttips.distributed.signals import StopRequest
    from fasttips.metrics import mfu
    os.environ["FASTTIPS_KERNELS"] = kernels
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(preset, batch, overrides, run_dir)
        try:
            it = iter(trainer.loader)
            batches = [trainer.next_batches([it]) for _ in range(2)]
            values = trainer.schedules(100)          # past warm-up: a representative lr
            stop = StopRequest()                      # never installed: no signal handling here

            def step(micro_batches):
                trainer.train_step(micro_batches, values, stop)   # ends in a host sync (flags)

            t0 = time.perf_counter()
            step(batches[0])                          # compile / autotune outside the timing
            first_s = time.perf_counter() - t0
            peak = _peak_allocated(step, batches[1])  # parameters, optimiser state and activations
            timing = _time_steps(bench, step, [(b,) for b in batches])
            flops_per_image = trainer.flops.per_image
            images_per_s = batch / (timing["ms"] * 1e-3)
            case = {"preset": preset, "batch_per_device": batch, "global_size": trainer.cfg.data.global_size,
                    "n_local": trainer.cfg.data.n_local, "local_size": trainer.cfg.data.local_size,
                    "prototypes": trainer.cfg.heads.prototypes,
                    "precision": str(trainer.ctx.param_dtype).replace("torch.", "")}
            return bench.add(case=case, impl=IMPLS[kernels], timing=timing, flops=flops_per_image * batch,
                             peak_mem=peak, images_per_s=images_per_s, gflop_per_image=flops_per_image / 1e9,
                             mfu=mfu(flops_per_image, images_per_s, trainer.peak),
                             overrides=overrides, kernels_env=kernels, first_step_s=first_s)
        finally:
            trainer = None                            # free the model before the next case
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def run(quick: bool = False, presets: list[str] | None = None, batches: list[int] | None = None,
        kernels: list[str] | None = None) -> Bench:
    bench = Bench("train_step", quick=quick)
    kind = "cuda" if bench.device.type == "cuda" else "cpu"
    cases = (QUICK if quick else CASES)[kind]
    if presets:
        cases = [(p, batches or [16], []) for p in presets]
    elif batches:
        cases = [(p, batches, extra) for p, _, extra in cases]
    for preset, sizes, extra in cases:
        fitted = None
        for batch in sizes:
            try:
                for k in kernels or ["reference", "auto"]:
                    row = measure(bench, preset, batch, extra, k)
                    mfu_text = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
                    print(f"{preset} batch {batch} {row['impl']}: {row['images_per_s']:.1f} img/s, "
                          f"MFU {mfu_text}, peak {_gib(row['peak_mem'])}, first step {row['first_step_s']:.1f} s",
                          flush=True)
                fitted = batch
                break
            except torch.OutOfMemoryError:
                print(f"{preset} batch {batch}: out of memory, trying a smaller batch", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
        if fitted is None:
            print(f"{preset}: no batch size in {sizes} fits", flush=True)
    os.environ.pop("FASTTIPS_KERNELS", None)
    return bench


def _time_steps(bench: Bench, step, inputs, slow_ms: float = 500.0, slow_reps: int = 4) -> dict:
    """The harness's timing, unless a step is slow: then a few steps on the wall clock (each step
    ends in a host sync), so a multi-second reference step does not eat the device budget."""
    t0 = time.perf_counter()
    step(*inputs[0])
    once_ms = (time.perf_counter() - t0) * 1e3
    if once_ms < slow_ms:
        return bench.time(step, inputs=inputs)
    samples = []
    for i in range(slow_reps):
        t0 = time.perf_counter()
        step(*inputs[i % len(inputs)])
        samples.append((time.perf_counter() - t0) * 1e3)
    from harness import summarize
    return summarize(samples)


def _peak_allocated(fn, *args) -> int | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn(*args)
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def _gib(n):
    return "n/a" if n is None else f"{n / 2**30:.1f} GiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small case per device, short timing windows")
    parser.add_argument("--preset", action="append", help="preset(s) to time instead of the defaults")
    parser.add_argument("--batch", help="comma-separated per-device batch sizes to try, largest first")
    parser.add_argument("--kernels", default="reference,auto",
                        help="FASTTIPS_KERNELS values to compare (default: reference,auto)")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")] if args.batch else None
    kernels = [k.strip() for k in args.kernels.split(",")]
    bad = [k for k in kernels if k not in IMPLS]
    if bad:
        parser.error(f"--kernels: {bad} not allowed; choose from {list(IMPLS)}")
    bench = run(args.quick, args.preset, batches, kernels)
    bench.report(baseline=BASELINE)
    print("wrote", bench.write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
