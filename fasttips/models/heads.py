"""Projection heads for DINO / iBOT: MLP → L2-normalised bottleneck → weight-normed prototypes.

The losses never call ``head(x)``: they take ``z = head.bottleneck(x)`` and the prototype layer's
``v`` and ``g`` and hand them to ``fasttips.kernels.prototype_cross_entropy``, which forms the
[rows × K] logits chunk by chunk. ``head(x)`` is the plain-PyTorch version of the same logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import init_linears_and_norms, trunc_normal_


class WeightNormPrototypes(nn.Module):
    """Linear(d → K, no bias) with weight normalisation: row k of W is g_k · v_k / ‖v_k‖."""

    def __init__(self, dim: int, prototypes: int):
        super().__init__()
        self.v = nn.Parameter(torch.empty(prototypes, dim))
        self.g = nn.Parameter(torch.empty(prototypes))

    def init_weights(self) -> None:
        trunc_normal_(self.v, 0.02)
        nn.init.ones_(self.g)

    def weight(self) -> torch.Tensor:
        v = self.v.float()
        return (self.g.float().unsqueeze(1) * v / v.norm(dim=1, keepdim=True)).to(self.v.dtype)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight().to(z.dtype).t()


class ProjectionHead(nn.Module):
    """``nlayers`` linears D → hidden → … → bottleneck with GELU between, then the prototypes."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, prototypes: int, nlayers: int = 3):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"heads.nlayers: must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden] * (nlayers - 1) + [bottleneck]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(a, b))
        self.mlp = nn.Sequential(*layers)
        self.prototypes = WeightNormPrototypes(bottleneck, prototypes)

    def init_weights(self) -> None:
        init_linears_and_norms(self.mlp)
        self.prototypes.init_weights()

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised bottleneck z (normalised in fp32, eps 1e-12; returned in the MLP's dtype)."""
        y = self.mlp(x)
        return F.normalize(y.float(), dim=-1, eps=1e-12).to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototypes(self.bottleneck(x))
