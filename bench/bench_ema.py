"""Head EMA: the fused fasttips launch against the three ways people write it.

    python bench/bench_ema.py [--quick] [--sweep]

Tensors are the EMA heads of a ViT-g run: two heads, each an MLP D→2048→2048→256 (with biases) and a
weight-normed prototype layer (v [K, 256], g [K]), at K = 65,536 and 131,072 (49.4 M and 83.1 M fp32
parameters, docs/kernels.md), plus the K = 65,536 heads as one rank's local shards under
FSDP2 at 8 ranks, where launch latency matters. Peers, in the same process:
  - ``loop_lerp``: a Python loop of ``t.lerp_(s, 1 − m)``;
  - ``foreach_mul_add``: ``_foreach_mul_`` + ``_foreach_add_`` (DINOv2 / DINOv3; 20 B/param of traffic);
  - ``foreach_lerp``: one ``_foreach_lerp_`` (timm ModelEmaV3; the reference and the baseline).
On GPU, ``fasttips+graph`` and ``foreach_lerp+graph`` replay a captured CUDA graph: the device time
alone, without the per-call host cost that dominates the small sharded case.
GB/s counts the minimal traffic (``harness.ema_bytes``: read teacher and student, write teacher), so
``% copy`` is the share of the measured device-to-device copy bandwidth each implementation reaches.
On CPU the ``fasttips`` row is the op's CPU dispatch (the reference), at shrunken head sizes.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from harness import Bench, ema_bytes  # noqa: E402

BASELINE = "foreach_lerp"
MOMENTUM = 0.996


def head_shapes(K: int, D: int = 1536, hidden: int = 2048, bottleneck: int = 256) -> list[tuple[int, ...]]:
    """Parameter shapes of one DINO-style head: three linears with biases, then (v, g) prototypes."""
    return [(hidden, D), (hidden,), (hidden, hidden), (hidden,), (bottleneck, hidden), (bottleneck,),
            (K, bottleneck), (K,)]


def ema_shapes(K: int, heads: int = 2, shards: int = 1, **dims) -> list[tuple[int]]:
    """Flat sizes of every EMA tensor; with ``shards`` > 1, one rank's FSDP2 dim-0 shard of each."""
    sizes = []
    for _ in range(heads):
        for shape in head_shapes(K, **dims):
            rows = -(-shape[0] // shards)  # FSDP2 pads dim 0 to a multiple of the world size
            sizes.append((rows * (shape[1] if len(shape) > 1 else 1),))
    return sizes


def make_lists(sizes, device, student_dtype=torch.float32):
    teacher = [torch.randn(s, device=device) for s in sizes]
    student = [torch.randn(s, device=device).to(student_dtype) for s in sizes]
    return teacher, student


def impls(momentum_tensor):
    from fasttips.kernels import ema_update_
    w = 1.0 - MOMENTUM

    def fasttips_(teacher, student):
        ema_update_(teacher, student, momentum_tensor)

    def loop_lerp(teacher, student):
        for t, s in zip(teacher, student):
            t.lerp_(s, w)

    def foreach_mul_add(teacher, student):
        torch._foreach_mul_(teacher, MOMENTUM)
        torch._foreach_add_(teacher, student, alpha=w)

    def foreach_lerp(teacher, student):
        torch._foreach_lerp_(teacher, student, w)

    return {"fasttips": fasttips_, "loop_lerp": loop_lerp, "foreach_mul_add": foreach_mul_add,
            "foreach_lerp": foreach_lerp}


def cases(quick: bool, on_gpu: bool):
    if not on_gpu:  # CPU: shrunken heads, so the CPU run stays a smoke test of the bench itself
        return [dict(K=2048, D=128, hidden=256, shards=1)]
    full = [dict(K=65536, D=1536, hidden=2048, shards=1), dict(K=131072, D=1536, hidden=2048, shards=1),
            dict(K=65536, D=1536, hidden=2048, shards=8)]
    return full[:1] + full[2:] if quick else full


def run(quick: bool = False, sweep: bool = False, results_dir: str | None = None) -> Bench:
    bench = Bench("ema", quick=quick, results_dir=results_dir)
    device = bench.device
    on_gpu = device.type == "cuda"
    if not on_gpu:
        print("no CUDA device: shrunken heads on CPU; the CUDA-graph rows need CUDA and are skipped",
              flush=True)
    momentum = torch.tensor(MOMENTUM, device=device)
    fns = impls(momentum)
    for c in cases(quick, on_gpu):
        sizes = ema_shapes(c["K"], shards=c["shards"], D=c["D"], hidden=c["hidden"])
        n_params = sum(s[0] for s in sizes)
        for student_dtype in (torch.float32, torch.bfloat16):
            # two input sets, rotated, so no call starts with the previous call's data in L2
            sets = [make_lists(sizes, device, student_dtype) for _ in range(1 if quick and not on_gpu else 2)]
            case = dict(c, n_params=n_params, n_tensors=len(sizes), student=str(student_dtype)[6:])
            student_bytes = torch.empty((), dtype=student_dtype).element_size()
            for name, fn in fns.items():
                if student_dtype != torch.float32 and name != "fasttips":
                    continue  # the torch peers need matching dtypes (a bf16 student would be cast first)
                timing = bench.time(fn, inputs=sets)
                bench.add(case=case, impl=name, timing=timing, bytes=ema_bytes(n_params, student_bytes),
                          peak_mem=bench.peak_memory(fn, *sets[0]))
            if on_gpu and student_dtype == torch.float32:
                _graph_rows(bench, case, fns, sets, n_params, student_bytes)
            if sweep and on_gpu and student_dtype == torch.float32:
                _sweep(bench, case, sets, momentum, n_params, student_bytes)
            del sets
    return bench


def _sweep(bench, case, sets, momentum, n_params, student_bytes):
    """Kernel configurations (chunk size × warps × grid cap in programs per SM), as extra rows."""
    from fasttips.kernels.ema import triton as ema_triton
    default = ema_triton.MAX_PROGRAMS
    sms = torch.cuda.get_device_properties(bench.device).multi_processor_count
    for block, warps in ((2048, 4), (4096, 8), (8192, 8), (16384, 16)):
        for per_sm in (4, 8, None):  # None: one program per chunk
            ema_triton.MAX_PROGRAMS = default if per_sm is None else per_sm * sms
            ema_triton.clear_cache()
            fn = lambda t, s, b=block, w=warps: ema_triton.ema_update_(t, s, momentum, block=b, num_warps=w)
            timing = bench.time(fn, inputs=sets, rep_ms=100)
            bench.add(case=case, impl=f"sweep-b{block}-w{warps}-p{per_sm or 'all'}",
                      timing=timing, bytes=ema_bytes(n_params, student_bytes))
    ema_triton.MAX_PROGRAMS = default
    ema_triton.clear_cache()


def _graph_rows(bench, case, fns, sets, n_params, student_bytes):
    """Replays of a captured CUDA graph: device time without the host's per-call launch cost."""
    for name in ("fasttips", "foreach_lerp"):
        graphs = []
        for args in sets:
            fns[name](*args)  # compile / warm up outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fns[name](*args)
            graphs.append((g,))
        timing = bench.time(lambda g: g.replay(), inputs=graphs)
        bench.add(case=case, impl=f"{name}+graph", timing=timing, bytes=ema_bytes(n_params, student_bytes))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer cases, shorter timing windows")
    p.add_argument("--sweep", action="store_true", help="also time kernel configurations (GPU)")
    p.add_argument("--no-write", action="store_true", help="print the table but write no JSON")
    args = p.parse_args(argv)
    bench = run(quick=args.quick, sweep=args.sweep)
    bench.report(baseline=BASELINE)
    if not args.no_write:
        print(f"wrote {bench.write()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
