"""DINO [CLS] loss with DINOv2 pairing and normalisation (docs/loss_math.md §2.1, §2.9).

Student views: L local crops (+ the G masked globals when G = 2); teacher views: the G global crops.
Terms: every (local l, global g) pair, plus the cross-global pairs (student g vs teacher g' ≠ g) when
G > 1 — same-view global pairs are excluded. Each term is a batch mean, and the sum of terms is
divided by their count ``G·L + G·(G−1)`` (= 2 + 2L for DINOv2's G = 2; = L for TIPSv2's G = 1).

The prototype cross-entropy goes through ``fasttips.kernels.prototype_cross_entropy``: the pairing
is encoded as (student row, teacher row) index lists and the normalisation as per-row weights
``1/(B·n_terms)``.
"""
from __future__ import annotations

import torch

from fasttips import kernels

from ._checks import check_prototypes, check_rows


def dino_pairing(batch_size: int, n_local: int, n_global: int, device=None):
    """(student_rows, teacher_rows, n_terms) for student rows [locals crop-major ++ globals crop-major]
    and teacher rows [globals crop-major]."""
    B, L, G = batch_size, n_local, n_global
    b = torch.arange(B, device=device)
    student, teacher = [], []
    for loc in range(L):
        for g in range(G):
            student.append(loc * B + b)
            teacher.append(g * B + b)
    for gs in range(G if G > 1 else 0):
        for gt in range(G):
            if gt != gs:
                student.append(L * B + gs * B + b)
                teacher.append(gt * B + b)
    n_terms = G * L + G * (G - 1)
    if n_terms == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, 0
    return torch.cat(student), torch.cat(teacher), n_terms


def dino_loss(student_local: torch.Tensor, teacher_global: torch.Tensor, student_prototypes,
              teacher_prototypes, *, n_global: int, student_global: torch.Tensor | None = None,
              center: torch.Tensor | None = None, student_temp: float = 0.1, teacher_temp: float = 0.04,
              centering: str = "softmax", sk_iterations: int = 3, group=None,
              prototype_ce: str = "fused"):
    """DINO loss over L2-normalised bottleneck rows.

    student_local [L·B, d] (crop-major), teacher_global [G·B, d] (no grad), student_global [G·B, d]
    (needed when G > 1), prototypes = (v [K, d], g [K]). Returns ``(loss, center_stat)``; center_stat
    is the mean teacher logit over the G·B teacher rows (None when there is no term).
    ``prototype_ce`` picks the op's implementation (``backward=`` of ``kernels.prototype_cross_entropy``;
    config ``loss.prototype_ce``).
    """
    check_rows("dino_loss: teacher_global", teacher_global)
    d = teacher_global.shape[1]
    if n_global < 1 or teacher_global.shape[0] % n_global:
        raise ValueError(f"dino_loss: teacher_global has {teacher_global.shape[0]} rows, not a multiple "
                         f"of n_global={n_global}")
    B = teacher_global.shape[0] // n_global
    check_rows("dino_loss: student_local", student_local, dim=d)
    if B == 0 or student_local.shape[0] % B:
        raise ValueError(f"dino_loss: student_local has {student_local.shape[0]} rows, not a multiple of "
                         f"the batch size {B} (teacher_global rows / n_global)")
    n_local = student_local.shape[0] // B
    rows = [student_local]
    if n_global > 1:
        if student_global is None:
            raise ValueError("dino_loss: student_global is required when n_global > 1 "
                             "(cross-global pairs)")
        check_rows("dino_loss: student_global", student_global, rows=n_global * B, dim=d)
        rows.append(student_global)
    sv, sg = check_prototypes("dino_loss: student_prototypes", student_prototypes, d)
    tv, tg = check_prototypes("dino_loss: teacher_prototypes", teacher_prototypes, d)
    if tv.shape[0] != sv.shape[0]:
        raise ValueError(f"dino_loss: teacher has K={tv.shape[0]} prototypes, student K={sv.shape[0]}")

    student_rows, teacher_rows, n_terms = dino_pairing(B, n_local, n_global, teacher_global.device)
    if n_terms == 0:   # one global and no local crop: DINO has nothing to compare
        return student_local.sum() * 0.0, None
    student = torch.cat(rows)[student_rows]
    weights = torch.full((student.shape[0],), 1.0 / (B * n_terms), device=student.device)
    return kernels.prototype_cross_entropy(
        student, sv, sg, teacher_global.detach(), tv.detach(), tg.detach(), teacher_rows, weights,
        center=center, student_temp=student_temp, teacher_temp=teacher_temp, centering=centering,
        sk_iterations=sk_iterations, group=group, backward=prototype_ce)
