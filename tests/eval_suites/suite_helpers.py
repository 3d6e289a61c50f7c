"""Helpers of the benchmark-suite tests: oracle
models whose embeddings encode what the image / text shows, so every metric has a known value.

Oracle image code: a pixel's colour carries an integer ``v`` in 0..1023 as red = 16·(v % 16) + 8,
green = 16·(v // 16 % 16) + 8, blue = 64·(v // 256) + 32 (robust to JPEG's small colour errors)."""
from __future__ import annotations

import types

import numpy as np
import torch
from PIL import Image
from torch import nn

TINY = ["vision.width=64", "vision.depth=1", "vision.heads=1", "vision.mlp_hidden=64", "text.depth=1",
        "text.vocab_size=64", "heads.hidden=32", "heads.bottleneck=16", "heads.prototypes=32"]
P = 14            # patch size of every model here


def colour(v: int) -> tuple[int, int, int]:
    return (16 * (v % 16) + 8, 16 * (v // 16 % 16) + 8, 64 * (v // 256) + 32)


def decode(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, ...] pixels in [0, 1] (TIPS normalisation) → the integer code at each position."""
    r = ((x[:, 0] * 255 - 8) / 16).round().clamp(0, 15)
    g = ((x[:, 1] * 255 - 8) / 16).round().clamp(0, 15)
    b = ((x[:, 2] * 255 - 32) / 64).round().clamp(0, 3)
    return (b * 256 + g * 16 + r).long()


def save_image(path, array_or_colour, size=(40, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(array_or_colour, tuple):
        img = Image.new("RGB", size, array_or_colour)
    else:
        img = Image.fromarray(np.asarray(array_or_colour, dtype=np.uint8))
    if (fmt or ("JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")) == "JPEG":
        img.save(path, format="JPEG", quality=100, subsampling=0)      # no chroma blur across patches
    else:
        img.save(path, format=fmt or "PNG")
    return path


class OracleTokenizer:
    """Maps each text to the integer ``lookup(text)``: one token id (+1, as 0 is padding)."""

    def __init__(self, lookup):
        self.lookup = lookup

    def encode(self, texts):
        ids = torch.tensor([self.lookup(t) for t in texts])[:, None] + 1
        return ids, torch.zeros_like(ids, dtype=torch.bool)


class OracleVision(nn.Module):
    """CLS#1 = CLS#2 = one-hot of the code at the image centre; patch = one-hot of the code at each
    patch centre. ``shift`` makes a confused model (code c is read as c + shift); ``blind`` one that
    sees nothing (every code read as 0: what a trained probe cannot learn from)."""

    def __init__(self, dim, shift=0, blind=False):
        super().__init__()
        self.dim, self.shift, self.blind = dim, shift, blind
        self.patch_embed = types.SimpleNamespace(patch_size=P)

    def forward(self, x, masks=None):
        code = (decode(x) + self.shift) % self.dim                          # [B, H, W]
        if self.blind:
            code = torch.zeros_like(code)
        H, W = code.shape[-2:]
        centre = code[:, H // 2, W // 2]
        patch = code[:, P // 2::P, P // 2::P].flatten(1)
        one = lambda c: nn.functional.one_hot(c, self.dim).float()         # noqa: E731
        return {"cls1": one(centre), "cls2": one(centre), "patch": one(patch)}


class OracleModel(nn.Module):
    def __init__(self, dim, shift=0, blind=False):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))      # evaluate.py reads the device from a parameter
        self.vision = OracleVision(dim, shift, blind)
        self.dim = dim

    def text(self, ids, pad):
        return nn.functional.one_hot(ids[:, 0] - 1, self.dim).float()


def run_suite(model, tok, cfg, suite, root, tmp_path, **kw):
    from fasttips.eval.suites import run_suites
    import io
    log = io.StringIO()
    opts = dict(image_size=28, seg_size=28, seg_stride=14, batch_size=2, workers=0, progress_every=1, log=log)
    opts.update(kw)
    out = run_suites(model, tok, cfg, [suite], None, roots={suite: root}, out_dir=tmp_path / "out", **opts)
    return out["suites"][suite], log.getvalue()


class RecordingModel(OracleModel):
    """An oracle that also keeps what its vision tower was fed: the pixel batches and whether bf16
    autocast was on (``seen``: [(pixels, autocast_on)])."""

    def __init__(self, dim, shift=0):
        super().__init__(dim, shift)
        self.seen = []
        inner = self.vision.forward

        def forward(x, masks=None):
            self.seen.append((x.detach().clone(), torch.is_autocast_enabled(x.device.type)))
            return inner(x, masks)

        self.vision.forward = forward
