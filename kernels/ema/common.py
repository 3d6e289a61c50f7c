"""The one argument contract of ``ema_update_``, shared by the reference and the Triton path.

Both paths take exactly the same inputs, so which one a run dispatches to never changes what it accepts:
- ``teacher``: a list of float32 tensors, or FSDP2 DTensors (the update runs on their local shards);
- ``student``: as many float32 or bfloat16 tensors of the same shapes, on the same device;
- every tensor contiguous (the Triton path walks flat memory);
- ``momentum``: a float or a 1-element tensor in [0, 1]. A tensor on the tensors' device is read by the
  kernel itself and its value is not checked here (that would wait for the device every step).
"""
from __future__ import annotations

import torch

TEACHER_DTYPE = torch.float32
STUDENT_DTYPES = (torch.float32, torch.bfloat16)


def local(x):
    """FSDP2 parameters are DTensors: the EMA runs on the local shard, element for element."""
    if type(x) is torch.Tensor or type(x) is torch.nn.Parameter:
        return x
    to_local = getattr(x, "to_local", None)
    return to_local() if to_local is not None else x


def check_tensors(teacher, student) -> torch.device | None:
    """Raise a one-line error naming the first bad tensor; return the common device (None if empty)."""
    if len(teacher) != len(student):
        raise ValueError(f"ema_update_: {len(teacher)} teacher tensors vs {len(student)} student tensors")
    device = None
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.dtype != TEACHER_DTYPE:
            raise TypeError(f"ema_update_: teacher[{i}] has dtype {t.dtype}; only {TEACHER_DTYPE} is allowed")
        if s.dtype not in STUDENT_DTYPES:
            raise TypeError(f"ema_update_: student[{i}] has dtype {s.dtype}; allowed: {list(STUDENT_DTYPES)}")
        if t.shape != s.shape:
            raise ValueError(f"ema_update_: teacher[{i}] shape {tuple(t.shape)} != student[{i}] shape "
                             f"{tuple(s.shape)}")
        if not (t.is_contiguous() and s.is_contiguous()):
            raise ValueError(f"ema_update_: teacher[{i}] and student[{i}] must be contiguous "
                             f"(got {t.is_contiguous()} / {s.is_contiguous()})")
        if device is None:
            device = t.device
        if t.device != device or s.device != device:
            raise ValueError(f"ema_update_: teacher[{i}] on {t.device} and student[{i}] on {s.device}; "
                             f"all tensors must be on {device}")
    return device


def check_momentum(momentum, device) -> None:
    """A float or a 1-element tensor; its value in [0, 1] unless it lives on an accelerator."""
    if torch.is_tensor(momentum):
        if momentum.numel() != 1:
            raise ValueError(f"ema_update_: momentum must be a float or a 1-element tensor, got shape "
                             f"{tuple(momentum.shape)}")
        if momentum.device.type != "cpu":
            return   # read by the kernel on the device; checking it here would synchronise
        value = float(momentum.item())
    else:
        value = float(momentum)
    if not 0.0 <= value <= 1.0:   # also rejects NaN
        raise ValueError(f"ema_update_: momentum must be in [0, 1], got {value}")


def check_arguments(teacher, student, momentum) -> torch.device | None:
    """The whole contract (tensors then momentum); returns the tensors' device."""
    device = check_tensors(teacher, student)
    check_momentum(momentum, device)
    return device
