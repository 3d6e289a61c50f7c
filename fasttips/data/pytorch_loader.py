"""The plain PyTorch loader: a ``DataLoader`` over an infinite ``IterableDataset`` of whole batches,
decoding and augmenting with Pillow in worker processes.

Worker ``w`` of ``W`` builds batches ``start + w, start + w + W, ...``; the DataLoader hands them out
round-robin, i.e. in batch order, so the batch sequence is the same for any worker count and a resume
just restarts at the batch counter. A sample that fails to decode here (an index checked with
``data.validate=header`` does not decode images) is replaced by a later sample of the stream and
counted, so batches keep their size; the batch carries the skipped samples, and the loader counts and
reports each one when it hands the batch out (``loader.Loader``), so the counts match the lines.

Remote storage that stops answering is not damage: reads are retried for up to
``data.outage_deadline_s`` (``storage.through_outage``), then the batch becomes a stop marker and
its worker stops; the loader raises ``storage.RemoteOutage`` at that batch and the trainer
checkpoints and stops. Refused access (401/403, e.g. expired credentials) stops the same way, at once
(``storage.AccessLost``). No sample is skipped for either.
"""
from __future__ import annotations

import itertools
import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fasttips.distributed.signals import ignore_stop_signals

from . import storage
from .augment import crop_recipes, decode_rgb, min_decode_side, multicrop
from .pipeline import SampleStream, assemble, crop_seed
from .shards import MemberReader
from .tokenizer import Tokenizer

log = logging.getLogger("fasttips.data")


class BatchDataset(IterableDataset):
    def __init__(self, stream: SampleStream, cfg_data, patch_size: int, tokenizer_bytes: bytes, max_len: int,
                 start_batch: int = 0):
        self.stream, self.cfg = stream, cfg_data
        self.grid = cfg_data.global_size // patch_size
        self.tokenizer_bytes, self.max_len = tokenizer_bytes, max_len
        self.start_batch = start_batch
        self.recipes = crop_recipes(cfg_data.global_size, cfg_data.n_global, cfg_data.global_scale,
                                    cfg_data.local_size, cfg_data.n_local, cfg_data.local_scale)
        self.min_side = min_decode_side(self.recipes)

    def _load(self, reader: MemberReader, position: int, skipped: list):
        """(crops, captions, key, epoch) of the sample at ``position``, or of the one standing in for it
        (``SampleStream.load_usable``, which appends each sample passed over to ``skipped``)."""
        spec = self.stream.spec
        img, caps, key, epoch = self.stream.load_usable(reader, position, skipped, self._open)
        rng = np.random.default_rng(crop_seed(spec.seed, spec.rank, position))
        return multicrop(img, self.recipes, rng), caps, key, epoch

    def _open(self, data: bytes):
        img = decode_rgb(data, self.min_side)
        img.load()                    # Pillow decodes lazily: a broken body fails here, not in the crops
        return img

    def make_batch(self, batch_index: int, reader: MemberReader, tokenizer: Tokenizer) -> dict:
        skipped: list[tuple[str, str, str, str]] = []
        items = [self._load(reader, p, skipped) for p in self.stream.batch_positions(batch_index)]
        crops, caps, keys, epochs = map(list, zip(*items))
        spec = self.stream.spec
        batch = assemble(crops, caps, keys, epochs, n_global=self.cfg.n_global, grid=self.grid,
                         cfg_data=self.cfg, seed=spec.seed, rank=spec.rank, batch_index=batch_index,
                         tokenizer=tokenizer)
        batch["_skipped"] = skipped
        batch["_batch_index"] = batch_index
        return batch

    def __iter__(self):
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = MemberReader(outage_deadline_s=self.cfg.outage_deadline_s)
        tokenizer = Tokenizer.from_bytes(self.tokenizer_bytes, self.max_len)
        if info is not None:
            torch.set_num_threads(1)      # the workers already run in parallel
        try:
            for b in itertools.count(self.start_batch + w, W):
                try:
                    batch = self.make_batch(b, reader, tokenizer)
                except storage.DataStop as exc:       # handed out in batch order, as batch b; then stop
                    yield {"_data_stop": (exc.kind, str(exc)), "_batch_index": b}
                    return
                yield batch
        finally:
            reader.close()


def make_dataloader(dataset: BatchDataset, num_workers: int):
    """Iterator over batches (in batch order) with ``num_workers`` processes (0 = in this process).
    The workers outlive the process group's SIGTERM/SIGINT, which is the trainer's to handle
    (``signals.ignore_stop_signals``)."""
    if num_workers == 0:
        return iter(dataset)
    return iter(DataLoader(dataset, batch_size=None, num_workers=num_workers, prefetch_factor=2,
                           worker_init_fn=ignore_stop_signals))
