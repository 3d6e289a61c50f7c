"""What every benchmark suite shares: the run context, dataset-layout checks, image decoding and
preprocessing (``fasttips.eval.transforms``: torchvision's Resize + CenterCrop), batched encoding at the
chosen precision, class-name embeddings, progress lines.

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

from fasttips.eval.transforms import resize_center_crop

METADATA = Path(__file__).resolve().parent / "metadata"
PRECISIONS = ("fp32", "bf16")


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
    precision: str = "fp32"          # "fp32" or "bf16" (autocast): see ``precision_context``
    log: object = None               # a text stream; None = sys.stderr at the time of printing
    probe_epochs: int | None = None  # linear probes (probe.py): None = each probe's default recipe
    probe_lrs: tuple | None = None
    probe_batch_size: int | None = None
    probe_cache: str | None = None   # folder for memory-mapped probe features; None = in RAM

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


def require_pairs(pairs: list[tuple[Path, Path]], name: str, listed_in: Path | None = None) -> list[tuple[Path, Path]]:
    """``pairs``, once both files of every (image, target) pair exist; else one line naming the first
    missing one (and the id list that named it)."""
    where = f" (listed in {listed_in})" if listed_in is not None else ""
    for image, target in pairs:
        for p in (image, target):
            if not p.is_file():
                raise DatasetLayoutError(f"{name}: missing file {p}{where}")
    return pairs


# -- images ---------------------------------------------------------------------------------------
def transform_record(resize: int, crop: int) -> dict:
    """What a suite's result says about its preprocessing (``fasttips.eval.transforms``)."""
    return {"resize_short_side": resize, "center_crop": crop, "interpolation": "PIL bicubic (antialiased)",
            "rounding": "torchvision"}


def to_pixels(arrays: list[np.ndarray], pixel_norm: str) -> torch.Tensor:
    """uint8 HWC arrays of one size → normalised float [B, 3, H, W], as training normalises them."""
    from fasttips.data.augment import normalize
    return normalize(torch.from_numpy(np.stack(arrays)), pixel_norm)


class ImageListDataset(torch.utils.data.Dataset):
    """(path, label) pairs → (uint8 image: short side to ``resize``, centre ``crop``, label, index); an
    unreadable image gives None (dropped by ``collate_skipping`` and counted as skipped)."""

    def __init__(self, items: list[tuple[Path, int]], crop: int, resize: int | None = None):
        self.items, self.crop, self.resize = items, crop, resize or crop

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        try:
            with Image.open(path) as img:
                return resize_center_crop(img.convert("RGB"), self.resize, self.crop), label, i
        except (OSError, ValueError, SyntaxError):
            return None


def as_is(sample):
    """One sample per step, unbatched (a module-level function, so worker processes can pickle it)."""
    return sample


def collate_skipping(batch):
    """Drop unreadable samples; keep how many were dropped."""
    good = [b for b in batch if b is not None]
    return good, len(batch) - len(good)


def loader(dataset, ctx: SuiteContext, batch_size: int | None = None):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size or ctx.batch_size, shuffle=False,
                                       num_workers=ctx.workers, collate_fn=collate_skipping)


# -- model ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def precision_context(device: torch.device, precision: str = "fp32"):
    """The arithmetic the encoders run in. "bf16": bf16 autocast on ``device``. "fp32": plain fp32,
    and on CUDA with TF32 switched off for matmuls and convolutions (cuDNN allows TF32 by default,
    which would round the patch embedding's inputs to 10 mantissa bits); the flags are restored after."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def encode_image_batch(ctx: SuiteContext, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"cls1", "cls2", "patch"} float32 on CPU for one batch (fasttips.eval.evaluate.encode_images)."""
    from fasttips.eval.evaluate import encode_images
    with precision_context(ctx.device, ctx.precision):
        return encode_images(ctx.model, pixels, batch_size=pixels.shape[0])


@torch.no_grad()
def encode_text_list(ctx: SuiteContext, texts: list[str], progress: str | None = None) -> torch.Tensor:
    """Text embeddings ``[len(texts), D]`` (float32, CPU); with ``progress``, a progress line under that
    name every ``ctx.progress_every`` batches."""
    from fasttips.eval.evaluate import encode_texts
    size = max(ctx.batch_size, 128)
    chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
    meter = Progress(ctx, progress, len(chunks), unit="texts") if progress else None
    out = []
    with precision_context(ctx.device, ctx.precision):
        for chunk in chunks:
            out.append(encode_texts(ctx.model, ctx.tokenizer, chunk, batch_size=size))
            if meter:
                meter.step(len(chunk))
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def class_embeddings(ctx: SuiteContext, class_names: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    """One unit vector per class: the mean of its normalised prompt embeddings (CLIP / TIPS)."""
    from fasttips.eval.zeroshot import average_prompts, class_prompts
    prompts = class_prompts(list(class_names), tuple(templates))
    return average_prompts(encode_text_list(ctx, prompts), len(class_names))


@torch.no_grad()
def embed_images(ctx: SuiteContext, items: list, suite: str, resize: int | None = None,
                 normalized: bool = True) -> tuple[dict[str, torch.Tensor], list, int]:
    """CLS#1 / CLS#2 features (L2-normalised unless ``normalized=False``) of the readable images of
    ``items`` [(path, tag)], the tags of those images in the same order, and how many images could not
    be read. Images are resized so the short side is ``resize`` (default: the crop size) and
    centre-cropped to ``ctx.image_size``."""
    from fasttips.eval.zeroshot import normalize
    feats: dict[str, list[torch.Tensor]] = {"cls1": [], "cls2": []}
    tags, skipped = [], 0
    batches = loader(ImageListDataset(items, ctx.image_size, resize), ctx)
    progress = Progress(ctx, suite, len(batches))
    for good, dropped in batches:
        skipped += dropped
        if good:
            out = encode_image_batch(ctx, to_pixels([g[0] for g in good], ctx.pixel_norm))
            for k in feats:
                feats[k].append(normalize(out[k]) if normalized else out[k].float())
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
