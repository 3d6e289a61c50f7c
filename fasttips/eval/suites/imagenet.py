"""ImageNet-1k zero-shot classification: CLS#1 and CLS#2 image embeddings against the class-name
embeddings (80 CLIP prompt templates averaged per class), top-1 / top-5 accuracy, always 1000-way: a
val folder holding only some classes is scored against all 1000 (the missing classes still compete),
and the result says how many classes had images.

Accepted layouts of ``ROOT`` (the suite's folder, default ``DATA_ROOT/imagenet``):
  1. ``ROOT/val/<wnid>/*.JPEG``  (ImageFolder, e.g. after the usual valprep script);
  2. ``ROOT/val/*.JPEG`` plus a labels file, first found of
     - ``ROOT/ILSVRC2012_validation_ground_truth.txt`` or
       ``ROOT/ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt``: the devkit's file,
       line i = ILSVRC2012_ID (1..1000) of ``ILSVRC2012_val_{i:08d}.JPEG``;
     - ``ROOT/val_labels.txt``: lines ``<file name> <wnid or class index 0..999>``.
Class folders that are not ImageNet-1k WordNet ids need ``ROOT/classnames.txt`` (one readable name per
line, in sorted folder order); then any ImageFolder classification set works.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .common import (DatasetLayoutError, ImageListDataset, Progress, SuiteContext, class_embeddings,
                     encode_image_batch, limited, load_metadata, loader, require_dir, to_pixels, transform_record)

SUITE = "imagenet"
IMAGE_EXTS = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
DEVKIT_GT = ("ILSVRC2012_validation_ground_truth.txt",
             "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt")


def is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS


def image_folder(folder: Path) -> tuple[list[str], list[tuple[Path, str]]]:
    """Sorted class folder names and (image, class folder) pairs of an ImageFolder split."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    items = [(p, c) for c in classes for p in sorted((folder / c).iterdir()) if is_image(p)]
    return classes, items


def custom_class_names(folders: list[str], root: Path, suite: str = SUITE) -> list[str]:
    """Readable names for class folders that are not ImageNet-1k wnids: ROOT/classnames.txt."""
    known = set(load_metadata("imagenet")["wnids"])
    custom = root / "classnames.txt"
    if not custom.is_file():
        unknown = next(f for f in folders if f not in known)
        raise DatasetLayoutError(f"{suite}: class folder {unknown!r} is not an ImageNet-1k WordNet id; missing "
                                 f"file {custom} (one class name per line, in sorted folder order)")
    lines = [ln.strip() for ln in custom.read_text().splitlines() if ln.strip()]
    if len(lines) != len(folders):
        raise DatasetLayoutError(f"{suite}: {custom} has {len(lines)} names for {len(folders)} class folders")
    return lines


def _flat_labels(root: Path, files: list[Path]) -> list[tuple[Path, int]]:
    meta = load_metadata("imagenet")
    index = {w: i for i, w in enumerate(meta["wnids"])}
    for rel in DEVKIT_GT:
        gt = root / rel
        if gt.is_file():
            ids = [int(x) for x in gt.read_text().split()]
            by_name = {p.name: p for p in files}
            items = []
            for i, ilsvrc_id in enumerate(ids, start=1):
                p = by_name.get(f"ILSVRC2012_val_{i:08d}.JPEG")
                if p is not None:
                    items.append((p, index[meta["devkit_wnids"][ilsvrc_id - 1]]))
            if not items:
                raise DatasetLayoutError(f"{SUITE}: {gt} names ILSVRC2012_val_XXXXXXXX.JPEG files, none of "
                                         f"which is in {root / 'val'}")
            return items
    table = root / "val_labels.txt"
    if not table.is_file():
        raise DatasetLayoutError(
            f"{SUITE}: missing file {root / DEVKIT_GT[0]} (or {table}): {root / 'val'} holds images directly, "
            "so a labels file is needed (or use the val/<wnid>/*.JPEG layout)")
    by_name = {p.name: p for p in files}
    items = []
    for n, line in enumerate(table.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in by_name:
            raise DatasetLayoutError(f"{SUITE}: {table} line {n}: expected '<file in val/> <wnid or 0..999>', "
                                     f"got {line!r}")
        label = index.get(parts[1], None) if not parts[1].isdigit() else int(parts[1])
        if label is None or not 0 <= label < len(index):
            raise DatasetLayoutError(f"{SUITE}: {table} line {n}: unknown label {parts[1]!r}")
        items.append((by_name[parts[0]], label))
    return items


def list_val(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image, class index)]) for either accepted layout. For ImageNet-1k the names are
    all 1000 classes and the index is the sorted-wnid index, whichever classes have images."""
    val = require_dir(root / "val", SUITE, "expected val/<wnid>/*.JPEG, or val/*.JPEG and a labels file")
    if any(d.is_dir() for d in val.iterdir()):
        folders, pairs = image_folder(val)
        meta = load_metadata("imagenet")
        if all(f in meta["wnids"] for f in folders):
            # ImageNet-1k: every class competes, whichever folders are present
            names, idx = meta["classes"], {w: i for i, w in enumerate(meta["wnids"])}
        else:
            names, idx = custom_class_names(folders, root), {f: i for i, f in enumerate(folders)}
        items = [(p, idx[c]) for p, c in pairs]
    else:
        files = sorted(p for p in val.iterdir() if is_image(p))
        names = load_metadata("imagenet")["classes"]
        items = _flat_labels(root, files)
    if not items:
        raise DatasetLayoutError(f"{SUITE}: no images found under {val}")
    return names, items


def check_layout(root: Path, suite: str = SUITE) -> None:
    list_val(root)


@torch.no_grad()
def run(ctx: SuiteContext, root: Path, suite: str = SUITE) -> dict:
    names, items = list_val(root)
    items = limited(items, ctx)
    templates = tuple(load_metadata("imagenet")["templates"])
    with_images = len({label for _, label in items})
    ctx.say(f"[{SUITE}] {len(items)} images of {with_images} classes, scored {len(names)}-way, "
            f"{len(templates)} prompt templates")
    class_emb = class_embeddings(ctx, names, templates)
    k = min(5, len(names))
    hits = {f"{cls}_top{t}": 0 for cls in ("cls1", "cls2") for t in (1, k)}
    seen = skipped = 0
    batches = loader(ImageListDataset(items, ctx.image_size), ctx)   # Resize(size) + CenterCrop(size), as open_clip
    progress = Progress(ctx, SUITE, len(batches))
    from fasttips.eval.zeroshot import classify
    for good, dropped in batches:
        skipped += dropped
        if good:
            feats = encode_image_batch(ctx, to_pixels([g[0] for g in good], ctx.pixel_norm))
            labels = torch.tensor([g[1] for g in good])
            for cls in ("cls1", "cls2"):
                top = classify(feats[cls], class_emb).topk(k, dim=1).indices
                hit = top == labels[:, None]
                hits[f"{cls}_top1"] += int(hit[:, 0].sum())
                hits[f"{cls}_top{k}"] += int(hit.any(dim=1).sum())
            seen += len(good)
        progress.step(len(good))
    if seen == 0:
        raise DatasetLayoutError(f"{SUITE}: none of the {len(items)} images under {root / 'val'} could be read")
    metrics = {f"zero-shot {cls.upper()[:3]}#{cls[-1]} top-{t} acc": hits[f"{cls}_top{t}"] / seen
               for cls in ("cls1", "cls2") for t in (1, k)}
    chance = {name: (1 if "top-1" in name else k) / len(names) for name in metrics}
    result = {"metrics": metrics, "chance": chance, "n_images": seen, "n_skipped": skipped,
              "n_classes": len(names), "n_classes_with_images": with_images, "n_templates": len(templates),
              "transform": transform_record(ctx.image_size, ctx.image_size)}
    if with_images < len(names):
        result["notes"] = [f"images of only {with_images} of the {len(names)} classes; scored {len(names)}-way"]
    return result
