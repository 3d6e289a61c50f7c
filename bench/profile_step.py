"""Where one training step's time goes: a per-category profile with torch.profiler.

    python bench/profile_step.py [--preset vit-l] [--batch 64] [--kernels auto|plain] [--compile]
                                 [--out DIR] [--quick]

The step is ``Training.train_step`` as in bench_train_step.py (same trainer, same implementations:
``auto`` = fasttips, ``plain`` = the plain-PyTorch baseline). Two warm-up steps, then one profiled
step. Its time is split into categories (``CATEGORIES``):

- on CUDA, device kernel time by category, and ``host gaps`` = the step's wall time not covered by
  any device kernel (launch overhead, host syncs, Python between ops);
- on the CPU, each op's self time by category, and ``host gaps`` = the step's wall time not covered
  by any op (Python between ops).

Classification (``classify``) looks at the kernel or op name and at the names of the ops and
``record_function`` scopes it was launched from; the first rule, in the order of ``RULES``, that
matches the name or any scope wins: communication, optimiser, EMA, prototype CE, attention, GEMMs;
anything else is ``norms+elementwise`` (LayerNorm, GELU, adds, copies, casts, reductions). So a
matmul inside the prototype loss counts as prototype CE, Adam's ``lerp_`` as optimiser.
The scopes come from the chrome trace: each kernel's ``External id`` names the CPU op that launched
it, and CPU ops nest by time on their thread. To make scopes reliable, this script wraps the four
fasttips ops (``fasttips.kernels.attention``/``attention_varlen``/``prototype_cross_entropy``/
``ema_update_``) in ``record_function("fasttips.<op>")`` for the profiled step; backward kernels are
recognised by the autograd node that runs them (``GeneratedBackwardFor_fasttips_prototype_ce_...``, ``attn_bwd_...``,
``...AttentionBackward``). Known limit: on the CPU the reference attention's backward is plain
``bmm``/softmax-backward ops under generic autograd nodes, so it counts as GEMMs/elementwise.

Output: a table on stdout, one JSON line appended to ``OUT/profile_step-<device>.jsonl`` (and to
$FASTTIPS_BENCH_STREAM when set), and a bar chart ``OUT/plots/profile_step-<device>.png``.
OUT defaults to bench/results. ``--quick``: on the CPU, the tiny preset at 56/28 px (the dry run).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from typing import Iterable, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import harness  # noqa: E402

GAPS = "host gaps"
ELEMENTWISE = "norms+elementwise"
# (category, pattern): tried in order on the name, then on each enclosing scope, innermost first
RULES: list[tuple[str, re.Pattern]] = [(c, re.compile(p, re.IGNORECASE)) for c, p in [
    ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter|c10d::|broadcast|Memcpy PtoP|"
                      r"record_param_comms"),
    ("optimiser", r"Optimizer\.(step|zero_grad)|adamw?|multi_tensor_apply.*Adam|clip_grad|_foreach_norm|"
                  r"fasttips\.optimiser"),
    ("EMA", r"fasttips\.ema|ema_update|_ema_chunks_kernel"),
    ("prototype CE", r"fasttips(\.|::|_)prototype_ce|PrototypeCE|prototype_cross_entropy|_grad_[zws]_kernel|"
                     r"_row_ce_kernel|(token|prototype)_lse|dino_loss"),
    ("attention", r"fasttips\.attention|attn|attention|flash|fmha|sdpa|scaled_dot_product"),
    ("GEMMs", r"gemm|cublas|cutlass|nvjet|xmma|wgmma|aten::(mm|addmm|bmm|baddbmm|matmul|linear|_convolution|"
              r"convolution|conv2d|cudnn_convolution)|\b(Mm|Addmm|Bmm|Convolution)Backward|triton_tem_fused_mm"),
]]
CATEGORIES = [c for c, _ in RULES] + [ELEMENTWISE, GAPS]
# scopes that only organise the trace (never a category's evidence by themselves)
_STEP_SCOPE = "fasttips.train_step"


def classify(name: str, scopes: Sequence[str] = ()) -> str:
    """The category of a kernel or op ``name`` launched inside ``scopes`` (innermost first): the
    first rule (in ``RULES`` order) that matches the name or any scope, else norms+elementwise. A
    scope outranks the op's own name, so a matmul inside the prototype loss or the optimiser counts
    there, not as a GEMM."""
    names = [name, *scopes]
    for category, pattern in RULES:
        if any(pattern.search(n) for n in names):
            return category
    return ELEMENTWISE


# ------------------------------------------------------------------------------------------------
# Chrome-trace analysis (pure: tested on a recorded trace fragment)
# ------------------------------------------------------------------------------------------------
def _intervals_union(spans: Iterable[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _parents(ops: list[dict]) -> dict[int, dict | None]:
    """Innermost enclosing op of each op on the same thread (time nesting), by index."""
    parent: dict[int, dict | None] = {}
    by_thread: dict = {}
    for i, op in enumerate(ops):
        by_thread.setdefault((op.get("pid"), op.get("tid")), []).append(i)
    for idxs in by_thread.values():
        idxs.sort(key=lambda i: (ops[i]["ts"], -ops[i]["dur"]))
        stack: list[int] = []
        for i in idxs:
            start = ops[i]["ts"]
            while stack and ops[stack[-1]]["ts"] + ops[stack[-1]]["dur"] <= start:
                stack.pop()
            parent[i] = stack[-1] if stack else None
            stack.append(i)
    return parent


def analyse_trace(trace: dict) -> dict:
    """{"step_ms", "device": bool, "categories": {category: ms}, "top": {category: [[name, ms], ...]}}
    for the ``fasttips.train_step`` scope of a torch.profiler chrome trace."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    ops = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation")]
    n_ops = len(ops)
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    steps = [e for e in ops if e["name"] == _STEP_SCOPE]
    if not steps:
        raise ValueError(f"trace has no '{_STEP_SCOPE}' scope")
    step = max(steps, key=lambda e: e["dur"])
    t0, t1 = step["ts"], step["ts"] + step["dur"]
    # runtime calls (cudaLaunchKernel, ...) join the nesting only to find the op around a launch
    # whose kernel carries no External id (Triton launches from Python may not), by correlation
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    ops = ops + runtime
    parent = _parents(ops)

    def scopes_of(i: int | None) -> list[str]:
        names = []
        while i is not None:
            names.append(ops[i]["name"])
            i = parent[i]
        return names

    per_cat = {c: 0.0 for c in CATEGORIES}
    top: dict[str, dict[str, float]] = {c: {} for c in CATEGORIES}

    def add(category: str, name: str, us: float) -> None:
        per_cat[category] += us
        top[category][name] = top[category].get(name, 0.0) + us

    if kernels:
        by_ext, by_corr = {}, {}
        for i, op in enumerate(ops[:n_ops]):
            ext = op.get("args", {}).get("External id")
            if ext is not None:
                by_ext.setdefault(ext, i)
        for i in range(n_ops, len(ops)):
            corr = ops[i].get("args", {}).get("correlation")
            if corr is not None:
                by_corr[corr] = i
        inside = [k for k in kernels if t0 <= k["ts"] < t1]
        for k in inside:
            args = k.get("args", {})
            i = by_ext.get(args.get("External id"))
            if i is None:
                i = by_corr.get(args.get("correlation"))
            add(classify(k["name"], scopes_of(i)), k["name"], k["dur"])
        covered = _intervals_union((max(k["ts"], t0), min(k["ts"] + k["dur"], t1)) for k in inside)
    else:
        children_time: dict[int, float] = {}
        for i, op in enumerate(ops):
            p = parent[i]
            if p is not None:
                children_time[p] = children_time.get(p, 0.0) + op["dur"]
        covered = 0.0
        for i, op in enumerate(ops):
            if op.get("cat") != "cpu_op" or not (t0 <= op["ts"] < t1):
                continue
            self_us = max(0.0, op["dur"] - children_time.get(i, 0.0))
            add(classify(op["name"], scopes_of(parent[i])), op["name"], self_us)
            covered += self_us
        # annotations' own time (Python between the ops inside a scope) is not covered by an op
    per_cat[GAPS] = max(0.0, step["dur"] - covered)
    return {"step_ms": step["dur"] / 1e3, "device": bool(kernels),
            "categories": {c: per_cat[c] / 1e3 for c in CATEGORIES},
            "top": {c: [[n, us / 1e3] for n, us in sorted(v.items(), key=lambda kv: -kv[1])[:5]]
                    for c, v in top.items() if v}}


# ------------------------------------------------------------------------------------------------
# Profiling one step
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def scoped_ops():
    """Wrap the four fasttips ops (whatever implementation is current) in record_function scopes."""
    import fasttips.kernels as ops
    labels = {"attention": "fasttips.attention", "attention_varlen": "fasttips.attention",
              "prototype_cross_entropy": "fasttips.prototype_ce", "ema_update_": "fasttips.ema"}
    saved = {name: getattr(ops, name) for name in labels}

    def wrap(fn, label):
        def scoped(*args, **kwargs):
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)
        return scoped
    try:
        for name, label in labels.items():
            setattr(ops, name, wrap(saved[name], label))
        yield
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)


def profile_step(preset: str, batch: int, kernels: str = "auto", overrides: Sequence[str] = (),
                 compile: bool = False) -> tuple[dict, dict]:
    """(analysis, case) of one profiled training step after two warm-up steps."""
    import bench_train_step as bts
    overrides = list(overrides) + (["train.compile=true"] if compile else [])
    with bts.implementation(kernels) as (impl, extra), tempfile.TemporaryDirectory() as run_dir:
        trainer = bts.build_trainer(preset, batch, overrides + extra, run_dir)
        it = iter(trainer.loader)
        batches = [trainer.next_batches([it]) for _ in range(3)]
        values = trainer.schedules(100)
        with scoped_ops():
            for b in batches[:2]:
                trainer.training.train_step(b, values)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()
            with torch.profiler.profile(activities=activities) as prof:
                with torch.profiler.record_function(_STEP_SCOPE):
                    trainer.training.train_step(batches[2], values)   # ends in a host read (flags)
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            prof.export_chrome_trace(f.name)
            with open(f.name) as fh:
                trace = json.load(fh)
        cfg = trainer.cfg
        case = {"preset": preset, "batch_per_device": batch, "impl": impl, "compile": compile,
                "global_size": cfg.data.global_size, "local_size": cfg.data.local_size,
                "n_local": cfg.data.n_local, "prototypes": cfg.heads.prototypes,
                "precision": str(trainer.ctx.param_dtype).replace("torch.", ""), "overrides": overrides + extra}
        trainer = None
    return analyse_trace(trace), case


def table(analysis: dict, title: str) -> str:
    step = analysis["step_ms"]
    lines = [title, f"  {'category':<20}{'ms':>10}{'% of step':>11}  top names"]
    for c in CATEGORIES:
        ms = analysis["categories"][c]
        names = ", ".join(n[:40] for n, _ in analysis["top"].get(c, [])[:2])
        lines.append(f"  {c:<20}{ms:>10.2f}{100 * ms / step if step else 0:>10.1f}%  {names}")
    lines.append(f"  {'step (wall)':<20}{step:>10.2f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str | None:
    """Horizontal stacked bar per row (impl/compile): ms per category."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.5 * len(rows)), dpi=100)
    labels = [f"{r['case']['impl']}{' +compile' if r['case']['compile'] else ''} (b={r['case']['batch_per_device']})"
              for r in rows]
    left = [0.0] * len(rows)
    for j, c in enumerate(CATEGORIES):
        widths = [r["categories"][c] for r in rows]
        ax.barh(labels, widths, left=left, color=f"C{j}", label=c)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("ms per training step")
    ax.set_title(f"{rows[0]['case']['preset']} step on {rows[0]['device']}", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", help="default: vit-l on CUDA, tiny on the CPU")
    parser.add_argument("--batch", type=int, help="per-device batch (default: 64 on CUDA, 4 on the CPU)")
    parser.add_argument("--kernels", default="auto", help="comma-separated, from auto (fasttips), plain")
    parser.add_argument("--compile", default="off", help="off, on, or off,on (per-block torch.compile)")
    parser.add_argument("--out", default=harness.RESULTS_DIR, help="folder for the JSON lines and plots/")
    parser.add_argument("--quick", action="store_true", help="small shapes (the CPU dry run)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    preset = args.preset or ("vit-s" if args.quick and cuda else "vit-l" if cuda else "tiny")
    batch = args.batch or (64 if cuda else 4)
    overrides = [] if cuda or not args.quick else ["data.global_size=56", "data.local_size=28"]
    compiles = [{"off": False, "on": True}[c.strip()] for c in args.compile.split(",")]
    device = torch.device("cuda" if cuda else "cpu")
    env = harness.environment(device)
    slug = harness.device_slug(env["device"])
    rows = []
    for kernels in [k.strip() for k in args.kernels.split(",")]:
        for comp in compiles:
            t = time.perf_counter()
            analysis, case = profile_step(preset, batch, kernels, overrides, comp)
            row = {"bench": "profile_step", "case": case, "impl": case["impl"], "quick": args.quick,
                   **analysis, **env, "wall_s": time.perf_counter() - t}
            rows.append(row)
            print(table(analysis, f"== {preset} {case['impl']}{' compiled' if comp else ''}, batch {batch}, "
                                  f"on {env['device']} =="), flush=True)
            path = os.path.join(args.out, f"profile_step-{slug}.jsonl")
            os.makedirs(args.out, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
            harness.stream_row(row)
    png = plot(rows, os.path.join(args.out, "plots", f"profile_step-{slug}.png"))
    print(f"wrote {path}" + (f" and {png}" if png else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["classify", "analyse_trace", "profile_step", "CATEGORIES", "RULES"]
