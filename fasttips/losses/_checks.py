"""Shape checks shared by the losses: a bad input fails with a message naming the argument."""
from __future__ import annotations

import torch


def check_rows(name: str, t: torch.Tensor, ndim: int = 2, rows: int | None = None,
               dim: int | None = None) -> None:
    if not torch.is_tensor(t):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {list(t.shape)}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name}: expected {rows} rows, got shape {list(t.shape)}")
    if dim is not None and t.shape[-1] != dim:
        raise ValueError(f"{name}: expected last dim {dim}, got shape {list(t.shape)}")


def check_prototypes(name: str, vg, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``vg`` = (v [K, d], g [K]) of a weight-normed prototype layer."""
    try:
        v, g = vg
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a pair (v [K, d], g [K])") from None
    if v.ndim != 2 or v.shape[1] != dim:
        raise ValueError(f"{name}: v must be [K, {dim}], got {list(v.shape)}")
    if g.numel() != v.shape[0]:
        raise ValueError(f"{name}: g must have K={v.shape[0]} entries, got shape {list(g.shape)}")
    return v, g.reshape(-1)
