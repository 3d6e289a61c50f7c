"""Helpers for the data tests: tiny JPEGs, captions, shards and configs."""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from fasttips.config import load
from fasttips.data.shards import ShardWriter

IMAGE_SIZE = 64


def jpeg(rng: np.random.Generator, size=(IMAGE_SIZE, IMAGE_SIZE)) -> bytes:
    """A small random blocky colour image as JPEG bytes."""
    small = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def captions_of(i: int) -> dict:
    return {"alt": f"thing number {i}", "short": f"A picture of thing {i}.",
            "long": f"A long description of thing {i} in the middle of a picture."}


def write_shards(folder, n_samples: int, per_shard: int, seed: int = 0, prefix: str = "shard"):
    rng = np.random.default_rng(seed)
    with ShardWriter(folder, prefix=prefix, samples_per_shard=per_shard) as w:
        for i in range(n_samples):
            w.write(f"s{i:04d}", jpeg(rng), "jpg", captions_of(i))
    return w.paths


def tiny_cfg(path, *overrides: str):
    """Tiny preset pointed at ``path``: 56 px globals (4×4 patches), 28 px locals, batch 4."""
    return load(overrides=[
        "data.source=shards", f"data.path={path}", "data.batch_size=4", "data.num_workers=0",
        "data.global_size=56", "data.local_size=28", "data.n_local=2", "text.max_len=16",
        "text.vocab_size=200", *overrides])


def read_json(data: bytes) -> dict:
    return json.loads(data.decode())
