"""The batch contract shared by every loader, the training step, the benchmarks and the tests.

A batch is a dict (B = images in this process's batch, G = n_global, L = n_local):

| key            | shape / type                  | meaning |
|----------------|-------------------------------|---------|
| global_crops   | float [G·B, 3, Sg, Sg]         | global views, crop-major (crop 0 of every image, then crop 1) |
| local_crops    | float [L·B, 3, Sl, Sl]         | local views, crop-major; L may be 0 (shape [0, 3, Sl, Sl]) |
| masks          | bool  [G·B, Ng]                | iBOT mask over the patches of each global crop (True = masked) |
| alt_ids        | int64 [B, max_len]             | alt-text token ids (CLS#1), pad id 0 |
| alt_pad        | bool  [B, max_len]             | True where alt_ids is padding |
| syn_ids        | int64 [B, max_len]             | synthetic caption token ids (CLS#2), pad id 0 |
| syn_pad        | bool  [B, max_len]             | True where syn_ids is padding |
| caption_kind   | int64 [B]                      | granularity given to CLS#2: 0 = alt, 1 = short, 2 = long |
| keys           | list[str] of length B          | sample keys |

Pixels are normalised already (TIPS: [0, 1] with mean 0, std 1). ``Ng = (Sg / patch)²``.
"""
from __future__ import annotations

import torch

from .shards import CAPTION_KINDS     # ("alt", "short", "long"): caption_kind is the index

BATCH_KEYS = ("global_crops", "local_crops", "masks", "alt_ids", "alt_pad", "syn_ids", "syn_pad",
              "caption_kind", "keys")


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with every tensor on ``device`` (a no-op for tensors already there)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def synthetic_batch(batch_size: int, global_size: int, local_size: int, n_global: int = 1,
                    n_local: int = 2, patch_size: int = 14, max_len: int = 16, vocab_size: int = 100,
                    mask_ratio: float = 0.3, generator: torch.Generator | None = None) -> dict:
    """A random batch that satisfies the contract (for tests and benchmarks; no data needed)."""
    g = generator
    B = batch_size
    n_patches = (global_size // patch_size) ** 2
    masks = torch.rand(n_global * B, n_patches, generator=g) < mask_ratio
    masks[: (n_global * B) // 2] = False          # about half the images carry no mask, as DINOv2
    lengths = torch.randint(1, max_len + 1, (2, B), generator=g)
    pos = torch.arange(max_len)
    pads = pos[None, None, :] >= lengths[:, :, None]
    ids = torch.randint(1, vocab_size, (2, B, max_len), generator=g).masked_fill(pads, 0)
    return {
        "global_crops": torch.randn(n_global * B, 3, global_size, global_size, generator=g),
        "local_crops": torch.randn(n_local * B, 3, local_size, local_size, generator=g),
        "masks": masks,
        "alt_ids": ids[0], "alt_pad": pads[0],
        "syn_ids": ids[1], "syn_pad": pads[1],
        "caption_kind": torch.randint(1, 3, (B,), generator=g),
        "keys": [f"synthetic-{i:06d}" for i in range(B)],
    }


def check_batch(batch: dict, n_global: int, n_local: int, patch_size: int) -> int:
    """Raise ValueError naming the first key that breaks the contract; return the batch size B."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch is missing keys {missing}; a batch needs {list(BATCH_KEYS)}")
    B = batch["alt_ids"].shape[0]
    g, loc = batch["global_crops"], batch["local_crops"]
    if g.ndim != 4 or g.shape[0] != n_global * B or g.shape[1] != 3:
        raise ValueError(f"global_crops: expected [{n_global}·{B}, 3, S, S], got {list(g.shape)}")
    if loc.ndim != 4 or loc.shape[0] != n_local * B:
        raise ValueError(f"local_crops: expected [{n_local}·{B}, 3, S, S], got {list(loc.shape)}")
    for name, crops in (("global_crops", g), ("local_crops", loc)):
        if crops.shape[-1] % patch_size or crops.shape[-2] % patch_size:
            raise ValueError(f"{name}: size {list(crops.shape[-2:])} is not a multiple of the patch "
                             f"size {patch_size}")
    n_patches = (g.shape[-2] // patch_size) * (g.shape[-1] // patch_size)
    if tuple(batch["masks"].shape) != (n_global * B, n_patches):
        raise ValueError(f"masks: expected [{n_global * B}, {n_patches}], got {list(batch['masks'].shape)}")
    return B
