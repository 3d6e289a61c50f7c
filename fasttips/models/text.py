"""The TIPS text encoder: √D-scaled token embedding + sinusoidal positions, pre-LN blocks with
key-padding-masked attention and a ReLU MLP, final LayerNorm, masked mean pooling (no projection)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Attention, Packing, init_linears_and_norms, trunc_normal_


def sinusoidal_positions(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[length, dim] = [sin(pos·ω_i) | cos(pos·ω_i)], timescales 1 … 1e4 spaced geometrically."""
    half = dim // 2
    log_step = math.log(1e4) / max(half - 1, 1)
    inv_timescales = torch.exp(-log_step * torch.arange(half, device=device, dtype=torch.float32))
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_timescales[None]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        table = F.pad(table, (0, 1))
    return table.to(dtype)


class TextBlock(nn.Module):
    """Pre-LN block; the ReLU MLP zeroes padded tokens before and after its second linear."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, eps: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, packing: Packing, valid: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), packing))
        h = F.relu(self.fc1(self.norm2(x))) * valid
        return x + self.dropout(self.fc2(h) * valid)


class TextEncoder(nn.Module):
    def __init__(self, vocab_size: int, width: int, depth: int, heads: int, mlp_hidden: int,
                 max_len: int = 64, ln_eps: float = 1e-6, dropout: float = 0.0):
        super().__init__()
        self.width, self.max_len = width, max_len
        # _weight: skip nn.Embedding's own init (init_weights does it; a meta normal_ costs seconds).
        self.token_embed = nn.Embedding(vocab_size, width, _weight=torch.empty(vocab_size, width))
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TextBlock(width, heads, mlp_hidden, ln_eps, dropout)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=ln_eps)

    def init_weights(self) -> None:
        init_linears_and_norms(self)
        # Variance scaling on fan-in (= D): std 1/√D, so the √D-scaled embedding has unit variance.
        trunc_normal_(self.token_embed.weight, self.width ** -0.5)

    def forward(self, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """ids int64 [B, L], pad bool [B, L] (True = padding) → pooled [B, D]."""
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids: expected int64 [B, L], got {ids.dtype} {list(ids.shape)}")
        if pad.dtype != torch.bool or pad.shape != ids.shape:
            raise ValueError(f"pad: expected bool {list(ids.shape)} (True = padding), got "
                             f"{pad.dtype} {list(pad.shape)}")
        B, L = ids.shape
        if L > self.max_len:
            raise ValueError(f"ids: length {L} exceeds text.max_len={self.max_len}")
        x = self.token_embed(ids) * math.sqrt(self.width)
        x = x + sinusoidal_positions(L, self.width, x.device, x.dtype)
        x = self.dropout(x).reshape(B * L, self.width)
        packing = Packing.from_lengths([L] * B, x.device, key_padding_mask=pad)
        valid = (~pad).reshape(B * L, 1).to(x.dtype)
        for block in self.blocks:
            x = block(x, packing, valid)
        x = self.norm(x).view(B, L, self.width)
        valid = valid.view(B, L, 1)
        return (x * valid).sum(1) / (valid.sum(1) + 1e-8)


def text_mlp_hidden(cfg) -> int:
    """The text MLP width follows the vision tower's nominal MLP width: for a SwiGLU vision tower
    3/2 of each SwiGLU branch (4096 → 6144 for ViT-g, which gives TIPS' 389 M text parameters)."""
    v = cfg.vision
    return v.mlp_hidden * 3 // 2 if v.ffn == "swiglu" else v.mlp_hidden


def text_from_config(cfg) -> TextEncoder:
    """Width and heads follow the vision tower; so does the MLP width (``text_mlp_hidden``)."""
    v = cfg.vision
    return TextEncoder(vocab_size=cfg.text.vocab_size, width=v.width, depth=cfg.text.depth,
                       heads=v.heads, mlp_hidden=text_mlp_hidden(cfg), max_len=cfg.text.max_len,
                       ln_eps=cfg.text.ln_eps, dropout=cfg.text.dropout)
