"""Zero-shot image-text retrieval on COCO and Flickr30k, Karpathy test split (5,000 / 1,000 images),
the first 5 captions of each image, Recall@1/5/10 in both directions, for CLS#1 and CLS#2.

Accepted layout of ``ROOT`` (default ``DATA_ROOT/coco`` or ``DATA_ROOT/flickr30k``):
  ``ROOT/dataset_coco.json`` (or ``dataset_flickr30k.json``), Karpathy's split file:
  ``images[].{filename, filepath?, split, sentences[].raw}``; each image is read from
  ``ROOT/<filepath>/<filename>`` (COCO: ``ROOT/val2014/COCO_val2014_….jpg``), or for Flickr30k,
  which has no filepath, from ``ROOT/flickr30k-images/<filename>`` or ``ROOT/<filename>``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fasttips.eval.metrics import recall_from_positives
from fasttips.eval.zeroshot import normalize

from .common import (DatasetLayoutError, SuiteContext, embed_images, encode_text_list, limited, require_file,
                     transform_record)

SPLIT_FILES = {"coco": "dataset_coco.json", "flickr30k": "dataset_flickr30k.json"}
CAPTIONS_PER_IMAGE = 5
KS = (1, 5, 10)


def read_karpathy(root: Path, suite: str, split: str = "test") -> list[tuple[Path, list[str]]]:
    """[(image path, its first 5 captions)] of the split, in file order."""
    path = require_file(root / SPLIT_FILES[suite], suite, "Karpathy split JSON")
    try:
        images = json.loads(path.read_text())["images"]
    except (ValueError, KeyError) as e:
        raise DatasetLayoutError(f"{suite}: {path} is not a Karpathy split file (no 'images' list): {e}") from None
    out = []
    for entry in images:
        if entry.get("split") != split:
            continue
        caps = [s["raw"].strip() for s in entry.get("sentences", [])][:CAPTIONS_PER_IMAGE]
        if len(caps) < CAPTIONS_PER_IMAGE:
            raise DatasetLayoutError(f"{suite}: {path}: image {entry.get('filename')!r} has {len(caps)} "
                                     f"captions, the protocol needs {CAPTIONS_PER_IMAGE}")
        if "filepath" in entry:
            candidates = [root / entry["filepath"] / entry["filename"]]
        else:
            candidates = [root / "flickr30k-images" / entry["filename"], root / entry["filename"]]
        image = next((c for c in candidates if c.is_file()), candidates[0])
        out.append((image, caps))
    if not out:
        raise DatasetLayoutError(f"{suite}: {path} has no images in split {split!r}")
    missing = next((p for p, _ in out if not p.is_file()), None)
    if missing is not None:
        raise DatasetLayoutError(f"{suite}: missing file {missing} (named in {path.name})")
    return out


def multi_caption_recall(sim: torch.Tensor, text_image: torch.Tensor, ks=KS) -> dict[str, float]:
    """Recall@k for ``sim [N_images, N_texts]`` where text j describes image ``text_image[j]``.

    image→text: a hit when any of the image's captions is among its k best texts; text→image: a hit
    when the text's image is among its k best images. Ties are broken by index (a stable descending
    sort, open_clip's rule), as in ``fasttips.eval.metrics.recall_from_positives``.
    """
    n_img, n_txt = sim.shape
    if text_image.shape != (n_txt,):
        raise ValueError(f"text_image: expected [{n_txt}] image indices, got {list(text_image.shape)}")
    pos = text_image[None, :].to(sim.device) == torch.arange(n_img, device=sim.device)[:, None]   # [N_img, N_txt]
    return recall_from_positives(sim, pos, ks)


def chance_recall(n_img: int, n_txt: int, per_image: int, k: int) -> tuple[float, float]:
    """Expected R@k of a random ranking: (image→text, text→image)."""
    miss = 1.0
    for j in range(min(k, n_txt)):               # none of the image's captions in k random draws
        miss *= max(n_txt - per_image - j, 0) / (n_txt - j)
    return 1.0 - miss, min(k, n_img) / n_img


def check_layout(root: Path, suite: str) -> None:
    read_karpathy(root, suite)


@torch.no_grad()
def run(ctx: SuiteContext, root: Path, suite: str) -> dict:
    pairs = limited(read_karpathy(root, suite), ctx)
    ctx.say(f"[{suite}] {len(pairs)} test images, {CAPTIONS_PER_IMAGE * len(pairs)} captions")
    return score_retrieval(ctx, suite, root, pairs, CAPTIONS_PER_IMAGE)


@torch.no_grad()
def score_retrieval(ctx: SuiteContext, suite: str, root: Path, pairs: list[tuple[Path, list[str]]],
                    per_image: int) -> dict:
    """R@1/5/10 both ways, CLS#1 and CLS#2, for ``pairs`` [(image, its ``per_image`` captions)]: the
    result dict of a retrieval suite (metrics, chance levels, counts, the transform)."""
    feats, kept, skipped = embed_images(ctx, [(p, i) for i, (p, _) in enumerate(pairs)], suite)
    if len(kept) < 2:
        raise DatasetLayoutError(f"{suite}: fewer than 2 readable test images under {root}")
    # an unreadable image takes its captions out with it, so every text still has its image
    texts = [c for i in kept for c in pairs[i][1]]
    text_image = torch.arange(len(kept)).repeat_interleave(per_image)
    text_emb = normalize(encode_text_list(ctx, texts, progress=f"{suite} text"))
    metrics, chance = {}, {}
    for cls in ("cls1", "cls2"):
        sim = feats[cls] @ text_emb.T
        for name, value in multi_caption_recall(sim, text_image).items():
            direction, k = name.split("_r")
            label = f"CLS#{cls[-1]} {'image->text' if direction == 'i2t' else 'text->image'} R@{k}"
            metrics[label] = value
            c_i2t, c_t2i = chance_recall(len(kept), len(texts), per_image, int(k))
            chance[label] = c_i2t if direction == "i2t" else c_t2i
    return {"metrics": metrics, "chance": chance, "n_images": len(kept), "n_captions": len(texts),
            "n_skipped": skipped, "transform": transform_record(ctx.image_size, ctx.image_size)}
