"""ImageNet-1k linear probe on frozen CLS features (DINOv2's linear evaluation; docs/eval_suites.md).

Every training and validation image goes through DINOv2's evaluation transform (short side 256, bicubic,
centre crop 224; the same ratio at other ``--image-size``) once; the features are the final
LayerNorm's CLS outputs, not L2-normalised. Three probes are trained, each with its own learning rate
from the grid (probe.CLASSIFICATION): on CLS#1, on CLS#2, and on the two concatenated. Top-1 / top-5 on
val for each.

Accepted layout of ``ROOT`` (default ``DATA_ROOT/imagenet``): the kNN suite's, ``ROOT/train/<class>/*``
and ``ROOT/val/<class>/*`` (or for ImageNet-1k a flat ``ROOT/val`` with a labels file).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fasttips.eval.transforms import knn_resize

from .common import DatasetLayoutError, SuiteContext, embed_images, limited, transform_record
from .knn import list_split_pair
from .probe import CLASSIFICATION, fit, recipe_for

SUITE = "linear"
INPUTS = ("CLS#1", "CLS#2", "CLS#1+CLS#2")


def both(feats: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([feats.pop("cls1"), feats.pop("cls2")], dim=1)


class ClassificationTask:
    """Cross-entropy on cached features; the learning rate is picked by held-out top-1 error."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n_classes: int, device):
        self.x, self.y, self.device = x, y, device
        self.d_in, self.d_out = x.shape[1], n_classes

    def batch(self, idx):
        return self.x[idx].to(self.device), self.y[idx].to(self.device)

    def forward(self, linear, x):
        return linear(x)

    def loss(self, logits, y):
        return F.cross_entropy(logits, y)

    def error(self, logits, y):
        return int((logits.argmax(dim=1) != y).sum()), len(y)


def check_layout(root: Path, suite: str = SUITE) -> None:
    list_split_pair(root, suite)


def _embed(ctx: SuiteContext, items, what: str, suite: str):
    feats, labels, skipped = embed_images(ctx, items, f"{suite} {what}", resize=knn_resize(ctx.image_size),
                                          normalized=False)
    if not labels:
        raise DatasetLayoutError(f"{suite}: none of the {len(items)} {what} images could be read")
    return feats, torch.tensor(labels), skipped


@torch.no_grad()
def _topk_hits(linear, x: torch.Tensor, y: torch.Tensor, k: int, device, chunk: int = 4096):
    top1 = topk = 0
    for i in range(0, len(y), chunk):
        top = linear(x[i:i + chunk].to(device)).topk(k, dim=1).indices.cpu()
        hit = top == y[i:i + chunk, None]
        top1 += int(hit[:, 0].sum())
        topk += int(hit.any(dim=1).sum())
    return top1 / len(y), topk / len(y)


def run(ctx: SuiteContext, root: Path, suite: str = SUITE) -> dict:
    classes, train, val = list_split_pair(root, suite)
    train, val = limited(train, ctx), limited(val, ctx)
    recipe = recipe_for(ctx, CLASSIFICATION)
    resize = knn_resize(ctx.image_size)
    C = len(classes)
    ctx.say(f"[{suite}] {len(train)} train / {len(val)} val images, {C} classes, resize {resize} crop "
            f"{ctx.image_size}, probes on {', '.join(INPUTS)}")
    train_feats, train_labels, skipped_train = _embed(ctx, train, "train", suite)
    val_feats, val_labels, skipped_val = _embed(ctx, val, "val", suite)
    k = min(5, C)
    # one [N, 2D] copy of the features; each probe reads a column slice of it (a view, no copy)
    train_x, val_x = both(train_feats), both(val_feats)
    D = train_x.shape[1] // 2
    metrics, probes = {}, {}
    for name, cols in {"CLS#1": slice(0, D), "CLS#2": slice(D, 2 * D), "CLS#1+CLS#2": slice(0, 2 * D)}.items():
        task = ClassificationTask(train_x[:, cols], train_labels, C, ctx.device)
        probe = fit(task, torch.arange(len(train_labels)), recipe, ctx, f"{suite} {name}")
        top1, topk = _topk_hits(probe.linear(), val_x[:, cols], val_labels, k, ctx.device)
        metrics[f"linear {name} top-1 acc"] = top1
        metrics[f"linear {name} top-{k} acc"] = topk
        probes[name] = probe.record
    chance = {name: (1 if "top-1" in name else k) / C for name in metrics}
    return {"metrics": metrics, "chance": chance, "n_train": len(train_labels), "n_val": len(val_labels),
            "n_skipped": skipped_train + skipped_val, "n_classes": C, "probes": probes,
            "transform": transform_record(resize, ctx.image_size)}
