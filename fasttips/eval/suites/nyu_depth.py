"""NYUv2 monocular depth with a linear probe on frozen features (DINOv2's "lin. 1" depth head;
docs/eval_suites.md, "Depth and surface normals").

Layout read: the NYUv2 copy of the BTS repository (Lee et al.), as AdaBins, ZoeDepth and the
Monocular-Depth-Estimation-Toolbox behind DINOv2's depth evaluation read it. ``ROOT`` (default
``DATA_ROOT/nyu_depth_v2``) holds
  nyudepthv2_train_files_with_gt.txt   BTS's split files (here or in ROOT/train_test_inputs/); a line is
  nyudepthv2_test_files_with_gt.txt    "<rgb> <depth or None> <focal>", paths relative to the folders below
  sync/<scene>/rgb_XXXXX.jpg           training frames (BTS's sync.zip) and
  sync/<scene>/sync_depth_XXXXX.png    their depth, uint16 PNG in millimetres (0 = no depth)
  official_splits/test/<scene>/...     the 654 official test images, same naming (BTS's extraction of
                                       nyu_depth_v2_labeled.mat)
Lines whose depth is "None" are skipped.

Every image is resized (bicubic) to ``--seg-size`` on its shorter side with both sides on the patch
grid (480×640 → 448×602 at 448), whole. The layer reads each patch token with CLS#1‖CLS#2 appended
(DINOv2 appends its one CLS token), standardised; 256 depth bins over [0.001, 10] m. Scored at the
ground truth's resolution (prediction upsampled bilinearly), inside Eigen's crop, on pixels with
0.001 < depth < 10 m: RMSE, AbsRel and δ1 per image, averaged over the test images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .common import DatasetLayoutError, SuiteContext, limited, require_file, require_pairs
from .dense import DenseCache, DenseTask, DepthHead, PairDataset, TestPass, probe_geometry
from .probe import DENSE, fit, recipe_for

SUITE = "nyu-depth"
SPLIT_FILES = {"train": "nyudepthv2_train_files_with_gt.txt", "test": "nyudepthv2_test_files_with_gt.txt"}
FOLDERS = {"train": "sync", "test": "official_splits/test"}
MIN_DEPTH, MAX_DEPTH = 1e-3, 10.0
DEPTH_SCALE = 1000.0                # PNG value per metre


def split_file(root: Path, split: str, suite: str) -> Path:
    name = SPLIT_FILES[split]
    for candidate in (root / name, root / "train_test_inputs" / name):
        if candidate.is_file():
            return candidate
    return require_file(root / name, suite, f"BTS's {split} split file (or in {root / 'train_test_inputs'})")


def list_split(root: Path, split: str, suite: str = SUITE) -> list[tuple[Path, Path]]:
    """[(rgb, depth png)] of a split, in file order; every listed file must exist."""
    listing = split_file(root, split, suite)
    base = root / FOLDERS[split]
    items = []
    for n, line in enumerate(listing.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DatasetLayoutError(f"{suite}: {listing} line {n}: expected '<rgb> <depth> <focal>', got {line!r}")
        if parts[1] == "None":
            continue
        items.append((base / parts[0].lstrip("/"), base / parts[1].lstrip("/")))
    if not items:
        raise DatasetLayoutError(f"{suite}: {listing} lists no image with depth")
    return require_pairs(items, suite)


def read_depth(path: Path) -> np.ndarray:
    """Metres, float32 ``[H, W]``; 0 where the sensor gave no depth."""
    with Image.open(path) as im:
        depth = np.asarray(im, dtype=np.float32) / DEPTH_SCALE
    if depth.ndim != 2:
        raise ValueError(f"{path}: expected a one-channel depth image, got shape {list(depth.shape)}")
    return depth


def depth_pairs(items, hw: tuple[int, int], fine: tuple[int, int] | None = None) -> PairDataset:
    return PairDataset(items, hw, Image.open, read_depth, fine)


def image_size(path) -> tuple[int, int]:
    """(height, width) of an RGB frame (NYUv2 frames are all 480×640)."""
    with Image.open(path) as im:
        return im.height, im.width


def check_layout(root: Path, suite: str = SUITE) -> None:
    for split in ("train", "test"):
        list_split(root, split, suite)


@torch.no_grad()
def score(ctx: SuiteContext, task: DenseTask, linear, test, hw, constant: float, suite: str):
    """Per-image mean of RMSE / AbsRel / δ1 for the probe and for ``constant`` depth everywhere."""
    from fasttips.eval.metrics import depth_errors, depth_eval_mask
    sums = {"probe": {}, "constant": {}}
    n = 0
    images = TestPass(ctx, task, linear, depth_pairs(test, hw), suite)
    for gt, out in images:
        pred = task.head.predict(out)                                             # [1, 4h, 4w]
        pred = F.interpolate(pred[:, None], size=gt.shape, mode="bilinear", align_corners=False)[0, 0].cpu()
        pred = pred.clamp(MIN_DEPTH, MAX_DEPTH)
        gt_t = torch.from_numpy(gt)
        mask = depth_eval_mask(gt_t, MIN_DEPTH, MAX_DEPTH)
        for key, p in (("probe", pred), ("constant", torch.full_like(gt_t, constant))):
            errs = depth_errors(p, gt_t, mask)
            if errs is None:
                continue
            for name, v in errs.items():
                sums[key][name] = sums[key].get(name, 0.0) + v
        n += mask.any().item()
    if n == 0:
        raise DatasetLayoutError(f"{suite}: no test image with valid depth could be read")
    return {k: {name: v / n for name, v in d.items()} for k, d in sums.items()}, n, images.skipped


def run(ctx: SuiteContext, root: Path, suite: str = SUITE) -> dict:
    train, test = limited(list_split(root, "train", suite), ctx), limited(list_split(root, "test", suite), ctx)
    hw, grid, fine = probe_geometry(ctx, train, image_size, suite)
    recipe = recipe_for(ctx, DENSE)
    ctx.say(f"[{suite}] {len(train)} train / {len(test)} test images, input {hw[0]}x{hw[1]}, "
            f"patch tokens + CLS#1 + CLS#2, 256 bins over [{MIN_DEPTH}, {MAX_DEPTH}] m")
    cache = DenseCache(ctx, depth_pairs(train, hw, fine), suite, grid, fine, np.float16)
    try:
        task = DenseTask(cache, DepthHead(MIN_DEPTH, MAX_DEPTH), use_cls=True, device=ctx.device)
        probe = fit(task, cache.items, recipe, ctx, suite)
        constant = mean_training_depth(cache)
    finally:
        cache.close()
    results, n, skipped = score(ctx, task, probe.linear(), test, hw, constant, suite)
    names = {"rmse": "RMSE", "abs_rel": "AbsRel", "delta1": "delta1 (<1.25)"}
    metrics = {names[k]: v for k, v in results["probe"].items()}
    chance = {names[k]: v for k, v in results["constant"].items()}
    return {"metrics": metrics, "chance": chance, "units": {"RMSE": "m", "AbsRel": ""},
            "lower_is_better": ["RMSE", "AbsRel"],
            "n_train": len(cache.items), "n_images": n, "n_skipped": skipped + cache.skipped,
            "probe": probe.record, "constant_depth": round(constant, 4),
            "protocol": {"input": list(hw), "features": "patch + CLS#1 + CLS#2", "bins": 256,
                         "depth_range": [MIN_DEPTH, MAX_DEPTH], "eigen_crop": "on 480x640 maps",
                         "chance": "the mean training depth predicted everywhere"}}


def mean_training_depth(cache: DenseCache, chunk: int = 256) -> float:
    """Mean of the valid training depths (the constant that "chance" predicts)."""
    total, n = 0.0, 0
    for start in range(0, len(cache.items), chunk):
        d = cache.targets.take(cache.items[start:start + chunk]).double()
        valid = d > 0
        total += float(d[valid].sum())
        n += int(valid.sum())
    return total / n if n else 1.0
