"""Benchmark of prototype_cross_entropy (softmax centering): time and peak extra memory, fwd and fwd+bwd.

Implementations, all on the same inputs (bf16 L2-normalised features, fp32 head parameters, as under
bf16 autocast in training):
- fasttips         the Triton kernels (no [T × K] tensor)
- fasttips-slab    the same forward, backward through the opt-in dS slab (backward="slab",
                   a [chunk × K] bf16 slab + 2 cuBLAS GEMMs); fwd+bwd rows only, CUDA only
- fasttips-chunked backward="chunked": cuBLAS logits on row chunks + one Triton row kernel, the gradient
                   formed in the forward (kernels/dino_loss/chunked.py); fwd and fwd+bwd, CUDA only
- torch-eager      naive.py under bf16 autocast: bf16 logits GEMMs, fp32 softmax/CE (DINOv2-style)
- torch-compile    the same function through torch.compile (only where --compile-cases allows: slow
                   to compile, so by default at the target case T = 16384, K = 65536)
- reference        the chunked PyTorch reference (fp32 math, the CPU path)
- xformers         only where importable; it is not installed on this project's GPU machine, and no
                   xformers soft-target cross-entropy is wired in yet: the run prints which, untimed.

At the target (T = 16384, K = 65536) the run ends with the issue-27 targets per path (fused, slab,
chunked): fwd+bwd speed ≥ 1.5× torch-compile, peak extra memory ≤ 5 % of torch-eager's (``targets``).

Run: python bench/bench_dino_loss.py [--quick] [--cases 16384:65536 65536:131072]
(``--cases`` replaces the tokens × prototypes grid; torch.compile then runs at every listed case. At
T = 65536, K = 131072 eager needs ~100 GiB: where it runs out of memory the row is recorded as OOM.)
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness import Bench, matmul_flops, stream_row  # noqa: E402

from fasttips.kernels import prototype_cross_entropy  # noqa: E402
from fasttips.kernels.dino_loss import naive, reference  # noqa: E402

BASELINE = "torch-eager"
D = 256
TOKENS = (4096, 16384, 32768)
PROTOTYPES = (65536, 131072)
TARGET = (16384, 65536)
# CPU (no CUDA): a smoke pass of the bench itself at tiny shapes; the fasttips row is the op's CPU
# dispatch (the chunked reference), and torch.compile is skipped (minutes of compile on 2 cores).
CPU_TOKENS, CPU_PROTOTYPES = (64, 192), (512,)


def make_inputs(T, K, device, n_sets=2):
    sets = []
    for _ in range(n_sets):
        sets.append(dict(
            student_z=F.normalize(torch.randn(T, D, device=device), dim=1).bfloat16().requires_grad_(),
            student_v=torch.randn(K, D, device=device).requires_grad_(),
            student_g=torch.ones(K, device=device).requires_grad_(),
            teacher_z=F.normalize(torch.randn(T, D, device=device), dim=1).bfloat16(),
            teacher_v=torch.randn(K, D, device=device),
            teacher_g=torch.ones(K, device=device),
            pairs=torch.randperm(T, device=device),          # iBOT++: one teacher row per student row
            weights=torch.full((T,), 1.0 / T, device=device),
            center=0.01 * torch.randn(K, device=device),
        ))
    return sets


def _eager(**kw):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=kw["student_z"].is_cuda):
        return naive.prototype_cross_entropy(**kw)


def _fused(backward="fused", **kw):
    # the Triton kernels on CUDA; elsewhere the op's own dispatch (its reference)
    return prototype_cross_entropy(**kw, backend="triton" if kw["student_z"].is_cuda else None, backward=backward)


def _slab(**kw):
    return _fused(backward="slab", **kw)


def _chunked(**kw):
    return _fused(backward="chunked", **kw)


def _reference(**kw):
    return reference.prototype_cross_entropy(**kw)


def _step(fn, backward):
    def call(inputs):
        if backward:
            loss, _ = fn(**inputs)
            loss.backward()
            for k in ("student_z", "student_v", "student_g"):
                inputs[k].grad = None
        else:
            with torch.no_grad():
                fn(**inputs)
    return call


SLAB = "fasttips-slab"
CHUNKED = "fasttips-chunked"
PATHS = ("fasttips", SLAB, CHUNKED)   # backward = fused, slab, chunked
# The issue-27 targets at TARGET, fwd+bwd: ≥ 1.5× torch.compile's speed, ≤ 5 % of eager's peak extra memory
TARGET_SPEEDUP_VS_COMPILE = 1.5
TARGET_MEMORY_PCT_OF_EAGER = 5.0
CUDA_ONLY = (SLAB, CHUNKED)   # without CUDA the op runs its chunked reference, not the kernels
ISSUE_CASES = ((16384, 65536), (65536, 131072))   # issue 17: the target, and ViT-g iBOT++ over all patches


def parse_case(text: str) -> tuple[int, int]:
    try:
        t, k = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cases: {text!r} is not TOKENS:PROTOTYPES, e.g. 16384:65536") from None
    if t < 1 or k < 1:
        raise argparse.ArgumentTypeError(f"--cases: {text!r} needs positive sizes")
    return t, k


def run(quick: bool, compile_cases=(TARGET,), tokens=TOKENS, prototypes=PROTOTYPES,
        impls=("fasttips", SLAB, CHUNKED, "torch-eager", "torch-compile", "reference"), results_dir=None,
        cases=None) -> Bench:
    """Every impl at tokens × prototypes, or at ``cases`` [(T, K), ...] when given (torch.compile then
    runs at each of them)."""
    bench = Bench("dino_loss", quick=quick, results_dir=results_dir)
    if importlib.util.find_spec("xformers") is None:
        print("xformers: not importable, skipped", flush=True)
    else:
        print("xformers: importable, but no soft-target (DINO) cross-entropy is wired in; skipped", flush=True)
    device = bench.device
    if device.type != "cuda":
        print("no CUDA device: tiny CPU shapes; torch-compile skipped (needs CUDA here: compiling "
              "takes minutes on CPU)", flush=True)
        tokens, prototypes, cases = CPU_TOKENS, CPU_PROTOTYPES, None
        print(f"{', '.join(CUDA_ONLY)}: skipped (without CUDA the op runs its chunked reference, not the "
              "kernels)", flush=True)
        impls = tuple(i for i in impls if i not in ("torch-compile",) + CUDA_ONLY)
    if cases is not None:
        compile_cases = tuple(cases)
    grid = list(cases) if cases is not None else [(T, K) for T in tokens for K in prototypes]
    compiled = torch.compile(naive.prototype_cross_entropy) if "torch-compile" in impls else None

    def _compiled(**kw):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=kw["student_z"].is_cuda):
            return compiled(**kw)

    fns = {"fasttips": _fused, SLAB: _slab, CHUNKED: _chunked, "torch-eager": _eager,
           "torch-compile": _compiled, "reference": _reference}
    for T, K in grid:
        inputs = make_inputs(T, K, device)
        gemm = matmul_flops(T, K, D)
        # Useful GEMM work, the same for every impl: fwd = teacher + student logits; fwd+bwd adds
        # dZ and dW (the fused kernels' recomputation is not counted as useful).
        for mode, backward, flops in (("fwd", False, 2 * gemm), ("fwd_bwd", True, 4 * gemm)):
            case = {"T": T, "K": K, "d": D, "mode": mode, "centering": "softmax"}
            for impl in impls:
                if impl == "torch-compile" and (T, K) not in compile_cases:
                    continue
                if impl == "reference" and T * K > TARGET[0] * TARGET[1]:
                    continue       # fp32 reference at the largest shapes costs minutes of device time
                if impl == SLAB and not backward:
                    continue       # same forward as fasttips
                step = _step(fns[impl], backward)
                try:
                    step(inputs[0])     # compile / autotune outside the memory measurement
                    peak = bench.peak_memory(step, inputs[0])
                    timing = bench.time(step, inputs=[(x,) for x in inputs])
                except torch.OutOfMemoryError:
                    for x in inputs:              # drop grads left by the failed step
                        for k in ("student_z", "student_v", "student_g"):
                            x[k].grad = None
                    torch.cuda.empty_cache()
                    print(f"  {impl} {case}: out of memory", flush=True)
                    bench.add(case, impl, {"ms": float("nan")}, oom=True)
                    continue
                bench.add(case, impl, timing, flops=flops, peak_mem=peak)
                torch.cuda.empty_cache() if device.type == "cuda" else None
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return bench


def targets(rows: list[dict], case=TARGET) -> list[dict]:
    """Per fasttips path at ``case`` (fwd+bwd): speed relative to torch-compile and peak extra memory as
    a percentage of torch-eager's, each against its target (None where a row is missing or ran out of
    memory). One dict per path, also streamed as a ``dino_loss_targets`` row."""
    at = {r["impl"]: r for r in rows if (r["case"]["T"], r["case"]["K"]) == tuple(case)
          and r["case"]["mode"] == "fwd_bwd" and not r.get("oom")}
    compiled, eager = at.get("torch-compile"), at.get("torch-eager")
    out = []
    for impl in PATHS:
        row = at.get(impl)
        speedup = compiled["ms"] / row["ms"] if row and compiled else None
        memory = (100 * row["peak_mem"] / eager["peak_mem"]
                  if row and eager and row.get("peak_mem") is not None and eager.get("peak_mem") else None)
        result = {"bench": "dino_loss_targets", "impl": impl, "case": {"T": case[0], "K": case[1], "mode": "fwd_bwd"},
                  "speedup_vs_compile": speedup, "speedup_target": TARGET_SPEEDUP_VS_COMPILE,
                  "memory_pct_of_eager": memory, "memory_target_pct": TARGET_MEMORY_PCT_OF_EAGER,
                  "met": (speedup is not None and memory is not None and speedup >= TARGET_SPEEDUP_VS_COMPILE
                          and memory <= TARGET_MEMORY_PCT_OF_EAGER)}
        out.append(result)
    return out


def print_targets(results: list[dict]) -> None:
    def show(x, fmt):
        return "n/a" if x is None else fmt.format(x)
    print(f"targets at T={TARGET[0]} K={TARGET[1]} fwd+bwd: ≥ {TARGET_SPEEDUP_VS_COMPILE}× torch-compile, "
          f"≤ {TARGET_MEMORY_PCT_OF_EAGER:g} % of torch-eager's peak extra memory")
    for r in results:
        print(f"  {r['impl']:<18} {show(r['speedup_vs_compile'], '{:.2f}×'):>8} vs compile   "
              f"{show(r['memory_pct_of_eager'], '{:.1f} %'):>8} of eager   {'met' if r['met'] else 'not met'}",
              flush=True)


def kernel_breakdown(T=TARGET[0], K=TARGET[1], dino_backward="fused"):
    """CUDA time per kernel of one fwd+bwd with ``dino_backward`` (torch.profiler) and the autotuner's choices."""
    from fasttips.kernels.dino_loss import triton as dino_triton
    inputs = make_inputs(T, K, "cuda", n_sets=1)[0]
    step = _step(functools.partial(_fused, backward=dino_backward), True)
    step(inputs)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(inputs)
        torch.cuda.synchronize()
    print(f"kernel breakdown, T={T} K={K} d={D}, backward={dino_backward}, 3 × fwd+bwd:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    for name in dino_triton.CONFIGS:
        best = getattr(dino_triton._tuned(name), "best_config", None)
        print(f"  {name}: {best}")
    from fasttips.kernels.dino_loss import chunked as dino_chunked
    print(f"  {dino_chunked.ROW_KERNEL}: {getattr(dino_chunked._tuned_row_kernel(), 'best_config', None)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short timing windows")
    parser.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
    parser.add_argument("--prototypes", type=int, nargs="*", default=list(PROTOTYPES))
    parser.add_argument("--breakdown", action="store_true",
                        help="profile the kernels at the target with the fused, slab and chunked paths")
    parser.add_argument("--cases", type=parse_case, nargs="*", default=None, metavar="T:K",
                        help="(tokens, prototypes) pairs instead of the --tokens × --prototypes grid, "
                             f"e.g. {' '.join(f'{t}:{k}' for t, k in ISSUE_CASES)} (issue 17)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    args = parser.parse_args()
    impls = ("fasttips", SLAB, CHUNKED, "torch-eager", "reference") if args.no_compile else (
        "fasttips", SLAB, CHUNKED, "torch-eager", "torch-compile", "reference")
    if args.breakdown:
        for mode in ("fused", "slab", "chunked"):
            kernel_breakdown(dino_backward=mode)
    bench = run(args.quick, tokens=args.tokens, prototypes=args.prototypes, impls=impls, cases=args.cases)
    bench.report(baseline=BASELINE)
    if any((r["case"]["T"], r["case"]["K"]) == TARGET for r in bench.rows):
        results = targets(bench.rows)
        print_targets(results)
        for row in results:
            stream_row(dict(row, **bench.env))
    print("wrote", bench.write())


if __name__ == "__main__":
    main()
