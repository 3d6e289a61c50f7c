"""The public ops of ``fasttips.kernels`` and their dispatch (re-exported by the package).

Each op describes its call as a site (op, mode, shape class), asks ``dispatch.choose`` which
implementation runs it (forced by ``backend=`` / ``FASTTIPS_KERNELS``, fixed by ``kernels.dispatch``,
or measured on this device: ``dispatch/``), and runs that candidate. Under ``torch.compile`` the
choice is a constant of the traced graph (no graph break).
"""
from __future__ import annotations

import torch

from . import dispatch
from .attention.common import recorded_offsets
from .dino_loss import common as _dino_common
from .dispatch import attention as _attention
from .dispatch import ema as _ema
from .dispatch import prototype_ce as _prototype_ce
from .ema import common as _ema_common
from .ema import reference as _ema_ref


def attention(q, k, v, key_padding_mask=None, scale=None, backend=None):
    """softmax(q kᵀ·scale) v for q, k, v of shape [B, H, N, D]; key_padding_mask [B, N] (True = pad)."""
    site = _attention.dense_site(q, k, v, key_padding_mask)
    name = dispatch.choose(site, backend, lambda: _attention.DenseTiming(q, k, v, key_padding_mask, scale))
    return dispatch.candidate(site.op, name).run(q, k, v, key_padding_mask, scale)


def attention_varlen(q, k, v, cu_seqlens, max_seqlen=None, scale=None, backend=None, runs=None):
    """Packed attention: q, k, v [T, H, D]; segment i is rows cu_seqlens[i]:cu_seqlens[i+1].

    ``max_seqlen`` (None: derived) must be at least the longest segment, or a ValueError is raised.
    Offsets built by ``cu_seqlens_from_lengths`` carry their longest segment on the host, so neither
    the check nor the derivation waits for the device; other offsets are read once per tensor.
    ``runs``: ((count, length), ...), the runs of equal-length segments in order, known on the host
    (``models.layers.Packing.runs``); it lets dispatch run each run as one dense call. Derived from
    recorded offsets when not given, never read from the device; pass it under ``torch.compile``.
    """
    if runs is None and not torch.compiler.is_compiling():
        offsets = recorded_offsets(cu_seqlens)
        if offsets is not None:
            runs = _attention.runs_of(b - a for a, b in zip(offsets[:-1], offsets[1:]))
    if runs is not None:
        runs = tuple((int(c), int(n)) for c, n in runs)
        if max_seqlen is None:
            max_seqlen = max((n for c, n in runs if c), default=0)
    site = _attention.varlen_site(q, k, v, cu_seqlens, max_seqlen, runs)
    name = dispatch.choose(site, backend, lambda: _attention.VarlenTiming(q, k, v, cu_seqlens, max_seqlen,
                                                                          scale, runs, site, attention))
    return dispatch.candidate(site.op, name).run(q, k, v, cu_seqlens, max_seqlen, scale, runs, attention)


def prototype_cross_entropy(student_z, student_v, student_g, teacher_z, teacher_v, teacher_g,
                            pairs, weights, center=None, student_temp=0.1, teacher_temp=0.04,
                            centering="softmax", sk_iterations=3, group=None, chunk_bytes=None,
                            backend=None, backward=None):
    """Σ_j weights[j] · CE(teacher_target[pairs[j]], softmax(student_z[j] W_sᵀ / student_temp)).

    student_z [S, d] and teacher_z [T, d] are L2-normalised bottleneck rows; (v, g) are the
    weight-norm direction [K, d] and gain [K] of the prototype layers (student: with grad; teacher:
    the EMA copy). Teacher targets: softmax((z_t W_tᵀ − center)/teacher_temp), or Sinkhorn-Knopp
    (``centering="sinkhorn_knopp"``, row sums all-reduced over ``group``). Returns
    ``(loss, center_stat)`` where center_stat [K] = mean over teacher rows of z_t W_tᵀ (fp32, no grad;
    zeros when there is no teacher row).
    ``chunk_bytes`` caps the reference path's per-chunk [rows × K] working set. ``backward``: None or
    ``"auto"`` (default) lets dispatch choose among all implementations; ``"fused"``, ``"slab"`` or
    ``"chunked"`` (``loss.prototype_ce``) forces that Triton path wherever Triton runs (``slab``: dS
    slab per row chunk, products in cuBLAS, ``kernels/dino_loss/triton.py``; ``chunked``: cuBLAS logits
    per row chunk + one Triton row kernel, ``kernels/dino_loss/chunked.py``). fp32 features or a
    bottleneck over 256 run the reference on a GPU.
    """
    args = (student_z, student_v, student_g, teacher_z, teacher_v, teacher_g, pairs, weights)
    options = dict(center=center, student_temp=student_temp, teacher_temp=teacher_temp,
                   centering=centering, sk_iterations=sk_iterations, group=group)
    path = None if backward in (None, "auto") else backward
    if path is not None:
        _dino_common.check_backward(path)
    site = _prototype_ce.site(student_z, student_v, teacher_z, centering, path)
    name = dispatch.choose(site, backend, lambda: _prototype_ce.Timing(args, options, chunk_bytes))
    return dispatch.candidate(site.op, name).run(*args, chunk_bytes=chunk_bytes, **options)


def ema_update_(teacher, student, momentum, backend=None):
    """In place: teacher[i] ← momentum·teacher[i] + (1 − momentum)·student[i], for every i."""
    teacher, student = list(teacher), list(student)
    if len(teacher) != len(student):
        raise ValueError(f"ema_update_: {len(teacher)} teacher tensors vs {len(student)} student tensors")
    if not teacher:
        return _ema_ref.ema_update_(teacher, student, momentum)
    local_t = [_ema_common.local(t) for t in teacher]
    local_s = [_ema_common.local(s) for s in student]
    site = _ema.site(local_t, local_s)
    name = dispatch.choose(site, backend, lambda: _ema.Timing(local_t, local_s))
    return dispatch.candidate(site.op, name).run(teacher, student, momentum)
