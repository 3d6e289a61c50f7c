"""The Hopper compile gate, shared by the kernel tests (``gate_<op>.py`` names each op's compiles).

The gate (DESIGN.md) compiles a Triton kernel ahead of time for sm_90a on a machine with no
GPU (the triton wheel ships ptxas and cuobjdump) and reads what the interpreter cannot check:
shared memory, register spills and whether matmuls use Hopper's HGMMA instructions.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

H100_SHARED_MEMORY_BYTES = 227 * 1024


@dataclass
class HopperReport:
    name: str
    shared_bytes: int
    registers: int
    local_bytes: int
    stack_bytes: int
    has_hgmma: bool
    has_wgmma_ptx: bool

    def check(self, matmul: bool) -> None:
        """Assert: fits shared memory, no spills, and (for matmul kernels) HGMMA in the SASS."""
        assert self.shared_bytes <= H100_SHARED_MEMORY_BYTES, (
            f"{self.name}: {self.shared_bytes} B shared memory > {H100_SHARED_MEMORY_BYTES} B")
        assert self.local_bytes == 0 and self.stack_bytes == 0, (
            f"{self.name}: register spills (LOCAL={self.local_bytes}, STACK={self.stack_bytes}, "
            f"REG={self.registers})")
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
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              # FMA fusion stated, not defaulted: the launches get Triton's default, which is
                              # on up to 3.9 and announced to turn off in 3.10 (then this gate must follow)
                              options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_nvidia_bin("cuobjdump"), "-res-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_nvidia_bin("cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout

    def field(key):
        m = re.search(rf"{key}:(\d+)", usage)
        return int(m.group(1)) if m else 0

    return HopperReport(
        name=name or getattr(fn, "__name__", "kernel"),
        shared_bytes=int(compiled.metadata.shared),
        registers=field("REG"),
        local_bytes=field("LOCAL"),
        stack_bytes=field("STACK"),
        has_hgmma="HGMMA" in sass,
        has_wgmma_ptx="wgmma" in compiled.asm["ptx"],
    )


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
