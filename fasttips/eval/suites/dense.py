"""Dense linear probes (segmentation, depth, normals): frozen patch features on a grid, one linear layer
per patch, its output upsampled bilinearly. What ``seg_linear``, ``nyu_depth`` and ``nyu_normals``
share; protocols in docs/eval_suites.md, "Linear probes".

Training targets are sampled on a grid 4× finer than the patch grid (the nearest label at each cell
centre); the layer's output is upsampled ×4 bilinearly to that grid before the loss, as DINOv2's
linear depth head upsamples its features ×4. Evaluation upsamples to the label's own resolution.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .common import (DatasetLayoutError, Progress, SuiteContext, as_is, collate_skipping, encode_image_batch,
                     to_pixels)
from .probe import Store, standardizer

UPSAMPLE = 4          # training targets per patch side


def snapped_size(height: int, width: int, short_side: int, patch: int) -> tuple[int, int]:
    """(H, W) with the shorter side ``short_side`` and the longer side scaled alike, then rounded to the
    nearest multiple of ``patch`` (at least one patch): the whole image goes through the encoder."""
    scale = short_side / min(height, width)
    snap = lambda x: max(patch, int(round(x * scale / patch)) * patch)  # noqa: E731
    return snap(height), snap(width)


def probe_geometry(ctx: SuiteContext, items, size_of, suite: str):
    """(input H×W, patch grid, target grid) of a dense probe: the first readable training image's size
    (``size_of(path) -> (h, w)``) with its short side ``--seg-size``, snapped to whole patches
    (``snapped_size``), and ``UPSAMPLE`` targets per patch side."""
    p = ctx.model.vision.patch_embed.patch_size
    for path, _ in items:
        try:
            h, w = size_of(path)
        except (OSError, ValueError, SyntaxError):
            continue
        hw = snapped_size(h, w, ctx.seg_size, p)
        grid = (hw[0] // p, hw[1] // p)
        return hw, grid, (UPSAMPLE * grid[0], UPSAMPLE * grid[1])
    raise DatasetLayoutError(f"{suite}: none of the {len(items)} training images could be read")


def sample_grid(array: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Nearest sample of ``array [H, W, ...]`` at the centres of an ``out_h × out_w`` grid of cells
    covering it (labels are never interpolated)."""
    H, W = array.shape[:2]
    rows = np.minimum(((np.arange(out_h) + 0.5) * H / out_h).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * W / out_w).astype(np.int64), W - 1)
    return array[rows[:, None], cols[None, :]]


def resize_image(img: Image.Image, hw: tuple[int, int]) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` at ``hw`` (PIL bicubic, antialiased as the eval transforms)."""
    img = img.convert("RGB")
    if img.size != (hw[1], hw[0]):
        img = img.resize((hw[1], hw[0]), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


class PairDataset(torch.utils.data.Dataset):
    """(image resized to ``hw`` as uint8, its dense target: on the ``fine`` grid when given, else full
    size, index) for (image path, target path) pairs; ``read_image(path) -> PIL image`` and
    ``read_target(path) -> [H, W, ...] array`` per dataset layout. An unreadable pair gives None (skipped)."""

    def __init__(self, items, hw: tuple[int, int], read_image, read_target, fine: tuple[int, int] | None = None):
        self.items, self.hw, self.fine = items, hw, fine
        self.read_image, self.read_target = read_image, read_target

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        image, target = self.items[i]
        try:
            with self.read_image(image) as im:
                pixels = resize_image(im, self.hw)
            gt = self.read_target(target)
        except (OSError, ValueError, SyntaxError):
            return None
        return pixels, (sample_grid(gt, *self.fine).astype(np.float16) if self.fine else gt), i


@torch.no_grad()
def encode_dense(ctx: SuiteContext, images_u8: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-LayerNorm patch tokens on their grid ``[B, h, w, D]`` and CLS#1‖CLS#2 ``[B, 2D]`` (float32,
    CPU) of equally sized uint8 images."""
    pixels = to_pixels(images_u8, ctx.pixel_norm)
    p = ctx.model.vision.patch_embed.patch_size
    h, w = pixels.shape[-2] // p, pixels.shape[-1] // p
    out = encode_image_batch(ctx, pixels)
    patch = out["patch"].reshape(len(images_u8), h, w, -1)
    return patch, torch.cat([out["cls1"], out["cls2"]], dim=1)


class TestPass:
    """The test images of a dense probe, one at a time: ``for gt, out in TestPass(...)`` yields each
    readable pair's ground truth and the probe layer's output (``size`` as ``DenseTask.layer_output``),
    with progress lines; ``skipped`` counts the unreadable pairs."""

    def __init__(self, ctx: SuiteContext, task: "DenseTask", linear, pairs: PairDataset, suite: str,
                 size_of=None):
        self.ctx, self.task, self.linear, self.pairs, self.suite = ctx, task, linear, pairs, suite
        self.size_of, self.skipped = size_of, 0

    def __iter__(self):
        loader = torch.utils.data.DataLoader(self.pairs, batch_size=None, shuffle=False,
                                             num_workers=self.ctx.workers, collate_fn=as_is)
        progress = Progress(self.ctx, f"{self.suite} test", len(self.pairs))
        for sample in loader:
            if sample is None:
                self.skipped += 1
                progress.step(0)
                continue
            pixels, gt, _ = sample
            patch, cls = encode_dense(self.ctx, [pixels])
            size = self.size_of(gt) if self.size_of else None
            yield gt, self.task.layer_output(self.linear, self.task.inputs(patch, cls), size=size)
            progress.step(1)


class DenseCache:
    """Training features and targets of a dense probe, extracted once: patch grids ``[n, h, w, D]``
    (fp16), CLS#1‖CLS#2 ``[n, 2D]`` (fp16) and targets ``[n, 4h, 4w, ...]``."""

    def __init__(self, ctx: SuiteContext, dataset, suite: str, grid: tuple[int, int], target_shape: tuple,
                 target_dtype):
        self.grid, self.valid = grid, torch.zeros(len(dataset), dtype=torch.bool)
        loader = torch.utils.data.DataLoader(dataset, batch_size=ctx.batch_size, shuffle=False,
                                             num_workers=ctx.workers, collate_fn=collate_skipping)
        progress = Progress(ctx, f"{suite} train", len(loader))
        self.patch = self.cls = None
        self.targets = Store(len(dataset), target_shape, target_dtype, ctx.probe_cache, "targets")
        for good, _ in loader:
            if good:
                patch, cls = encode_dense(ctx, [g[0] for g in good])
                if self.patch is None:
                    n, D = len(dataset), patch.shape[-1]
                    gb = (Store.nbytes(n, (*grid, D), np.float16) + Store.nbytes(n, (2 * D,), np.float16)) / 2**30
                    ctx.say(f"[{suite}] caching {n} x {grid[0]}x{grid[1]} patch features of width {D} (fp16, "
                            f"{gb:.2f} GiB {'in ' + str(ctx.probe_cache) if ctx.probe_cache else 'in RAM'})")
                    self.patch = Store(n, (*grid, D), np.float16, ctx.probe_cache, "patch")
                    self.cls = Store(n, (2 * D,), np.float16, ctx.probe_cache, "cls")
                for (_, target, i), p_i, c_i in zip(good, patch, cls):
                    self.patch[i], self.cls[i] = p_i.half(), c_i.half()
                    self.targets[i] = target
                    self.valid[i] = True
            progress.step(len(good))
        self.items = torch.nonzero(self.valid).flatten()
        self.skipped = len(dataset) - len(self.items)
        if len(self.items) == 0:
            self.close()
            raise DatasetLayoutError(f"{suite}: none of the {len(dataset)} training images could be read")

    def close(self) -> None:
        for store in (self.patch, self.cls, self.targets):
            if store is not None:
                store.close()


class DenseTask:
    """A linear layer on (standardised) patch features, optionally with CLS#1‖CLS#2 appended to every
    patch; its output ``[B, d_out, h, w]`` is upsampled ×4 and handed to ``head`` (``SegHead``,
    ``DepthHead`` or ``NormalHead``) for the prediction, the loss and the selection error."""

    def __init__(self, cache: DenseCache, head, use_cls: bool, device):
        self.cache, self.head, self.use_cls, self.device = cache, head, use_cls, device
        self.mean, self.std = standardizer(cache.patch, cache.items)
        if use_cls:
            cmean, cstd = standardizer(cache.cls, cache.items)
            self.mean, self.std = torch.cat([self.mean, cmean]), torch.cat([self.std, cstd])
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        self.d_in, self.d_out = self.mean.numel(), head.d_out

    def inputs(self, patch: torch.Tensor, cls: torch.Tensor | None) -> torch.Tensor:
        """``[B, h, w, d_in]`` standardised layer inputs on the device."""
        x = patch.to(self.device)
        if self.use_cls:
            c = cls.to(self.device)[:, None, None, :].expand(*x.shape[:3], cls.shape[-1])
            x = torch.cat([x, c], dim=-1)
        return (x - self.mean) / self.std

    def batch(self, idx):
        x = self.inputs(self.cache.patch.take(idx), self.cache.cls.take(idx) if self.use_cls else None)
        return x, self.cache.targets.take(idx).to(self.device)

    def layer_output(self, linear, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The layer's output upsampled bilinearly to ``size`` (default ×4), ``[B, d_out, H, W]``."""
        out = linear(x).permute(0, 3, 1, 2)
        size = size or (UPSAMPLE * out.shape[-2], UPSAMPLE * out.shape[-1])
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)

    def forward(self, linear, x):
        return self.head.predict(self.layer_output(linear, x))

    def loss(self, pred, y):
        return self.head.loss(pred, y)

    def error(self, pred, y):
        return self.head.error(pred, y)


class SegHead:
    """Class logits; cross-entropy over labelled pixels (255 = ignored); selection by pixel error."""
    ignore = 255

    def __init__(self, n_classes: int):
        self.d_out = n_classes

    def predict(self, logits):
        return logits

    def loss(self, logits, y):
        y = y.long()
        if not (y != self.ignore).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits, y, ignore_index=self.ignore)

    def error(self, logits, y):
        valid = y != self.ignore
        return int(((logits.argmax(dim=1) != y) & valid).sum()), int(valid.sum())


class DepthHead:
    """DINOv2's depth head ("classify" mode): ``n_bins`` logits per position, bins spaced uniformly over
    [min_depth, max_depth], ReLU + 0.1 then normalised ("linear" norm), depth = Σ p_i · bin_i. Loss:
    the scale-invariant log loss (SigLoss, DINOv2 / AdaBins: sqrt(Var g + 0.15 · mean(g)²), g =
    log pred − log gt over pixels with gt > 0). Selection: mean per-image RMSE."""

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0, n_bins: int = 256):
        self.min_depth, self.max_depth, self.d_out = min_depth, max_depth, n_bins
        self.bins = torch.linspace(min_depth, max_depth, n_bins)

    def predict(self, logits):
        p = torch.relu(logits) + 0.1
        p = p / p.sum(dim=1, keepdim=True)
        return torch.einsum("bkhw,k->bhw", p, self.bins.to(logits.device))

    def loss(self, pred, y):
        valid = y > 0
        if not valid.any():
            return pred.sum() * 0.0
        g = torch.log(pred[valid] + 1e-3) - torch.log(y[valid] + 1e-3)
        return torch.sqrt(g.var(unbiased=False) + 0.15 * g.mean() ** 2)

    def error(self, pred, y):
        valid = (y > 0).float()
        n = valid.sum(dim=(1, 2))
        rmse = (((pred - y) ** 2 * valid).sum(dim=(1, 2)) / n.clamp_min(1)).sqrt()
        keep = n > 0
        return float(rmse[keep].sum()), int(keep.sum())


def angles(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between unit vectors ``pred`` and ``target`` (channel axis 1)."""
    cos = (F.normalize(pred, dim=1) * target).sum(dim=1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos))


class NormalHead:
    """A 3-vector per position, L2-normalised. Loss: the angle (radians) to the ground truth over pixels
    that have one (non-zero vectors), its cosine clamped away from ±1 so the gradient stays finite, as
    Probe3D's angular loss. Selection: mean angular error."""
    d_out = 3

    def predict(self, out):
        return F.normalize(out, dim=1)

    def loss(self, pred, y):
        y = y.permute(0, 3, 1, 2)
        valid = y.norm(dim=1) > 0.5
        if not valid.any():
            return pred.sum() * 0.0
        cos = (pred * F.normalize(y, dim=1)).sum(dim=1)[valid]
        return torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6)).mean()

    def error(self, pred, y):
        y = y.permute(0, 3, 1, 2)
        valid = y.norm(dim=1) > 0.5
        return float(angles(pred, F.normalize(y, dim=1))[valid].sum()), int(valid.sum())
