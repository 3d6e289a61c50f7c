"""What every benchmark suite shares: the run context, dataset-layout checks, image decoding and
preprocessing, batched encoding under bf16 autocast on GPU, class-name embeddings, progress lines.

The model-side work is delegated to ``fasttips.eval.evaluate`` (``encode_images``, ``encode_texts``)
and ``fasttips.eval.zeroshot`` (prompts, prompt averaging); this module only feeds them batches.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

METADATA = Path(__file__).resolve().parent / "metadata"


class DatasetLayoutError(FileNotFoundError):
    """A benchmark folder is not laid out as the suite expects; the message names the missing path."""


@dataclass
class SuiteContext:
    """Everything a suite needs besides its own dataset folder."""
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    batch_size: int = 64
    image_size: int = 224            # square input of classification / retrieval / kNN
    pixel_norm: str = "tips"
    workers: int = 0
    progress_every: int = 50         # a progress line every N batches (0 = none)
    limit: int | None = None         # evaluate only the first N samples (smoke runs)
    seg_size: int = 448              # TIPS protocol: short side and sliding-window side
    seg_stride: int = 336
    seg_tokens: str = "values"       # "values" (TIPS: value-attention last block) or "final"
    log: object = None               # a text stream; None = sys.stderr at the time of printing

    def say(self, msg: str) -> None:
        print(msg, file=self.log or sys.stderr, flush=True)


def load_metadata(name: str) -> dict:
    return _load_metadata(name)


@lru_cache(maxsize=None)
def _load_metadata(name: str) -> dict:
    return json.loads((METADATA / f"{name}.json").read_text())


def require_dir(path: Path, suite: str, what: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(f"{suite}: missing folder {path} ({what})")
    return path


def require_file(path: Path, suite: str, what: str) -> Path:
    if not path.is_file():
        raise DatasetLayoutError(f"{suite}: missing file {path} ({what})")
    return path


# -- images ---------------------------------------------------------------------------------------
def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side to ``size`` (bicubic), then the central ``size``×``size`` square, as uint8 HWC."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def to_pixels(arrays: list[np.ndarray], pixel_norm: str) -> torch.Tensor:
    """uint8 HWC arrays of one size → normalised float [B, 3, H, W], as training normalises them."""
    from fasttips.data.augment import normalize
    return normalize(torch.from_numpy(np.stack(arrays)), pixel_norm)


class ImageListDataset(torch.utils.data.Dataset):
    """(path, label) pairs → (center-cropped uint8 image, label, index); an unreadable image gives None
    (dropped by ``collate_skipping`` and counted as skipped)."""

    def __init__(self, items: list[tuple[Path, int]], size: int):
        self.items, self.size = items, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        try:
            with Image.open(path) as img:
                return resize_center_crop(img.convert("RGB"), self.size), label, i
        except (OSError, ValueError, SyntaxError):
            return None


def collate_skipping(batch):
    """Drop unreadable samples; keep how many were dropped."""
    good = [b for b in batch if b is not None]
    return good, len(batch) - len(good)


def loader(dataset, ctx: SuiteContext, batch_size: int | None = None):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size or ctx.batch_size, shuffle=False,
                                       num_workers=ctx.workers, collate_fn=collate_skipping)


# -- model ---------------------------------------------------------------------------------------
def autocast(device: torch.device):
    """bf16 autocast on GPU (as training runs); plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def encode_image_batch(ctx: SuiteContext, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"cls1", "cls2", "patch"} float32 on CPU for one batch (fasttips.eval.evaluate.encode_images)."""
    from fasttips.eval.evaluate import encode_images
    with autocast(ctx.device):
        return encode_images(ctx.model, pixels, batch_size=pixels.shape[0])


@torch.no_grad()
def encode_text_list(ctx: SuiteContext, texts: list[str]) -> torch.Tensor:
    from fasttips.eval.evaluate import encode_texts
    with autocast(ctx.device):
        return encode_texts(ctx.model, ctx.tokenizer, texts, batch_size=max(ctx.batch_size, 128))


@torch.no_grad()
def class_embeddings(ctx: SuiteContext, class_names: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    """One unit vector per class: the mean of its normalised prompt embeddings (CLIP / TIPS)."""
    from fasttips.eval.zeroshot import average_prompts, class_prompts
    prompts = class_prompts(list(class_names), tuple(templates))
    return average_prompts(encode_text_list(ctx, prompts), len(class_names))


@torch.no_grad()
def embed_images(ctx: SuiteContext, items: list, suite: str) -> tuple[dict[str, torch.Tensor], list, int]:
    """Normalised CLS#1 / CLS#2 features of the readable images of ``items`` [(path, tag)], the tags of
    those images in the same order, and how many images could not be read."""
    from fasttips.eval.zeroshot import normalize
    feats: dict[str, list[torch.Tensor]] = {"cls1": [], "cls2": []}
    tags, skipped = [], 0
    batches = loader(ImageListDataset(items, ctx.image_size), ctx)
    progress = Progress(ctx, suite, len(batches))
    for good, dropped in batches:
        skipped += dropped
        if good:
            out = encode_image_batch(ctx, to_pixels([g[0] for g in good], ctx.pixel_norm))
            for k in feats:
                feats[k].append(normalize(out[k]))
            tags.extend(g[1] for g in good)
        progress.step(len(good))
    return {k: torch.cat(v) if v else torch.empty(0) for k, v in feats.items()}, tags, skipped


class Progress:
    """A line every ``every`` batches: done/total, rate, elapsed."""

    def __init__(self, ctx: SuiteContext, suite: str, total_batches: int, unit: str = "images"):
        self.ctx, self.suite, self.total, self.unit = ctx, suite, total_batches, unit
        self.t0, self.batches, self.items = time.perf_counter(), 0, 0

    def step(self, n_items: int) -> None:
        self.batches += 1
        self.items += n_items
        every = self.ctx.progress_every
        if every and (self.batches % every == 0 or self.batches == self.total):
            dt = time.perf_counter() - self.t0
            self.ctx.say(f"[{self.suite}] batch {self.batches}/{self.total}  {self.items} {self.unit}  "
                         f"{self.items / max(dt, 1e-9):.1f} {self.unit}/s  {dt:.0f}s")


def limited(items: list, ctx: SuiteContext) -> list:
    return items[: ctx.limit] if ctx.limit else items
