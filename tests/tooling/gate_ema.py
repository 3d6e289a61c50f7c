"""Hopper compile gate for the EMA kernel: each (student dtype, momentum on device or not) specialisation,
compiled ahead of time for sm_90a (no GPU needed) and checked by ``hopper.py``.

Like the other ops' gates, the compiles run in spawned worker processes with TRITON_INTERPRET=0, so
the result never depends on what ran before in the test process (an in-process compile after
interpreted launches sees the interpreter's objects and fails).
"""
from __future__ import annotations

STUDENT_TYPES = ("*fp32", "*bf16")


def cases() -> list[tuple[str, bool]]:
    return [(student_type, on_device) for student_type in STUDENT_TYPES for on_device in (True, False)]


def compile_case(case):
    from .hopper import compile_for_hopper

    from fasttips.kernels.ema import kernels as K, triton as T
    student_type, momentum_on_device = case
    signature = dict(teacher_base="*fp32", student_base=student_type, chunk_table="*i64", num_chunks="i32",
                     momentum_ptr="*fp32", momentum_value="fp32", BLOCK="constexpr",
                     MOMENTUM_ON_DEVICE="constexpr", TEACHER_VEC="constexpr", STUDENT_VEC="constexpr")
    constexprs = dict(BLOCK=T.BLOCK, MOMENTUM_ON_DEVICE=momentum_on_device, TEACHER_VEC=4,
                      STUDENT_VEC=8 if student_type == "*bf16" else 4)
    return compile_for_hopper(K.ema_chunks_kernel, signature, constexprs, num_warps=T.NUM_WARPS,
                              name=f"ema_{student_type[1:]}_momentum_{'device' if momentum_on_device else 'value'}")


def compile_all(workers: int | None = None) -> dict:
    """{case: HopperReport, or the exception its compile raised}."""
    from .hopper import compile_in_workers
    return compile_in_workers(compile_case, cases(), workers)
