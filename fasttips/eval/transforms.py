"""Evaluation preprocessing with torchvision's semantics, without torchvision.

The reference evaluations (open_clip's zero-shot classification and retrieval, DINOv2's kNN, timm's
eval transform) all build ``Resize(short_side, BICUBIC)`` + ``CenterCrop(crop)`` and apply it to PIL
images. Two integer roundings decide which pixels a model sees, and both are reproduced here:

- ``Resize(s)``: the shorter side becomes ``s``, the longer ``int(s * long / short)`` (truncated, not
  rounded: a 500×375 image at s = 224 becomes 298×224, not 299×224);
- ``CenterCrop(c)``: the offset is ``int(round((side - c) / 2.0))``, Python's round (half to even).

Interpolation follows torchvision's PIL path: ``PIL.Image.resize(..., BICUBIC)``, which always
antialiases (its filter widens with the scale factor; bicubic a = -0.5). torchvision on *tensors*
uses torch's own antialiased bicubic (a = -0.75), which differs by a few grey levels; the reference
pipelines decode to PIL and resize there, so that is the path followed. Pixels are then identical
to torchvision's (tests/eval_suites/test_transforms.py checks it where torchvision is installed).

Used by every evaluation suite (classification, retrieval, kNN, DOCCI, segmentation's short-side
resize); written so an export or data path can use the same functions.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# DINOv2's kNN / linear eval transform: Resize(256) + CenterCrop(224), i.e. timm's crop_pct 0.875.
KNN_RESIZE, KNN_CROP = 256, 224


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) after torchvision ``Resize(short_side)``: the shorter side becomes
    ``short_side`` and the longer ``int(short_side * long / short)`` (computed in that order, as
    torchvision does, so float rounding agrees too)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size: expected positive width and height, got {width}x{height}")
    if short_side < 1:
        raise ValueError(f"short_side: must be >= 1, got {short_side}")
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def center_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of torchvision ``CenterCrop(crop)`` on a width×height image; the
    offsets are ``int(round((side - crop) / 2.0))``. The crop must fit (no padding here)."""
    if crop < 1 or crop > width or crop > height:
        raise ValueError(f"crop: {crop} does not fit in a {width}x{height} image")
    left = int(round((width - crop) / 2.0))
    top = int(round((height - crop) / 2.0))
    return left, top, left + crop, top + crop


def resize_short_side(img: Image.Image, short_side: int) -> Image.Image:
    """torchvision ``Resize(short_side, BICUBIC)`` on a PIL image (unchanged when already that size)."""
    size = resized_size(img.width, img.height, short_side)
    return img if size == img.size else img.resize(size, Image.BICUBIC)


def resize_center_crop(img: Image.Image, resize: int, crop: int) -> np.ndarray:
    """``Resize(resize, BICUBIC)`` then ``CenterCrop(crop)``, as torchvision does on PIL images;
    uint8 HWC ``[crop, crop, 3]`` for an RGB image."""
    if crop > resize:
        raise ValueError(f"crop: {crop} is larger than the resized short side {resize}")
    img = resize_short_side(img, resize)
    return np.asarray(img.crop(center_crop_box(img.width, img.height, crop)), dtype=np.uint8)


def knn_resize(crop: int) -> int:
    """The short side DINOv2's kNN protocol resizes to before cropping ``crop`` pixels: 256 for 224,
    the same 256/224 ratio (timm's crop_pct 0.875) at other crop sizes."""
    return crop * KNN_RESIZE // KNN_CROP
