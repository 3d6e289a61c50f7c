"""KoLeo regulariser (docs/loss_math.md §2.5): spread the backbone CLS of one crop over the sphere.

``L = −mean_i log(‖x̂_i − x̂_nn(i) + ε‖ + ε)`` with x̂ = x/‖x‖ and nn(i) the nearest other row by
cosine. In fp32 (fp64 kept) with autocast off; per crop and per rank (no all-gather).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_rows

EPS = 1e-8


def koleo_loss(x: torch.Tensor) -> torch.Tensor:
    check_rows("koleo_loss: x", x)
    if x.shape[0] < 2:
        raise ValueError(f"koleo_loss: x needs at least 2 rows (a nearest neighbour), got {x.shape[0]}")
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x if x.dtype == torch.float64 else x.float(), dim=-1, eps=EPS)
        with torch.no_grad():
            sim = x @ x.t()
            sim.fill_diagonal_(-2.0)              # below any cosine: never pick yourself
            nearest = sim.argmax(dim=1)
        dist = (x - x[nearest] + EPS).norm(dim=-1)
        return -torch.log(dist + EPS).mean()
