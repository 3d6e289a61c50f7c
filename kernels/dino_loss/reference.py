"""Chunked PyTorch prototype cross-entropy: the CPU path and the readable statement of the fused math.

Per student row i with teacher row j = pairs[i] and weight w_i (docs/loss_math.md):
    s_i = z_s,i W_sᵀ / τ_s,   u_j = z_t,j W_tᵀ / τ_t + b,   p_j = softmax(u_j)
    ℓ_i = LSE(s_i) − Σ_k p_jk s_ik                      (= CE(p_j, softmax(s_i)) since Σ_k p_jk = 1)
    loss = Σ_i w_i ℓ_i,   ∂loss/∂s_i = w_i (softmax(s_i) − p_j)
with b from ``common.teacher_bias`` (−c/τ_t for centering, log r for Sinkhorn-Knopp).

Rows are processed in chunks sized by a byte budget, so at most a few [chunk × K] fp32 tensors exist at
once. The autograd Function keeps only its inputs and recomputes each chunk in backward, so memory stays
O(chunk · K) in both directions. All arithmetic is fp32, like naive.py.
"""
from __future__ import annotations

import torch

from .common import check_arguments, center_statistic, sinkhorn_log_scaling, teacher_bias, weight_normed

DEFAULT_CHUNK_BYTES = 256 * 2**20
_LIVE_ROW_TENSORS = 5   # s, u, p, softmax(s), ds: fp32 [chunk × K] tensors alive at the peak


def rows_per_chunk(K: int, chunk_bytes: int | None, live_tensors: int = _LIVE_ROW_TENSORS) -> int:
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    if budget <= 0:
        raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    return max(1, budget // (live_tensors * 4 * max(K, 1)))


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


class _ChunkedPrototypeCE(torch.autograd.Function):
    """loss = Σ_i w_i [LSE(s_i) − p_{pairs[i]}·s_i]; gradients for z_s and W_s only."""

    @staticmethod
    def forward(ctx, student_z, w_s, teacher_z, w_t, bias, pairs, weights, student_temp, teacher_temp,
                chunk_rows):
        loss = torch.zeros((), dtype=torch.float32, device=student_z.device)
        for a, b in _chunks(student_z.shape[0], chunk_rows):
            s, p = _chunk_logits(student_z[a:b], w_s, teacher_z[pairs[a:b]], w_t, bias,
                                 student_temp, teacher_temp)
            per_row = torch.logsumexp(s, dim=1) - (p * s).sum(dim=1)
            loss += (weights[a:b].float() * per_row).sum()
        ctx.save_for_backward(student_z, w_s, teacher_z, w_t, bias, pairs, weights)
        ctx.temps = (student_temp, teacher_temp, chunk_rows)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        student_z, w_s, teacher_z, w_t, bias, pairs, weights = ctx.saved_tensors
        student_temp, teacher_temp, chunk_rows = ctx.temps
        ws32 = w_s.float()
        grad_z = torch.empty(student_z.shape, dtype=torch.float32, device=student_z.device)
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device)
        for a, b in _chunks(student_z.shape[0], chunk_rows):
            zs = student_z[a:b].float()
            s, p = _chunk_logits(zs, w_s, teacher_z[pairs[a:b]], w_t, bias, student_temp, teacher_temp)
            coef = grad_loss.float() * weights[a:b].float() / student_temp
            ds = coef[:, None] * (torch.softmax(s, dim=1) - p)        # ∂loss/∂(z_s W_sᵀ)
            grad_z[a:b] = ds @ ws32
            grad_w += ds.t() @ zs
        return (grad_z.to(student_z.dtype), grad_w.to(w_s.dtype)) + (None,) * 8


def _chunk_logits(zs, w_s, zt, w_t, bias, student_temp, teacher_temp):
    """Student logits s (already / τ_s) and teacher targets p for one chunk of rows, fp32."""
    s = (zs.float() @ w_s.float().t()) / student_temp
    p = torch.softmax((zt.float() @ w_t.float().t()) / teacher_temp + bias, dim=1)
    return s, p


def _sinkhorn_bias(teacher_z, w_t, teacher_temp, n_iterations, group, chunk_bytes):
    K = w_t.shape[0]
    rows = rows_per_chunk(K, chunk_bytes, live_tensors=2)

    def logits(a, b):
        return (teacher_z[a:b].float() @ w_t.t()) / teacher_temp

    def row_lse(log_c):
        out = torch.full((K,), float("-inf"), dtype=torch.float32, device=w_t.device)
        for a, b in _chunks(teacher_z.shape[0], rows):
            out = torch.logaddexp(out, torch.logsumexp(logits(a, b) + log_c[a:b, None], dim=0))
        return out

    def col_lse(log_r):
        out = torch.empty(teacher_z.shape[0], dtype=torch.float32, device=w_t.device)
        for a, b in _chunks(teacher_z.shape[0], rows):
            out[a:b] = torch.logsumexp(logits(a, b) + log_r, dim=1)
        return out

    return sinkhorn_log_scaling(row_lse, col_lse, teacher_z.shape[0], K, n_iterations,
                                teacher_z.device, group)


def prototype_cross_entropy(student_z, student_v, student_g, teacher_z, teacher_v, teacher_g,
                            pairs, weights, center=None, student_temp=0.1, teacher_temp=0.04,
                            centering="softmax", sk_iterations=3, group=None, chunk_bytes=None):
    """Same contract as ``fasttips.kernels.prototype_cross_entropy``; ``chunk_bytes`` bounds the fp32
    [rows × K] working set (default 256 MiB)."""
    check_arguments(student_z, student_v, student_g, teacher_z, teacher_v, teacher_g, pairs, weights,
                    center, student_temp, teacher_temp, centering, sk_iterations)
    K = student_v.shape[0]
    w_s = weight_normed(student_v, student_g)          # autograd carries dW_s back to v and g
    with torch.no_grad():
        w_t = weight_normed(teacher_v.detach(), teacher_g.detach())
        teacher_z = teacher_z.detach()
        center_stat = center_statistic(teacher_z, w_t)          # mean_rows(z_t W_tᵀ); zeros for no rows
        bias = teacher_bias(center, teacher_temp, centering, K, w_t.device,
                            sinkhorn=lambda: _sinkhorn_bias(teacher_z, w_t, teacher_temp, int(sk_iterations),
                                                            group, chunk_bytes))
    chunk_rows = rows_per_chunk(K, chunk_bytes)
    loss = _ChunkedPrototypeCE.apply(student_z, w_s, teacher_z, w_t, bias, pairs.long(),
                                     weights.detach(), student_temp, teacher_temp, chunk_rows)
    return loss, center_stat
