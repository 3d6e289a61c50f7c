"""What both loaders share: the sample stream of a rank, per-sample seeds, and turning decoded
crops + captions into a batch that satisfies ``batch.py``.

The stream of a rank is fully determined by (seed, rank, world_size, shard list): the rank owns a
contiguous slice of all good samples (DALI's ``shard_id``/``num_shards`` split), epoch ``e`` visits
that slice in the order ``permutation(seed, e, rank)``, and epochs follow each other forever. Batch
``b`` is positions ``[b·B, (b+1)·B)`` of that stream, so any worker can build any batch and a resumed
run only needs the number of batches already consumed.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from . import masks as masks_mod
from .augment import normalize
from .captions import sample_captions
from .shards import Sample, rank_slice


def seed_words(*parts: int) -> list[int]:
    """Integers as a numpy seed list; negative ones (``train.seed=-1``) wrap to 64 bits, others are kept."""
    return [int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and machines)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


@dataclass
class StreamSpec:
    seed: int
    rank: int
    world_size: int
    batch_size: int


class SampleStream:
    """Position -> (epoch, sample) for one rank."""

    def __init__(self, samples: list[Sample], spec: StreamSpec):
        start, stop = rank_slice(len(samples), spec.rank, spec.world_size)
        self.samples = samples[start:stop]
        if not self.samples:
            raise ValueError(f"rank {spec.rank} of {spec.world_size} gets no samples: the shards hold only "
                             f"{len(samples)} good samples")
        self.spec = spec

    def __len__(self) -> int:
        return len(self.samples)

    @functools.lru_cache(maxsize=4)
    def order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(seed_words(self.spec.seed, epoch, self.spec.rank))
        return rng.permutation(len(self.samples))

    def at(self, position: int) -> tuple[int, Sample]:
        epoch, i = divmod(position, len(self.samples))
        return epoch, self.samples[int(self.order(epoch)[i])]

    def batch_positions(self, batch_index: int) -> range:
        B = self.spec.batch_size
        return range(batch_index * B, (batch_index + 1) * B)


def mask_seed(seed: int, rank: int, batch_index: int) -> int:
    return mix_seed(seed, rank, batch_index, 0x6D61736B)


def crop_seed(seed: int, rank: int, position: int) -> int:
    return mix_seed(seed, rank, position, 0x63726F70)


def assemble(crops: list[list[np.ndarray]] | None, captions: list[dict], keys: list[str], epoch_of: list[int],
             *, n_global: int, grid: int, cfg_data, seed: int, rank: int, batch_index: int, tokenizer,
             global_u8: torch.Tensor | None = None, local_u8: torch.Tensor | None = None,
             pixels_ready: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Build the batch dict. Crops come either per image (``crops[i][c]`` uint8 HWC, globals first),
    as stacked crop-major uint8 tensors, or already normalised (``pixels_ready``, e.g. from DALI)."""
    B = len(keys)
    if pixels_ready is not None:
        global_crops, local_crops = pixels_ready
    else:
        if global_u8 is None:
            global_u8 = torch.from_numpy(np.stack([crops[i][c] for c in range(n_global) for i in range(B)]))
            n_local = len(crops[0]) - n_global
            if n_local:
                local_u8 = torch.from_numpy(np.stack([crops[i][n_global + c] for c in range(n_local)
                                                      for i in range(B)]))
            else:
                S = cfg_data.local_size
                local_u8 = torch.zeros(0, S, S, 3, dtype=torch.uint8)
        global_crops = normalize(global_u8, cfg_data.pixel_norm)
        local_crops = normalize(local_u8, cfg_data.pixel_norm)
    alts, syns, kinds = [], [], []
    for cap, key, ep in zip(captions, keys, epoch_of):
        a, s, k = sample_captions(cap, key, seed, ep, rank, cfg_data.caption_short_prob)
        alts.append(a), syns.append(s), kinds.append(k)
    alt_ids, alt_pad = tokenizer.encode(alts)
    syn_ids, syn_pad = tokenizer.encode(syns)
    masks = masks_mod.batch_masks(n_global * B, grid, cfg_data.mask_probability, tuple(cfg_data.mask_ratio),
                                  seed=mask_seed(seed, rank, batch_index))
    return {"global_crops": global_crops, "local_crops": local_crops, "masks": masks,
            "alt_ids": alt_ids, "alt_pad": alt_pad, "syn_ids": syn_ids, "syn_pad": syn_pad,
            "caption_kind": torch.tensor(kinds, dtype=torch.int64), "keys": list(keys)}
