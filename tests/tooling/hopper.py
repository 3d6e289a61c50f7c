"""The Hopper compile gate and performance lint, shared by the kernel tests (``gate_<op>.py`` names
each op's compiles).

The gate (DESIGN.md) compiles a Triton kernel ahead of time for sm_90a on a machine with no GPU (the
triton wheel ships ptxas and cuobjdump) and reads what the interpreter cannot check. It fails on:
shared memory over the H100's 227 KB, register spills (cuobjdump's LOCAL/STACK, ptxas's spill bytes),
ptxas serialising wgmma instructions (its C7515-style "Potential Performance Loss" notes: the tensor
cores then wait for each other), and a
matmul kernel without Hopper's HGMMA instructions. Per kernel and configuration it reports registers,
shared memory, CTAs per SM, HGMMA instructions and ptxas warnings (``HopperReport.summary``).

The ptxas log is the one Triton's own ptxas run prints with TRITON_DUMP_PTXAS_LOG=1; when the kernel
comes from Triton's cache (no ptxas run), ptxas runs once more on the PTX with Triton's options. That
is the ptxas Triton picks for sm_90 (``get_ptxas(90)``: under Triton 3.9 the newer one the wheel ships,
not the legacy ``bin/ptxas``, which misses some C7515 notes).

The SASS is read too (``sass_profile``): per innermost loop the HGMMA instructions, the tensor-core
GEMMs (wgmma groups: the HGMMA that ends a group carries ``gsb0``), the exps (MUFU.EX2) and any
``HMMA`` (mma.sync, the pre-Hopper path); over the kernel the TMA loads / stores (UTMALDG / UTMASTG),
``USETMAXREG`` (the register split a warp-specialised kernel makes between its producer and consumer
warps: its presence, not the source's flag, says warp specialisation happened) and the atomics.
``HopperReport.check_expected`` checks these against what a kernel claims (``Expected``).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

H100_SHARED_MEMORY_BYTES = 227 * 1024       # per block (opt-in maximum)
H100_SM_SHARED_BYTES = 228 * 1024           # per SM
H100_SM_REGISTERS = 65536
H100_SM_WARPS = 64
H100_SM_BLOCKS = 32
# ptxas says "(C7510/C7511/C7515...) Potential Performance Loss: wgmma.mma_async instructions are
# serialized due to ..." as an info line, not a warning
WGMMA_SERIALISED = "wgmma.mma_async instructions are serialized"


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
SASS_COUNTED = ("HGMMA", "HMMA", "MUFU.EX2", "UTMALDG", "UTMASTG", "USETMAXREG", "REDG", "ATOMG")


@dataclass(frozen=True)
class LoopProfile:
    """One innermost loop of the SASS (an address range closed by a backward branch that holds no
    other loop): what one iteration executes, per thread."""
    start: int
    end: int
    hgmma: int
    gemms: int          # wgmma groups: the last HGMMA of each carries gsb0
    ex2: int
    hmma: int


def _instructions(sass: str) -> list[tuple[int, str, str]]:
    out = []
    for line in sass.splitlines():
        m = _INSN.search(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return out


def _count(insns, name: str) -> int:
    return sum(1 for _, op, _ in insns if op == name or op.startswith(name + "."))


def sass_profile(sass: str) -> tuple[dict, tuple]:
    """({instruction: count over the kernel} for SASS_COUNTED, innermost loops with tensor-core or
    exp work as LoopProfiles, in address order; when no loop does tensor-core work, the whole kernel
    comes last as one more "loop", so that a one-tile kernel's GEMMs are counted too)."""
    insns = _instructions(sass)
    ranges = set()
    for addr, op, args in insns:
        m = _BRANCH_TARGET.search(args) if op.startswith("BRA") else None
        if m and int(m.group(1), 16) < addr:
            ranges.add((int(m.group(1), 16), addr))
    innermost = [r for r in ranges if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in ranges)]
    loops = [_profile(insns, start, end) for start, end in sorted(innermost)]
    loops = [lp for lp in loops if lp.hgmma or lp.ex2 or lp.hmma]
    if not any(lp.hgmma for lp in loops) and insns:   # no loop does tensor-core work: the kernel is one step
        loops.append(_profile(insns, insns[0][0], insns[-1][0]))
    return {name: _count(insns, name) for name in SASS_COUNTED}, tuple(loops)


def _profile(insns, start: int, end: int) -> LoopProfile:
    body = [i for i in insns if start <= i[0] <= end]
    hgmma = [i for i in body if i[1].startswith("HGMMA")]
    return LoopProfile(start, end, hgmma=len(hgmma), gemms=sum("gsb0" in args for _, _, args in hgmma),
                       ex2=_count(body, "MUFU.EX2"), hmma=_count(body, "HMMA"))


@dataclass(frozen=True)
class Expected:
    """What a kernel configuration claims, checked against its SASS by ``HopperReport.check_expected``.

    ``gemms_per_step``: tensor-core GEMMs per iteration of the main loop (the innermost loop with
    the most HGMMA); ``scores_per_step``: scores one thread owns per iteration of it, and
    ``ex2_per_step`` the most MUFU.EX2 it may execute per iteration (one per score, plus the online
    softmax's rescale: one per row the thread holds). ``ex2_duplicated``: a known, tracked case that
    executes more (every score twice): the check fails once it no longer does. ``tma``: UTMALDG
    present; ``warp_specialized``: USETMAXREG present; ``mma_sync_ok``: HMMA tolerated (known and
    tracked the same way); budgets on registers and CTAs/SM."""
    gemms_per_step: int | None = None
    scores_per_step: int | None = None
    ex2_per_step: int | None = None
    ex2_duplicated: bool = False
    tma: bool = False
    warp_specialized: bool = False
    mma_sync_ok: bool = False
    max_registers: int | None = None
    min_ctas_per_sm: int | None = None


@dataclass
class HopperReport:
    name: str
    shared_bytes: int
    registers: int
    local_bytes: int
    stack_bytes: int
    has_hgmma: bool
    has_wgmma_ptx: bool
    num_warps: int = 4
    hgmma_count: int = 0
    spill_bytes: int = 0                    # ptxas: spill stores + spill loads
    ptxas_warnings: tuple = ()              # ptxas's warnings and "Potential Performance Loss" notes
    sass_counts: dict | None = None         # sass_profile: instruction counts over the kernel
    loops: tuple = ()                       # sass_profile: innermost loops (LoopProfile)

    @property
    def main_loop(self) -> LoopProfile | None:
        """The innermost loop with the most HGMMA (the steady state of an attention kernel)."""
        return max(self.loops, key=lambda lp: (lp.hgmma, lp.ex2), default=None)

    def count(self, name: str) -> int:
        return (self.sass_counts or {}).get(name, 0)

    @property
    def ctas_per_sm(self) -> int:
        """Resident blocks per SM, from registers (allocated per warp in units of 256), shared memory
        (plus the 1 KB the driver reserves per block) and warps."""
        regs_per_warp = -(-max(self.registers, 1) * 32 // 256) * 256
        by_regs = H100_SM_REGISTERS // (regs_per_warp * self.num_warps)
        by_smem = H100_SM_SHARED_BYTES // (self.shared_bytes + 1024)
        return min(by_regs, by_smem, H100_SM_WARPS // self.num_warps, H100_SM_BLOCKS)

    @property
    def wgmma_serialised(self) -> list[str]:
        return [w for w in self.ptxas_warnings if WGMMA_SERIALISED in w]

    def summary(self) -> str:
        warns = f", ptxas warnings: {len(self.ptxas_warnings)}" if self.ptxas_warnings else ""
        text = (f"{self.name}: {self.registers} registers, {self.shared_bytes} B shared, "
                f"{self.ctas_per_sm} CTAs/SM at {self.num_warps} warps, {self.hgmma_count} HGMMA, "
                f"spills {self.local_bytes + self.stack_bytes + self.spill_bytes} B{warns}")
        if self.sass_counts is not None:
            main = self.main_loop
            step = (f"; main loop: {main.gemms} GEMMs ({main.hgmma} HGMMA), {main.ex2} EX2 per step"
                    if main else "")
            flags = [f for f, name in (("TMA", "UTMALDG"), ("WS", "USETMAXREG"), ("mma.sync", "HMMA"),
                                       ("atomics", "REDG")) if self.count(name)]
            text += step + (f"; {', '.join(flags)}" if flags else "")
        return text

    def check_expected(self, expected: Expected) -> None:
        """Assert what the kernel claims (``Expected``) against its SASS and resources."""
        e, main = expected, self.main_loop
        if e.gemms_per_step is not None:
            assert main is not None and main.gemms == e.gemms_per_step, (
                f"{self.name}: {main.gemms if main else 0} GEMMs per main-loop step, expected {e.gemms_per_step}")
        if e.ex2_per_step is not None:
            ex2 = main.ex2 if main else 0
            if e.ex2_duplicated:
                assert ex2 > e.ex2_per_step, (
                    f"{self.name}: {ex2} EX2 per step, no longer more than {e.ex2_per_step}: drop it from "
                    "the known duplicated-exp cases")
            else:
                assert ex2 <= e.ex2_per_step, (
                    f"{self.name}: {ex2} EX2 per step for {e.scores_per_step} scores per thread "
                    f"({ex2 / e.scores_per_step:.2f} per score), expected ≤ {e.ex2_per_step}")
        if e.tma:
            assert self.count("UTMALDG"), f"{self.name}: claims TMA but has no UTMALDG in its SASS"
        if e.warp_specialized:
            assert self.count("USETMAXREG"), (
                f"{self.name}: claims warp specialisation but has no USETMAXREG in its SASS (Triton "
                "drops it silently, e.g. at 8 warps, on a flattened loop or with a second tensor-core loop)")
        hmma = self.count("HMMA")
        if e.mma_sync_ok:
            assert hmma, f"{self.name}: no HMMA any more: drop it from the known mma.sync kernels"
        else:
            assert not hmma, f"{self.name}: {hmma} HMMA (mma.sync, not wgmma) in a Hopper path"
        if e.max_registers is not None:
            assert self.registers <= e.max_registers, (
                f"{self.name}: {self.registers} registers > budget {e.max_registers}")
        if e.min_ctas_per_sm is not None:
            assert self.ctas_per_sm >= e.min_ctas_per_sm, (
                f"{self.name}: {self.ctas_per_sm} CTAs/SM < budget {e.min_ctas_per_sm}")

    def check(self, matmul: bool, serialised_ok: bool = False) -> None:
        """Assert: fits shared memory, no spills, no serialised wgmma (unless ``serialised_ok``: a
        known case the caller tracks), and (for matmul kernels) HGMMA."""
        assert self.shared_bytes <= H100_SHARED_MEMORY_BYTES, (
            f"{self.name}: {self.shared_bytes} B shared memory > {H100_SHARED_MEMORY_BYTES} B")
        assert self.local_bytes == 0 and self.stack_bytes == 0 and self.spill_bytes == 0, (
            f"{self.name}: register spills (LOCAL={self.local_bytes}, STACK={self.stack_bytes}, "
            f"ptxas spill bytes={self.spill_bytes}, REG={self.registers})")
        assert serialised_ok or not self.wgmma_serialised, (
            f"{self.name}: ptxas serialises wgmma: {self.wgmma_serialised[0]}")
        if matmul:
            assert self.has_hgmma, f"{self.name}: no HGMMA in the SASS (slow HMMA path on Hopper)"


def _nvidia_bin(tool: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def compile_for_hopper(kernel, signature: dict, constexprs: dict, num_warps: int = 4,
                       num_stages: int = 3, name: str | None = None,
                       divisible_by_16: tuple = ()) -> HopperReport:
    """Compile ``kernel`` (a @triton.jit function, interpreted or not) for sm_90a and report resources.

    ``signature`` maps every argument name to a Triton type ("*bf16", "*fp32", "i32", "fp32", ...) or
    "constexpr"; ``constexprs`` gives the constexpr values. ``divisible_by_16`` names the pointer and
    integer arguments that a real launch specialises as multiples of 16 (Triton does this at run time);
    without the hint loads cannot vectorise or be pipelined, so the report would describe another kernel.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # Interpreted launches leave triton.language patched with the interpreter's builders, so an
        # in-process compile would depend on which tests ran before it: compile in a clean process.
        raise RuntimeError("compile_for_hopper runs only with TRITON_INTERPRET=0; call it through "
                           "compile_in_workers (spawned workers), never in a process that interprets kernels")
    fn = kernel
    while not isinstance(fn, JITFunction):  # unwrap autotune/heuristics/interpreter wrappers
        inner = getattr(fn, "fn", None)
        if inner is None:
            break
        if not isinstance(inner, JITFunction) and not hasattr(inner, "fn"):
            fn = JITFunction(inner)  # the interpreter keeps the plain Python function in .fn
            break
        fn = inner
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible_by_16}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), _environ(TRITON_DUMP_PTXAS_LOG="1"):
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  # FMA fusion stated, not defaulted: the launches get Triton's default, which
                                  # is on up to 3.9 and announced to turn off in 3.10 (then this gate must follow)
                                  options={"num_warps": num_warps, "num_stages": num_stages,
                                           "enable_fp_fusion": True})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_nvidia_bin("cuobjdump"), "-res-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_nvidia_bin("cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
        ptxas_log = printed.getvalue()
        if "registers" not in ptxas_log:     # from Triton's cache: no ptxas ran, so run it for its log
            ptxas_log = _ptxas_log(compiled.asm["ptx"], tmp)

    def field(key):
        m = re.search(rf"{key}:(\d+)", usage)
        return int(m.group(1)) if m else 0

    counts, loops = sass_profile(sass)
    return HopperReport(
        name=name or getattr(fn, "__name__", "kernel"),
        shared_bytes=int(compiled.metadata.shared),
        registers=field("REG"),
        local_bytes=field("LOCAL"),
        stack_bytes=field("STACK"),
        has_hgmma="HGMMA" in sass,
        has_wgmma_ptx="wgmma" in compiled.asm["ptx"],
        num_warps=int(compiled.metadata.num_warps),   # a warp-specialised kernel launches more than asked
        hgmma_count=len(re.findall(r"\bHGMMA\.", sass)),
        sass_counts=counts,
        loops=loops,
        **parse_ptxas_log(ptxas_log),
    )


def parse_ptxas_log(log: str) -> dict:
    """Spill bytes (stores + loads) and the warning / performance-loss lines of a ``ptxas -v`` log."""
    return dict(
        spill_bytes=sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)),
        ptxas_warnings=tuple(line.strip() for line in log.splitlines()
                             if "warning" in line.lower() or "Performance Loss" in line))


@contextlib.contextmanager
def _environ(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ptxas_log(ptx: str, tmp: str) -> str:
    """ptxas's -v log for ``ptx`` with the options Triton's NVIDIA backend passes (line info, FMA
    fusion on, --regAllocOptLevel=2): the same machine code, and its warnings."""
    src, out = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "relinted.cubin")
    with open(src, "w") as f:
        f.write(ptx)
    from triton.backends.nvidia.compiler import get_ptxas   # the ptxas Triton picks for sm_90
    run = subprocess.run([get_ptxas(90).path, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a",
                          src, "-o", out], capture_output=True, text=True, check=True)
    return run.stdout + run.stderr


def compile_in_workers(compile_case, cases, workers: int | None = None) -> dict:
    """Run ``compile_case(case)`` for every case in spawned processes with TRITON_INTERPRET=0.

    Returns {case: HopperReport, or the exception its compile raised} so each case's test can report
    its own failure. Spawned workers are needed because under TRITON_INTERPRET=1 the @triton.jit
    helpers a kernel calls (tl.sum, tl.zeros, ...) are interpreter objects the compiler rejects;
    ``compile_case`` must be a module-level function so it can be pickled.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    todo = list(cases)
    workers = workers or max(1, min(len(todo), os.cpu_count() or 1))
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"           # inherited by the spawned workers
    results = {}
    try:
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(compile_case, c): c for c in todo}
            for fut in cf.as_completed(futures):
                try:
                    results[futures[fut]] = fut.result()
                except Exception as exc:
                    results[futures[fut]] = exc
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return results
