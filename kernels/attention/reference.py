"""Reference attention: softmax(q kᵀ · scale + mask) v, in plain PyTorch. The numerical truth.

Layouts: dense q, k, v are [B, H, N, D]; packed (varlen) q, k, v are [T, H, D] with
``cu_seqlens`` = [0, n0, n0+n1, ...] (int32/int64), as in flash-attn's varlen API.
Softmax statistics are computed in fp32 whatever the input dtype.
"""
from __future__ import annotations

import math

import torch


def attention(q, k, v, key_padding_mask=None, scale=None):
    """Non-causal attention. ``key_padding_mask``: [B, N] bool, True where the key is padding."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A row whose keys are all padding has no defined output; make it 0 instead of NaN.
    probs = torch.nan_to_num(probs, nan=0.0)
    return torch.matmul(probs, v.float()).to(q.dtype)


def attention_varlen(q, k, v, cu_seqlens, max_seqlen=None, scale=None):
    """Packed sequences: each segment cu_seqlens[i]:cu_seqlens[i+1] attends only to itself."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            seg = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # [1, H, n, D]
            out[start:end] = attention(*seg, scale=scale)[0].transpose(0, 1)
    return out
