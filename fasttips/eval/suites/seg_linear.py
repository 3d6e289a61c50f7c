"""Linear semantic segmentation on frozen patch tokens (DINOv2's "linear" setting; docs/eval_suites.md):
ADE20K-150 (``ade20k-linear``) and Pascal VOC 2012 with background, 21 classes (``voc-linear``).

Training: each training image's shorter side is resized to ``--seg-size`` (bicubic; the label map
nearest) and the centre square of that side is cropped, once, with no augmentation; its final patch
tokens are cached. A linear layer on the standardised tokens predicts class logits per patch, upsampled
×4 bilinearly; cross-entropy against the labels at those positions. Evaluation: the zero-shot suite's
sliding windows (``--seg-size`` every ``--seg-stride``) with the probe's logits upsampled to each window,
averaged where windows overlap, upsampled to the label map, argmax; mIoU over the classes present.

Accepted layouts: the zero-shot suites' folders, plus the training split:
  ade20k-linear  ``ADEChallengeData2016/images/{training,validation}/*.jpg`` and
                 ``annotations/{training,validation}/*.png`` (0 = unlabelled, ignored; 1..150 = classes)
  voc-linear     ``VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt``, ``JPEGImages/<id>.jpg``,
                 ``SegmentationClass/<id>.png`` (0 = background, a class here; 1..20; 255 = void, ignored).
                 When the SBD-augmented labels are there (``SegmentationClassAug/``), the probe trains on
                 the 10,582-image augmented set instead (the usual VOC training set, mmsegmentation's
                 ``voc12aug``): DeepLab's list ``ImageSets/Segmentation/trainaug.txt`` (or
                 ``train_aug.txt``) with every label in ``SegmentationClassAug``, else mmsegmentation's
                 ``train.txt`` (labels in ``SegmentationClass``) plus ``aug.txt`` (``SegmentationClassAug``).
                 Validation ids are never trained on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fasttips.eval.transforms import center_crop_box, resize_center_crop, resized_size

from .common import DatasetLayoutError, SuiteContext, limited, load_metadata, require_pairs
from .dense import UPSAMPLE, DenseCache, DenseTask, SegHead, sample_grid
from .probe import DENSE, fit, recipe_for
from .segmentation import chance_miou, list_pairs, sliding_confusion, to_targets

LAYOUT = {"ade20k-linear": "ade20k", "voc-linear": "voc"}


def voc_targets(label: np.ndarray) -> np.ndarray:
    """VOC label values → class indices with background as class 0: 0..20 kept, 255 (void) ignored."""
    label = label.astype(np.int64)
    return np.where(label <= 20, label, 255)


def classes_and_targets(suite: str):
    meta = load_metadata("segmentation")
    if suite == "voc-linear":
        return ["background"] + list(meta["voc"]), voc_targets
    return list(meta["ade20k"]), to_targets


class SegTrainDataset(torch.utils.data.Dataset):
    """(centre crop of side ``size`` as uint8, labels sampled on the ``fine`` grid, index); None when a
    file cannot be read."""

    def __init__(self, pairs, size: int, target_fn, fine: tuple[int, int]):
        self.pairs, self.size, self.target_fn, self.fine = pairs, size, target_fn, fine

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):
        image, label = self.pairs[i]
        try:
            with Image.open(image) as im:
                pixels = resize_center_crop(im.convert("RGB"), self.size, self.size)
            with Image.open(label) as lb:
                lb.load()
                size = resized_size(lb.width, lb.height, self.size)
                crop = lb.resize(size, Image.NEAREST).crop(center_crop_box(*size, self.size))
                target = self.target_fn(np.asarray(crop))
        except (OSError, ValueError, SyntaxError):
            return None
        if target.ndim != 2:
            return None
        return pixels, sample_grid(target, *self.fine).astype(np.uint8), i


AUG_LABELS = "SegmentationClassAug"           # the SBD-augmented VOC label maps (0..20, 255 = void)
AUG_LISTS = ("trainaug.txt", "train_aug.txt")  # DeepLab's list of the 10,582 augmented training ids
MMSEG_AUG_LIST = "aug.txt"                     # mmsegmentation's: the augmented ids beyond train.txt


def _id_pairs(root: Path, ids_file: Path, labels: str, suite: str) -> list[tuple[Path, Path]]:
    ids = [ln.strip() for ln in ids_file.read_text().splitlines() if ln.strip()]
    return require_pairs([(root / "JPEGImages" / f"{i}.jpg", root / labels / f"{i}.png") for i in ids], suite,
                         listed_in=ids_file)


def train_pairs(root: Path, suite: str) -> tuple[list[tuple[Path, Path]], str]:
    """(training pairs, which set): ADE20K's training split; for VOC the SBD-augmented set when its
    labels are there (module docstring), else ``train.txt``. Validation images are left out."""
    plain = list_pairs(LAYOUT[suite], root, "train", suite)
    if suite != "voc-linear" or not (root / AUG_LABELS).is_dir():
        return plain, "train.txt" if suite == "voc-linear" else "training"
    sets = root / "ImageSets" / "Segmentation"
    deeplab = next((sets / n for n in AUG_LISTS if (sets / n).is_file()), None)
    if deeplab is not None:
        pairs, used = _id_pairs(root, deeplab, AUG_LABELS, suite), f"{deeplab.name} ({AUG_LABELS})"
    elif (sets / MMSEG_AUG_LIST).is_file():
        pairs = plain + _id_pairs(root, sets / MMSEG_AUG_LIST, AUG_LABELS, suite)
        used = f"train.txt + {MMSEG_AUG_LIST} ({AUG_LABELS})"
    else:
        raise DatasetLayoutError(f"{suite}: {root / AUG_LABELS} is there but no list of its ids: expected "
                                 f"{sets / AUG_LISTS[0]} (DeepLab) or {sets / MMSEG_AUG_LIST} (mmsegmentation)")
    val = {image.stem for image, _ in list_pairs(LAYOUT[suite], root, "val", suite)}
    seen: set[str] = set()
    kept = []
    for image, label in pairs:
        if image.stem not in val and image.stem not in seen:
            seen.add(image.stem)
            kept.append((image, label))
    return kept, used


def check_layout(root: Path, suite: str) -> None:
    train_pairs(root, suite)
    list_pairs(LAYOUT[suite], root, "val", suite)


def run(ctx: SuiteContext, root: Path, suite: str) -> dict:
    from fasttips.eval.metrics import iou_per_class, mean_iou, pixel_accuracy

    names, target_fn = classes_and_targets(suite)
    C = len(names)
    train, train_set = train_pairs(root, suite)
    train = limited(train, ctx)
    val = limited(list_pairs(LAYOUT[suite], root, "val", suite), ctx)
    side = ctx.seg_size
    p = ctx.model.vision.patch_embed.patch_size
    G = side // p
    recipe = recipe_for(ctx, DENSE)
    ctx.say(f"[{suite}] {len(train)} train ({train_set}) / {len(val)} val images, {C} classes, train crops {side}px, "
            f"windows {side}px every {ctx.seg_stride}px, final patch tokens")
    cache = DenseCache(ctx, SegTrainDataset(train, side, target_fn, (UPSAMPLE * G, UPSAMPLE * G)), suite,
                       (G, G), (UPSAMPLE * G, UPSAMPLE * G), np.uint8)
    try:
        task = DenseTask(cache, SegHead(C), use_cls=False, device=ctx.device)
        probe = fit(task, cache.items, recipe, ctx, suite)
    finally:
        cache.close()
    linear = probe.linear()

    def window_scores(patch):
        # the probe's logits upsampled to the window; logits (not probabilities) are averaged, as
        # mmsegmentation's sliding inference does
        x = task.inputs(patch.reshape(patch.shape[0], G, G, -1), None)
        return task.layer_output(linear, x, (side, side))

    cm, skipped = sliding_confusion(ctx, suite, val, C, window_scores, target_fn, tokens="final")
    if cm.sum() == 0:
        raise DatasetLayoutError(f"{suite}: no labelled pixel could be read under {root}")
    iou = iou_per_class(cm)
    return {"metrics": {"mIoU": mean_iou(cm), "pixel accuracy": pixel_accuracy(cm)},
            "chance": {"mIoU": chance_miou(cm), "pixel accuracy": 1.0 / C},
            "n_train": len(cache.items), "n_images": len(val) - skipped, "n_skipped": skipped + cache.skipped,
            "n_classes": C,
            "iou_per_class": {n: (None if v != v else round(v, 4)) for n, v in zip(names, iou.tolist())},
            "probe": probe.record,
            "protocol": {"size": side, "stride": ctx.seg_stride, "tokens": "final", "train_crop": side,
                         "train_set": train_set,
                         "target_grid": UPSAMPLE * G}}
