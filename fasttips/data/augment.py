"""DINOv2 multi-crop augmentation on Pillow images (the PyTorch loader's CPU path).

The recipe is DINOv2's *effective* one (docs/loss_math.md §5.1): every crop gets a random resized
crop (bicubic, aspect 3/4..4/3), a horizontal flip (p 0.5), colour jitter (0.4, 0.4, 0.2, 0.1) with
p 0.8 and grayscale with p 0.2. Gaussian blur (σ ∈ [0.1, 2]) has the probabilities DINOv2 actually
applies, 0.0 / 0.9 / 0.5 for global crop 1 / global crop 2 / local crops (the declared 1.0 / 0.1 / 0.5
are inverted by its RandomApply wrapper), and global crop 2 is solarized with p 0.2. Global crops
beyond the second reuse the second one's recipe.

Crops leave this module as uint8 HWC arrays; ``normalize`` turns a stacked batch into float CHW
(TIPS: pixels in [0, 1], no mean/std; or ImageNet mean/std). The DALI graph in ``dali_loader.py``
implements the same recipe with DALI operators.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from fasttips.config import PIXEL_NORMS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
JITTER_P, GRAY_P, SOLARIZE_P, SOLARIZE_THRESHOLD = 0.8, 0.2, 0.2, 128
BLUR_SIGMA = (0.1, 2.0)
BLUR_KERNEL = 9           # DINOv2 GaussianBlur kernel size (DALI window; Pillow blurs without a cut-off)
BLUR_P_GLOBAL1, BLUR_P_GLOBAL2, BLUR_P_LOCAL = 0.0, 0.9, 0.5
ASPECT = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class CropRecipe:
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


def crop_recipes(global_size: int, n_global: int, global_scale, local_size: int, n_local: int,
                 local_scale) -> list[CropRecipe]:
    """Recipes of all crops of one image: globals first, then locals."""
    out = []
    for i in range(n_global):
        first = i == 0
        out.append(CropRecipe(global_size, tuple(global_scale), BLUR_P_GLOBAL1 if first else BLUR_P_GLOBAL2,
                              0.0 if first else SOLARIZE_P))
    out += [CropRecipe(local_size, tuple(local_scale), BLUR_P_LOCAL, 0.0)] * n_local
    return out


def random_resized_box(width: int, height: int, scale, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop with area fraction in ``scale`` and aspect in
    ASPECT; after 10 failed tries, the largest centred crop with a clamped aspect."""
    area = width * height
    log_lo, log_hi = math.log(ASPECT[0]), math.log(ASPECT[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < ASPECT[0]:
        w, h = width, int(round(width / ASPECT[0]))
    elif ratio > ASPECT[1]:
        h, w = height, int(round(height * ASPECT[1]))
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


LUMA = np.array([0.299, 0.587, 0.114])
# RGB <-> YIQ: a hue change is a rotation of the (I, Q) chroma plane around the luma axis.
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = np.linalg.inv(_YIQ)


GRAY_MATRIX = np.outer(np.ones(3), LUMA)        # x -> gray(x) in every channel
_LEVELS = np.arange(256, dtype=np.float64)


def hue_matrix(turns: float) -> np.ndarray:
    c, s = math.cos(2 * math.pi * turns), math.sin(2 * math.pi * turns)
    rot = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return _YIQ_INV @ rot @ _YIQ


def jitter_parts(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Colour jitter as an affine map ``x -> A x + t`` on RGB, with ``t = t0 + T m`` for the crop's
    mean colour ``m`` (same units as x). Returns ``(A, t0, T)``.

    Brightness (scale), saturation (blend with luma), hue (YIQ rotation, as DALI's color_twist does)
    and contrast (blend with the mean luma of the image *at that point*) are composed in a random
    order, like torchvision's ColorJitter. Every step is affine, so the mean luma at any point is a
    linear function of ``m``: carrying that dependence in ``T`` lets a whole batch be jittered on its
    device without reading the means back (``photometric.py``). One pass over the pixels instead of
    four (torchvision also clamps between steps; we clamp once at the end). Scalar on purpose: a few
    3×3 products per sample are cheaper in a loop than vectorised with masks, even for a batch.
    """
    return jitter_map(draw_jitter(rng))


def draw_jitter(rng: np.random.Generator) -> tuple[float, float, float, float, np.ndarray]:
    """The random part of ``jitter_parts``: brightness, contrast, saturation and hue factors, and
    the order of the four steps."""
    b = rng.uniform(1 - JITTER["brightness"], 1 + JITTER["brightness"])
    c = rng.uniform(1 - JITTER["contrast"], 1 + JITTER["contrast"])
    s = rng.uniform(1 - JITTER["saturation"], 1 + JITTER["saturation"])
    hue = rng.uniform(-JITTER["hue"], JITTER["hue"])
    return b, c, s, hue, rng.permutation(4)


def jitter_map(draw: tuple[float, float, float, float, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A, t0, T)`` of ``jitter_parts`` for a ``draw_jitter``."""
    b, c, s, hue, order = draw
    A, t0, T = np.eye(3), np.zeros(3), np.zeros((3, 3))
    for op in order:
        if op == 0:
            A, t0, T = b * A, b * t0, b * T
        elif op == 1:       # mean luma now = LUMA·t0 + (LUMA (A + T))·m
            t0 = c * t0 + (1 - c) * float(LUMA @ t0)
            T = c * T + (1 - c) * np.outer(np.ones(3), LUMA @ (A + T))
            A = c * A
        elif op == 2:
            A, t0, T = (s * M + (1 - s) * (GRAY_MATRIX @ M) for M in (A, t0, T))
        else:
            H = hue_matrix(hue)
            A, t0, T = H @ A, H @ t0, H @ T
    return A, t0, T


def jitter_affine(mean_rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One ``jitter_parts`` for an image of mean colour ``mean_rgb``: ``(A, t)`` with ``x -> A x + t``."""
    A, t0, T = jitter_parts(rng)
    return A, t0 + T @ mean_rgb


def color_jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Apply ``jitter_affine`` with Pillow's matrix conversion (rounds and clamps to 0..255)."""
    return _apply_jitter(img, jitter_parts(rng))


def _apply_jitter(img: Image.Image, parts: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Image.Image:
    hist = np.asarray(img.histogram(), dtype=np.float64).reshape(3, 256)   # C-speed per-channel counts
    mean_rgb = hist @ _LEVELS / (img.width * img.height)
    A, t0, T = parts
    t = t0 + T @ mean_rgb
    matrix = tuple(float(v) for v in np.concatenate([A, t[:, None]], axis=1).reshape(-1))
    return img.convert("RGB", matrix)


@dataclass(frozen=True)
class CropDraw:
    """Every random choice of one crop (``draw_crop``): the box in the pixels of the decoded image,
    the flip, and the photometric choices (None / False: not applied)."""
    box: tuple[int, int, int, int]
    flip: bool
    jitter: tuple[float, float, float, float, np.ndarray] | None     # ``draw_jitter``
    gray: bool
    blur_sigma: float | None
    solarize: bool


def draw_crop(width: int, height: int, recipe: CropRecipe, rng: np.random.Generator) -> CropDraw:
    """The random choices of one crop of a ``width`` × ``height`` image, in a fixed order: box, flip,
    jitter, grayscale, blur, solarize. Both loaders draw their boxes and flips here from the same
    per-sample seed (``pipeline.crop_seed``), so given the image size they crop the same regions.
    Draws only (the jitter's matrices are made when applied): the DALI loader, which uses the box
    and flip alone, pays little for the rest."""
    box = random_resized_box(width, height, recipe.scale, rng)
    flip = bool(rng.random() < 0.5)
    jitter = draw_jitter(rng) if rng.random() < JITTER_P else None
    gray = bool(rng.random() < GRAY_P)
    sigma = float(rng.uniform(*BLUR_SIGMA)) if rng.random() < recipe.blur_p else None
    solarize = bool(rng.random() < recipe.solarize_p)
    return CropDraw(box, flip, jitter, gray, sigma, solarize)


def draw_crops(width: int, height: int, recipes: list[CropRecipe], rng: np.random.Generator) -> list[CropDraw]:
    """``draw_crop`` for every recipe of one image, in recipe order (what ``multicrop`` draws)."""
    return [draw_crop(width, height, r, rng) for r in recipes]


def apply_crop(img: Image.Image, recipe: CropRecipe, d: CropDraw) -> np.ndarray:
    """The crop ``d`` of ``img`` (RGB) with Pillow, as uint8 [size, size, 3]."""
    crop = img.resize((recipe.size, recipe.size), Image.BICUBIC, box=d.box)
    if d.flip:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    if d.jitter is not None:
        crop = _apply_jitter(crop, jitter_map(d.jitter))
    if d.gray:
        crop = crop.convert("L").convert("RGB")
    if d.blur_sigma is not None:
        crop = crop.filter(ImageFilter.GaussianBlur(radius=d.blur_sigma))
    if d.solarize:
        crop = ImageOps.solarize(crop, threshold=SOLARIZE_THRESHOLD)
    return np.asarray(crop, dtype=np.uint8)


def augment_crop(img: Image.Image, recipe: CropRecipe, rng: np.random.Generator) -> np.ndarray:
    """One augmented crop of ``img`` (RGB) as uint8 [size, size, 3]."""
    return apply_crop(img, recipe, draw_crop(img.width, img.height, recipe, rng))


def decode_rgb(data: bytes, min_side: int = 0) -> Image.Image:
    """Decode to 8-bit RGB with the same pixels as DALI (``decode.decode_rgb``); a large JPEG is decoded
    at a reduced scale (1/2, 1/4, 1/8) when its shorter side stays >= ``min_side``, which is much faster
    and keeps the crops at (about) their output resolution (see ``min_decode_side``)."""
    from .decode import decode_rgb as decode
    return decode(data, min_side)


def min_decode_side(recipes: list[CropRecipe]) -> int:
    """Shorter side at which a square crop of the smallest scale still has its output resolution.
    (At the extreme aspect 3/4 such a crop is sqrt(3/4) = 0.87 of it on its short side: slight
    upsampling of the rare smallest, most elongated crops, the price of the faster decode.)"""
    return max(int(math.ceil(r.size / math.sqrt(r.scale[0]))) for r in recipes)


def multicrop(img: Image.Image, recipes: list[CropRecipe], rng: np.random.Generator) -> list[np.ndarray]:
    return [augment_crop(img, r, rng) for r in recipes]


def normalize(crops_u8: torch.Tensor, pixel_norm: str = "tips") -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W]: TIPS = x / 255; ImageNet = (x / 255 - mean) / std."""
    if pixel_norm not in PIXEL_NORMS:
        raise ValueError(f"data.pixel_norm={pixel_norm!r}: choose one of {list(PIXEL_NORMS)}")
    # Transpose while still uint8 (4× fewer bytes to move), then convert contiguously.
    x = crops_u8.permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    if pixel_norm == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = x.sub_(mean).div_(std)
    return x
