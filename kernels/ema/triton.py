"""Fused head EMA: teacher[i] ← m·teacher[i] + (1−m)·student[i] for a whole list in one Triton launch.

Layout. The tensor list is cut into chunks of ``BLOCK`` elements. A device table holds one row per
chunk: (teacher element offset, student element offset, chunk length), where an offset is the
chunk's address relative to a base tensor of the same list, counted in elements. Each program
strides over the chunk rows (``range(pid, num_chunks, num_programs)``); the grid is one program per
chunk up to ``MAX_PROGRAMS``, which measured best on H100 (bench/bench_ema.py --sweep). Relative
offsets (rather than raw int64 addresses cast to pointers) keep every address a ``base + offset``
that Triton can reason about: with the alignment hints the full chunks use 16-byte vector loads on
the GPU, and the CPU interpreter runs the very same kernel.

Cost. One read of teacher and student and one write of teacher (12 B/param with fp32 students,
10 B/param with bf16) plus 24 B per chunk of table. The table is built once per list of tensors and
cached by everything the argument checks depend on (address, shape, strides, dtype, device), so a
training loop that passes the same tensors every step pays a dictionary look-up and one launch, and a
call with other shapes or layouts at the same addresses is checked afresh. The momentum may live on
the device (a 1-element tensor), so a momentum schedule never recompiles, never synchronises and can
be replayed in a CUDA graph. The kernel itself is in kernels.py.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch

from .common import check_momentum, check_tensors, local
from .kernels import ema_chunks_kernel

BLOCK = 4096           # elements per chunk: 16 KiB of fp32 teacher
NUM_WARPS = 8          # 256 threads × 16 elements = 4 × 16-byte vectors each per operand
MAX_PROGRAMS = 1 << 20  # programs per launch; past this, each program strides over several chunks
_PLAN_CACHE_SIZE = 16


# ------------------------------------------------------------------------------------------------
# Host side: validation, the cached chunk table, the launch
# ------------------------------------------------------------------------------------------------
class _ChunkTable:
    """The chunk rows of one (teacher list, student list) group, relative to the first tensor of each."""

    def __init__(self, teacher, student, block: int):
        t_item, s_item = teacher[0].element_size(), student[0].element_size()
        t_base, s_base = teacher[0].data_ptr(), student[0].data_ptr()
        rows = []
        aligned = True
        for t, s in zip(teacher, student):
            # relative offsets in elements are exact: every address is a multiple of its element size
            t_off, s_off = (t.data_ptr() - t_base) // t_item, (s.data_ptr() - s_base) // s_item
            aligned &= t.data_ptr() % 16 == 0 and s.data_ptr() % 16 == 0
            for start in range(0, t.numel(), block):
                rows.append((t_off + start, s_off + start, min(block, t.numel() - start)))
        self.num_chunks = len(rows)
        self.table = torch.tensor(rows, dtype=torch.int64).to(teacher[0].device)
        # with every address 16-byte aligned, each chunk starts on a whole 16-byte vector
        self.teacher_vec = 16 // t_item if aligned else 1
        self.student_vec = 16 // s_item if aligned else 1


class _Plan:
    """What one call does for one list of tensors: one launch per student dtype (one in practice)."""

    def __init__(self, teacher, student, block: int):
        self.device = check_tensors(teacher, student)
        groups: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(teacher):
            if t.numel():  # empty shards (FSDP2 ranks past the end of dim 0) have nothing to update
                groups.setdefault(student[i].dtype, []).append(i)
        # (index of the base pair, table) per launch; the base tensors are taken from each call's
        # lists, which hold the same addresses as the ones the table was built from
        self.launches = [(idx[0], _ChunkTable([teacher[i] for i in idx], [student[i] for i in idx], block))
                         for idx in groups.values()]
        # On H100 one program per chunk beat a persistent grid of 4–8 programs per SM by 3–4% (the
        # hardware refills SMs chunk by chunk; a fixed grid leaves a partly idle last round). The
        # kernel still strides, so a grid capped below the chunk count stays correct.
        # (the interpreter runs programs in turn; a cap of 3 exercises the striding)
        self.programs_cap = MAX_PROGRAMS if self.device.type == "cuda" else 3


_plans: OrderedDict = OrderedDict()


def _plan_for(teacher, student, block: int) -> _Plan:
    # Keyed by everything the chunk rows AND the argument checks depend on: addresses, shapes, strides
    # (contiguity), dtypes and devices. A hit therefore means the checks passed for exactly this
    # layout; the same parameters come back every step (or new views of them from ``to_local()`` /
    # ``detach()``), so a hit costs a few attribute reads per tensor.
    key = (block,) + tuple((t.data_ptr(), t.shape, t.stride(), t.dtype, t.get_device(),
                            s.data_ptr(), s.shape, s.stride(), s.dtype, s.get_device())
                           for t, s in zip(teacher, student))
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _Plan(teacher, student, block)
        if len(_plans) > _PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plan


def clear_cache() -> None:
    """Forget every cached plan (each holds a small device table of chunk rows)."""
    _plans.clear()


_unused_momentum: dict = {}


def _momentum_args(momentum, device):
    """(pointer tensor, float value, on_device flag). A device tensor is read by the kernel itself."""
    if torch.is_tensor(momentum) and momentum.device == device:
        return momentum, 0.0, True
    # a float, or a CPU scalar tensor (reading it costs no device sync): pass it by value; the
    # pointer argument then gets one fixed fp32 placeholder so the signature never changes
    value = float(momentum.item()) if torch.is_tensor(momentum) else float(momentum)
    placeholder = _unused_momentum.get(device)
    if placeholder is None:
        placeholder = _unused_momentum[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return placeholder, value, False


def ema_update_(teacher, student, momentum, block: int = BLOCK, num_warps: int = NUM_WARPS):
    """In place, one launch per student dtype (in practice one): teacher ← m·teacher + (1−m)·student.

    Arguments as ``common.py`` states them (the contract the reference shares): fp32 teachers (or FSDP2
    DTensors, updated through their local shards), fp32 or bf16 students of the same shapes, all
    contiguous; ``momentum`` a float or a 1-element tensor in [0, 1] (kept on the device for
    schedules). Empty tensors are allowed and skipped. The update itself is the custom op
    ``fasttips::ema_update_`` (it declares that it writes ``teacher``), so torch.compile calls it as
    one opaque, mutating op.
    """
    teacher = [local(t) for t in teacher]
    student = [local(s) for s in student]
    if len(teacher) != len(student):
        raise ValueError(f"ema_update_: {len(teacher)} teacher tensors vs {len(student)} student tensors")
    if block < 16 or block & (block - 1):
        raise ValueError(f"ema_update_: block={block} must be a power of two >= 16 (whole 16-byte vectors)")
    if not teacher:
        check_momentum(momentum, None)
        return
    on_device = torch.is_tensor(momentum)   # a tensor travels as one; a float as a float argument
    ema_update_op(teacher, student, momentum if on_device else None, 0.0 if on_device else float(momentum),
                  block, num_warps)


@torch.library.custom_op("fasttips::ema_update_", mutates_args=("teacher",))
def ema_update_op(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: Optional[torch.Tensor],
                  momentum_value: float, block: int, num_warps: int) -> None:
    """The launches of ``ema_update_`` (``momentum`` a 1-element tensor, or None for ``momentum_value``)."""
    momentum = momentum_value if momentum is None else momentum
    with torch.no_grad():
        plan = _plan_for(teacher, student, block)   # checks the tensors when it builds a plan
        check_momentum(momentum, plan.device)        # every call: the value may change between calls
        m_ptr, m_value, m_on_device = _momentum_args(momentum, plan.device)
        for base, table in plan.launches:
            ema_chunks_kernel[(min(table.num_chunks, plan.programs_cap),)](
                teacher[base], student[base], table.table, table.num_chunks, m_ptr, m_value,
                BLOCK=block, MOMENTUM_ON_DEVICE=m_on_device,
                TEACHER_VEC=table.teacher_vec, STUDENT_VEC=table.student_vec, num_warps=num_warps)


@ema_update_op.register_fake
def _(teacher, student, momentum, momentum_value, block, num_warps):
    return None
