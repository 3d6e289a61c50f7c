"""The whole training step: fasttips against a plain-PyTorch baseline of the same model.

    python bench/bench_train_step.py [--quick] [--preset vit-l] [--batch 128,96,64]
                                     [--kernels plain,plain-head,auto] [--compile off,on]
                                     [--no-max-batch] [--max-batch-refine 2]

One step is exactly what ``fasttips train`` runs (``Training.train_step``): the packed student pass
over the global, masked and local crops, the text tower, the CLIP, DINO and iBOT++ losses, backward,
per-module clipping, AdamW and the EMA, on synthetic batches already on the device. On a GPU the
step runs under FSDP2 with the bf16 MixedPrecisionPolicy (one rank), as training does.

Implementations (``--kernels``), measured in the same process at the same batch:
- ``fasttips`` (``auto``): measured dispatch (``kernels.dispatch=measured``: each op runs the
  implementation timed fastest on this device, decided in the first step), head-only EMA, packed
  multi-crop attention; the row lists the decisions (``kernels``).
- ``fasttips-only`` (``fasttips-only``): the same with ``kernels.dispatch=fasttips`` (the Triton kernels
  on CUDA wherever they run, as ``auto`` did before measured dispatch).
- ``plain-pytorch`` (``plain``, the baseline): the same model and step with the four fasttips ops
  swapped, inside this benchmark only (``plain_pytorch_ops``), for what a plain-PyTorch DINOv2-style
  codebase runs: SDPA attention (one dense call per crop size), the unfused fp32 prototype
  cross-entropy (``kernels/dino_loss/naive.py``, the full [rows × K] logits), and a full-model EMA
  teacher (``teacher.mode=full_ema``: an EMA copy of the backbone that runs its own no-grad forward
  for the targets) updated with ``_foreach_mul_`` + ``_foreach_add_``. The engine's code is untouched.
- ``plain-pytorch-head-ema`` (``plain-head``): the same plain ops with TIPSv2's head-only EMA teacher
  (the student's detached features through EMA heads), so the teacher's share of the gap shows.
- ``torch-reference`` (``reference``): FASTTIPS_KERNELS=reference, the engine's own PyTorch
  references (not a realistic peer on GPU: seconds per step; opt-in).

``--compile off,on`` measures each implementation eager and with per-block ``torch.compile``
(``train.compile=true``; row names get ``+compile``); compiling is skipped on the CPU (minutes of
inductor time per case on a small machine, and CPU numbers mean nothing for it).

``--batch`` lists per-device batch sizes to try, largest first; the first at which every
implementation fits is measured (a CUDA OOM moves to the next). On CUDA (not ``--quick``) a bounded
search then finds the largest per-device batch each implementation can run (doubling up to
``MAX_BATCH_CAP``, then ``--max-batch-refine`` bisection steps between the last fit and the first
miss), and measures it there too: a second row with ``at_max_batch: true``; ``max_batch`` in both.
FLOPs come from the explicit model in ``fasttips.flops.flop_model`` (matmul FLOPs, fwd + bwd) of
each implementation's own config: the full-EMA teacher's extra forward counts as work done, so the
baseline's MFU is not flattered by it being slower. MFU is against the device's nominal dense bf16
peak (``fasttips.flops.PEAK_BF16_FLOPS``); ``%peak`` in the table against the matmul ceiling the
harness measured on this device.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from harness import Bench, env_var  # noqa: E402

BASELINE = "plain-pytorch"
# --kernels value → (row name, FASTTIPS_KERNELS, swap in the plain-PyTorch ops, extra overrides)
IMPLS = {
    "plain": (BASELINE, "reference", True, ["teacher.mode=full_ema"]),
    "plain-head": (BASELINE + "-head-ema", "reference", True, ["teacher.mode=head_ema"]),
    "auto": ("fasttips", "auto", False, []),
    "fasttips-only": ("fasttips-only", "auto", False, ["kernels.dispatch=fasttips"]),
    "reference": ("torch-reference", "reference", False, []),
}
DEFAULT_KERNELS = ["plain", "plain-head", "auto"]
COMPILED = "+compile"         # a --kernels value with this suffix runs with train.compile=true
# (preset, per-device batch sizes to try, extra overrides, fallback overrides when no batch fits:
# vit-g "layers", the same widths at fewer blocks) per device kind; quick runs shrink them.
CASES = {
    "cuda": [("vit-b", [256, 192, 128, 96, 64], [], None),
             ("vit-l", [128, 96, 64, 32], [], None),
             ("vit-g", [64, 32, 16], [], ["vision.depth=12"])],
    "cpu": [("tiny", [16], [], None), ("vit-s", [4], ["data.n_local=2", "heads.prototypes=4096"], None)],
}
QUICK = {
    "cuda": [("vit-s", [64], [], None)],
    "cpu": [("tiny", [4], ["data.global_size=56", "data.local_size=28"], None)],
}
MAX_BATCH_CAP = 2048


# ------------------------------------------------------------------------------------------------
# The plain-PyTorch baseline: the four fasttips ops swapped for what a plain codebase calls
# ------------------------------------------------------------------------------------------------
def sdpa_attention(q, k, v, key_padding_mask=None, scale=None, backend=None):
    """Dense [B, H, N, D] attention through SDPA; the key padding mask becomes a boolean keep-mask."""
    import torch.nn.functional as F
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


_BOUNDS_CACHE: list = [None, None]   # (the last cu_seqlens tensor, its values on the host)


def _host_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    if _BOUNDS_CACHE[0] is not cu_seqlens:
        _BOUNDS_CACHE[:] = [cu_seqlens, cu_seqlens.tolist()]
    return _BOUNDS_CACHE[1]


def sdpa_attention_varlen(q, k, v, cu_seqlens, max_seqlen=None, scale=None, backend=None, runs=None):
    """Packed [T, H, D] attention as SDPA has no varlen: one dense call per run of equal-length
    segments (per crop size, as DINOv2 runs its global and local crops), reading cu_seqlens on
    the host once per forward (every layer gets the same cu_seqlens tensor, so the read is cached;
    DINOv2 knows its crop sizes without asking the device)."""
    bounds = _host_bounds(cu_seqlens)
    outs, start = [], 0
    while start < len(bounds) - 1:
        length = bounds[start + 1] - bounds[start]
        end = start + 1
        while end < len(bounds) - 1 and bounds[end + 1] - bounds[end] == length:
            end += 1
        rows = slice(bounds[start], bounds[end])
        views = [t[rows].unflatten(0, (end - start, length)).transpose(1, 2) for t in (q, k, v)]
        out = sdpa_attention(*views, scale=scale)                       # [S, H, n, D]
        outs.append(out.transpose(1, 2).flatten(0, 1))
        start = end
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def naive_prototype_cross_entropy(*args, chunk_bytes=None, backend=None, backward=None, **kwargs):
    """The unfused fp32 loss: full [rows × K] logits and softmaxes (kernels/dino_loss/naive.py); it has
    one backward (autograd's), so the fasttips-only ``backward`` choice is ignored."""
    from fasttips.kernels.dino_loss import naive
    return naive.prototype_cross_entropy(*args, **kwargs)


@torch.no_grad()
def foreach_ema_update_(teacher, student, momentum, backend=None):
    """DINOv2's teacher update: ξ ← m·ξ, then ξ += (1 − m)·θ, over the whole model."""
    teacher, student = list(teacher), list(student)
    torch._foreach_mul_(teacher, float(momentum))
    torch._foreach_add_(teacher, student, alpha=1.0 - float(momentum))


@contextlib.contextmanager
def plain_pytorch_ops():
    """Swap ``fasttips.kernels``' public ops for the plain-PyTorch ones for the duration (the engine's
    modules look them up as ``kernels.<op>`` at call time), and put the originals back after."""
    import fasttips.kernels as ops
    swaps = {"attention": sdpa_attention, "attention_varlen": sdpa_attention_varlen,
             "prototype_cross_entropy": naive_prototype_cross_entropy, "ema_update_": foreach_ema_update_}
    saved = {name: getattr(ops, name) for name in swaps}
    try:
        for name, fn in swaps.items():
            setattr(ops, name, fn)
        yield
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)


def build_trainer(preset: str, batch: int, overrides: list[str], run_dir: str):
    from fasttips import config as config_lib
    from fasttips.distributed import fsdp
    from fasttips.trainer import Trainer
    cfg = config_lib.load(None, [f"preset={preset}", "data.source=synthetic", f"data.batch_size={batch}",
                                 "train.steps=1000", f"train.run_dir={run_dir}", *overrides])
    return Trainer(cfg, fsdp.init_distributed(cfg), Path(run_dir), progress=False)


def variants(kernels: list[str], compiles: list[bool]) -> list[str]:
    """Every (implementation, compile) pair as one --kernels value: ``auto``, ``auto+compile``, ..."""
    return [k + (COMPILED if c else "") for k in kernels for c in compiles]


@contextlib.contextmanager
def implementation(kernels: str):
    """Environment and op swaps of one --kernels value (``name`` or ``name+compile``); yields (row
    name, extra config overrides)."""
    base, compiled = (kernels[:-len(COMPILED)], True) if kernels.endswith(COMPILED) else (kernels, False)
    name, env, plain, extra = IMPLS[base]
    if compiled:
        name, extra = name + COMPILED, extra + ["train.compile=true"]
    with env_var("FASTTIPS_KERNELS", env), plain_pytorch_ops() if plain else contextlib.nullcontext():
        yield name, extra


def _is_oom(exc: BaseException) -> bool:
    """A CUDA OOM, including the ones that surface as a plain RuntimeError (cuBLAS/cuDNN workspaces)."""
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "alloc_failed" in text


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(bench: Bench, preset: str, batch: int, overrides: list[str], kernels: str) -> dict:
    """Time one (preset, batch, kernels) case and add its row; raises torch.OutOfMemoryError."""
    from fasttips.flops import mfu
    from fasttips.kernels import dispatch as kernel_dispatch
    with implementation(kernels) as (impl, extra), tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(preset, batch, overrides + extra, run_dir)
        try:
            it = iter(trainer.loader)
            batches = [trainer.next_batches([it]) for _ in range(2)]
            values = trainer.schedules(100)          # past warm-up: a representative lr

            def step(micro_batches):
                trainer.training.train_step(micro_batches, values)   # ends in a host sync (flags)

            t0 = time.perf_counter()
            step(batches[0])                          # compile / autotune outside the timing
            first_s = time.perf_counter() - t0
            peak = _peak_allocated(step, batches[1])  # parameters, optimiser state and activations
            timing = _time_steps(bench, step, [(b,) for b in batches])
            flops_per_image = trainer.flops.per_image
            images_per_s = batch / (timing["ms"] * 1e-3)
            case = {"preset": preset, "batch_per_device": batch, "global_size": trainer.cfg.data.global_size,
                    "n_local": trainer.cfg.data.n_local, "local_size": trainer.cfg.data.local_size,
                    "prototypes": trainer.cfg.heads.prototypes, "depth": trainer.cfg.vision.depth,
                    "precision": str(trainer.ctx.param_dtype).replace("torch.", "")}
            return bench.add(case=case, impl=impl, timing=timing, flops=flops_per_image * batch,
                             peak_mem=peak, images_per_s=images_per_s, gflop_per_image=flops_per_image / 1e9,
                             mfu=mfu(flops_per_image, images_per_s, trainer.peak),
                             overrides=overrides + extra, kernels_env=os.environ["FASTTIPS_KERNELS"],
                             teacher_mode=trainer.cfg.teacher.mode, compile=trainer.cfg.train.compile,
                             first_step_s=first_s,
                             kernels=None if impl.startswith(BASELINE) else kernel_dispatch.report_records())
        finally:
            trainer = None                            # free the model before the next case
            _free()


def fits(preset: str, batch: int, overrides: list[str], kernels: str) -> bool:
    """Whether two training steps at this per-device batch run without a CUDA OOM."""
    with implementation(kernels) as (_, extra), tempfile.TemporaryDirectory() as run_dir:
        trainer = None
        try:
            trainer = build_trainer(preset, batch, overrides + extra, run_dir)
            it = iter(trainer.loader)
            values = trainer.schedules(100)
            for _ in range(2):   # the second step holds the optimiser state as well
                trainer.training.train_step(trainer.next_batches([it]), values)
            return True
        except RuntimeError as exc:             # torch.OutOfMemoryError is a RuntimeError
            if not _is_oom(exc):
                raise
            return False
        finally:
            trainer = None
            _free()


def max_batch(preset: str, start: int, overrides: list[str], kernels: str, cap: int = MAX_BATCH_CAP,
              refine: int = 0) -> int:
    """Bounded search from a batch known to fit: doubling while it fits (never past ``cap``), then
    ``refine`` bisection steps between the last fit and the first miss (CUDA only: on CPU memory is
    not the limit). At most log2(cap/start) + 1 + refine trial builds."""
    best = start
    while best * 2 <= cap and fits(preset, best * 2, overrides, kernels):
        best *= 2
    miss = best * 2 if best * 2 <= cap else None
    for _ in range(refine if miss else 0):
        mid = (best + miss) // 2
        if mid <= best:
            break
        if fits(preset, mid, overrides, kernels):
            best = mid
        else:
            miss = mid
    return best


def run(quick: bool = False, presets: list[str] | None = None, batches: list[int] | None = None,
        kernels: list[str] | None = None, results_dir: str | None = None,
        search_max_batch: bool | None = None, compiles: list[bool] | None = None,
        refine: int = 2) -> Bench:
    bench = Bench("train_step", quick=quick, results_dir=results_dir)
    kind = "cuda" if bench.device.type == "cuda" else "cpu"
    kernels = kernels or DEFAULT_KERNELS
    bad = [k for k in kernels if k not in IMPLS]
    if bad:
        raise ValueError(f"kernels: {bad} not allowed; choose from {list(IMPLS)}")
    compiles = compiles or [False]
    if True in compiles and kind != "cuda":
        print("torch.compile variants skipped: they need CUDA here (inductor on the CPU takes minutes "
              "per case and says nothing about the GPU)", flush=True)
        compiles = [c for c in compiles if not c] or [False]
    kernels = variants(kernels, compiles)
    if search_max_batch is None:
        search_max_batch = kind == "cuda" and not quick
    if search_max_batch and kind != "cuda":
        print("max-batch search skipped: it needs CUDA (CPU memory is not what limits the batch)", flush=True)
        search_max_batch = False
    cases = (QUICK if quick else CASES)[kind]
    if presets:
        fallbacks = {c[0]: c[3] for c in CASES["cuda"]}           # vit-g → its layers when it does not fit
        cases = [(p, batches or [16], [], fallbacks.get(p)) for p in presets]
    elif batches:
        cases = [(p, batches, extra, fallback) for p, _, extra, fallback in cases]
    for preset, sizes, extra, fallback in cases:
        rows = _measure_first_fit(bench, preset, sizes, extra, kernels)
        if rows is None and fallback:
            print(f"{preset}: trying {fallback} (the same layers, fewer of them)", flush=True)
            extra = extra + fallback
            rows = _measure_first_fit(bench, preset, sizes, extra, kernels)
        if rows is None:
            print(f"{preset}: no batch size in {sizes} fits", flush=True)
            continue
        _print_ratio(preset, rows)
        if search_max_batch:
            for row, k in zip(rows, kernels):
                row["max_batch"] = max_batch(preset, row["case"]["batch_per_device"], extra, k, refine=refine)
                print(f"{preset} {row['impl']}: largest per-device batch {row['max_batch']}", flush=True)
                if row["max_batch"] > row["case"]["batch_per_device"]:
                    try:
                        at_max = measure(bench, preset, row["max_batch"], extra, k)
                    except RuntimeError as exc:     # fits() ran two steps; timing may still not fit
                        if not _is_oom(exc):
                            raise
                        print(f"{preset} {row['impl']}: out of memory when timing batch {row['max_batch']}",
                              flush=True)
                        continue
                    at_max.update(at_max_batch=True, max_batch=row["max_batch"])
                    print(f"{preset} {row['impl']} at batch {row['max_batch']}: {at_max['images_per_s']:.1f} "
                          f"img/s, MFU {_pct(at_max['mfu'])}, peak {_gib(at_max['peak_mem'])}", flush=True)
    return bench


def _measure_first_fit(bench, preset, sizes, extra, kernels):
    """Rows of every implementation at the largest batch in ``sizes`` where all of them fit."""
    for batch in sizes:
        n_before = len(bench.rows)
        try:
            rows = []
            for k in kernels:
                row = measure(bench, preset, batch, extra, k)
                mfu_text = _pct(row["mfu"])
                print(f"{preset} batch {batch} {row['impl']}: {row['images_per_s']:.1f} img/s, "
                      f"MFU {mfu_text}, peak {_gib(row['peak_mem'])}, first step {row['first_step_s']:.1f} s",
                      flush=True)
                rows.append(row)
            return rows
        except RuntimeError as exc:             # torch.OutOfMemoryError is a RuntimeError
            if not _is_oom(exc):
                raise
            del bench.rows[n_before:]                 # a batch is compared only where all impls ran
            print(f"{preset} batch {batch}: out of memory, trying a smaller batch", flush=True)
        _free()   # outside the except block: the exception's frames no longer pin the activations
    return None


def _print_ratio(preset, rows):
    """fasttips against each baseline variant, eager against eager and compiled against compiled,
    and the best fasttips against the best (usually compiled) plain baseline."""
    by_impl = {r["impl"]: r for r in rows}
    batch = rows[0]["case"]["batch_per_device"] if rows else None
    for suffix in ("", COMPILED):
        ours = by_impl.get("fasttips" + suffix)
        for name in (BASELINE, BASELINE + "-head-ema"):
            base = by_impl.get(name + suffix)
            if ours and base:
                print(f"{preset}: fasttips{suffix} {ours['images_per_s'] / base['images_per_s']:.2f}x "
                      f"{name}{suffix} images/s at batch {batch}", flush=True)
        only = by_impl.get("fasttips-only" + suffix)
        base = by_impl.get(BASELINE + suffix)
        if ours and only and base:     # issue 26: measured dispatch never slower than either fixed choice
            best = max(only, base, key=lambda r: r["images_per_s"])
            print(f"{preset}: fasttips{suffix} (measured dispatch) "
                  f"{ours['images_per_s'] / best['images_per_s']:.2f}x the best of {BASELINE}{suffix} and "
                  f"fasttips-only{suffix} ({best['impl']}) images/s at batch {batch} (target: >= 1.0)", flush=True)
    ours = [r for r in rows if r["impl"].startswith("fasttips")]
    plain = [r for r in rows if r["impl"].startswith(BASELINE)]
    if ours and plain:
        a, b = max(ours, key=lambda r: r["images_per_s"]), max(plain, key=lambda r: r["images_per_s"])
        print(f"{preset}: best fasttips ({a['impl']}) {a['images_per_s'] / b['images_per_s']:.2f}x the best "
              f"plain baseline ({b['impl']}) (target: >= 1.3x the compiled plain baseline)", flush=True)


def _pct(value):
    return "n/a" if value is None else f"{value:.1%}"


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
    parser.add_argument("--kernels", default=",".join(DEFAULT_KERNELS),
                        help=f"implementations to compare, from {list(IMPLS)} (default: {','.join(DEFAULT_KERNELS)})")
    parser.add_argument("--compile", default="off", help="off, on or off,on: per-block torch.compile (CUDA)")
    parser.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch search (CUDA)")
    parser.add_argument("--max-batch-refine", type=int, default=2,
                        help="bisection steps after the doubling search (default 2)")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")] if args.batch else None
    kernels = [k.strip() for k in args.kernels.split(",")]
    bad = [k for k in kernels if k not in IMPLS]
    if bad:
        parser.error(f"--kernels: {bad} not allowed; choose from {list(IMPLS)}")
    try:
        compiles = [{"off": False, "on": True}[c.strip()] for c in args.compile.split(",")]
    except KeyError:
        parser.error(f"--compile: {args.compile!r}; use off, on or off,on")
    bench = run(args.quick, args.preset, batches, kernels,
                search_max_batch=False if args.no_max_batch else None, compiles=compiles,
                refine=args.max_batch_refine)
    bench.report(baseline=BASELINE)
    print("wrote", bench.write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
