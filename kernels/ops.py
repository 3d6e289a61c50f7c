"""The public ops of ``fasttips.kernels`` and their dispatch (re-exported by the package).

Each op picks its implementation through ``_backend.use_triton`` and runs either the Triton path
(``<op>/triton.py``) or the PyTorch reference (``<op>/reference.py``).
"""
from __future__ import annotations

from ._backend import requested as requested_backend, use_triton
from .attention import reference as _attn_ref
from .attention.common import cu_seqlens_from_lengths
from .dino_loss import common as _dino_common
from .dino_loss import reference as _dino_ref
from .ema import reference as _ema_ref


def attention(q, k, v, key_padding_mask=None, scale=None, backend=None):
    """softmax(q kᵀ·scale) v for q, k, v of shape [B, H, N, D]; key_padding_mask [B, N] (True = pad)."""
    if use_triton(q, k, v, backend=backend):
        from .attention import triton as _attn_triton
        return _attn_triton.attention(q, k, v, key_padding_mask=key_padding_mask, scale=scale)
    return _attn_ref.attention(q, k, v, key_padding_mask=key_padding_mask, scale=scale)


def attention_varlen(q, k, v, cu_seqlens, max_seqlen=None, scale=None, backend=None):
    """Packed attention: q, k, v [T, H, D]; segment i is rows cu_seqlens[i]:cu_seqlens[i+1].

    ``max_seqlen`` (None: derived) must be at least the longest segment, or a ValueError is raised.
    Offsets built by ``cu_seqlens_from_lengths`` carry their longest segment on the host, so neither
    the check nor the derivation waits for the device; other offsets are read once per tensor.
    """
    if use_triton(q, k, v, backend=backend):
        from .attention import triton as _attn_triton
        return _attn_triton.attention_varlen(q, k, v, cu_seqlens, max_seqlen=max_seqlen, scale=scale)
    return _attn_ref.attention_varlen(q, k, v, cu_seqlens, max_seqlen=max_seqlen, scale=scale)


def prototype_cross_entropy(student_z, student_v, student_g, teacher_z, teacher_v, teacher_g,
                            pairs, weights, center=None, student_temp=0.1, teacher_temp=0.04,
                            centering="softmax", sk_iterations=3, group=None, chunk_bytes=None,
                            backend=None, backward="fused"):
    """Σ_j weights[j] · CE(teacher_target[pairs[j]], softmax(student_z[j] W_sᵀ / student_temp)).

    student_z [S, d] and teacher_z [T, d] are L2-normalised bottleneck rows; (v, g) are the
    weight-norm direction [K, d] and gain [K] of the prototype layers (student: with grad; teacher:
    the EMA copy). Teacher targets: softmax((z_t W_tᵀ − center)/teacher_temp), or Sinkhorn-Knopp
    (``centering="sinkhorn_knopp"``, row sums all-reduced over ``group``). Returns
    ``(loss, center_stat)`` where center_stat [K] = mean over teacher rows of z_t W_tᵀ (fp32, no grad;
    zeros when there is no teacher row).
    ``chunk_bytes`` caps the reference path's per-chunk [rows × K] working set; ``backward`` picks the
    Triton path (``loss.prototype_ce``): ``"fused"`` (default, the one measured on a GPU), or the
    experimental ``"slab"`` (dS slab per row chunk, products in cuBLAS; ``kernels/dino_loss/triton.py``)
    or ``"chunked"`` (cuBLAS logits per row chunk + one Triton row kernel, gradient formed in the forward;
    ``kernels/dino_loss/chunked.py``), both unmeasured on a GPU. fp32 features or a bottleneck over 256
    run the reference on a GPU.
    """
    args = (student_z, student_v, student_g, teacher_z, teacher_v, teacher_g, pairs, weights)
    kwargs = dict(center=center, student_temp=student_temp, teacher_temp=teacher_temp,
                  centering=centering, sk_iterations=sk_iterations, group=group)
    _dino_common.check_backward(backward)
    if use_triton(student_z, student_v, backend=backend, op="prototype_cross_entropy",
                  unsupported=lambda interpreting: _dino_common.unsupported_on_gpu(student_z, interpreting)):
        from .dino_loss import triton as _dino_triton
        return _dino_triton.prototype_cross_entropy(*args, backward=backward, **kwargs)
    return _dino_ref.prototype_cross_entropy(*args, chunk_bytes=chunk_bytes, **kwargs)


def ema_update_(teacher, student, momentum, backend=None):
    """In place: teacher[i] ← momentum·teacher[i] + (1 − momentum)·student[i], for every i."""
    teacher, student = list(teacher), list(student)
    if len(teacher) != len(student):
        raise ValueError(f"ema_update_: {len(teacher)} teacher tensors vs {len(student)} student tensors")
    if teacher and use_triton(*teacher, *student, backend=backend):
        from .ema import triton as _ema_triton
        return _ema_triton.ema_update_(teacher, student, momentum)
    return _ema_ref.ema_update_(teacher, student, momentum)

