"""Naive DINO/iBOT prototype cross-entropy: materialises the full [rows × K] logits.

Used only by tests as the independent truth for the chunked reference and the Triton kernels.
Math (docs/loss_math.md):
    W_s = g_s · v_s/‖v_s‖,  W_t = g_t · v_t/‖v_t‖           (weight-normed prototype layers)
    l_t = z_t W_tᵀ                                          (teacher logits, fp32, no grad)
    p   = softmax((l_t − c)/τ_t)  or  SinkhornKnopp(l_t/τ_t) (teacher targets)
    s   = z_s W_sᵀ / τ_s
    loss = Σ_j w_j · Σ_k −p[pair_j, k] · log_softmax(s_j)_k
    center statistic = mean_rows(l_t)                        (for the one-step-late center update;
                                                              zeros when there is no teacher row)
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def weight_normed(v, g):
    g = g.reshape(-1, 1)
    return g * v / v.norm(dim=1, keepdim=True)


def _all_reduce(t, group):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, group=group)
    return t


@torch.no_grad()
def sinkhorn_knopp(logits, teacher_temp, n_iterations=3, group=None):
    """DINOv2 Sinkhorn-Knopp on [rows × K] fp32 logits; rows and totals all-reduced across ranks."""
    q = torch.exp(logits.float() / teacher_temp).t()            # K × B (no max-subtraction, as DINOv2)
    n_rows = _all_reduce(torch.tensor([float(q.shape[1])], device=q.device), group)
    k = q.shape[0]
    q /= _all_reduce(q.sum().reshape(1), group)
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True), group)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n_rows
    q *= n_rows
    return q.t()


def teacher_targets(teacher_z, teacher_v, teacher_g, center, teacher_temp, centering="softmax",
                    sk_iterations=3, group=None):
    with torch.no_grad():
        logits = teacher_z.float() @ weight_normed(teacher_v.float(), teacher_g.float()).t()
        if centering == "softmax":
            c = 0.0 if center is None else center.float().reshape(1, -1)
            probs = torch.softmax((logits - c) / teacher_temp, dim=-1)
        elif centering == "sinkhorn_knopp":
            probs = sinkhorn_knopp(logits, teacher_temp, sk_iterations, group)
        else:
            raise ValueError(f"centering={centering!r}; choose 'softmax' or 'sinkhorn_knopp'")
        stat = logits.mean(dim=0) if logits.shape[0] else logits.new_zeros(logits.shape[1])
        return probs, stat


def prototype_cross_entropy(student_z, student_v, student_g, teacher_z, teacher_v, teacher_g,
                            pairs, weights, center=None, student_temp=0.1, teacher_temp=0.04,
                            centering="softmax", sk_iterations=3, group=None):
    probs, center_stat = teacher_targets(teacher_z, teacher_v, teacher_g, center, teacher_temp,
                                         centering, sk_iterations, group)
    w_s = weight_normed(student_v.float(), student_g.float())
    logp = torch.log_softmax(student_z.float() @ w_s.t() / student_temp, dim=-1)
    per_row = -(probs[pairs] * logp).sum(dim=-1)
    return (weights.float() * per_row).sum(), center_stat
