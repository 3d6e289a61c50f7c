"""Zero-shot use of embeddings (TIPS protocol): compare image-side embeddings with text embeddings of
class names, by cosine similarity, with no trained classifier.

- classification: one global image embedding (CLS#1 or CLS#2) against every class-name embedding;
- segmentation: every patch embedding against every class-name embedding, argmax over classes after
  upsampling the patch scores to the image size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .metrics import patch_grid, upsample_patch_logits

# Prompts averaged per class name (the CLIP/TIPS habit: one prompt is noisy, a few are steadier).
DEFAULT_TEMPLATES = ("{}", "a {}", "a photo of a {}", "an image of a {}")


def normalize(x: torch.Tensor) -> torch.Tensor:
    # TIPS inference clips the norm at 1e-3, so an all-zero vector stays finite.
    return F.normalize(x.float(), dim=-1, eps=1e-3)


def class_prompts(class_names: list[str], templates: tuple[str, ...] = DEFAULT_TEMPLATES) -> list[str]:
    """Every template filled with every name, class-major: [c0t0, c0t1, ..., c1t0, ...]."""
    if not class_names:
        raise ValueError("class_names: need at least one class name")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates: each template needs one '{{}}' for the class name, got {templates}")
    return [t.format(name) for name in class_names for t in templates]


def average_prompts(text_emb: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``[C·T, D]`` class-major prompt embeddings → one unit vector per class ``[C, D]``."""
    if text_emb.shape[0] % n_classes:
        raise ValueError(f"text_emb: {text_emb.shape[0]} rows is not a multiple of n_classes={n_classes}")
    per_class = normalize(text_emb).reshape(n_classes, -1, text_emb.shape[-1]).mean(dim=1)
    return normalize(per_class)


def classify(image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """Cosine scores ``[N, C]`` of ``image_emb [N, D]`` against ``class_emb [C, D]``."""
    if image_emb.ndim != 2 or class_emb.ndim != 2 or image_emb.shape[1] != class_emb.shape[1]:
        raise ValueError(f"image_emb {list(image_emb.shape)} and class_emb {list(class_emb.shape)} must be "
                         "[N, D] and [C, D] with the same D")
    return normalize(image_emb) @ normalize(class_emb).T


def segment_logits(patch_emb: torch.Tensor, class_emb: torch.Tensor, image_hw: tuple[int, int],
                   grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-pixel class scores ``[B, C, H, W]``: cosine of each patch embedding ``[B, N, D]`` with each
    class embedding ``[C, D]``, reshaped to the patch grid and bilinearly upsampled to ``image_hw``."""
    if patch_emb.ndim != 3 or class_emb.ndim != 2 or patch_emb.shape[-1] != class_emb.shape[-1]:
        raise ValueError(f"patch_emb {list(patch_emb.shape)} and class_emb {list(class_emb.shape)} must be "
                         "[B, N, D] and [C, D] with the same D")
    B, N, _ = patch_emb.shape
    h, w = grid or patch_grid(N, image_hw)
    if h * w != N:
        raise ValueError(f"grid: {h}x{w} does not hold N = {N} patches")
    scores = normalize(patch_emb) @ normalize(class_emb).T            # [B, N, C]
    scores = scores.transpose(1, 2).reshape(B, -1, h, w)
    return upsample_patch_logits(scores, image_hw)


def segment(patch_emb: torch.Tensor, class_emb: torch.Tensor, image_hw: tuple[int, int],
            grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Predicted label map ``[B, H, W]`` (argmax over classes of ``segment_logits``)."""
    return segment_logits(patch_emb, class_emb, image_hw, grid).argmax(dim=1)
