"""Building blocks shared by the vision and text towers.

Every tower works on a flat token stream ``x`` of shape [T, D] plus a ``Packing`` that says how the
T tokens split into sequences. Linears, norms and MLPs act per token and never need the split; only
attention (and per-sample drop-path) read it. This is what lets crops of different sizes run as one
pass: their tokens are concatenated and attention is one packed (varlen) call.
"""
from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fasttips import kernels

INIT_STD = 0.02


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Normal(0, std) truncated at ±2 std, by inverse-CDF sampling: x = √2·std·erfinv(u) with u
    uniform on [erf(−√2), erf(√2)]. (torch's own trunc_normal_ rejection-samples: several times
    slower on CPU, which the test suite feels.)"""
    bound = math.erf(2.0 / math.sqrt(2.0))
    exact = tensor.dtype in (torch.float32, torch.float64)
    work = tensor if exact else torch.empty_like(tensor, dtype=torch.float32)
    work.uniform_(-bound, bound).erfinv_().mul_(math.sqrt(2.0) * std).clamp_(-2 * std, 2 * std)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def init_linears_and_norms(module: nn.Module, std: float = INIT_STD) -> None:
    """Linear weights trunc-normal(std), biases 0; LayerNorm weight 1, bias 0 (whole subtree)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@dataclass
class Packing:
    """How a flat [T, D] token stream splits into sequences.

    ``uniform`` is the common length when every sequence has the same length; then attention takes
    the dense [S, H, n, d] path (optionally with ``key_padding_mask`` [S, n]). Otherwise it is None
    and attention is a single varlen call over ``cu_seqlens``.
    """
    lengths: torch.Tensor                    # int64 [S], on the tokens' device
    cu_seqlens: torch.Tensor                 # int32 [S + 1], on the tokens' device
    max_seqlen: int
    uniform: int | None
    key_padding_mask: torch.Tensor | None = None
    token_seq: torch.Tensor | None = field(default=None, repr=False)   # [T] (non-uniform only)
    runs: tuple | None = None    # ((count, length), ...): runs of equal lengths, on the host (dispatch)

    @classmethod
    def from_lengths(cls, lengths: list[int], device, key_padding_mask=None) -> "Packing":
        lengths = [int(n) for n in lengths]
        uniform = lengths[0] if lengths and all(n == lengths[0] for n in lengths) else None
        if key_padding_mask is not None and uniform is None:
            raise ValueError("Packing: key_padding_mask needs sequences of equal length")
        lens, cu, token_seq = _packing_tensors(tuple(lengths), torch.device(device), uniform is None)
        return cls(lens, cu, max(lengths, default=0), uniform, key_padding_mask, token_seq,
                   kernels.segment_runs(lengths))

    @property
    def num_sequences(self) -> int:
        return self.lengths.numel()

    def per_token(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-sequence tensor [S, ...] to the tokens [T, ...]."""
        if self.uniform is not None:
            return per_sequence.repeat_interleave(self.uniform, dim=0)
        return per_sequence[self.token_seq]


_PACKING_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_PACKING_CACHE_SIZE = 32


def _packing_tensors(lengths: tuple[int, ...], device: torch.device, with_token_seq: bool):
    """(lengths int64 [S], cu_seqlens int32 [S + 1], token → sequence [T] or None) on ``device``.

    A training step packs the same few layouts again and again (each crop set, each caption batch),
    and building these from Python lists is a host → device copy that waits for the device. So they
    are built once per (layout, device) and reused; nothing ever writes into them.

    Under torch.compile they are built in the graph (constants there): no cache, and no host-side
    record of the offsets' longest sequence (both graph-break: the inference-mode query, and the
    record kept by tensor identity). The traced attention does not need that record (``Attention``).
    """
    if torch.compiler.is_compiling():
        return _build_packing_tensors(lengths, device, with_token_seq,
                                      torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32,
                                                   device=device))
    # inference-mode tensors cannot be saved for backward later, so they are kept apart; meta tensors
    # are never cached
    cacheable = device.type != "meta"
    key = (lengths, device, with_token_seq, torch.is_inference_mode_enabled())
    hit = _PACKING_CACHE.get(key) if cacheable else None
    if hit is not None:
        _PACKING_CACHE.move_to_end(key)
        return hit
    # cu_seqlens_from_lengths records its longest sequence on the host (no device read at attention)
    hit = _build_packing_tensors(lengths, device, with_token_seq, kernels.cu_seqlens_from_lengths(lengths, device))
    if cacheable:
        _PACKING_CACHE[key] = hit
        if len(_PACKING_CACHE) > _PACKING_CACHE_SIZE:
            _PACKING_CACHE.popitem(last=False)
    return hit


def _build_packing_tensors(lengths: tuple[int, ...], device: torch.device, with_token_seq: bool, cu):
    lens = torch.tensor(lengths, dtype=torch.int64, device=device)
    token_seq = None
    if with_token_seq:    # token → sequence index, built here so forward passes never mutate it
        token_seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens,
                                            output_size=sum(lengths))
    return lens, cu, token_seq


class Attention(nn.Module):
    """Multi-head self-attention on packed tokens; the attention itself is a fasttips.kernels op."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Attention: heads={heads} must divide dim={dim}")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        T, D = x.shape
        qkv = self.qkv(x).view(T, 3, self.heads, self.head_dim)
        if packing.uniform is not None:
            S, n = packing.num_sequences, packing.uniform
            q, k, v = qkv.view(S, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            out = kernels.attention(q, k, v, key_padding_mask=packing.key_padding_mask)  # [S, H, n, d]
            out = out.transpose(1, 2).reshape(T, D)
        elif torch.compiler.is_compiling():
            out = _attention_by_runs(qkv, packing).reshape(T, D)
        else:
            q, k, v = qkv.unbind(1)                                                       # [T, H, d]
            out = kernels.attention_varlen(q, k, v, packing.cu_seqlens, max_seqlen=packing.max_seqlen,
                                           runs=packing.runs)
            out = out.reshape(T, D)
        return self.proj(out)


def _attention_by_runs(qkv: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Packed attention as one dense call per run of equal-length sequences (one per crop size).

    The path torch.compile traces: the varlen op checks ``max_seqlen`` against a host record of
    ``cu_seqlens`` kept by tensor identity, which Dynamo cannot trace (graph breaks); the runs are host
    ints, so this traces into one graph. Same math as the varlen call (the CPU reference computes
    varlen exactly so), but on a GPU one dense launch per crop size instead of one packed launch.
    """
    outs, start = [], 0
    for count, n in packing.runs:
        run = qkv[start:start + count * n].view(count, n, *qkv.shape[1:])               # [S, n, 3, H, d]
        start += count * n
        q, k, v = run.permute(2, 0, 3, 1, 4).unbind(0)                                    # [S, H, n, d]
        outs.append(kernels.attention(q, k, v).transpose(1, 2).reshape(count * n, *qkv.shape[2:]))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


class GeluMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exact GELU, as the TIPS PyTorch port (flax defaults to the tanh approximation).
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """out = w3(silu(x W1) ⊙ x W2), with W1 and W2 fused into one ``w12`` matmul."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def init_weights(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def drop_path_scale(packing: Packing, rate: float, training: bool, like: torch.Tensor):
    """Per-token multiplier for stochastic depth: one keep/drop draw per *sequence* (= image),
    kept branches scaled by 1/(1 − rate). None when inactive."""
    if not training or rate <= 0.0:
        return None
    keep = torch.rand(packing.num_sequences, device=like.device) >= rate
    scale = keep.to(like.dtype) / (1.0 - rate)
    return packing.per_token(scale).unsqueeze(-1)


def add_residual(x: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return x + branch if scale is None else x + branch * scale
