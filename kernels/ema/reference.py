"""Reference EMA: teacher ← m·teacher + (1−m)·student, one ``torch._foreach_lerp_`` over the list."""
from __future__ import annotations

import torch


@torch.no_grad()
def ema_update_(teacher, student, momentum):
    teacher = [t for t in teacher]
    student = [s if s.dtype == t.dtype else s.to(t.dtype) for s, t in zip(student, teacher)]
    weight = 1.0 - (float(momentum) if not torch.is_tensor(momentum) else momentum.item())
    if teacher:
        torch._foreach_lerp_(teacher, student, weight)
