"""The TIPS vision transformer (patch 14, two CLS tokens, learned 2-D position grid).

Per image the token sequence is ``[CLS#1, CLS#2, patch_1 … patch_N]``. The position grid is added
to the patches only (TIPS: the CLS tokens carry no position embedding) and is resized bilinearly to
each crop's patch grid. Masked patches (iBOT) have their patch embedding replaced by a learned mask
token before the position embedding is added.

``forward`` takes one crop batch or a list of crop batches of different sizes. A list runs as ONE
pass: the tokens of all crops are concatenated, linears/MLPs run on the concatenation, and each
layer's attention is a single packed call (``fasttips.kernels.attention_varlen``). When all
sequences happen to have the same length, the dense ``fasttips.kernels.attention`` is used instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (Attention, GeluMlp, LayerScale, Packing, SwiGLU, add_residual, drop_path_scale,
                     init_linears_and_norms, trunc_normal_)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → D, as a Linear over the flattened (channel, row, col) patch
    (the same numbers as a stride-p Conv2d whose weight is reshaped to [D, 3·p·p])."""

    def __init__(self, patch_size: int, dim: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Linear(in_chans * patch_size * patch_size, dim)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        for name, size in (("height", height), ("width", width)):
            if size % p:
                raise ValueError(f"crop {name} {size} is not divisible by the patch size {p}; "
                                 f"use a multiple of {p} (e.g. {max(p, size // p * p)})")
        return height // p, width // p

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] → [B, h·w, D] (row-major patch order)."""
        B, C, H, W = images.shape
        h, w = self.grid(H, W)
        p = self.patch_size
        patches = images.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
        return self.proj(patches)


class Block(nn.Module):
    """Pre-LN transformer block: x + DropPath(LS(Attn(LN x))), then x + DropPath(LS(MLP(LN x)))."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, ffn: str, qkv_bias: bool,
                 layerscale: float, drop_path: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, mlp_hidden) if ffn == "swiglu" else GeluMlp(dim, mlp_hidden)
        self.ls1 = LayerScale(dim, layerscale) if layerscale > 0 else nn.Identity()
        self.ls2 = LayerScale(dim, layerscale) if layerscale > 0 else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        scale = drop_path_scale(packing, self.drop_path, self.training, x)
        x = add_residual(x, self.ls1(self.attn(self.norm1(x), packing)), scale)
        scale = drop_path_scale(packing, self.drop_path, self.training, x)
        return add_residual(x, self.ls2(self.mlp(self.norm2(x))), scale)


class VisionTransformer(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, mlp_hidden: int, ffn: str = "gelu",
                 patch_size: int = 14, pos_grid: int = 16, layerscale: float = 0.0,
                 drop_path: float = 0.0, ln_eps: float = 1e-6, qkv_bias: bool = True, n_cls: int = 2):
        super().__init__()
        if ffn not in ("gelu", "swiglu"):
            raise ValueError(f"VisionTransformer: ffn={ffn!r}; choose one of ['gelu', 'swiglu']")
        if n_cls != 2:
            raise ValueError(f"VisionTransformer: n_cls={n_cls}; TIPS uses exactly 2 CLS tokens")
        self.width, self.patch_size, self.n_cls = width, patch_size, n_cls
        self.patch_embed = PatchEmbed(patch_size, width)
        self.pos_embed = nn.Parameter(torch.empty(1, width, pos_grid, pos_grid))  # [1, D, G, G]
        self.cls_tokens = nn.Parameter(torch.empty(n_cls, width))
        self.mask_token = nn.Parameter(torch.empty(width))
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_hidden, ffn, qkv_bias, layerscale, drop_path, ln_eps)
            for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=ln_eps)
        self._pos_cache: dict = {}

    # -- parameters ---------------------------------------------------------------------------
    def init_weights(self) -> None:
        init_linears_and_norms(self)
        for m in self.modules():
            if isinstance(m, LayerScale):
                m.init_weights()
        nn.init.normal_(self.pos_embed, std=self.width ** -0.5)      # TIPS: N(0, 1/√D)
        # TIPS (scenic) zero-initialises the CLS tokens; a small random init keeps CLS#1 and CLS#2
        # distinguishable from step 0 (with zeros they are identical until the losses split them).
        trunc_normal_(self.cls_tokens, 0.02)
        nn.init.zeros_(self.mask_token)
        self._pos_cache.clear()

    def num_patches(self, size) -> int:
        """Patch tokens of a crop of ``size`` (an int for square crops, or (height, width))."""
        h, w = (size, size) if isinstance(size, int) else size
        gh, gw = self.patch_embed.grid(h, w)
        return gh * gw

    # -- position grid ------------------------------------------------------------------------
    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The learned grid resized (bilinear, antialiased) to grid_h × grid_w, as [grid_h·grid_w, D].

        Cached per size when no gradient is needed (eval / no_grad); the key includes the
        parameter's version and storage, so an optimiser step or a reload invalidates it. With
        gradients on it is recomputed per call (a cached graph could not be backpropagated twice).
        """
        pos = self.pos_embed
        needs_graph = torch.is_grad_enabled() and pos.requires_grad
        key = (grid_h, grid_w, pos._version, pos.data_ptr(), pos.device, pos.dtype)
        if not needs_graph and key in self._pos_cache:
            return self._pos_cache[key]
        if (grid_h, grid_w) == tuple(pos.shape[-2:]):
            resized = pos
        else:
            resized = F.interpolate(pos.float(), size=(grid_h, grid_w), mode="bilinear",
                                    align_corners=False, antialias=True).to(pos.dtype)
        out = resized[0].flatten(1).transpose(0, 1)                   # [h·w, D], row-major
        if not needs_graph:
            self._pos_cache = {k: v for k, v in self._pos_cache.items() if k[2:4] == key[2:4]}
            self._pos_cache[key] = out = out.detach()
        return out

    # -- forward ------------------------------------------------------------------------------
    def _embed(self, images: torch.Tensor, mask: torch.Tensor | None, pos_by_size: dict) -> torch.Tensor:
        """One crop batch → its token sequences [B, 2 + N, D]."""
        if images.ndim != 4 or images.shape[1] != self.patch_embed.in_chans:
            raise ValueError(f"x: expected images [B, {self.patch_embed.in_chans}, H, W], "
                             f"got {list(images.shape)}")
        B, _, H, W = images.shape
        grid = self.patch_embed.grid(H, W)
        # The residual stream is kept in the parameters' dtype (fp32 under autocast, bf16 when the
        # weights themselves are bf16); matmuls inside the blocks still follow autocast.
        x = self.patch_embed(images).to(self.pos_embed.dtype)        # [B, N, D]
        if mask is not None:
            N = grid[0] * grid[1]
            if mask.dtype != torch.bool or tuple(mask.shape) != (B, N):
                raise ValueError(f"masks: expected bool [{B}, {N}] for crops of {H}×{W}, got "
                                 f"{mask.dtype} {list(mask.shape)}")
            x = torch.where(mask.to(x.device, non_blocking=True).unsqueeze(-1), self.mask_token, x)
        if grid not in pos_by_size:
            pos_by_size[grid] = self.position_embedding(*grid)
        x = x + pos_by_size[grid]
        cls = self.cls_tokens.unsqueeze(0).expand(B, -1, -1)         # no position embedding
        return torch.cat([cls, x], dim=1)

    def forward(self, x, masks=None):
        """x: [B, 3, H, W] or a list of such (sizes may differ); masks: None, bool [B, N], or a list
        aligned with x whose entries may be None. Returns {"cls1", "cls2", "patch"} (or a list)."""
        single = torch.is_tensor(x)
        crops = [x] if single else list(x)
        if single:
            if masks is not None and not torch.is_tensor(masks):
                raise ValueError("masks: a single image tensor takes a single mask tensor (or None)")
            mask_list = [masks]
        elif masks is None:
            mask_list = [None] * len(crops)
        else:
            mask_list = list(masks)
            if len(mask_list) != len(crops):
                raise ValueError(f"masks: got {len(mask_list)} entries for {len(crops)} crop tensors")
        if not crops:
            raise ValueError("x: got an empty list of crops")

        pos_by_size: dict = {}
        sequences = [self._embed(c, m, pos_by_size) for c, m in zip(crops, mask_list)]
        lengths = [s.shape[1] for s in sequences for _ in range(s.shape[0])]
        tokens = torch.cat([s.reshape(-1, self.width) for s in sequences], dim=0)   # [T, D]
        packing = Packing.from_lengths(lengths, tokens.device)
        for block in self.blocks:
            tokens = block(tokens, packing)

        # The final LayerNorm is applied per output so each output is its own tensor, not a view
        # of the token stream (FSDP2 warns about views returned from a wrapped module).
        outputs, start = [], 0
        for s in sequences:
            B, n, _ = s.shape
            seq = tokens[start:start + B * n].view(B, n, self.width)
            start += B * n
            outputs.append({"cls1": self.norm(seq[:, 0]), "cls2": self.norm(seq[:, 1]),
                            "patch": self.norm(seq[:, self.n_cls:])})
        return outputs[0] if single else outputs


def vision_from_config(vcfg) -> VisionTransformer:
    return VisionTransformer(width=vcfg.width, depth=vcfg.depth, heads=vcfg.heads,
                             mlp_hidden=vcfg.mlp_hidden, ffn=vcfg.ffn, patch_size=vcfg.patch_size,
                             pos_grid=vcfg.pos_grid, layerscale=vcfg.layerscale,
                             drop_path=vcfg.drop_path, ln_eps=vcfg.ln_eps, qkv_bias=vcfg.qkv_bias,
                             n_cls=vcfg.n_cls)
