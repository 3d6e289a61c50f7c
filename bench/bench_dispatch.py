"""Measured dispatch on the bench shapes, or its decisions replayed from bench rows.

    fasttips bench dispatch [--quick] [--budget-s S] [--json] [--no-write] [--results DIR]
    fasttips bench dispatch --timings FILE [FILE ...] [--json] [--commit SHA] [--deterministic]

Live (no ``--timings``): every op at the shapes of the other benches (attention at N = 257, 1025 and
50 and the multi-crop layer, the prototype CE at T = 16384, K = 65536, the head EMA), forward-only and
training calls, decided by ``fasttips.kernels.dispatch`` exactly as a run decides them (no cache: every
candidate is timed). Prints the table (op, shape, each candidate's time, winner) and writes one row
per (site, candidate) to ``dispatch-<device>.jsonl`` (``site``, ``winner``, ``why`` and ``dropped``
beside the timing). Without CUDA it is a smoke pass at tiny shapes with a wall-clock timer, the fasttips
kernels left out (plain measured dispatch times nothing on the CPU).

Replay (``--timings``): the decisions the same code makes from the timings in bench rows
(``bench/results/*.jsonl``; ``kernels/dispatch/replay.py`` says which rows count), without a GPU.
``--json``: one object per decision (op, case, mode, winner, times, rows, parts, ignored, combine).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from harness import Bench, env_var, summarize  # noqa: E402

import fasttips.kernels as ops  # noqa: E402
from fasttips.kernels import dispatch  # noqa: E402
from fasttips.kernels.dispatch import replay, timing  # noqa: E402

BASELINE = None
DEFAULT_BUDGET_S = 20.0


# ------------------------------------------------------------------------------------------------
# the cases: (op, arguments builder) per device kind
# ------------------------------------------------------------------------------------------------
def _qkv(shape, dtype, device, grad):
    return [torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad) for _ in range(3)]


def dense_case(B, H, N, D, dtype, device):
    def build(grad):
        return ("attention", tuple(_qkv((B, H, N, D), dtype, device, grad)), {})
    return build


def multicrop_case(images, H, D, n_global, n_local, N_global, N_local, dtype, device):
    lengths = [N_global] * (images * n_global) + [N_local] * (images * n_local)
    cu = ops.cu_seqlens_from_lengths(lengths, device)

    def build(grad):
        q, k, v = _qkv((sum(lengths), H, D), dtype, device, grad)
        return ("attention_varlen", (q, k, v, cu), {"max_seqlen": N_global})
    return build


def ce_case(T, K, d, device):
    def build(grad):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        z = F.normalize(torch.randn(T, d, device=device), dim=1).to(dtype).requires_grad_(grad)
        v = torch.randn(K, d, device=device, requires_grad=grad)
        g = torch.ones(K, device=device, requires_grad=grad)
        zt = F.normalize(torch.randn(T, d, device=device), dim=1).to(dtype)
        args = (z, v, g, zt, torch.randn(K, d, device=device), torch.ones(K, device=device),
                torch.randperm(T, device=device), torch.full((T,), 1.0 / T, device=device))
        return ("prototype_cross_entropy", args, {"center": 0.01 * torch.randn(K, device=device)})
    return build


def ema_case(sizes, device):
    def build(grad):
        teacher = [torch.randn(s, device=device) for s in sizes]
        student = [torch.randn(s, device=device) for s in sizes]
        return ("ema_update_", (teacher, student, 0.996), {})
    return build


def cases(device: torch.device, quick: bool) -> list[tuple[str, object, tuple]]:
    """(label, builder, modes) per case."""
    from bench_attention import D, DENSE_CASES, MULTICROP, MULTICROP_CPU
    from bench_ema import ema_shapes
    if device.type != "cuda":
        m = MULTICROP_CPU
        return [("attention 2x2x50", dense_case(2, 2, 50, D, torch.float32, device), ("fwd", "fwd_bwd")),
                ("multicrop (CPU)", multicrop_case(m["images"], m["H"], D, m["n_global"], m["n_local"],
                                                   m["N_global"], m["N_local"], torch.float32, device),
                 ("fwd", "fwd_bwd")),
                ("prototype CE 64x512", ce_case(64, 512, 32, device), ("fwd", "fwd_bwd")),
                ("head EMA (tiny)", ema_case(ema_shapes(2048, D=128, hidden=256), device), ("update",))]
    out = [(f"attention {B}x{H}x{N}", dense_case(B, H, N, D, torch.bfloat16, device), ("fwd", "fwd_bwd"))
           for B, H, N in DENSE_CASES]
    m = MULTICROP
    out.append(("multicrop layer", multicrop_case(m["images"], m["H"], D, m["n_global"], m["n_local"],
                                                  m["N_global"], m["N_local"], torch.bfloat16, device),
                ("fwd", "fwd_bwd")))
    for T, K in ([(16384, 65536)] if quick else [(16384, 65536), (4096, 65536)]):
        out.append((f"prototype CE {T}x{K}", ce_case(T, K, 256, device), ("fwd", "fwd_bwd")))
    for shards in (1, 8):
        out.append((f"head EMA K=65536 shards={shards}", ema_case(ema_shapes(65536, shards=shards), device),
                    ("update",)))
    return out


# ------------------------------------------------------------------------------------------------
# live
# ------------------------------------------------------------------------------------------------
def case_of(site) -> dict:
    """The site's fields as a row's case: sizes and flags that are set (runs as text, no device)."""
    out = {}
    for k, v in site.fields:
        if k == "device" or v is None or v is False:
            continue
        out[k] = replay.runs_text(v) if k == "runs" else v
    return out


def decision_dict(d, device_name: str) -> dict:
    """A live decision in the replay's format (so both print through replay.text and --json)."""
    parts = [dict(p, ms=None) for p in d.parts]
    times = {d.winner_text() if n == d.winner else n: round(ms, 4)
             for n, ms in sorted(d.timings.items(), key=lambda kv: kv[1])}
    return {"device": device_name, "op": d.site.op, "case": case_of(d.site),
            "mode": d.site.mode, "winner": d.winner_text(), "why": d.reason, "times": times,
            "rows": {}, "parts": parts, "ignored": {}, "dropped": dict(d.dropped)}


def run(quick: bool = False, results_dir: str | None = None, budget_s: float = DEFAULT_BUDGET_S,
        quiet: bool = False) -> Bench:
    bench = Bench("dispatch", quick=quick, results_dir=results_dir)
    device = bench.device
    on_gpu = device.type == "cuda"
    if not on_gpu:
        print("no CUDA device: a smoke pass at tiny shapes, timed on the wall clock (measured dispatch "
              "itself times nothing on the CPU); the fasttips kernels are left out (in the Triton "
              "interpreter they would take minutes)", flush=True)
    saved = dispatch.settings()
    dispatch.reset()
    dispatch.configure(cache="off", budget_s=budget_s, timer=None if on_gpu else timing.cpu_samples,
                       log=None if not quiet else (lambda line: None))
    bench.decisions = []
    try:
        with env_var("TRITON_INTERPRET", None if on_gpu else "0"):
            _decide_all(bench, device, quick)
    finally:
        dispatch.reset()
        dispatch.configure(**{k: getattr(saved, k) for k in ("policy", "deterministic", "budget_s",
                                                                "memory_fraction", "cache")})
    return bench


def _decide_all(bench: Bench, device: torch.device, quick: bool) -> None:
    """Every case and mode through ``dispatch.decide``; one row per (measured site, timed candidate)."""
    on_gpu = device.type == "cuda"
    for label, build, modes in cases(device, quick):
        for mode in modes:
            print(f"-- {label} {mode}", flush=True)
            with torch.enable_grad() if mode == "fwd_bwd" else torch.no_grad():
                op, args, kwargs = build(mode == "fwd_bwd")
                made = dispatch.decide(getattr(ops, op), *args, **kwargs)
            for d in made:
                if d.reason != "measured" or any(d is seen for seen in bench.decisions):
                    continue
                bench.decisions.append(d)
                for name, samples in d.samples.items():
                    bench.add(case={"op": d.site.op, "mode": d.site.mode, **case_of(d.site)},
                              impl=name, timing=summarize(samples), site=d.site.key(),
                              winner=d.winner_text(), why=d.reason, dropped=d.dropped)
            del args, kwargs
            if on_gpu:
                torch.cuda.empty_cache()


def report(bench: Bench, as_json: bool = False) -> str:
    decisions = [decision_dict(d, bench.env["device"]) for d in getattr(bench, "decisions", [])]
    if as_json:
        text = "\n".join(json.dumps(d, sort_keys=True) for d in decisions)
    else:
        text = replay.text(decisions, len(bench.rows), 0).replace(
            "== dispatch replay:", "== dispatch measured live:", 1)
    print(text, flush=True)
    return text


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fasttips bench dispatch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timings", nargs="+", metavar="FILE", help="replay: decide from these bench rows "
                   "(bench/results/*.jsonl) instead of measuring")
    p.add_argument("--json", action="store_true", help="one JSON object per decision instead of the table")
    p.add_argument("--commit", metavar="SHA", help="replay only rows whose git_commit starts with SHA")
    p.add_argument("--deterministic", action="store_true",
                   help="replay: admit only candidates with a deterministic backward (kernels.deterministic)")
    p.add_argument("--quick", action="store_true", help="live: fewer prototype CE shapes")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"live: timing budget per op and shape, seconds (default {DEFAULT_BUDGET_S:g})")
    p.add_argument("--no-write", action="store_true", help="live: print the table but write no JSON")
    p.add_argument("--results", metavar="DIR", default=None, help="live: folder for the rows")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.timings:
        try:
            rows = replay.read_rows(args.timings)
        except FileNotFoundError as exc:
            print(f"fasttips bench dispatch: {exc}", file=sys.stderr)
            return 2
        decisions = replay.replay(rows, deterministic=args.deterministic, commit=args.commit)
        if args.json:
            print("\n".join(json.dumps(d, sort_keys=True) for d in decisions))
        else:
            print(replay.text(decisions, len(rows), len(args.timings)))
        return 0
    if args.budget_s <= 0:
        print("fasttips bench dispatch: --budget-s must be > 0", file=sys.stderr)
        return 2
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        bench = run(args.quick, results_dir=args.results, budget_s=args.budget_s)
    report(bench, as_json=args.json)
    if not args.no_write:
        print(f"wrote {bench.write()}", file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
