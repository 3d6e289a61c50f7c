"""The EMA kernel: one program strides over rows of the chunk table (see triton.py for the layout).

Per element, torch.lerp's two-sided form (exact at both ends, the rounding of ``_foreach_lerp_``):
full chunks load and store unmasked, so that with the alignment hints they use 16-byte vectors.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_chunks", "momentum_value"])
def ema_chunks_kernel(teacher_base, student_base, chunk_table, num_chunks,
                       momentum_ptr, momentum_value,
                       BLOCK: tl.constexpr, MOMENTUM_ON_DEVICE: tl.constexpr,
                       TEACHER_VEC: tl.constexpr, STUDENT_VEC: tl.constexpr):
    if MOMENTUM_ON_DEVICE:
        m = tl.load(momentum_ptr).to(tl.float32)
    else:
        m = tl.cast(momentum_value, tl.float32)
    w = 1.0 - m                      # lerp weight towards the student
    # torch.lerp's two-sided form (exact at both ends, the rounding of _foreach_lerp_); the side is
    # a scalar choice, made once
    near_teacher = w < 0.5
    cols = tl.arange(0, BLOCK)
    for c in range(tl.program_id(0), num_chunks, tl.num_programs(0)):
        row = chunk_table + 3 * tl.cast(c, tl.int64)
        t_off = tl.multiple_of(tl.load(row), TEACHER_VEC)
        s_off = tl.multiple_of(tl.load(row + 1), STUDENT_VEC)
        n = tl.load(row + 2)
        t_ptrs = teacher_base + t_off + cols
        s_ptrs = student_base + s_off + cols
        if n == BLOCK:               # full chunk: unmasked, so loads and stores vectorise
            t = tl.load(t_ptrs)
            s = tl.load(s_ptrs).to(tl.float32)
            d = s - t
            tl.store(t_ptrs, tl.where(near_teacher, t + w * d, s - d * (1.0 - w)))
        else:                        # the tail of a tensor
            mask = cols < n
            t = tl.load(t_ptrs, mask=mask)
            s = tl.load(s_ptrs, mask=mask).to(tl.float32)
            d = s - t
            tl.store(t_ptrs, tl.where(near_teacher, t + w * d, s - d * (1.0 - w)), mask=mask)
