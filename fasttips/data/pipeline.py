"""What both loaders share: the sample stream of a rank, per-sample seeds, and turning decoded
crops + captions into a batch that satisfies ``batch.py``.

There is one global stream of samples, the same for every layout of ranks: epoch ``e`` visits all
good samples in the order ``permutation(seed, e)``, and epochs follow each other forever; position
``p`` of the stream (a global sample index) is sample ``p mod N`` of epoch ``p div N``. The ranks take
turns on it, one batch each: batch ``b`` of rank ``r`` of ``W`` covers the positions
``[start + ((b − first_batch)·W + r)·B, … + B)``, where a fresh run has ``start = first_batch = 0``.
So after any number of steps the ranks together have consumed exactly ``[0, position)`` of the
stream, and a run resumed on another number of ranks (or another batch size) starts a new layout at
that ``position``: within an epoch no sample is repeated or skipped. Any worker can build any batch,
and a resume on the same layout only needs the number of batches already consumed. (With one rank
this is the stream of earlier versions, position for position.)
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import masks as masks_mod
from . import storage
from .augment import normalize
from .captions import sample_captions
from .shards import Sample

log = logging.getLogger("fasttips.data")
MAX_REPLACEMENTS = 64          # stand-ins tried for one position before the shards are called broken


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
    start: int = 0           # global position where this layout of ranks began (0: a fresh run)
    first_batch: int = 0     # the batch counter at that moment (batch indexes keep counting across it)


class SampleStream:
    """Global position -> (epoch, sample), and this rank's share of the positions (module docstring)."""

    ORDERS_KEPT = 2          # epoch orders kept: the current one and the next (a batch may straddle the two)

    def __init__(self, samples: Sequence[Sample], spec: StreamSpec):
        if not samples:
            raise ValueError("the shards hold no good sample")
        if not 0 <= spec.rank < spec.world_size:
            raise ValueError(f"rank={spec.rank} must be in [0, world_size={spec.world_size})")
        self.samples = samples
        self.spec = spec
        self._orders: dict[int, np.ndarray] = {}          # epoch -> order, least recently used first

    def __len__(self) -> int:
        """Samples in one epoch (all ranks together)."""
        return len(self.samples)

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of epoch ``epoch`` (int32 below 2**31 samples: 464 MB at 116 M samples, per
        worker, so only ``ORDERS_KEPT`` of them are kept, by this stream alone)."""
        order = self._orders.pop(epoch, None)
        if order is None:
            # (the rank word stays 0: with one rank this is the order earlier versions used)
            rng = np.random.default_rng(seed_words(self.spec.seed, epoch, 0))
            order = rng.permutation(len(self.samples))
            order = order.astype(np.int32) if len(order) < 2**31 else order   # (half the memory per worker)
            while len(self._orders) >= self.ORDERS_KEPT:
                del self._orders[next(iter(self._orders))]
        self._orders[epoch] = order
        return order

    def __getstate__(self):
        return {**self.__dict__, "_orders": {}}           # (a worker started by pickling computes its own)

    def at(self, position: int) -> tuple[int, Sample]:
        epoch, i = divmod(position, len(self.samples))
        return epoch, self.samples[int(self.order(epoch)[i])]

    def stand_in(self, position: int, attempt: int) -> int:
        """The position whose sample stands in for the one at ``position`` when ``attempt`` samples
        in a row could not be loaded there (attempt 0: ``position`` itself). Half an epoch apart, so
        a stand-in is rarely a sample of the same batch."""
        return position + attempt * (1 + len(self.samples) // 2)

    def load_usable(self, reader, position: int, skipped: list, open_image):
        """(open_image(encoded image), captions, key, epoch) of the sample at ``position``, or of the
        first stand-in (``stand_in``) that can be used. Each sample passed over is appended to
        ``skipped`` as (reason, key, shard, why): its shard can no longer be read there (it shrank or
        vanished since indexing), it has no usable caption, or ``open_image`` raised (a broken image).
        Storage that stopped serving (``storage.DataStop``) is not the sample's fault: raised as it is.
        Both loaders take their samples through here, so they pass over the same ones."""
        for attempt in range(MAX_REPLACEMENTS):
            epoch, s = self.at(self.stand_in(position, attempt))
            try:
                data, caps = reader.image(s), reader.captions(s)
            except storage.DataStop:
                raise                         # the run checkpoints and stops (storage.py)
            except OSError as exc:
                skipped.append(("unreadable_shard", s.key, s.shard, f"cannot read it: {exc}"))
                continue
            if not caps:
                skipped.append(("missing_caption", s.key, s.shard, "no usable caption"))
                continue
            try:
                image = open_image(data)
            except Exception as exc:  # PIL raises many types for a broken file
                skipped.append(("corrupt_image", s.key, s.shard, str(exc) or type(exc).__name__))
                continue
            return image, caps, s.key, epoch
        raise RuntimeError(f"{MAX_REPLACEMENTS} samples in a row failed to load; the shards look broken")

    def batch_positions(self, batch_index: int) -> range:
        """The global positions of this rank's batch ``batch_index``."""
        spec, B = self.spec, self.spec.batch_size
        turn = (batch_index - spec.first_batch) * spec.world_size + spec.rank
        first = spec.start + turn * B
        return range(first, first + B)

    def position_after(self, batches: int) -> int:
        """The global position once every rank has taken ``batches`` batches (counted from 0)."""
        spec = self.spec
        return spec.start + (batches - spec.first_batch) * spec.world_size * spec.batch_size


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


class StreamLoader:
    """The position of a loader that reads the global stream (module docstring): both the PyTorch
    loader (``loader.Loader``) and the DALI loader (``dali_loader.DaliLoader``). A subclass sets ``cfg``,
    ``rank``, ``world_size``, ``batch_size``, ``samples``, ``stream``, ``batches`` and provides
    ``__next__`` and ``close``; the state, and the resume on any layout of ranks, are here."""

    def _stream(self, start: int, first_batch: int) -> SampleStream:
        spec = StreamSpec(self.cfg.train.seed, self.rank, self.world_size, self.batch_size, start, first_batch)
        return SampleStream(self.samples, spec)

    @property
    def num_samples(self) -> int:
        """This rank's share of one epoch (the epoch is every good sample, shared by the ranks)."""
        return len(self.stream) // self.world_size

    @property
    def epoch_samples(self) -> int:
        return len(self.stream)

    @property
    def global_position(self) -> int:
        """Samples of the global stream consumed by all ranks together (every rank took ``batches``)."""
        return self.stream.position_after(self.batches)

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        spec = self.stream.spec
        return {"kind": self.kind, "batches": self.batches, "seed": self.cfg.train.seed, "rank": self.rank,
                "world_size": self.world_size, "num_samples": self.num_samples,
                "batch_size": self.batch_size, "position": self.global_position,
                "epoch_samples": self.epoch_samples, "start": spec.start, "first_batch": spec.first_batch}

    def load_state_dict(self, state: dict) -> None:
        """This rank's saved position: the same batches again when the layout (ranks, batch size) is
        the one saved; on another layout, the same global position (``resume_at``). Both loaders read
        the same stream, so a position saved by one is the same samples in the other."""
        same_layout = all(state.get(k, v) == v for k, v in (("world_size", self.world_size),
                                                            ("batch_size", self.batch_size)))
        if not same_layout and "position" in state:
            self.resume_at(state)
            return
        if "dali_checkpoint" in state and "position" not in state:
            log.warning("data: this checkpoint comes from a fasttips whose DALI loader shuffled each rank's "
                        "own slice of the samples; both loaders now read one global stream, which continues "
                        "at batch %d, so this epoch may repeat or skip samples", int(state["batches"]))
        elif "position" not in state and self.world_size > 1:
            log.warning("data: this checkpoint comes from a fasttips whose ranks each read their own slice "
                        "of the samples; the ranks now share one stream, so this epoch may repeat or skip "
                        "samples")
        for field in ("seed", "world_size", "batch_size", "epoch_samples"):
            if field in state and state[field] != self.state_dict()[field]:
                log.warning("data: resuming with %s=%r (saved: %r); the batch sequence will differ",
                            field, self.state_dict()[field], state[field])
        self.close()
        self.stream = self._stream(int(state.get("start", 0)), int(state.get("first_batch", 0)))
        self.batches = int(state["batches"])

    def position_state(self) -> dict:
        """The position in a form any layout of ranks can resume from (saved once, in meta.json)."""
        return {"position": self.global_position, "batches": self.batches, "epoch_samples": self.epoch_samples}

    def resume_at(self, state: dict) -> None:
        """Continue the global stream at ``state["position"]`` (a :meth:`position_state`, or a rank's
        state_dict) with this loader's layout: its rank, number of ranks and batch size; batch
        indexes count on from ``state["batches"]``. An epoch of another size means the data changed,
        which the position cannot bridge (a warning says so)."""
        position, batches = int(state["position"]), int(state["batches"])
        if state.get("epoch_samples", self.epoch_samples) != self.epoch_samples:
            log.warning("data: the checkpoint counted %d samples per epoch, the data now holds %d; its "
                        "position %d is kept, but this epoch may repeat or skip samples",
                        state["epoch_samples"], self.epoch_samples, position)
        self.close()
        self.stream = self._stream(position, batches)
        self.batches = batches

    def close(self) -> None:
        raise NotImplementedError

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def count_skipped(stats: dict, skipped) -> None:
    """Count and report the samples a batch passed over, as the batch is handed out (one line per
    sample, so the counts match the lines; a batch built ahead and never used counts nothing)."""
    for reason, key, shard, why in skipped:
        stats[reason] = stats.get(reason, 0) + 1
        log.warning("data: skipped sample %r of %s at load time: %s (%s)", key, shard, reason, why)
