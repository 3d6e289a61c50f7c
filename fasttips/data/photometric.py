"""DINOv2's photometric augmentation for a whole batch of crops, in torch, on the crops' device.

The DALI loader crops, resizes and flips in DALI and hands the uint8 crops to ``photometric``: colour
jitter and grayscale as one affine colour map per sample (the composition of the Pillow path,
``augment.jitter_parts``), Gaussian blur with a per-sample σ (window 9 like DINOv2, reflected
borders), solarize, then the pixel normalisation. Order and probabilities are those of
``augment.augment_crop``.

Why not in DALI: on the CPU, DALI 2.4 operators given a per-sample argument (a random σ, random jitter
factors) are about 4× slower per pixel than with one value for the whole batch (``python
bench/bench_data.py --dali-ops``, 294² crops: ``gaussian_blur`` 8.2 against 1.9 CPU-ms per image,
``color_twist`` 2.8 against 0.7). Those two ops were 9 of the 17 CPU-ms per image of the DALI graph;
batched here they cost about 1.5. The same code then runs on the GPU after nvJPEG decoding, and is
tested on the CPU.

All random draws come from the numpy ``rng`` the caller seeds per (seed, rank, batch, crop), in a
fixed order, so a resumed loader repeats them without saving any state.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .augment import (BLUR_KERNEL, BLUR_SIGMA, GRAY_P, IMAGENET_MEAN, IMAGENET_STD, JITTER_P, PIXEL_NORMS,
                      SOLARIZE_THRESHOLD, CropRecipe, GRAY_MATRIX, jitter_parts)


def colour_maps(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample ``(A [n,3,3], t0 [n,3], T [n,3,3])`` of colour jitter (p 0.8) then grayscale (p 0.2):
    ``x -> A x + t0 + T m`` for a crop of mean colour m; the identity for untouched samples."""
    jitter = rng.random(n) < JITTER_P
    gray = rng.random(n) < GRAY_P
    A, t0, T = np.tile(np.eye(3), (n, 1, 1)), np.zeros((n, 3)), np.zeros((n, 3, 3))
    for i in np.flatnonzero(jitter):
        A[i], t0[i], T[i] = jitter_parts(rng)
    A[gray], t0[gray], T[gray] = GRAY_MATRIX @ A[gray], t0[gray] @ GRAY_MATRIX.T, GRAY_MATRIX @ T[gray]
    return A, t0, T


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, window: int = BLUR_KERNEL) -> torch.Tensor:
    """Separable Gaussian blur of float [n, C, H, W] with σ [n] per sample (normalised taps, reflected
    borders as torchvision and DALI do). One grouped convolution per direction for the whole batch."""
    n, C, H, W = x.shape
    r = torch.arange(window, dtype=x.dtype, device=x.device) - window // 2
    taps = torch.exp(-r[None] ** 2 / (2 * sigma.to(x)[:, None] ** 2))
    taps = (taps / taps.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)        # [n·C, window]
    pad = window // 2
    y = F.pad(x.reshape(1, n * C, H, W), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, taps[:, None, None, :], groups=n * C)
    y = F.conv2d(y, taps[:, None, :, None], groups=n * C)
    return y.reshape(n, C, H, W)


def photometric(crops_u8: torch.Tensor, recipe: CropRecipe, rng: np.random.Generator,
                pixel_norm: str = "tips") -> torch.Tensor:
    """uint8 [n, 3, S, S] crops (already cropped, resized and flipped) -> normalised float32 [n, 3, S, S]."""
    if pixel_norm not in PIXEL_NORMS:
        raise ValueError(f"data.pixel_norm={pixel_norm!r}: choose one of {list(PIXEL_NORMS)}")
    n, dev = crops_u8.shape[0], crops_u8.device
    A, t0, T = colour_maps(n, rng)
    blurred = rng.random(n) < recipe.blur_p
    sigma = rng.uniform(*BLUR_SIGMA, size=n)
    solarized = rng.random(n) < recipe.solarize_p
    # Every sample goes through its colour map (the identity for most untouched ones: cheaper than
    # gathering a subset), with the 1/255 of the uint8 -> [0, 1] conversion folded into A.
    as_tensor = lambda a: torch.from_numpy(a).to(device=dev, dtype=torch.float32)  # noqa: E731
    x = crops_u8.reshape(n, 3, -1).float()
    offset = as_tensor(t0 / 255.0) + (as_tensor(T / 255.0) @ x.mean(dim=2, keepdim=True)).squeeze(2)
    x = torch.baddbmm(offset[:, :, None], as_tensor(A / 255.0), x).clamp_(0.0, 1.0).reshape(crops_u8.shape)
    if blurred.any():
        idx = torch.from_numpy(np.flatnonzero(blurred)).to(dev)
        x[idx] = gaussian_blur(x[idx], torch.from_numpy(sigma[blurred]).to(dev)).clamp_(0.0, 1.0)  # taps sum to 1 ± ulp
    if solarized.any():
        idx = torch.from_numpy(np.flatnonzero(solarized)).to(dev)
        part = x[idx]
        x[idx] = torch.where(part * 255.0 >= SOLARIZE_THRESHOLD, 1.0 - part, part)
    if pixel_norm == "imagenet":
        x = (x - torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)) / \
            torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    return x
