"""Reference attention: softmax(q kᵀ · scale + mask) v, in plain PyTorch. The numerical truth.

Layouts: dense q, k, v are [B, H, N, D]; packed (varlen) q, k, v are [T, H, D] with
``cu_seqlens`` = [0, n0, n0+n1, ...] (int32/int64), as in flash-attn's varlen API.
Softmax statistics are computed in fp32 whatever the input dtype.
"""
from __future__ import annotations

import math

import torch

from .common import check_max_seqlen, host_offsets


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
    """Packed sequences: each segment cu_seqlens[i]:cu_seqlens[i+1] attends only to itself.

    Runs of consecutive segments with the same length (the crops of one size in a multi-crop
    batch) go through one dense batched call: the same math as one call per segment, with far
    fewer tiny matmuls on the CPU. ``max_seqlen`` is not needed here, but it is checked as the Triton
    path checks it, so both accept the same calls.
    """
    out = torch.empty_like(q)
    bounds = host_offsets(cu_seqlens)          # recorded with the offsets: no device read
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    check_max_seqlen(max_seqlen, max(lengths, default=0))
    first = 0
    while first < len(lengths):
        last = first
        while last + 1 < len(lengths) and lengths[last + 1] == lengths[first]:
            last += 1
        n, count, start = lengths[first], last - first + 1, bounds[first]
        if n > 0:
            end = start + n * count
            run = [t[start:end].reshape(count, n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)]
            out[start:end] = attention(*run, scale=scale).transpose(1, 2).reshape(end - start, *q.shape[1:])
        first = last + 1
    return out
