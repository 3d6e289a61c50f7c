"""NYUv2 surface normals with a linear probe on frozen features (docs/eval_suites.md, "Depth and surface
normals").

Layout read: the preprocessed NYUv2 of MTAN (Liu et al., CVPR 2019, github.com/lorenmt/mtan), the
copy the multi-task learning literature shares: the official 795 training and 654 test images of the
labelled set at 288×384, one ``.npy`` per image and task. ``ROOT`` (default ``DATA_ROOT/nyuv2``) holds
  train/image/<i>.npy    [288, 384, 3] float RGB in [0, 1], i = 0, 1, ...
  train/normal/<i>.npy   [288, 384, 3] float surface normal in [-1, 1]; an all-zero vector = no ground truth
  val/image/<i>.npy, val/normal/<i>.npy   the test split, same format
(its ``depth/`` and ``label/`` folders are not read).

Every image is resized (bicubic) to ``--seg-size`` on its shorter side with both sides on the patch
grid; the layer reads each patch token with CLS#1‖CLS#2 appended, standardised, and predicts a 3-vector
per position, L2-normalised. Scored at the ground truth's resolution (prediction upsampled bilinearly,
renormalised) over every pixel with a normal, pooled over the test split: mean, median and RMSE of the
angular error, and the fractions within 11.25°, 22.5° and 30°.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .common import DatasetLayoutError, SuiteContext, limited, require_dir, require_pairs
from .dense import DenseCache, DenseTask, NormalHead, PairDataset, TestPass, angles, probe_geometry
from .probe import DENSE, fit, recipe_for

SUITE = "nyu-normals"
SPLITS = {"train": "train", "test": "val"}


def list_split(root: Path, split: str, suite: str = SUITE) -> list[tuple[Path, Path]]:
    """[(image .npy, normal .npy)] for i = 0, 1, ... as many as ``<split>/image`` holds."""
    folder = root / SPLITS[split]
    images = require_dir(folder / "image", suite, f"{split} images <i>.npy")
    normals = require_dir(folder / "normal", suite, f"{split} surface normals <i>.npy")
    n = sum(1 for p in images.iterdir() if p.suffix == ".npy")
    if n == 0:
        raise DatasetLayoutError(f"{suite}: no <i>.npy images in {images}")
    return require_pairs([(images / f"{i}.npy", normals / f"{i}.npy") for i in range(n)], suite)


def read_image(path: Path) -> Image.Image:
    """An MTAN image (float RGB in [0, 1]) as a PIL image."""
    x = np.load(path)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"{path}: expected [H, W, 3], got {list(x.shape)}")
    return Image.fromarray(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8))


def read_normal(path: Path) -> np.ndarray:
    """``[H, W, 3]`` float32 unit vectors; zero where there is no ground truth."""
    n = np.load(path).astype(np.float32)
    if n.ndim != 3 or n.shape[2] != 3:
        raise ValueError(f"{path}: expected [H, W, 3], got {list(n.shape)}")
    norm = np.linalg.norm(n, axis=2, keepdims=True)
    return np.where(norm > 0.5, n / np.maximum(norm, 1e-6), 0.0).astype(np.float32)


def normal_pairs(items, hw: tuple[int, int], fine: tuple[int, int] | None = None) -> PairDataset:
    return PairDataset(items, hw, read_image, read_normal, fine)


def check_layout(root: Path, suite: str = SUITE) -> None:
    for split in SPLITS:
        list_split(root, split, suite)


def image_size(path) -> tuple[int, int]:
    """(height, width) of an image array (memory-mapped: only its header is read)."""
    return np.load(path, mmap_mode="r").shape[:2]


def mean_training_normal(cache: DenseCache, chunk: int = 256) -> torch.Tensor:
    """The normalised mean of the training normals (the direction that "chance" predicts everywhere)."""
    total = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(cache.items), chunk):
        total += cache.targets.take(cache.items[start:start + chunk]).double().reshape(-1, 3).sum(0)
    return F.normalize(total.float(), dim=0) if total.norm() > 0 else torch.tensor([0.0, 0.0, 1.0])


@torch.no_grad()
def score(ctx: SuiteContext, task: DenseTask, linear, test, hw, constant: torch.Tensor, suite: str):
    from fasttips.eval.metrics import AngleStats
    stats = {"probe": AngleStats(), "constant": AngleStats()}
    n = 0
    images = TestPass(ctx, task, linear, normal_pairs(test, hw), suite, size_of=lambda gt: gt.shape[:2])
    for gt, out in images:                                                       # out [1, 3, H, W]
        pred = F.normalize(out, dim=1)[0].cpu()
        gt_t = torch.from_numpy(gt).permute(2, 0, 1)
        valid = gt_t.norm(dim=0) > 0.5
        stats["probe"].add(angles(pred[None], gt_t[None])[0][valid])
        stats["constant"].add(angles(constant[:, None, None].expand_as(gt_t)[None], gt_t[None])[0][valid])
        n += 1
    if stats["probe"].n == 0:
        raise DatasetLayoutError(f"{suite}: no test pixel with a surface normal could be read")
    return stats["probe"].result(), stats["constant"].result(), n, images.skipped


NAMES = {"mean": "mean angular error", "median": "median angular error", "rmse": "angular RMSE",
         "within 11.25": "within 11.25 deg", "within 22.5": "within 22.5 deg", "within 30": "within 30 deg"}


def run(ctx: SuiteContext, root: Path, suite: str = SUITE) -> dict:
    train, test = limited(list_split(root, "train", suite), ctx), limited(list_split(root, "test", suite), ctx)
    hw, grid, fine = probe_geometry(ctx, train, image_size, suite)
    recipe = recipe_for(ctx, DENSE)
    ctx.say(f"[{suite}] {len(train)} train / {len(test)} test images, input {hw[0]}x{hw[1]}, "
            f"patch tokens + CLS#1 + CLS#2")
    cache = DenseCache(ctx, normal_pairs(train, hw, fine), suite, grid, (*fine, 3), np.float16)
    try:
        task = DenseTask(cache, NormalHead(), use_cls=True, device=ctx.device)
        probe = fit(task, cache.items, recipe, ctx, suite)
        constant = mean_training_normal(cache)
    finally:
        cache.close()
    probe_stats, constant_stats, n, skipped = score(ctx, task, probe.linear(), test, hw, constant, suite)
    metrics = {NAMES[k]: v for k, v in probe_stats.items()}
    chance = {NAMES[k]: v for k, v in constant_stats.items()}
    degrees = ("mean angular error", "median angular error", "angular RMSE")
    return {"metrics": metrics, "chance": chance, "units": {k: "deg" for k in degrees},
            "lower_is_better": list(degrees),
            "n_train": len(cache.items), "n_images": n, "n_skipped": skipped + cache.skipped,
            "probe": probe.record, "constant_normal": [round(float(v), 4) for v in constant],
            "protocol": {"input": list(hw), "features": "patch + CLS#1 + CLS#2",
                         "pooling": "all scored pixels of the test split",
                         "chance": "the mean training normal predicted everywhere"}}
