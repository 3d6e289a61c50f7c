"""Evaluation metrics: retrieval recall, zero-shot accuracy, mIoU, and patch-to-pixel upsampling.

All functions take plain tensors, so they can be checked against hand-computed cases without a model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255   # pixels with this label count for no class (borders, "unlabelled")


def _check_matrix(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got {getattr(x, 'shape', type(x))}")


def recall_at_k(similarity: torch.Tensor, ks: tuple[int, ...] = (1, 5),
                positives: torch.Tensor | None = None) -> dict[str, float]:
    """Image↔text retrieval recall for paired data: ``similarity[i, j]`` scores image i against text j
    and text i is the true match of image i (the diagonal).

    ``positives`` (bool [N, N], optional, must hold the diagonal) marks further correct pairs, e.g.
    ``positives[i, j]`` when texts i and j are the same caption: then either image is a right answer
    for that text and either copy of the text a right answer for image i.

    R@k is the fraction of queries with a correct candidate among the k best-scored candidates. Ties
    are broken by index, as a stable descending sort does (open_clip's rule): a wrong candidate scoring
    *equal* to the best correct one ranks ahead of it only when its index is lower.
    Returns {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"} (one pair per k), in [0, 1].
    """
    _check_matrix("similarity", similarity)
    n_img, n_txt = similarity.shape
    if n_img != n_txt or n_img == 0:
        raise ValueError(f"similarity: expected a non-empty square [N, N] matrix (text i matches image i), "
                         f"got {list(similarity.shape)}")
    if any(k < 1 for k in ks):
        raise ValueError(f"ks: each k must be >= 1, got {ks}")
    sim = similarity.float()
    sim = sim.masked_fill(sim.isnan(), -math.inf)          # a NaN score (diverged model) is never a hit
    eye = torch.eye(n_img, dtype=torch.bool, device=sim.device)
    if positives is None:
        pos = eye
    else:
        if tuple(positives.shape) != (n_img, n_img) or positives.dtype != torch.bool:
            raise ValueError(f"positives: expected a bool [{n_img}, {n_img}] matrix, got "
                             f"{positives.dtype} {list(positives.shape)}")
        pos = positives.to(sim.device)
        if not pos.diagonal().all():
            raise ValueError("positives: the diagonal (text i matches image i) must be True")
    return recall_from_positives(sim, pos, ks)


def recall_from_positives(similarity: torch.Tensor, positives: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Recall@k both ways for a [N_img, N_txt] similarity whose bool ``positives`` marks the right pairs
    (every row and column has one). A query's rank is the position of its best correct candidate in a
    stable descending sort: a wrong candidate ranks ahead when it scores higher, or the same with a
    lower index. A NaN score ranks last (as -inf)."""
    sim = similarity.float()
    sim = sim.masked_fill(sim.isnan(), -math.inf)
    pos = positives.to(sim.device)
    i2t_rank = _rank_of_best_positive(sim, pos)
    t2i_rank = _rank_of_best_positive(sim.T, pos.T)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t_rank < k).float().mean().item()
        out[f"t2i_r{k}"] = (t2i_rank < k).float().mean().item()
    return out


def _rank_of_best_positive(sim: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Per row: how many wrong candidates a stable descending sort puts before the row's first
    best-scoring correct candidate (0 = first)."""
    best = sim.masked_fill(~pos, -math.inf).amax(dim=1, keepdim=True)            # [Q, 1]
    at_best = pos & (sim == best)
    # index of the first correct candidate reaching the best score (argmax returns the first maximum)
    first = at_best.to(torch.uint8).argmax(dim=1, keepdim=True)
    index = torch.arange(sim.shape[1], device=sim.device)[None, :]
    ahead = (sim > best) | ((sim == best) & (index < first))
    return (ahead & ~pos).sum(dim=1)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 zero-shot classification accuracy: ``logits [N, C]`` (image vs class-name scores)."""
    _check_matrix("logits", logits)
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels: expected shape [{logits.shape[0]}], got {list(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("logits: need at least one image")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels: values must be in [0, {logits.shape[1]}), got "
                         f"[{labels.min().item()}, {labels.max().item()}]")
    return (logits.argmax(dim=1) == labels.to(logits.device)).float().mean().item()


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, n_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``cm[t, p]`` = number of pixels of true class t predicted as p, over pixels whose target is
    not ``ignore_index``. ``pred`` and ``target`` are integer label maps of the same shape."""
    if pred.shape != target.shape:
        raise ValueError(f"pred: shape {list(pred.shape)} must equal target's {list(target.shape)}")
    if n_classes < 1:
        raise ValueError(f"n_classes: must be >= 1, got {n_classes}")
    valid = target != ignore_index
    t = target[valid].long()
    p = pred[valid].long()
    for name, x in (("target", t), ("pred", p)):
        if x.numel() and (x.min() < 0 or x.max() >= n_classes):
            raise ValueError(f"{name}: labels must be in [0, {n_classes}) or {ignore_index} (ignored); "
                             f"got [{x.min().item()}, {x.max().item()}]")
    return torch.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """IoU = TP / (TP + FP + FN) per class; NaN for a class absent from both prediction and ground
    truth (its IoU is undefined, so it must not count as 0 or 1)."""
    cm = cm.double()
    tp = cm.diagonal()
    union = cm.sum(dim=0) + cm.sum(dim=1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))


def mean_iou(cm: torch.Tensor) -> float:
    """Mean IoU over the classes that appear in the prediction or the ground truth."""
    iou = iou_per_class(cm)
    present = ~iou.isnan()
    return iou[present].mean().item() if present.any() else math.nan


def pixel_accuracy(cm: torch.Tensor) -> float:
    total = cm.sum()
    return (cm.diagonal().sum() / total).item() if total > 0 else math.nan


def upsample_patch_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Patch-grid scores ``[B, C, h, w]`` → pixel scores ``[B, C, H, W]`` by bilinear interpolation
    (scores, not labels, are interpolated, so boundaries fall between patches where the scores cross)."""
    if logits.ndim != 4:
        raise ValueError(f"logits: expected [B, C, h, w], got {list(logits.shape)}")
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


def patch_grid(n_patches: int, image_hw: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (h, w) patch grid for ``n_patches`` tokens: from the image aspect ratio when given,
    else the square grid."""
    if image_hw is not None:
        H, W = image_hw
        for h in range(1, n_patches + 1):
            if n_patches % h == 0 and h * W == (n_patches // h) * H:
                return h, n_patches // h
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"n_patches: {n_patches} tokens do not form a square grid; pass image_hw")
    return side, side


# -- depth and surface normals ----------------------------------------------------------------------
EIGEN_CROP = (45, 471, 41, 601)     # rows y1:y2, columns x1:x2 scored on a 480×640 NYUv2 depth map


def depth_eval_mask(gt: torch.Tensor, min_depth: float = 1e-3, max_depth: float = 10.0,
                    eigen_crop: bool = True) -> torch.Tensor:
    """Pixels scored on a ground-truth depth map ``[H, W]`` (metres): min_depth < gt < max_depth, and on a
    480×640 map only inside Eigen et al.'s crop (the rule of the BTS / DINOv2 NYUv2 evaluation)."""
    valid = (gt > min_depth) & (gt < max_depth)
    if eigen_crop and tuple(gt.shape[-2:]) == (480, 640):
        y1, y2, x1, x2 = EIGEN_CROP
        crop = torch.zeros_like(valid)
        crop[..., y1:y2, x1:x2] = True
        valid &= crop
    return valid


def depth_errors(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> dict[str, float] | None:
    """One image's RMSE (metres), AbsRel and δ1 (fraction of pixels with max(p/g, g/p) < 1.25) over
    ``mask``; None when the mask is empty."""
    p, g = pred[mask].double(), gt[mask].double()
    if g.numel() == 0:
        return None
    ratio = torch.maximum(p / g, g / p.clamp_min(1e-9))
    return {"rmse": float(((p - g) ** 2).mean().sqrt()), "abs_rel": float(((p - g).abs() / g).mean()),
            "delta1": float((ratio < 1.25).double().mean())}


class AngleStats:
    """Angular errors (degrees) pooled over every scored pixel of a split: mean, median, RMSE and the
    fractions within 11.25°, 22.5° and 30° (the surface-normal metrics of Fouhey et al. and Probe3D).
    The median comes from a histogram of 0.01° bins (exact to ±0.005°), so memory stays fixed."""
    THRESHOLDS = (11.25, 22.5, 30.0)
    BIN = 0.01

    def __init__(self):
        self.hist = torch.zeros(int(180 / self.BIN) + 1, dtype=torch.float64)
        self.n = 0
        self.sum = self.sumsq = 0.0
        self.within = [0] * len(self.THRESHOLDS)

    def add(self, deg: torch.Tensor) -> None:
        deg = deg.detach().flatten().double().cpu()
        self.n += deg.numel()
        self.sum += float(deg.sum())
        self.sumsq += float((deg * deg).sum())
        for i, t in enumerate(self.THRESHOLDS):
            self.within[i] += int((deg < t).sum())
        idx = (deg / self.BIN).floor().long().clamp(0, self.hist.numel() - 1)
        self.hist += torch.bincount(idx, minlength=self.hist.numel()).double()

    def result(self) -> dict[str, float]:
        if self.n == 0:
            return {}
        half = int(torch.searchsorted(self.hist.cumsum(0), torch.tensor(self.n / 2, dtype=torch.float64)))
        out = {"mean": self.sum / self.n, "median": (half + 0.5) * self.BIN, "rmse": math.sqrt(self.sumsq / self.n)}
        for t, k in zip(self.THRESHOLDS, self.within):
            out[f"within {t:g}"] = k / self.n
        return out
