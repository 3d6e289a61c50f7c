"""Reference EMA: teacher ← m·teacher + (1−m)·student, one ``torch._foreach_lerp_`` over the list.

It takes exactly what the Triton path takes (``common.check_arguments``), so dispatch never changes
which inputs are accepted.
"""
from __future__ import annotations

import torch

from .common import check_arguments, local


@torch.no_grad()
def ema_update_(teacher, student, momentum):
    teacher = [local(t) for t in teacher]
    student = [local(s) for s in student]
    check_arguments(teacher, student, momentum)
    if not teacher:
        return
    student = [s if s.dtype == t.dtype else s.to(t.dtype) for s, t in zip(student, teacher)]
    weight = 1.0 - (float(momentum) if not torch.is_tensor(momentum) else momentum.item())
    torch._foreach_lerp_(teacher, student, weight)
