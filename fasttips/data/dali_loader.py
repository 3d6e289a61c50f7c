"""The NVIDIA DALI loader: ``fn.readers.webdataset``, decoding and the geometric crops in one DALI
graph; the photometric augmentation batched in torch on the same device.

With a CUDA device (``nvidia.dali.backend.GetCUDADeviceCount() > 0``) images are decoded with
``device='mixed'`` (nvJPEG) and cropped on the GPU (``device_id`` = the local rank); without one the
same graph runs on the CPU (``device_id=None``, docs/data.md §1). Per crop the graph does DINOv2's
random resized crop and flip and returns uint8 CHW; ``photometric.py`` then applies jitter, grayscale,
blur and solarize with the recipe of ``augment.py`` to the whole batch, on the crops' device (DALI's
CPU operators are about 4× slower with per-sample random arguments; see that module). Crops are resized
bicubically on the GPU; on the CPU DALI uses bilinear (about 15% less CPU per image in DALI's
resampler; antialiased either way).

The reader gets the validated ``.idx`` files written by ``shards.index_shard``, so it only ever sees
good samples (bad ones were skipped and counted when the shards were indexed). Each rank reads its own
contiguous part of the samples (``shard_id``/``num_shards``, ``stick_to_shard``) in an order that DALI
reshuffles every epoch from the pipeline seed (train.seed, rank). Captions, tokenization and iBOT masks
are done in Python on the batch, with the same functions as the PyTorch loader. The photometric draws
are seeded per (train.seed, rank, batch, crop), so they need no state to resume.

Resuming: ``state_dict()`` stores the batch counter and a DALI pipeline checkpoint (reader position
and every random generator, ``enable_checkpointing``; base64 text). ``load_state_dict`` rebuilds the
pipeline from that checkpoint, so a resumed run continues with the same batches at no cost. Without a
usable checkpoint (another DALI version, a changed graph) it replays the consumed batches instead.
"""
from __future__ import annotations

import base64
import contextlib
import logging
import os

import numpy as np
import torch

from .augment import ASPECT, crop_recipes
from .photometric import photometric
from .pipeline import assemble, mix_seed, seed_words
from .caption_fields import DEFAULT
from .shards import dali_caption_labels, parse_dali_source

log = logging.getLogger("fasttips.data")
SHUFFLE_BUFFER = 4096      # encoded samples held for DALI's shuffle (a whole small dataset = a full shuffle)


def cuda_devices() -> int:
    from nvidia.dali import backend
    try:
        return int(backend.GetCUDADeviceCount())
    except Exception:
        return 0


def _build_pipeline(paths, index_paths, recipes, batch_size: int, num_threads: int, device_id,
                    seed: int, rank: int, world_size: int, shuffle_buffer: int, interp: str = "cubic",
                    checkpoint: bytes | None = None, caption_labels=("cap0",)):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    interp_type = {"cubic": types.INTERP_CUBIC, "linear": types.INTERP_LINEAR}[interp]

    def geometry(image, recipe):
        """Random resized crop + flip, as uint8 CHW: the photometric part runs in torch (module doc)."""
        crop = fn.random_resized_crop(image, size=[recipe.size, recipe.size], random_area=list(recipe.scale),
                                      random_aspect_ratio=list(ASPECT), interp_type=interp_type,
                                      antialias=True)
        return fn.crop_mirror_normalize(crop, dtype=types.UINT8, output_layout="CHW",
                                        mirror=fn.random.coin_flip(probability=0.5))

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2, enable_checkpointing=True)
    def multicrop_pipeline():
        # the caption members (shards.dali_caption_labels): a sample may lack some of them (a
        # fallback source such as txt|json:caption), which then arrive empty
        encoded, *captions = fn.readers.webdataset(
            paths=paths, index_paths=index_paths, ext=["img", *caption_labels], random_shuffle=True,
            initial_fill=shuffle_buffer, shard_id=rank, num_shards=world_size,
            stick_to_shard=True, missing_component_behavior="empty", name="Reader")
        source = fn.get_property(encoded, key="source_info")
        image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        crops = [geometry(image, r) for r in recipes]
        texts = [x for c in captions for x in (fn.pad(c, fill_value=0), c.shape())]
        return (*crops, *texts, fn.pad(source, fill_value=0), source.shape())

    pipe = multicrop_pipeline(checkpoint=checkpoint) if checkpoint else multicrop_pipeline()
    pipe.build()
    return pipe


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


def _bytes(padded, lengths) -> list[bytes]:
    buf, lens = np.asarray(padded.as_tensor()), np.asarray(lengths.as_tensor()).reshape(-1)
    if buf.ndim == 1:                                     # every sample empty: nothing was padded
        return [b""] * len(lens)
    return [bytes(buf[i, : int(lens[i])]) for i in range(len(lens))]


def _to_torch(tensor_list, device) -> torch.Tensor:
    """A dense DALI batch -> torch tensor (on the GPU for a GPU pipeline, else CPU). The CPU tensor
    shares DALI's buffer, which stays valid until the next ``run()``: use it before that."""
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
        t = tensor_list.as_tensor()
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.asarray(tensor_list.as_tensor()))


class DaliLoader:
    kind = "dali"

    def __init__(self, cfg, rank: int, world_size: int, indexes, tokenizer, stats: dict):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.tokenizer, self.stats = tokenizer, stats
        self.batch_size = cfg.data.batch_size
        indexes = [ix for ix in indexes if ix.samples]
        self.fields = indexes[0].samples[0].fields if indexes else DEFAULT    # the mapping they were indexed with
        # DALI reads shards in list order through a bounded shuffle buffer: shuffle the shard order
        # once from train.seed (the same on every rank, so the ranks' sample ranges stay disjoint).
        order = np.random.default_rng(seed_words(cfg.train.seed, 0x736861)).permutation(len(indexes))
        indexes = [indexes[i] for i in order]
        self.paths = [ix.shard for ix in indexes]
        self.index_paths = [ix.dali_index for ix in indexes]
        # DALI reports a sample as (shard, number in the .idx); the key is looked up here (shards.py)
        self._keys = {ix.shard: ix.samples.keys for ix in indexes}      # (read from the packed table)
        total = sum(len(ix.samples) for ix in indexes)
        self.num_samples = (total * (rank + 1)) // world_size - (total * rank) // world_size
        if self.num_samples == 0:
            raise ValueError(f"rank {rank} of {world_size} gets no samples: the shards hold only {total}")
        self.recipes = crop_recipes(cfg.data.global_size, cfg.data.n_global, cfg.data.global_scale,
                                    cfg.data.local_size, cfg.data.n_local, cfg.data.local_scale)
        self.device_id = None
        if cuda_devices() > 0 and torch.cuda.is_available():
            self.device_id = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
        self.device = torch.device("cuda", self.device_id) if self.device_id is not None else torch.device("cpu")
        self.batches = 0
        self._pipe = None
        self._checkpoint: str | None = None

    def _start(self):
        seed = mix_seed(self.cfg.train.seed, self.rank, 0x64616C69) % (2**31 - 1)
        threads = max(1, self.cfg.data.num_workers or 1)

        def build(checkpoint=None):
            return _build_pipeline(
                self.paths, self.index_paths, self.recipes, self.batch_size, threads,
                self.device_id, seed, self.rank, self.world_size,
                shuffle_buffer=min(SHUFFLE_BUFFER, max(self.batch_size, self.num_samples)),
                interp="cubic" if self.device_id is not None else "linear", checkpoint=checkpoint,
                caption_labels=dali_caption_labels(self.fields))

        if self._checkpoint is not None and self.batches > 0:
            try:
                self._pipe = build(base64.b64decode(self._checkpoint))
                return
            except Exception as exc:  # DALI raises RuntimeError/ValueError for a foreign checkpoint
                log.warning("data: cannot restore the DALI checkpoint (%s); replaying %d batches instead",
                            exc, self.batches)
        self._pipe = build()
        for _ in range(self.batches):          # resume without a checkpoint: replay the consumed batches
            self._pipe.run()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._pipe is None:
            self._start()
        out = self._pipe.run()
        if self.device.type == "cpu":
            # DALI's threads already fill the cores: torch's own thread pool would only spin-wait
            # against them (measured on 2 cores: 97 images/s with 2 torch threads, 148 with 1).
            with torch_threads(1):
                return self._assemble(out)
        return self._assemble(out)

    def _assemble(self, out) -> dict:
        """The batch from one ``run()``'s outputs: photometric augmentation, captions, masks."""
        n_crops = len(self.recipes)
        G = self.cfg.data.n_global
        crops = [photometric(_to_torch(out[i], self.device), recipe,
                             np.random.default_rng(seed_words(self.cfg.train.seed, self.rank, self.batches, i,
                                                              0x70686F74)), self.cfg.data.pixel_norm)
                 for i, recipe in enumerate(self.recipes)]
        exts = self.fields.exts
        members = [_bytes(out[n_crops + 2 * j], out[n_crops + 2 * j + 1]) for j in range(len(exts))]
        captions = [self.fields.extract(dict(zip(exts, per_sample))) for per_sample in zip(*members)]
        sources = _bytes(out[n_crops + 2 * len(exts)], out[n_crops + 2 * len(exts) + 1])
        keys = [self._key(s.decode("utf-8", errors="surrogateescape")) for s in sources]
        B = len(keys)
        S = self.cfg.data.local_size
        global_crops = torch.cat(crops[:G])
        local_crops = torch.cat(crops[G:]) if n_crops > G else torch.zeros(0, 3, S, S, device=self.device)
        epoch = (self.batches * self.batch_size) // self.num_samples
        batch = assemble(None, captions, keys, [epoch] * B, n_global=G,
                         grid=self.cfg.data.global_size // self.cfg.vision.patch_size, cfg_data=self.cfg.data,
                         seed=self.cfg.train.seed, rank=self.rank, batch_index=self.batches,
                         tokenizer=self.tokenizer, pixels_ready=(global_crops, local_crops))
        self.batches += 1
        return batch

    def _key(self, source_info: str) -> str:
        shard, i = parse_dali_source(source_info)
        return self._keys[shard][i]

    def state_dict(self) -> dict:
        if self._pipe is not None:
            checkpoint = base64.b64encode(self._pipe.checkpoint()).decode("ascii")
        else:
            checkpoint = self._checkpoint
        return {"kind": self.kind, "batches": self.batches, "seed": self.cfg.train.seed, "rank": self.rank,
                "world_size": self.world_size, "num_samples": self.num_samples, "batch_size": self.batch_size,
                "dali_checkpoint": checkpoint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind", self.kind) != self.kind:
            log.warning("data: resuming a %s loader position with the %s loader; the batch sequence will differ",
                        state.get("kind"), self.kind)
        self.close()
        self.batches = int(state["batches"])
        same_stream = all(state.get(k) == v for k, v in (("seed", self.cfg.train.seed), ("rank", self.rank),
                                                          ("world_size", self.world_size),
                                                          ("batch_size", self.batch_size)))
        self._checkpoint = state.get("dali_checkpoint") if same_stream and state.get("kind") == self.kind else None

    def close(self) -> None:
        self._pipe = None
