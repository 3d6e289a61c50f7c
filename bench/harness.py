"""One benchmark harness for every ``bench/bench_*.py``.

    bench = Bench("attention", quick=args.quick)
    t = bench.time(fn, inputs=[args0, args1])          # dict(ms=median, p20=..., p80=...)
    bench.add(case={...}, impl="fasttips", timing=t, flops=..., bytes=...)
    bench.report(baseline="torch-eager"); bench.write()

Timing: on CUDA each call is bracketed by its own pair of CUDA events after a warm-up, and the inputs
rotate from call to call so that no call finds its operands in L2 from the call before; on CPU the same
loop runs on the wall clock. Every row carries the environment (device, versions, git commit, date)
and, on GPU, the percentage of two ceilings measured once per process: a bf16 matmul's TFLOP/s and a
device-to-device copy's GB/s. Peers are measured in the same process, never copied from papers.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import time
from typing import Any, Callable, Sequence

import torch

# $FASTTIPS_BENCH_RESULTS redirects every bench's rows (bench/gpu_session.sh points it into $OUT, so
# that a session's rows come back as whole files and the checkout's bench/results/ stays untouched).
RESULTS_DIR = (os.environ.get("FASTTIPS_BENCH_RESULTS")
               or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
# When set, every row is also appended to this file the moment it is measured (and flushed to disk),
# so that a run killed part-way (a GPU session's time limit) still returns the rows it measured.
STREAM_ENV = "FASTTIPS_BENCH_STREAM"


def stream_row(row: dict) -> None:
    """Append ``row`` as one JSON line to $FASTTIPS_BENCH_STREAM (nothing when it is unset)."""
    path = os.environ.get(STREAM_ENV)
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------
# FLOP and byte models (explicit, so every number in a row can be checked by hand)
# ------------------------------------------------------------------------------------------------
def matmul_flops(m: int, n: int, k: int, batch: int = 1) -> int:
    """[m, k] @ [k, n]: one multiply and one add per (m, n, k)."""
    return 2 * batch * m * n * k


ATTENTION_MODES = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}  # FA convention: bwd = 2.5 × fwd


def attention_flops(B: int, H: int, N: int, D: int, mode: str = "fwd", N_k: int | None = None) -> int:
    """Non-causal attention: fwd is two matmuls (QKᵀ and PV) = 4·N·N_k·D per head."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"mode={mode!r} is not allowed; choose one of {list(ATTENTION_MODES)}")
    fwd = 4 * B * H * N * (N if N_k is None else N_k) * D
    return int(fwd * ATTENTION_MODES[mode])


def attention_varlen_flops(seqlens: Sequence[int], H: int, D: int, mode: str = "fwd") -> int:
    """Packed attention: the sum over segments of the dense count (no cross-segment work)."""
    return sum(attention_flops(1, H, int(n), D, mode) for n in seqlens)


def copy_bytes(n_bytes: int) -> int:
    """A copy reads and writes every byte once."""
    return 2 * n_bytes


def ema_bytes(n_params: int, student_bytes: int = 4, teacher_bytes: int = 4) -> int:
    """teacher ← m·teacher + (1−m)·student: read teacher and student, write teacher."""
    return n_params * (2 * teacher_bytes + student_bytes)


# ------------------------------------------------------------------------------------------------
# Environment and device ceilings
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def env_var(name: str, value: str | None):
    """``os.environ[name] = value`` for the duration (``None``: leave it as it is), then the old value
    back (for the kernels' deployment override FASTTIPS_KERNELS)."""
    if value is None:
        yield
        return
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _git_commit() -> str | None:
    """HEAD of this checkout (+"-dirty"), or $FASTTIPS_GIT_COMMIT where the copy has no .git
    (the GPU machine gets a bare copy of the working tree)."""
    if os.environ.get("FASTTIPS_GIT_COMMIT"):
        return os.environ["FASTTIPS_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        commit = out.stdout.strip() or None
        if commit:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10,
                                   cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
            commit += "-dirty" if dirty else ""
        return commit
    except Exception:  # no git, or not a checkout
        return None


def environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{platform.machine()}" + (f" ({platform.processor()})" if platform.processor() else "")
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    }


def device_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'nvidia-h100-80gb-hbm3' (used in result file names)."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown"


_CEILINGS: dict[str, dict[str, float]] = {}


def measure_ceilings(device: torch.device, quick: bool = False) -> dict[str, float | None]:
    """bf16 matmul TFLOP/s and device-to-device copy GB/s, measured once per process and device."""
    if device.type != "cuda":
        return {"matmul_tflops": None, "copy_gbps": None}
    key = str(device)
    if key not in _CEILINGS:
        n = 4096 if quick else 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        mm = _time_cuda(lambda x, y: torch.mm(x, y), [(a, b)], warmup_ms=50, rep_ms=200)
        numel = (1 << 28)  # 1 GiB of fp32: far larger than L2
        src = torch.empty(numel, device=device, dtype=torch.float32)
        dst = torch.empty_like(src)
        cp = _time_cuda(lambda d, s: d.copy_(s), [(dst, src)], warmup_ms=50, rep_ms=200)
        # best (p20) rather than median: a ceiling is what the device can do, not what it usually does
        _CEILINGS[key] = {
            "matmul_tflops": matmul_flops(n, n, n) / (mm["p20"] * 1e-3) / 1e12,
            "copy_gbps": copy_bytes(numel * 4) / (cp["p20"] * 1e-3) / 1e9,
        }
        del a, b, src, dst
        torch.cuda.empty_cache()
    return dict(_CEILINGS[key])


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), q in [0, 1]."""
    if not values:
        raise ValueError("quantile of no values")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples_ms: Sequence[float]) -> dict[str, float]:
    return {"ms": quantile(samples_ms, 0.5), "p20": quantile(samples_ms, 0.2),
            "p80": quantile(samples_ms, 0.8), "n": len(samples_ms)}


def _as_args(inputs) -> list[tuple]:
    if inputs is None:
        return [()]
    args = [tuple(x) if isinstance(x, (tuple, list)) else (x,) for x in inputs]
    if not args:
        raise ValueError("inputs must hold at least one argument tuple")
    return args


def _time_cuda(fn, args, warmup_ms: float, rep_ms: float, min_reps: int = 10, max_reps: int = 10_000):
    # estimate the cost of one call, then warm up and measure for a fixed time window each
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(5):
        fn(*args[i % len(args)])
    end.record()
    torch.cuda.synchronize()
    per_call = max(start.elapsed_time(end) / 5, 1e-3)
    for i in range(max(1, int(warmup_ms / per_call))):
        fn(*args[i % len(args)])
    reps = int(min(max(rep_ms / per_call, min_reps), max_reps))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        a = args[i % len(args)]
        starts[i].record()
        fn(*a)
        ends[i].record()
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


def _time_cpu(fn, args, warmup_ms: float, rep_ms: float, min_reps: int = 5, max_reps: int = 10_000):
    t0 = time.perf_counter()
    fn(*args[0])
    per_call = max((time.perf_counter() - t0) * 1e3, 1e-4)
    for i in range(min(int(warmup_ms / per_call), 100)):
        fn(*args[i % len(args)])
    reps = int(min(max(rep_ms / per_call, min_reps), max_reps))
    samples = []
    for i in range(reps):
        a = args[i % len(args)]
        t = time.perf_counter()
        fn(*a)
        samples.append((time.perf_counter() - t) * 1e3)
    return summarize(samples)


# ------------------------------------------------------------------------------------------------
# The harness
# ------------------------------------------------------------------------------------------------
class Bench:
    """Collects rows for one benchmark; see the module docstring for the flow."""

    def __init__(self, name: str, quick: bool = False, device: str | torch.device | None = None,
                 results_dir: str | None = None, measure_device_ceilings: bool = True):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"Bench name {name!r}: use letters, digits, '.', '_' and '-' only")
        self.name = name
        self.quick = quick
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.results_dir = results_dir or RESULTS_DIR
        self.env = environment(self.device)
        self.ceilings = (measure_ceilings(self.device, quick) if measure_device_ceilings
                         else {"matmul_tflops": None, "copy_gbps": None})
        self.rows: list[dict[str, Any]] = []
        # time windows per measurement: short in --quick, long enough otherwise that p20/p80 mean something
        self.warmup_ms, self.rep_ms = (10.0, 50.0) if quick else (50.0, 300.0)

    # -- measuring --------------------------------------------------------------------------------
    def time(self, fn: Callable, inputs: Sequence | None = None, warmup_ms: float | None = None,
             rep_ms: float | None = None) -> dict[str, float]:
        """Median/p20/p80 milliseconds of ``fn(*inputs[i % len(inputs)])``, rotating the inputs."""
        args = _as_args(inputs)
        warmup = self.warmup_ms if warmup_ms is None else warmup_ms
        rep = self.rep_ms if rep_ms is None else rep_ms
        if self.device.type == "cuda":
            return _time_cuda(fn, args, warmup, rep)
        return _time_cpu(fn, args, warmup, rep)

    def peak_memory(self, fn: Callable, *args) -> int | None:
        """Peak bytes allocated by ``fn(*args)`` beyond what was allocated before it (CUDA), else None."""
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn(*args)
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device) - before)

    # -- rows -------------------------------------------------------------------------------------
    def add(self, case: dict, impl: str, timing: dict, flops: float | None = None,
            bytes: float | None = None, peak_mem: int | None = None, **extra) -> dict[str, Any]:
        """Record one (case, impl) measurement, deriving TFLOP/s, GB/s and % of the device ceilings."""
        seconds = timing["ms"] * 1e-3
        tflops = flops / seconds / 1e12 if flops is not None and seconds > 0 else None
        gbps = bytes / seconds / 1e9 if bytes is not None and seconds > 0 else None
        peak_tf, peak_bw = self.ceilings.get("matmul_tflops"), self.ceilings.get("copy_gbps")
        row = {
            "bench": self.name, "case": dict(case), "impl": impl,
            "ms": timing["ms"], "p20": timing.get("p20"), "p80": timing.get("p80"), "reps": timing.get("n"),
            "flops": flops, "bytes": bytes, "tflops": tflops, "gbps": gbps,
            "pct_matmul_peak": 100 * tflops / peak_tf if tflops is not None and peak_tf else None,
            "pct_copy_bw": 100 * gbps / peak_bw if gbps is not None and peak_bw else None,
            "peak_mem": peak_mem, "quick": self.quick,
            "ceilings": dict(self.ceilings), **self.env, **extra,
        }
        self.rows.append(row)
        stream_row(row)
        return row

    def report(self, baseline: str | None = None, file=None) -> str:
        """Print (and return) one table per case; ``×base`` is the baseline's time over this impl's."""
        lines = [f"== {self.name} on {self.env['device']} (torch {self.env['torch']}, triton "
                 f"{self.env['triton']}, commit {self.env['git_commit']}) =="]
        cases: dict[str, list[dict]] = {}
        for row in self.rows:
            cases.setdefault(json.dumps(row["case"], sort_keys=True), []).append(row)
        width = max([24] + [len(str(r["impl"])) + 2 for r in self.rows])
        header = f"  {'impl':<{width}}{'ms':>10}{'p20–p80':>20}{'TFLOP/s':>9}{'GB/s':>9}{'%peak':>7}{'×base':>7}"
        for key, rows in cases.items():
            lines += [f"case {key}", header]
            base = next((r["ms"] for r in rows if r["impl"] == baseline), None)
            for r in rows:
                pct = r["pct_matmul_peak"] if r["pct_matmul_peak"] is not None else r["pct_copy_bw"]
                lines.append(
                    f"  {r['impl']:<{width}}{r['ms']:>10.4f}{_span(r):>20}{_fmt(r['tflops'], 9, 1)}"
                    f"{_fmt(r['gbps'], 9, 0)}{_fmt(pct, 7, 1)}"
                    f"{_fmt(base / r['ms'] if base and r['ms'] > 0 else None, 7, 2)}")
        text = "\n".join(lines)
        print(text, file=file, flush=True)
        return text

    def results_path(self) -> str:
        return os.path.join(self.results_dir, f"{self.name}-{device_slug(self.env['device'])}.jsonl")

    def write(self, path: str | None = None) -> str:
        """Append every row as one JSON line; returns the file's path."""
        path = path or self.results_path()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a") as f:
            for row in self.rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")
        return path


def _span(row) -> str:
    if row.get("p20") is None or row.get("p80") is None:
        return "-"
    return f"{row['p20']:.4f}–{row['p80']:.4f}"


def _fmt(value, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"
