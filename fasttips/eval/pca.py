"""The PCA picture: the first three principal components of patch features shown as RGB.

One PCA is fitted over the patches of all images together, so the same colour means the same
direction in feature space across images (a good dense encoder paints one object one colour).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def pca_components(features: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Project ``features [M, D]`` on their first ``k`` principal components → ``[M, k]``.

    The sign of each component is fixed (largest-magnitude loading positive) so the picture does not
    flip colours between runs of the SVD."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features: expected [M >= 2, D], got {list(features.shape)}")
    x = features.double()
    x = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    comps = vh[:k]                                         # [k', D], k' = min(k, M, D)
    signs = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    proj = x @ comps.T
    if proj.shape[1] < k:                                  # fewer dims than colours: pad with zeros
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], k - proj.shape[1])], dim=1)
    return proj.float()


def pca_rgb(patch_features: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """``patch_features [B, N, D]`` on an ``(h, w)`` grid → uint8 images ``[B, h, w, 3]``.

    Each component is scaled to [0, 255] over its 1st–99th percentile across all images, so one
    outlier patch does not wash the picture out."""
    if patch_features.ndim != 3:
        raise ValueError(f"patch_features: expected [B, N, D], got {list(patch_features.shape)}")
    B, N, D = patch_features.shape
    h, w = grid
    if h * w != N:
        raise ValueError(f"grid: {h}x{w} = {h * w} patches, but patch_features has N = {N}")
    proj = pca_components(patch_features.reshape(B * N, D).float(), k=3)
    lo = torch.quantile(proj, 0.01, dim=0)
    hi = torch.quantile(proj, 0.99, dim=0)
    scaled = ((proj - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    return (scaled * 255).round().to(torch.uint8).reshape(B, h, w, 3).cpu().numpy()


def to_uint8_image(pixels: torch.Tensor) -> np.ndarray:
    """A normalised image ``[3, H, W]`` → uint8 ``[H, W, 3]`` by per-image min/max (for display only)."""
    x = pixels.detach().float().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
    return (x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def save_pca_png(path: str | Path, patch_features: torch.Tensor, grid: tuple[int, int],
                 images: torch.Tensor | None = None) -> np.ndarray:
    """Write one PNG: a row per image (the image itself when given, then its PCA map enlarged to the
    image size with nearest-neighbour so patches stay visible). Returns the picture ``[H', W', 3]``."""
    from PIL import Image

    maps = pca_rgb(patch_features, grid)                   # [B, h, w, 3]
    B, h, w, _ = maps.shape
    if images is not None:
        if images.ndim != 4 or images.shape[0] != B or images.shape[1] != 3:
            raise ValueError(f"images: expected [{B}, 3, H, W], got {list(images.shape)}")
        H, W = images.shape[-2:]
    else:
        H, W = h * 16, w * 16
    rows = []
    for b in range(B):
        pca = np.asarray(Image.fromarray(maps[b]).resize((W, H), Image.NEAREST))
        rows.append(np.concatenate([to_uint8_image(images[b]), pca], axis=1) if images is not None else pca)
    picture = np.concatenate(rows, axis=0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)
    return picture
