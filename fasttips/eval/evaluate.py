"""``evaluate(model, tokenizer, cfg)``: zero-shot retrieval, classification and segmentation of a
TIPS model on a held-out set. The training loop calls it every ``eval.every`` steps; ``fasttips eval``
calls it on a checkpoint.

Result keys (flat, so they can go straight into metrics.jsonl; values are fractions in [0, 1]):
  ret/cls1_alt/{i2t,t2i}_r{1,5}    CLS#1 ↔ alt-text retrieval
  ret/cls2_{short,long}/...        CLS#2 ↔ synthetic caption retrieval (each granularity present)
  cls/cls{1,2}_acc                 zero-shot classification (image label vs class-name prompts)
  seg/miou, seg/pixel_acc          zero-shot segmentation: patch embeddings vs class names (TIPS),
                                   scored on the exact masks, classes absent from both ignored
  seg/miou_fg, seg/pixel_acc_fg    the same on object pixels only, background not a candidate
                                   (when a class is named "background")
  n_images
"""
from __future__ import annotations

import torch

from .evalset import EvalSet
from .metrics import (IGNORE_INDEX, accuracy, confusion_matrix, iou_per_class, mean_iou, patch_grid,
                      pixel_accuracy, recall_at_k)
from .zeroshot import DEFAULT_TEMPLATES, average_prompts, class_prompts, classify, normalize, segment_logits


def _device_of(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Vision outputs for all images, in batches: {"cls1" [N, D], "cls2" [N, D], "patch" [N, Np, D]}."""
    device = _device_of(model)
    # the stored parameter dtype (fp32 under FSDP mixed precision, which casts inputs itself)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    outs: dict[str, list[torch.Tensor]] = {"cls1": [], "cls2": [], "patch": []}
    for i in range(0, images.shape[0], batch_size):
        y = model.vision(images[i:i + batch_size].to(device, dtype))
        for k in outs:
            outs[k].append(y[k].float().cpu())
    return {k: torch.cat(v) for k, v in outs.items()}


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], batch_size: int = 128) -> torch.Tensor:
    """Pooled text embeddings ``[len(texts), D]``."""
    device = _device_of(model)
    chunks = []
    for i in range(0, len(texts), batch_size):
        ids, pad = tokenizer.encode(list(texts[i:i + batch_size]))
        chunks.append(model.text(ids.to(device), pad.to(device)).float().cpu())
    return torch.cat(chunks)


def same_text(texts: list[str]) -> torch.Tensor:
    """bool [N, N]: True where two captions are the same text (as the tokenizer sees it: lower-cased)."""
    norm = [" ".join(t.lower().split()) for t in texts]
    ids = {t: i for i, t in enumerate(dict.fromkeys(norm))}
    code = torch.tensor([ids[t] for t in norm])
    return code[:, None] == code[None, :]


def retrieval_metrics(cls1, cls2, text_emb: dict[str, torch.Tensor],
                      captions: dict[str, list[str]] | None = None) -> dict[str, float]:
    """Recall@{1,5} per caption kind. With ``captions``, images whose captions are the same text are
    interchangeable answers (a duplicate caption is not a retrieval error)."""
    out = {}
    for kind, emb in text_emb.items():
        image = cls1 if kind == "alt" else cls2          # CLS#1 ↔ alt-text, CLS#2 ↔ synthetic captions
        sim = normalize(image) @ normalize(emb).T
        positives = same_text(captions[kind]) if captions is not None and kind in captions else None
        for name, value in recall_at_k(sim, ks=(1, 5), positives=positives).items():
            out[f"ret/{'cls1' if kind == 'alt' else 'cls2'}_{kind}/{name}"] = value
    return out


BACKGROUND = "background"


def segmentation_metrics(patch: torch.Tensor, class_emb: torch.Tensor, eval_set: EvalSet, batch_size: int = 32,
                         per_class: bool = False) -> dict:
    """mIoU and pixel accuracy over all classes; when a class is named "background", also the
    foreground-only scores ``seg/miou_fg``, ``seg/pixel_acc_fg``: background pixels are ignored and
    background is not a candidate, so the score asks only "is each object's patch closest to its
    own name?" (a large background class that no prompt describes well otherwise dominates mIoU)."""
    C = len(eval_set.class_names)
    bg = eval_set.class_names.index(BACKGROUND) if BACKGROUND in eval_set.class_names else None
    fg = torch.tensor([c for c in range(C) if c != bg])
    cm = torch.zeros(C, C, dtype=torch.long)
    cm_fg = torch.zeros(C, C, dtype=torch.long)
    grid = patch_grid(patch.shape[1], tuple(eval_set.images.shape[-2:]))
    mask_hw = tuple(eval_set.masks.shape[-2:])
    for i in range(0, len(eval_set), batch_size):
        logits = segment_logits(patch[i:i + batch_size], class_emb, mask_hw, grid)     # [b, C, H, W]
        target = eval_set.masks[i:i + batch_size]
        cm += confusion_matrix(logits.argmax(dim=1), target, C, IGNORE_INDEX)
        if bg is not None:
            pred_fg = fg[logits[:, fg].argmax(dim=1)]
            cm_fg += confusion_matrix(pred_fg, target.masked_fill(target == bg, IGNORE_INDEX), C, IGNORE_INDEX)
    out = {"seg/miou": mean_iou(cm), "seg/pixel_acc": pixel_accuracy(cm)}
    if bg is not None:
        out["seg/miou_fg"] = mean_iou(cm_fg)
        out["seg/pixel_acc_fg"] = pixel_accuracy(cm_fg)
    if per_class:
        out["seg/iou_per_class"] = {name: (None if v != v else round(v, 4))
                                    for name, v in zip(eval_set.class_names, iou_per_class(cm).tolist())}
    return out


@torch.no_grad()
def evaluate(model, tokenizer, cfg=None, eval_set: EvalSet | None = None, n_images: int | None = None,
             templates: tuple[str, ...] = DEFAULT_TEMPLATES, batch_size: int = 32,
             per_class: bool = False, return_features: bool = False) -> dict:
    """Zero-shot metrics of ``model`` on ``eval_set`` (default: the demo eval split, ``cfg.eval.n_images``
    images). The model is put in eval mode and restored to its previous mode afterwards.

    All values are floats (plus the int ``n_images``) unless ``per_class``, which adds
    ``seg/iou_per_class`` {class name: IoU or None}. ``return_features`` also returns the image
    features (for the PCA picture)."""
    if eval_set is None:
        from .data import load_eval_set
        eval_set = load_eval_set(cfg, n_images=n_images)
    n = n_images if n_images is not None else (cfg.eval.n_images if cfg is not None else len(eval_set))
    eval_set = eval_set.subset(n)
    if len(eval_set) < 2:
        raise ValueError(f"eval_set: need at least 2 images for retrieval, got {len(eval_set)}")

    was_training = model.training
    model.eval()
    try:
        feats = encode_images(model, eval_set.images, batch_size)
        captions = {k: v for k, v in eval_set.captions.items() if all(t.strip() for t in v)}
        text_emb = {k: encode_texts(model, tokenizer, v) for k, v in captions.items()}
        class_emb = None
        if eval_set.class_names:
            prompts = class_prompts(eval_set.class_names, templates)
            class_emb = average_prompts(encode_texts(model, tokenizer, prompts), len(eval_set.class_names))
    finally:
        model.train(was_training)

    result: dict = {"n_images": len(eval_set)}
    result.update(retrieval_metrics(feats["cls1"], feats["cls2"], text_emb, captions))
    if eval_set.labels is not None:
        # classes that compete; labels re-indexed into that subset
        keep = torch.tensor(eval_set.classify_classes or list(range(len(eval_set.class_names))))
        labels = (eval_set.labels[:, None] == keep[None, :]).int().argmax(dim=1)
        result["cls/cls1_acc"] = accuracy(classify(feats["cls1"], class_emb[keep]), labels)
        result["cls/cls2_acc"] = accuracy(classify(feats["cls2"], class_emb[keep]), labels)
    if eval_set.masks is not None:
        result.update(segmentation_metrics(feats["patch"], class_emb, eval_set, batch_size, per_class))
    if return_features:
        return result, feats
    return result
