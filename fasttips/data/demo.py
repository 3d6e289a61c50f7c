"""The embedded default data, made on first use without any download (a few seconds).

``ensure_demo_data(root=None)`` writes, once, under ``root`` (default: ``$FASTTIPS_DATA_DIR`` or
``~/.cache/fasttips``) a folder ``demo-v1/``::

    demo-v1/
      scenes/train/scenes-train-00000N.tar   procedural scenes for training
      scenes/eval/scenes-eval-000000.tar     held-out scenes (other seeds) for evaluation
      photos/photos-000000.tar               real photos shipped by scikit-image (if installed)
      classes.json                           {"classes": [...], "mask_member": "mask.png", ...}
      README.txt

Every scene sample is ``{key}.jpg`` + ``{key}.json`` (captions "alt" / "short" / "long" plus an
"objects" list) + ``{key}.mask.png``: an 8-bit single-channel PNG of the image's size whose pixel
values index ``classes.json["classes"]`` (0 = background). So zero-shot segmentation is scored by
reading the ``mask.png`` member of the eval shards and prompting with the class names;
``eval_samples()`` yields them decoded (image, class mask, captions, objects).
Photo samples carry the hand-written captions of ``assets/photos.json`` (credits and licences in
``assets/PHOTO_CREDITS.md``).
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from . import scenes
from .shards import MemberReader, ShardWriter, cache_dir, index_shards

log = logging.getLogger("fasttips.data")

VERSION = "demo-v1"
N_TRAIN, N_EVAL, PER_SHARD = 512, 128, 128
EVAL_SEED_BASE = 1_000_000        # eval scenes use seeds disjoint from the training ones
PHOTO_MAX_SIDE = 640


def _write_scenes(out: Path, split: str, seeds: range) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool, \
            ShardWriter(out, prefix=f"scenes-{split}", samples_per_shard=PER_SHARD) as writer:
        for seed, (jpg, png, meta) in zip(seeds, pool.map(scenes.make_scene, seeds)):
            writer.write(f"scene-{split}-{seed:07d}", jpg, "jpg", meta, extras={"mask.png": png})


def photo_entries() -> list[dict]:
    return json.loads(resources.files("fasttips.data").joinpath("assets/photos.json").read_text())


def _photo_jpeg(array: np.ndarray) -> bytes:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    img = Image.fromarray(array).convert("RGB")
    img.thumbnail((PHOTO_MAX_SIDE, PHOTO_MAX_SIDE), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_photos(out: Path) -> int:
    try:
        import skimage.data
    except ImportError:
        log.warning("scikit-image is not installed: the demo data has no real-photo set "
                    "(pip install scikit-image to add it)")
        print("fasttips: scikit-image not installed, skipping the real-photo demo set", flush=True)
        return 0
    n = 0
    with ShardWriter(out, prefix="photos", samples_per_shard=1000) as writer:
        for entry in photo_entries():
            loader = getattr(skimage.data, entry["loader"].rsplit(".", 1)[-1], None)
            try:
                array = loader()
            except Exception as exc:  # an optional image missing from this skimage version
                log.warning("demo photos: skipping %s (%s)", entry["name"], exc)
                continue
            captions = {k: entry[k] for k in ("alt", "short", "long")}
            writer.write(f"photo-{entry['name']}", _photo_jpeg(array), "jpg", captions)
            n += 1
    return n


def demo_dir(root: str | os.PathLike | None = None) -> Path:
    """Where the demo data lives (or will): ``root/demo-v1``, by default in the cache folder."""
    return (Path(root) if root is not None else cache_dir()) / VERSION


def demo_data_ready(root: str | os.PathLike | None = None) -> bool:
    """True when the demo data is already built (``classes.json`` is written last, then renamed in)."""
    return (demo_dir(root) / "classes.json").is_file()


def ensure_demo_data(root: str | os.PathLike | None = None) -> Path:
    """Create the demo data once (atomically; safe with several ranks) and return its folder."""
    target = demo_dir(root)
    base = target.parent
    if demo_data_ready(root):
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{VERSION}-", dir=base))
    try:
        _write_scenes(tmp / "scenes" / "train", "train", range(N_TRAIN))
        _write_scenes(tmp / "scenes" / "eval", "eval", range(EVAL_SEED_BASE, EVAL_SEED_BASE + N_EVAL))
        n_photos = _write_photos(tmp / "photos")
        (tmp / "README.txt").write_text(__doc__)
        (tmp / "classes.json").write_text(json.dumps({
            "classes": list(scenes.CLASSES), "mask_member": "mask.png",
            "mask_format": "8-bit PNG, pixel value = index into classes",
            "splits": {"train": N_TRAIN, "eval": N_EVAL}, "photos": n_photos}, indent=1))
        try:
            os.rename(tmp, target)
        except OSError:           # another process finished first: use its copy
            if not (target / "classes.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_shards(root: str | os.PathLike | None = None, split: str = "train") -> list[str]:
    """Shard paths of a split: "train" = training scenes + photos; "eval" = held-out scenes;
    "photos" = the real photos only."""
    d = ensure_demo_data(root)
    folders = {"train": [d / "scenes" / "train", d / "photos"], "eval": [d / "scenes" / "eval"],
               "photos": [d / "photos"]}
    if split not in folders:
        raise ValueError(f"demo split {split!r}: choose one of {list(folders)}")
    return sorted(str(p) for f in folders[split] if f.is_dir() for p in f.glob("*.tar"))


def eval_samples(root: str | os.PathLike | None = None, limit: int | None = None):
    """Held-out scenes for evaluation, decoded: dicts with ``key``, ``image`` (PIL RGB), ``mask``
    (uint8 [H, W], values index ``classes``), ``classes``, ``captions`` ({alt, short, long}) and
    ``objects`` (shape, color, size, position, class_id)."""
    d = ensure_demo_data(root)
    classes = json.loads((d / "classes.json").read_text())["classes"]
    reader = MemberReader()
    n = 0
    try:
        for ix in index_shards(demo_shards(root, "eval")):
            for s in ix.samples:
                if limit is not None and n >= limit:
                    return
                meta = json.loads(reader.read(s.shard, *s.caption))
                yield {"key": s.key, "image": Image.open(io.BytesIO(reader.image(s))).convert("RGB"),
                       "mask": np.array(Image.open(io.BytesIO(reader.extra(s, "mask.png")))),
                       "classes": classes, "objects": meta.get("objects", []),
                       "captions": {k: meta[k] for k in ("alt", "short", "long") if k in meta}}
                n += 1
    finally:
        reader.close()
