"""Candidates of ``ema_update_``, its site, and how each is timed.

  fasttips       the one-launch Triton kernel over the whole tensor list
  foreach_lerp   ``torch._foreach_lerp_`` (the reference; names as in bench/results rows)

Timing runs each candidate on the call's own tensors with momentum 1: teacher ← 1·teacher + 0·student
leaves every (finite) teacher value exactly as it was, so nothing is copied and nothing changes,
while the memory traffic is the real update's.
"""
from __future__ import annotations

import torch

from .. import _backend
from .site import Candidate, Site, dtype_name, size_class


def fields(device: str, tensors: int, params: int, student: str) -> tuple:
    return (("device", device), ("tensors", size_class(tensors)), ("params", size_class(params)),
            ("student", student))


def site(teacher, student) -> Site:
    dtypes = "+".join(sorted({dtype_name(s.dtype) for s in student}))
    return Site("ema_update_", "update", fields(teacher[0].device.type if teacher else "cpu", len(teacher),
                                                sum(t.numel() for t in teacher), dtypes))


def _fasttips(teacher, student, momentum):
    from ..ema import triton as module
    return module.ema_update_(teacher, student, momentum)


def _foreach_lerp(teacher, student, momentum):
    from ..ema import reference
    return reference.ema_update_(teacher, student, momentum)


def _fasttips_supports(s: Site) -> str | None:
    if s["device"] != "cuda" and not _backend.interpreting():
        return "needs CUDA tensors (or TRITON_INTERPRET=1)"
    return None


def candidates() -> list[Candidate]:
    return [
        Candidate("fasttips", "fasttips", _fasttips, supports=_fasttips_supports,
                  unavailable=lambda: None if _backend.triton_available() else "Triton does not import"),
        Candidate("foreach_lerp", "pytorch", _foreach_lerp),
    ]


class Timing:
    def __init__(self, teacher, student):
        self.teacher, self.student = list(teacher), list(student)

    def bench(self, candidate: Candidate, s: Site):
        def run():
            with torch.no_grad():
                candidate.run(self.teacher, self.student, 1.0)
        return run
