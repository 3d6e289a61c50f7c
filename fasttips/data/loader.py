"""``build_loader(cfg, rank, world_size)``: the one entry point the trainer, evaluation and benches use.

It resolves the shards (demo data, a shard path or fsspec URL, or synthetic batches; a ``data.path``
always means shards, ``effective_source``), picks the DALI loader (``data.loader = auto`` when
``nvidia.dali`` imports and the shards are local files, or ``dali``) or the PyTorch + Pillow loader,
gets the shards' indexes (built once, shared through ``data.index_dir``: ``shards.index_shards``;
images fully decoded for DALI, header-checked for PyTorch: ``validation_level``; bad samples are
skipped, counted in ``.stats`` and reported in one log line), then resolves the tokenizer. Iterating
yields batches that satisfy ``batch.py`` forever; ``state_dict()`` / ``load_state_dict()`` capture the
data position so a resumed run continues with the same batches. ``global_position`` is that position
as a global sample index (all ranks together), and ``resume_at(position, batches)`` continues from it
on another number of ranks or another batch size (``pipeline.py``). Both loaders read that one stream
and share this logic (``pipeline.StreamLoader``); the DALI loader differs only in who decodes and crops.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import time

import torch

from fasttips.distributed.signals import startup_guard
from fasttips.safe_io import write_atomic

from . import demo, storage
from .caption_fields import DEFAULT_CAPTION_FIELDS, caption_fields_of, missing_caption_hint
from .batch import synthetic_batch
from .pipeline import StreamLoader, count_skipped
from .sample_table import ConcatSamples
from .shards import (SKIP_REASONS, MemberReader, cache_dir, fingerprint, index_shards, list_shards,
                     total_skipped)
from .tokenizer import Tokenizer

log = logging.getLogger("fasttips.data")
MAX_TOKENIZER_CAPTIONS = 200_000


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def effective_source(cfg_data) -> str:
    """``data.source``, except that a ``data.path`` selects shards: the demo data never comes from,
    or is written into, a user's folder (it lives in ``$FASTTIPS_DATA_DIR`` or ``~/.cache/fasttips``)."""
    source = cfg_data.source
    if source == "auto":
        return "shards" if cfg_data.path else "demo"
    if source == "demo" and cfg_data.path:       # the config refuses this; older callers get shards
        return "shards"
    return source


def resolve_shards(cfg) -> list[str]:
    source = effective_source(cfg.data)
    if source == "demo":
        return demo.demo_shards(None, "train")
    if cfg.data.source != source:
        log.info("data.path=%s is set: training on those shards (data.source=shards)", cfg.data.path)
    return list_shards(cfg.data.path, what="data.path")


def startup_line(cfg) -> str | None:
    """What the data start-up is about to do, said before its silence (None: nothing slow). The long
    demo line only when the demo data is really built (the first run); a short one when it is cached."""
    source = effective_source(cfg.data)
    if source == "demo":
        if demo.demo_data_ready():
            return f"data: the demo data, cached in {demo.demo_dir()}"
        return ("data: preparing the demo data (this first run builds it in "
                f"{demo.demo_dir()} and trains a tokenizer on its captions, about 30 s; later runs reuse it)...")
    if source == "shards":
        return (f"data: indexing the shards of data.path={cfg.data.path} (and training a tokenizer on their "
                "captions unless data.tokenizer is set or one is cached)...")
    return None


def shard_captions(indexes, limit: int = MAX_TOKENIZER_CAPTIONS) -> list[str]:
    """Every caption of every good sample (up to ``limit``), for tokenizer training."""
    reader, texts = MemberReader(), []
    try:
        for ix in indexes:
            for s in ix.samples:
                texts += list(reader.captions(s).values())
                if len(texts) >= limit:
                    return texts
    finally:
        reader.close()
    return texts


def tokenizer_cache_key(indexes, vocab_size: int) -> str:
    """What the trained tokenizer depends on: each shard's path *and content* (``shards.fingerprint``,
    as for the shard index, so a shard rewritten in place trains a new one), the vocabulary size and
    the caption cap."""
    parts = [f"{ix.shard}|{ix.fingerprint if ix.fingerprint is not None else fingerprint(ix.shard)}"
             for ix in indexes]       # (the index's own fingerprint: no second request per remote shard)
    fields = next((ix.samples[0].fields.spec for ix in indexes if ix.samples), "")
    if fields and fields != DEFAULT_CAPTION_FIELDS:       # (the default leaves the key as it always was)
        parts.append(f"caption_fields={fields}")
    parts.append(f"vocab={vocab_size}|captions<={MAX_TOKENIZER_CAPTIONS}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def resolve_tokenizer(cfg, indexes) -> Tokenizer:
    """data.tokenizer if given, else a SentencePiece model trained on the shards' captions (cached by
    shard set, shard contents and vocabulary size, so every rank and every rerun gets the same one)."""
    max_len = cfg.text.max_len
    if cfg.data.tokenizer:
        tok = Tokenizer.load(cfg.data.tokenizer, max_len)
    else:
        key = tokenizer_cache_key(indexes, cfg.text.vocab_size)
        path = cache_dir() / "tokenizers" / f"spm-{cfg.text.vocab_size}-{key}.model"
        if path.is_file():
            tok = Tokenizer.load(path, max_len)
        else:
            tok = Tokenizer.train(shard_captions(indexes), cfg.text.vocab_size, max_len=max_len)
            write_atomic(path, tok.serialized())
            log.info("trained a %d-piece tokenizer on the shard captions: %s", tok.vocab_size, path)
    if tok.vocab_size > cfg.text.vocab_size:
        raise ValueError(f"data.tokenizer has {tok.vocab_size} ids but text.vocab_size={cfg.text.vocab_size}; "
                         "raise text.vocab_size")
    return tok


class Loader(StreamLoader):
    """Infinite iterator of batches with a resumable position (see module docstring)."""

    kind = "pytorch"

    def __init__(self, cfg, rank: int, world_size: int, samples, tokenizer: Tokenizer, stats: dict):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.tokenizer, self.stats = tokenizer, stats
        self.batch_size = cfg.data.batch_size
        self.samples = samples
        self.stream = self._stream(start=0, first_batch=0)
        self.batches = 0              # batches handed out so far
        self._it = None

    def _start(self):
        from .pytorch_loader import BatchDataset, make_dataloader
        ds = BatchDataset(self.stream, self.cfg.data, self.cfg.vision.patch_size, self.tokenizer.serialized(),
                          self.tokenizer.max_len, start_batch=self.batches)
        return make_dataloader(ds, self.cfg.data.num_workers)

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._start()
        batch = next(self._it)
        index = batch.pop("_batch_index", self.batches)
        assert index == self.batches, f"loader out of order: got batch {index}, expected {self.batches}"
        if "_data_stop" in batch:     # the storage stayed unavailable or refused access: nothing skipped,
            self.close()              # the run stops here
            kind, message = batch["_data_stop"]
            raise (storage.AccessLost if kind == storage.AccessLost.kind else storage.RemoteOutage)(message)
        count_skipped(self.stats, batch.pop("_skipped", ()))
        self.batches += 1
        return batch

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


class SyntheticLoader:
    """data.source = synthetic: random batches (``batch.synthetic_batch``), deterministic per step."""

    kind = "synthetic"

    def __init__(self, cfg, rank: int):
        self.cfg, self.rank = cfg, rank
        self.batches = 0
        self.stats = dict.fromkeys(SKIP_REASONS, 0)
        self.tokenizer = None
        self.batch_size = cfg.data.batch_size

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        d, g = self.cfg.data, torch.Generator().manual_seed(
            (self.cfg.train.seed * 1_000_003 + self.rank) * 1_000_003 + self.batches)
        self.batches += 1
        return synthetic_batch(d.batch_size, d.global_size, d.local_size, d.n_global, d.n_local,
                               self.cfg.vision.patch_size, self.cfg.text.max_len, self.cfg.text.vocab_size,
                               mask_ratio=sum(d.mask_ratio) / 2, generator=g)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])

    def position_state(self) -> dict:
        return {"batches": self.batches}

    def resume_at(self, state: dict) -> None:
        """On another number of ranks: random batches come from (seed, rank, batch counter) alone."""
        self.batches = int(state["batches"])


def build_loader(cfg, rank: int = 0, world_size: int = 1):
    """The data loader of this rank (see module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if effective_source(cfg.data) == "synthetic":
        return SyntheticLoader(cfg, rank)
    # Start-up (demo build, indexing, tokenizer training) can take minutes and has nothing to save:
    # SIGTERM/SIGINT here end the process cleanly, unless a trainer already handles them.
    with startup_guard():
        return _build_shard_loader(cfg, rank, world_size)


def resolve_loader_kind(cfg, shards) -> str:
    """``dali`` or ``pytorch`` for these shards (``data.loader``; DALI reads local files only)."""
    kind = cfg.data.loader
    remote = [s for s in shards if storage.is_url(s)]
    if kind == "auto":
        kind = "dali" if dali_available() and importlib.util.find_spec("fasttips.data.dali_loader") else "pytorch"
        if kind == "dali" and remote:
            log.info("data: %s is remote; the DALI loader reads local files only, so the PyTorch loader "
                     "streams it (data.loader=pytorch)", remote[0])
            kind = "pytorch"
    if kind == "dali" and remote:
        raise ValueError(f"data.loader=dali: {remote[0]} is remote and DALI reads local files only; use "
                         "data.loader=pytorch (or auto), or copy the shards to a local disk")
    return kind


def validation_level(cfg, kind: str) -> str:
    """The image check of the index: ``data.validate``, where ``auto`` = ``full`` for DALI (one corrupt
    image stops a DALI pipeline, so DALI must only ever see decoded-once images) and ``header`` for
    the PyTorch loader (which skips and counts a bad image when it meets it)."""
    level = getattr(cfg.data, "validate", "auto")
    if level == "auto":
        return "full" if kind == "dali" else "header"
    if level == "header" and kind == "dali":
        log.warning("data.validate=header with the DALI loader: a corrupt image that passes the header "
                    "check will stop the DALI pipeline (use data.validate=full or auto)")
    return level


def _build_shard_loader(cfg, rank: int, world_size: int):
    fields = caption_fields_of(cfg)                  # a bad mapping stops here, before any indexing
    storage.configure(retries=getattr(cfg.data, "retries", None))
    shards = resolve_shards(cfg)
    kind = resolve_loader_kind(cfg, shards)
    validate = validation_level(cfg, kind)
    t0 = time.monotonic()

    def progress(done: int, total: int) -> None:
        if total >= 50 and (done % 500 == 0 or done == total) and time.monotonic() - t0 > 5:
            log.info("data: indexed %d of %d shards (%.0f s)", done, total, time.monotonic() - t0)
    indexes = index_shards(shards, fields, validate=validate, index_dir=getattr(cfg.data, "index_dir", ""),
                           rank=rank, world_size=world_size, progress=progress)
    stats = total_skipped(indexes)
    samples = ConcatSamples([ix.samples for ix in indexes])   # (the shards' tables, not a list of every sample)
    bad = {k: v for k, v in stats.items() if v}
    hint = f"; {missing_caption_hint(fields)}" if stats.get("missing_caption") else ""
    if bad:
        log.warning("data: %d good samples in %d shards; skipped %s%s", len(samples), len(shards), bad, hint)
    if not samples:
        raise ValueError(f"data.path={cfg.data.path!r}: the {len(shards)} shard(s) hold no usable sample "
                         f"(skipped: {bad or 'none'}){hint}")
    tokenizer = resolve_tokenizer(cfg, indexes)
    if kind == "dali":
        if not dali_available():
            raise ImportError("data.loader=dali but nvidia.dali is not installed "
                              "(pip install 'fasttips[dali]', or use data.loader=pytorch)")
        from .dali_loader import DaliLoader
        return DaliLoader(cfg, rank, world_size, samples, tokenizer, stats)
    return Loader(cfg, rank, world_size, samples, tokenizer, stats)
