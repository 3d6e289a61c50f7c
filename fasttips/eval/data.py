"""Held-out evaluation data as an in-memory ``EvalSet``.

Default: the demo's ``eval`` split (procedural scenes with seeds disjoint from training). Each scene
sample carries captions (alt / short / long) and an exact class mask (``mask.png``: pixel value =
index into ``classes.json``'s class names, 0 = background). Any shards in the same caption format
work too (``path``); masks and class names are used when the shards carry ``mask.png`` members and a
``classes.json`` sits in the shard folder or its parent.

Geometry: each image is centre-cropped to a square and resized to the training resolution
(``data.global_size``) for the model; its mask gets the same centre crop but keeps its own resolution,
so segmentation is scored on the exact masks (patch scores are upsampled to the mask size).
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .evalset import EvalSet
from .metrics import IGNORE_INDEX
from .transforms import center_crop_box

MASK_MEMBER = "mask.png"
_CACHE: dict = {}
log = logging.getLogger("fasttips.eval")


def _square(img: Image.Image) -> Image.Image:
    """The central square (offsets rounded as torchvision's CenterCrop rounds them)."""
    return img.crop(center_crop_box(img.width, img.height, min(img.size)))


def _find_classes(shards: list[str]) -> list[str]:
    for folder in sorted({Path(s).parent for s in shards}):
        for candidate in (folder / "classes.json", folder.parent / "classes.json",
                          folder.parent.parent / "classes.json"):
            if candidate.is_file():
                return list(json.loads(candidate.read_text())["classes"])
    return []


def _largest_object(mask: np.ndarray, n_classes: int) -> int:
    """Image label for zero-shot classification: the foreground class covering most pixels
    (-1 when the mask holds no foreground)."""
    counts = np.bincount(mask[mask != IGNORE_INDEX].ravel(), minlength=n_classes)[:n_classes]
    counts[0] = 0                                       # class 0 is the background
    return int(counts.argmax()) if counts.sum() > 0 else -1


def eval_shards(cfg, split: str = "eval", path: str | None = None) -> list[str]:
    from fasttips.data import demo
    from fasttips.data.shards import list_shards

    if path:
        return list_shards(path, what="--data")
    return demo.demo_shards(None, split)        # the demo cache only: data.path is the user's shards


def load_eval_set(cfg=None, split: str = "eval", path: str | None = None, n_images: int | None = None,
                  size: int | None = None) -> EvalSet:
    """The first ``n_images`` good samples of the split (default ``cfg.eval.n_images``) at ``size``
    pixels (default ``cfg.data.global_size``). Cached per arguments: periodic evaluation reads the
    shards once."""
    from fasttips.data.augment import normalize
    from fasttips.data.caption_fields import caption_fields_of
    from fasttips.data.decode import decode_rgb
    from fasttips.data.shards import MemberReader, index_shards

    n = n_images if n_images is not None else (cfg.eval.n_images if cfg is not None else 64)
    size = size or (cfg.data.global_size if cfg is not None else 224)
    pixel_norm = cfg.data.pixel_norm if cfg is not None else "tips"
    shards = eval_shards(cfg, split, path)
    key = (tuple(shards), n, size, pixel_norm)
    if key in _CACHE:
        return _CACHE[key]

    class_names = _find_classes(shards)
    fields = caption_fields_of(cfg) if path and cfg is not None else None   # the demo split: its own format
    samples = [s for ix in (index_shards(shards, fields) if fields else index_shards(shards))
               for s in ix.samples][:n]
    if not samples:
        raise ValueError(f"eval data: no usable samples in {shards}")
    with_masks = bool(class_names) and all(MASK_MEMBER in s.extras for s in samples)
    reader = MemberReader()
    images, masks, labels, keys = [], [], [], []
    captions: dict[str, list[str]] = {"alt": [], "short": [], "long": []}
    try:
        for s in samples:
            img = _square(decode_rgb(reader.image(s)))          # the training loaders' pixels
            images.append(np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.uint8))
            caps = reader.captions(s)
            for kind in captions:
                captions[kind].append(caps.get(kind, "") or "")
            keys.append(s.key)
            if with_masks:
                mask = np.asarray(_square(Image.open(io.BytesIO(reader.extra(s, MASK_MEMBER)))), dtype=np.int64)
                mask = np.where(mask < len(class_names), mask, IGNORE_INDEX)
                masks.append(mask)
                labels.append(_largest_object(mask, len(class_names)))
    finally:
        reader.close()
    pixels = normalize(torch.from_numpy(np.stack(images)), pixel_norm)
    if with_masks and len({m.shape for m in masks}) > 1:
        # one tensor needs one size: masks of different sizes (all square now) are scored at the
        # model's input size instead of their own
        log.warning("eval data: masks of %d different sizes; scoring segmentation at %dx%d",
                    len({m.shape for m in masks}), size, size)
        masks = [np.asarray(Image.fromarray(m.astype(np.int32)).resize((size, size), Image.NEAREST),
                            dtype=np.int64) for m in masks]
    mask_t = torch.from_numpy(np.stack(masks)) if with_masks else None
    label_t = torch.tensor(labels) if with_masks and min(labels) >= 0 else None
    if with_masks and label_t is None:
        log.warning("eval data: %d image(s) have no foreground object, so no zero-shot classification "
                    "(cls/*) is scored", sum(label < 0 for label in labels))
    eval_set = EvalSet(pixels, captions, class_names if with_masks else [], mask_t, label_t, keys,
                       classify_classes=([i for i, c in enumerate(class_names) if c != "background"]
                                         if with_masks else None))
    _CACHE[key] = eval_set
    return eval_set
