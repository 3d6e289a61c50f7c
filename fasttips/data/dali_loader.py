"""The NVIDIA DALI loader: the PyTorch loader's global sample stream, decoded and cropped in a DALI
graph; the photometric augmentation batched in torch on the same device.

What is read, and in which order, is decided in Python exactly as for the PyTorch loader
(``pipeline.py``): batch ``b`` of this rank holds the positions ``stream.batch_positions(b)`` of the
one global stream, and their encoded images are read from the local shards by byte range
(``shards.MemberReader``) and handed to the graph by an ``fn.external_source`` whose source is a
``Feed``. The crop boxes and flips are drawn in Python too, per sample, from ``crop_seed(train.seed, rank, position)`` with the
Pillow path's own ``augment.draw_crops`` on the size the Pillow loader decodes the image to
(``decode.decoded_size``, read from the header: a large JPEG counts at its reduced decoding scale);
the graph gets each box relative to the image (``fn.resize`` with ``roi_relative``) and the flip as a
per-sample ``mirror``. So both loaders take the same samples in the same order, with the same boxes;
their pixels differ only by the resampling filter and, for large JPEGs, by the decoding scale. The
graph itself holds no random state.

Where the feed runs: with ``data.num_workers`` > 0 the external source is parallel, and the feed runs
in that many processes that DALI starts before the graph is built (each computing whole batches,
ahead of the training loop): forked on the CPU, spawned where there is a CUDA context or the graph
decodes on the GPU (``worker_start_method``); with 0, in the main thread, inside ``run()``. The ``Feed`` is picklable and
keeps no state of the loader: batch ``b`` is ``first_batch + BatchInfo.iteration``, and what the
loader needs of it besides the crops (keys, epochs, captions, boxes, the samples passed over) comes
back as one more output, a JSON record per sample, so the loader reports each skipped sample once, in
batch order, from whichever process read it. ``close()`` drops the graph, which stops its threads
and worker processes (nothing holds the graph but the loader).

With a CUDA device (``nvidia.dali.backend.GetCUDADeviceCount() > 0``) images are decoded with
``device='mixed'`` (nvJPEG) and cropped on the GPU (``device_id`` = the local rank); without one the
same graph runs on the CPU (``device_id=None``, docs/data.md §1). Per crop the graph resizes the box
and flips it and returns uint8 CHW; ``photometric.py`` then applies jitter, grayscale, blur and
solarize with the recipe of ``augment.py`` to the whole batch, on the crops' device (DALI's CPU
operators are about 4× slower with per-sample random arguments; see that module), with draws seeded
per (train.seed, rank, batch, crop). Crops are resized bicubically on the GPU; on the CPU DALI uses
bilinear (about 15% less CPU per image in DALI's resampler; antialiased either way). Captions,
tokenization and iBOT masks are done in Python on the batch, with the same functions as the PyTorch
loader.

DALI stops on an image it cannot decode, so it needs indexes checked with ``data.validate=full``
(``loader.validation_level``). A sample that cannot be read at load time (its shard shrank or
vanished since indexing, no caption, an unreadable header) is replaced by a later sample of the
stream, counted and reported, as in the PyTorch loader.

Resuming: the position in the stream is the whole state (``pipeline.StreamLoader``): on the same layout
of ranks the batch counter gives the same batches again, and on another number of ranks or another
batch size ``resume_at`` continues at the global position with no sample of the epoch repeated or
skipped. A checkpoint of an earlier DALI loader (which kept a DALI pipeline checkpoint of its own
shuffled reader) resumes at its batch count; its pipeline checkpoint is ignored.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from fasttips.distributed.signals import ignore_stop_signals

from .augment import crop_recipes, draw_crops, min_decode_side
from .decode import decoded_size
from .photometric import photometric
from .pipeline import SampleStream, StreamLoader, assemble, count_skipped, crop_seed, seed_words
from .shards import MemberReader

log = logging.getLogger("fasttips.data")


def cuda_devices() -> int:
    from nvidia.dali import backend
    try:
        return int(backend.GetCUDADeviceCount())
    except Exception:
        return 0


def _build_pipeline(recipes, feed: Feed, batch_size: int, num_threads: int, device_id, workers: int,
                    interp: str = "cubic"):
    """The DALI graph: encoded images and, per crop, the relative box (start, end as [y, x]) and the
    flip, all from ``feed`` (one call per batch); out come the uint8 CHW crops and the feed's records.
    With ``workers`` > 0 the feed runs in that many worker processes (forked here, when the pipeline
    is built), each computing whole batches, ``workers`` batches ahead; with 0, in this thread."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    interp_type = {"cubic": types.INTERP_CUBIC, "linear": types.INTERP_LINEAR}[interp]
    parallel = {"parallel": True, "prefetch_queue_depth": max(2, workers)} if workers > 0 else {}
    start_method = worker_start_method(gpu)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0,
                  prefetch_queue_depth=2, py_num_workers=workers, py_start_method=start_method)
    def multicrop_pipeline():
        encoded, *geometry, records = fn.external_source(source=feed, num_outputs=feed.num_outputs, batch=True,
                                                         batch_info=True, **parallel)
        image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        crops = []
        for i, recipe in enumerate(recipes):
            start, end, mirror = geometry[3 * i: 3 * i + 3]
            crop = fn.resize(image, size=[recipe.size, recipe.size], roi_start=start, roi_end=end,
                             roi_relative=True, interp_type=interp_type, antialias=True)
            crops.append(fn.crop_mirror_normalize(crop, dtype=types.UINT8, output_layout="CHW", mirror=mirror))
        return (*crops, records)

    pipe = multicrop_pipeline()
    if workers > 0:
        pipe.start_py_workers()       # before build(), which may create a CUDA context (fork needs none yet)
    pipe.build()
    return pipe


def worker_start_method(gpu: bool) -> str:
    """How DALI starts the feed's worker processes: fork (cheap: the stream is inherited, not pickled)
    unless this process has, or the pipeline will create, a CUDA context, which a forked child cannot
    use (DALI refuses to fork then); spawn otherwise (``Feed`` pickles; each worker imports fasttips)."""
    return "spawn" if gpu or torch.cuda.is_initialized() else "fork"


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


@dataclass
class FedBatch:
    """What was handed to the graph for one batch, and what the batch needs besides the crops."""
    index: int
    keys: list[str]
    captions: list[dict]
    epochs: list[int]
    skipped: list[tuple[str, str, str, str]]
    sizes: list[tuple[int, int]]                               # the image sizes the boxes were drawn on
    boxes: list[list[tuple[int, int, int, int, bool]]]        # per sample, per crop: box and flip


def _pack(record) -> np.ndarray:
    return np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)


class Feed:
    """The graph's input: batch ``first_batch + info.iteration`` of the stream, read and drawn here.
    It holds no state of the loader's (DALI calls it with each batch's ``BatchInfo``), so it pickles
    into DALI's worker processes and runs there, or in the main thread with no workers. Besides the
    encoded images and the geometry, its last output is, per sample, the sample's record (key,
    epoch, captions, decoded size, boxes and flips, and the samples passed over for it) as JSON
    bytes: it reaches the loader with the batch, from whichever process read it."""

    def __init__(self, stream: SampleStream, recipes, min_side: int, first_batch: int):
        self.stream, self.recipes, self.min_side, self.first_batch = stream, recipes, min_side, first_batch
        self._reader: MemberReader | None = None
        self._owner = os.getpid()

    def __getstate__(self):
        return {**self.__dict__, "_reader": None}

    @property
    def num_outputs(self) -> int:
        return 2 + 3 * len(self.recipes)

    def _read(self, position: int, skipped: list):
        """(encoded image, captions, key, epoch, decoded size) of the sample at ``position``, or of the
        one standing in for it (``SampleStream.load_usable``, which appends each sample passed over to
        ``skipped``; a header that cannot be read counts as a corrupt image)."""
        (data, size), caps, key, epoch = self.stream.load_usable(
            self._reader, position, skipped, lambda data: (data, decoded_size(data, self.min_side)))
        return data, caps, key, epoch, size

    def __call__(self, info) -> tuple:
        if self._reader is None:
            if os.getpid() != self._owner:
                ignore_stop_signals()         # a worker outlives the process group's first stop signal
            self._reader = MemberReader()
        b = self.first_batch + info.iteration
        spec = self.stream.spec
        positions = self.stream.batch_positions(b)
        n, B = len(self.recipes), len(positions)
        encoded, records = [], []
        boxes = np.empty((n, B, 4), dtype=np.float32)    # per crop and sample: y0, x0, y1, x1
        flips = np.empty((n, B), dtype=np.int32)
        for j, position in enumerate(positions):
            skipped: list = []
            data, caps, key, epoch, (width, height) = self._read(position, skipped)
            rng = np.random.default_rng(crop_seed(spec.seed, spec.rank, position))
            draws = draw_crops(width, height, self.recipes, rng)
            encoded.append(np.frombuffer(data, dtype=np.uint8))
            for i, d in enumerate(draws):
                left, top, right, bottom = d.box
                boxes[i, j] = (top / height, left / width, bottom / height, right / width)
                flips[i, j] = d.flip
            records.append(_pack({"batch": b, "key": key, "epoch": epoch, "captions": caps,
                                  "size": [width, height], "boxes": [[*d.box, d.flip] for d in draws],
                                  "skipped": skipped}))
        # dense arrays (one per graph input, the batch first) cost DALI far less to take than lists
        geometry = [part for i in range(n) for part in (np.ascontiguousarray(boxes[i, :, :2]),
                                                          np.ascontiguousarray(boxes[i, :, 2:]), flips[i])]
        return (encoded, *geometry, records)

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()


def unpack_fed(records) -> FedBatch:
    """The loader's side of ``Feed``'s last output: the batch's records, in sample order."""
    fed = None
    for j in range(len(records)):
        r = json.loads(np.asarray(records[j]).tobytes())
        if fed is None:
            fed = FedBatch(r["batch"], [], [], [], [], [], [])
        fed.keys.append(r["key"]), fed.captions.append(r["captions"]), fed.epochs.append(r["epoch"])
        fed.skipped += [tuple(s) for s in r["skipped"]]
        fed.sizes.append(tuple(r["size"]))
        fed.boxes.append([(*box[:4], bool(box[4])) for box in r["boxes"]])
    return fed


class DaliLoader(StreamLoader):
    kind = "dali"

    def __init__(self, cfg, rank: int, world_size: int, samples, tokenizer, stats: dict):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.tokenizer, self.stats = tokenizer, stats
        self.batch_size = cfg.data.batch_size
        self.samples = samples
        self.stream = self._stream(start=0, first_batch=0)
        self.batches = 0              # batches handed out so far
        self.recipes = crop_recipes(cfg.data.global_size, cfg.data.n_global, cfg.data.global_scale,
                                    cfg.data.local_size, cfg.data.n_local, cfg.data.local_scale)
        self.min_side = min_decode_side(self.recipes)             # as the Pillow loader decodes
        self.device_id = None
        if cuda_devices() > 0 and torch.cuda.is_available():
            self.device_id = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
        self.device = torch.device("cuda", self.device_id) if self.device_id is not None else torch.device("cpu")
        self.last_fed: FedBatch | None = None         # the batch handed out last (its boxes: for the tests)
        self._pipe = None
        self._feed: Feed | None = None

    def _start(self):
        workers = max(0, int(self.cfg.data.num_workers or 0))
        self._feed = Feed(self.stream, self.recipes, self.min_side, first_batch=self.batches)
        self._pipe = _build_pipeline(self.recipes, self._feed, self.batch_size, max(1, workers), self.device_id,
                                     workers, interp="cubic" if self.device_id is not None else "linear")

    def __next__(self) -> dict:
        if self._pipe is None:
            self._start()
        out = self._pipe.run()
        fed = unpack_fed(out[len(self.recipes)])
        assert fed.index == self.batches, f"loader out of order: got batch {fed.index}, expected {self.batches}"
        if self.device.type == "cpu":
            # DALI's threads already fill the cores: torch's own thread pool would only spin-wait
            # against them (measured on 2 cores: 97 images/s with 2 torch threads, 148 with 1).
            with torch_threads(1):
                batch = self._assemble(out, fed)
        else:
            batch = self._assemble(out, fed)
        count_skipped(self.stats, fed.skipped)
        self.last_fed = fed
        self.batches += 1
        return batch

    def _assemble(self, out, fed: FedBatch) -> dict:
        """The batch from one ``run()``'s crops and its fed samples: photometric augmentation, captions, masks."""
        G = self.cfg.data.n_global
        crops = [photometric(_to_torch(out[i], self.device), recipe,
                             np.random.default_rng(seed_words(self.cfg.train.seed, self.rank, self.batches, i,
                                                              0x70686F74)), self.cfg.data.pixel_norm)
                 for i, recipe in enumerate(self.recipes)]
        S = self.cfg.data.local_size
        global_crops = torch.cat(crops[:G])
        local_crops = torch.cat(crops[G:]) if len(crops) > G else torch.zeros(0, 3, S, S, device=self.device)
        return assemble(None, fed.captions, fed.keys, fed.epochs, n_global=G,
                        grid=self.cfg.data.global_size // self.cfg.vision.patch_size, cfg_data=self.cfg.data,
                        seed=self.cfg.train.seed, rank=self.rank, batch_index=self.batches,
                        tokenizer=self.tokenizer, pixels_ready=(global_crops, local_crops))

    def close(self) -> None:
        self._pipe = None             # (its last reference: DALI stops its threads and worker processes)
        feed, self._feed = self._feed, None
        if feed is not None:
            feed.close()
