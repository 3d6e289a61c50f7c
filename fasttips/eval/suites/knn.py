"""k-nearest-neighbour probe on frozen CLS#1 / CLS#2 features (DINOv2's protocol): every training image
is embedded once; each validation image takes its k = 20 most cosine-similar training images, each
votes for its class with weight exp(similarity / 0.07), and the class with the largest vote wins.
Images go through DINOv2's eval transform: short side to 256 (bicubic), centre crop 224 (the same
256/224 ratio at other ``--image-size`` values). Similarities and votes are fp32 on every device.

Accepted layout of ``ROOT`` (default ``DATA_ROOT/imagenet``): ``ROOT/train/<class>/*`` and
``ROOT/val/<class>/*`` (ImageFolder pair; val classes must be train classes), or for ImageNet-1k a flat
``ROOT/val`` with a labels file as the ``imagenet`` suite accepts it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fasttips.eval.transforms import knn_resize

from .common import (DatasetLayoutError, SuiteContext, embed_images, limited, load_metadata, precision_context,
                     require_dir, transform_record)
from .imagenet import image_folder, list_val

SUITE = "knn"
K = 20
TEMPERATURE = 0.07


def list_split_pair(root: Path, suite: str = SUITE) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]]]:
    """(class folders, train [(image, class index)], val [(image, class index)]) of an ImageFolder
    train/val pair; also read by the ``linear`` probe suite."""
    train_dir = require_dir(root / "train", suite, "training images train/<class>/*")
    classes, train_pairs = image_folder(train_dir)
    if not train_pairs:
        raise DatasetLayoutError(f"{suite}: no images in class folders under {train_dir}")
    index = {c: i for i, c in enumerate(classes)}
    val_dir = require_dir(root / "val", suite, "validation images val/<class>/*")
    if any(d.is_dir() for d in val_dir.iterdir()):
        val_classes, val_pairs = image_folder(val_dir)
        extra = sorted(set(val_classes) - set(index))
        if extra:
            raise DatasetLayoutError(f"{suite}: val class folder {val_dir / extra[0]} has no train/{extra[0]}")
        val = [(p, index[c]) for p, c in val_pairs]
    else:
        if classes != load_metadata("imagenet")["wnids"]:
            raise DatasetLayoutError(f"{suite}: {val_dir} holds images directly, which only works when "
                                     "train/ holds exactly the 1000 ImageNet-1k wnid folders")
        val = list_val(root)[1]
    return classes, [(p, index[c]) for p, c in train_pairs], val


@torch.no_grad()
def embed(ctx: SuiteContext, items, what: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """Normalised CLS#1 / CLS#2 features and labels of the readable images; how many were skipped."""
    feats, labels, skipped = embed_images(ctx, items, f"{SUITE} {what}", resize=knn_resize(ctx.image_size))
    if not labels:
        raise DatasetLayoutError(f"{SUITE}: none of the {len(items)} {what} images could be read")
    return feats, torch.tensor(labels), skipped


def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, n_classes: int,
                k: int = K, temperature: float = TEMPERATURE, chunk: int = 1024,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Class votes ``[N_query, n_classes]`` (fp32, on the CPU) from the k most similar bank rows (inputs
    unit vectors). The search runs on ``device`` in fp32, TF32 off: a bf16 similarity keeps 8 bits of
    mantissa, and exp(s / 0.07) turns its rounding step near s = 1 (2^-8) into a 5% change of a vote.
    An ImageNet train bank (1.28M rows) in fp32 takes 4 GB at width 768 per CLS token."""
    device = torch.device(device)
    k = min(k, bank.shape[0])
    bank_d, labels_d = bank.to(device, torch.float32), bank_labels.to(device)
    votes = []
    with precision_context(device, "fp32"):
        for i in range(0, query.shape[0], chunk):
            sim, idx = (query[i:i + chunk].to(device, torch.float32) @ bank_d.T).topk(k, dim=1)
            weight = (sim / temperature).exp()
            v = torch.zeros(sim.shape[0], n_classes, device=device, dtype=torch.float32)
            votes.append(v.scatter_add_(1, labels_d[idx], weight).cpu())
    return torch.cat(votes)


def check_layout(root: Path, suite: str = SUITE) -> None:
    list_split_pair(root, suite)


@torch.no_grad()
def run(ctx: SuiteContext, root: Path, suite: str = SUITE) -> dict:
    classes, train, val = list_split_pair(root)
    train, val = limited(train, ctx), limited(val, ctx)
    resize = knn_resize(ctx.image_size)
    ctx.say(f"[{SUITE}] {len(train)} train / {len(val)} val images, {len(classes)} classes, k={K}, T={TEMPERATURE}, "
            f"resize {resize} crop {ctx.image_size}")
    bank, bank_labels, skipped_train = embed(ctx, train, "train")
    query, labels, skipped_val = embed(ctx, val, "val")
    C = len(classes)
    t = min(5, C)
    metrics = {}
    for cls in ("cls1", "cls2"):
        top = knn_predict(query[cls], bank[cls], bank_labels, C, device=ctx.device).topk(t, dim=1).indices
        hit = top == labels[:, None]
        metrics[f"kNN CLS#{cls[-1]} top-1 acc"] = hit[:, 0].float().mean().item()
        metrics[f"kNN CLS#{cls[-1]} top-{t} acc"] = hit.any(dim=1).float().mean().item()
    chance = {name: (1 if "top-1" in name else t) / C for name in metrics}
    return {"metrics": metrics, "chance": chance, "n_train": len(bank_labels), "n_val": len(labels),
            "n_skipped": skipped_train + skipped_val, "n_classes": C, "k": K, "temperature": TEMPERATURE,
            "transform": transform_record(resize, ctx.image_size)}
