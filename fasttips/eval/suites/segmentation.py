"""Zero-shot semantic segmentation with the TIPS protocol (docs/eval_suites.md): ADE20K-150, Pascal
VOC 2012 (20 object classes, background pixels not scored) and Pascal Context (59 classes, background
not scored).

Protocol, per image: shorter side resized to ``seg_size`` (448, bicubic); square windows of that side
every ``seg_stride`` (336) pixels; in each window every patch embedding is compared (cosine) with the
class embeddings (9 TCL prompt templates averaged per class), the patch scores are upsampled
bilinearly to the window, turned into probabilities by a softmax over classes and averaged where
windows overlap; the probabilities are upsampled to the label's resolution and the argmax is scored.
Patch embeddings come from the "value attention" pass (MaskCLIP's trick, used by TIPS): the last
block's attention is replaced by its value projection, so each patch keeps its own content instead of
a mixture of its neighbours (``--seg-tokens final`` scores the ordinary final patch tokens instead).

Accepted layouts (the suite's folder, under ``DATA_ROOT`` by default):
  ade20k   ``ADEChallengeData2016/images/validation/*.jpg`` + ``annotations/validation/*.png``
           (same stem; 0 = unlabelled, 1..150 = classes)
  voc      ``VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt``, ``JPEGImages/<id>.jpg``,
           ``SegmentationClass/<id>.png`` (palette PNG; 0 = background, 1..20, 255 = void)
  context  ``VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt``, ``JPEGImages/<id>.jpg``,
           ``SegmentationClassContext/<id>.png`` (the 59-class label maps as written by mmsegmentation's
           Pascal Context converter: 0 = background, 1..59 = classes)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fasttips.eval.transforms import resize_short_side

from .common import (DatasetLayoutError, as_is, Progress, SuiteContext, class_embeddings, limited, load_metadata,
                     precision_context, require_dir, require_file, require_pairs, to_pixels)


@dataclass(frozen=True)
class SegLayout:
    name: str
    default_dir: str               # under DATA_ROOT
    classes_key: str               # key in metadata/segmentation.json


LAYOUTS = {
    "ade20k": SegLayout("ade20k", "ADEChallengeData2016", "ade20k"),
    "voc": SegLayout("voc", "VOCdevkit/VOC2012", "voc"),
    "context": SegLayout("context", "VOCdevkit/VOC2010", "context"),
}


SPLITS = {"val": ("validation", "val.txt"), "train": ("training", "train.txt")}


def list_pairs(layout: str, root: Path, split: str = "val", name: str | None = None) -> list[tuple[Path, Path]]:
    """[(image, label map)] of a split ("val" or "train") of the ade20k / voc / context layout, in a fixed
    order; errors name the suite ``name`` (default: the layout's)."""
    name = name or layout
    folder, ids_name = SPLITS[split]
    if layout == "ade20k":
        img_dir = require_dir(root / "images" / folder, name, f"{folder} images *.jpg")
        ann_dir = require_dir(root / "annotations" / folder, name, f"{folder} label maps *.png")
        images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() == ".jpg")
        pairs = [(p, ann_dir / f"{p.stem}.png") for p in images]
    else:
        sets, ann = (("Segmentation", "SegmentationClass") if layout == "voc"
                     else ("SegmentationContext", "SegmentationClassContext"))
        ids_file = require_file(root / "ImageSets" / sets / ids_name, name, f"{folder} image ids")
        img_dir = require_dir(root / "JPEGImages", name, "images <id>.jpg")
        ann_dir = require_dir(root / ann, name, "label maps <id>.png")
        ids = [ln.strip() for ln in ids_file.read_text().splitlines() if ln.strip()]
        pairs = [(img_dir / f"{i}.jpg", ann_dir / f"{i}.png") for i in ids]
    if not pairs:
        raise DatasetLayoutError(f"{name}: no {folder} images under {root}")
    return require_pairs(pairs, name)



def check_layout(root: Path, suite: str) -> None:
    list_pairs(suite, root)


def to_targets(label: np.ndarray) -> np.ndarray:
    """Label map values → class indices: 0 (unlabelled / background) and 255 (void) → 255 (ignored),
    k → k - 1. The same rule serves all three layouts."""
    label = label.astype(np.int64)
    return np.where((label == 0) | (label == 255), 255, label - 1)


class SegDataset(torch.utils.data.Dataset):
    """(image: short side resized to ``size``, uint8; targets by ``target_fn``; index) per pair."""

    def __init__(self, pairs, size: int, target_fn=to_targets):
        self.pairs, self.size, self.target_fn = pairs, size, target_fn

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):
        image, label = self.pairs[i]
        try:
            with Image.open(image) as im:
                pixels = np.asarray(resize_short_side(im.convert("RGB"), self.size), dtype=np.uint8)
            with Image.open(label) as lb:
                target = self.target_fn(np.asarray(lb))
        except (OSError, ValueError, SyntaxError):
            return None
        if target.ndim != 2:
            return None
        return pixels, target, i


def windows(h: int, w: int, side: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of the sliding windows covering an h×w image (the last ones flush with the
    border), as mmsegmentation's slide inference places them."""
    rows = max(h - side + stride - 1, 0) // stride + 1
    cols = max(w - side + stride - 1, 0) // stride + 1
    out = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * stride + side, h), min(j * stride + side, w)
            out.append((max(y2 - side, 0), y2, max(x2 - side, 0), x2))
    return out


@contextlib.contextmanager
def value_attention(vision: torch.nn.Module):
    """Within the block, the last transformer block's attention outputs ``proj(v)`` (each token's own
    value, no mixing): MaskCLIP's "values trick", which TIPS uses for zero-shot segmentation. Only the
    patch outputs of such a pass are meaningful."""
    attn = vision.blocks[-1].attn

    def hook(module, args, output):
        x = args[0]                                              # [T, D] packed tokens
        qkv = module.qkv(x)
        return module.proj(qkv.view(x.shape[0], 3, -1)[:, 2])   # v in (heads, head_dim) order = [T, D]

    handle = attn.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def window_patch_features(ctx: SuiteContext, crops: torch.Tensor, tokens: str | None = None) -> torch.Tensor:
    """Patch embeddings ``[B, N, D]`` (float32, on the model's device) of a batch of equal windows;
    ``tokens`` "values" (value-attention last block) or "final" (default: ``ctx.seg_tokens``)."""
    vision = ctx.model.vision
    dtype = next((p.dtype for p in ctx.model.parameters() if p.is_floating_point()), torch.float32)
    hook = value_attention(vision) if (tokens or ctx.seg_tokens) == "values" else contextlib.nullcontext()
    with hook, precision_context(ctx.device, ctx.precision):
        return vision(crops.to(ctx.device, dtype))["patch"].float()


def chance_miou(cm: torch.Tensor) -> float:
    """Expected mIoU of a uniformly random label per pixel, from the ground-truth class counts:
    class c with n_c of N pixels gets IoU n_c / (C·n_c + N − n_c)."""
    n = cm.sum(dim=1).double()
    C, N = n.numel(), n.sum()
    return float((n / (C * n + N - n)).mean()) if N > 0 else float("nan")


@torch.no_grad()
def sliding_confusion(ctx: SuiteContext, suite: str, pairs, n_classes: int, window_scores,
                      target_fn=to_targets, tokens: str | None = None) -> tuple[torch.Tensor, int]:
    """Confusion matrix over ``pairs`` with the sliding-window protocol, and how many pairs could not be
    read. ``window_scores(patch [B, N, D]) -> [B, C, side, side]``: the per-pixel scores of a batch of
    windows, averaged where windows overlap, upsampled bilinearly to the label map, then argmax."""
    from fasttips.eval.metrics import IGNORE_INDEX, confusion_matrix

    side = ctx.seg_size
    C = n_classes
    cm = torch.zeros(C, C, dtype=torch.long)
    skipped = 0
    data = torch.utils.data.DataLoader(SegDataset(pairs, side, target_fn), batch_size=None, shuffle=False,
                                       num_workers=ctx.workers, collate_fn=as_is)
    progress = Progress(ctx, suite, len(pairs), unit="images")
    # windows of several images share a batch; an image is scored once its last window has run
    pending: list[tuple[dict, tuple[int, int, int, int], torch.Tensor]] = []
    open_images: list[dict] = []

    def flush():
        nonlocal cm
        if not pending:
            return
        crops = torch.stack([c for _, _, c in pending])
        scores = window_scores(window_patch_features(ctx, crops, tokens))        # [B, C, side, side]
        for (state, (y1, y2, x1, x2), _), score in zip(pending, scores):
            state["probs"][:, y1:y2, x1:x2] += score
            state["counts"][y1:y2, x1:x2] += 1
            state["left"] -= 1
        pending.clear()
        while open_images and open_images[0]["left"] == 0:
            state = open_images.pop(0)
            probs_img = state["probs"] / state["counts"]
            target = state["target"]
            pred = F.interpolate(probs_img[None], size=tuple(target.shape), mode="bilinear",
                                 align_corners=False)[0].argmax(dim=0).cpu()
            cm += confusion_matrix(pred, target, C, IGNORE_INDEX)
            progress.step(1)

    for sample in data:
        if sample is None:
            skipped += 1
            progress.step(0)
            continue
        pixels_u8, target, _ = sample
        h, w = pixels_u8.shape[:2]
        image = to_pixels([pixels_u8], ctx.pixel_norm)[0]
        state = {"probs": torch.zeros(C, h, w, device=ctx.device), "counts": torch.zeros(h, w, device=ctx.device),
                 "target": torch.from_numpy(target), "left": 0}
        wins = windows(h, w, side, ctx.seg_stride)
        state["left"] = len(wins)
        open_images.append(state)
        for win in wins:
            y1, y2, x1, x2 = win
            pending.append((state, win, image[:, y1:y2, x1:x2]))
            if len(pending) >= ctx.batch_size:
                flush()
    flush()
    return cm, skipped


@torch.no_grad()
def run(ctx: SuiteContext, root: Path, suite: str) -> dict:
    from fasttips.eval.metrics import iou_per_class, mean_iou, pixel_accuracy
    from fasttips.eval.zeroshot import segment_logits

    meta = load_metadata("segmentation")
    names = meta[LAYOUTS[suite].classes_key]
    C = len(names)
    p = ctx.model.vision.patch_embed.patch_size           # sizes were checked by run_suites
    pairs = limited(list_pairs(suite, root), ctx)
    ctx.say(f"[{suite}] {len(pairs)} images, {C} classes, {len(meta['templates'])} prompt templates, "
            f"windows {ctx.seg_size}px every {ctx.seg_stride}px, {ctx.seg_tokens} patch tokens")
    class_emb = class_embeddings(ctx, names, tuple(meta["templates"])).to(ctx.device)
    grid = (ctx.seg_size // p, ctx.seg_size // p)
    side = ctx.seg_size

    def window_scores(patch):
        # TIPS: cosine scores upsampled to the window, softmax over classes, probabilities averaged
        return segment_logits(patch, class_emb, (side, side), grid).softmax(dim=1)

    cm, skipped = sliding_confusion(ctx, suite, pairs, C, window_scores)
    if cm.sum() == 0:
        raise DatasetLayoutError(f"{suite}: no labelled pixel could be read under {root}")
    iou = iou_per_class(cm)
    return {"metrics": {"mIoU": mean_iou(cm), "pixel accuracy": pixel_accuracy(cm)},
            "chance": {"mIoU": chance_miou(cm), "pixel accuracy": 1.0 / C},
            "n_images": len(pairs) - skipped, "n_skipped": skipped, "n_classes": C,
            "iou_per_class": {n: (None if v != v else round(v, 4)) for n, v in zip(names, iou.tolist())},
            "protocol": {"size": side, "stride": ctx.seg_stride, "tokens": ctx.seg_tokens,
                         "templates": len(meta["templates"])}}
