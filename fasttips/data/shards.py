"""WebDataset tar shards: writing, indexing (with validation) and reading samples by offset.

A sample is a group of tar members sharing a key (the member name up to the first dot):
``{key}.jpg`` (or ``.jpeg`` / ``.png``) plus ``{key}.json`` holding captions by granularity
(``{"alt": ..., "short": ..., "long": ...}``, any non-empty subset), or captions in other members
and fields as ``data.caption_fields`` maps them (``caption_fields.py``). Other members of a sample
(for example the demo's ``{key}.mask.png``) are kept in the index as extras and otherwise ignored.
A key that comes back later in the shard with a member it already has (a second ``{key}.jpg``) is
a second sample with that key: the first complete one (an image and a caption) is kept, the others
are left out and counted as ``duplicate_key``, in both loaders and in ``data check``.

Every shard gets a checked index before it is read (``index_shard``): the tar is scanned once,
each sample is checked (an image member, a caption as ``caption_fields`` reads it), and bad samples
are left out and counted by reason (``SKIP_REASONS``). The image check is ``full`` (decode every
image: what the DALI loader needs, since one corrupt image stops its pipeline; ``data check``) or
``header`` (``image_header_ok``: format, header and container structure, no pixel decoding; a bad
image that passes it is skipped and counted by the PyTorch loader when met). A damaged tar keeps its
intact samples: a bad header is skipped to the next valid one, a shard cut off mid-way keeps
everything before the cut.

The index is built once and shared: it lives in ``data.index_dir`` (default
``$FASTTIPS_DATA_DIR/index`` or ``~/.cache/fasttips/index``; never in the shards' folder, which is the
user's), named after the shard's path or URL *and* its fingerprint (size + mtime, or ETag), so a
rewritten shard gets a new index and a stale one is never read. Files are written to a temporary
name and renamed, so ranks indexing concurrently never see half a file; ``index_shards`` starts each
rank at a different place in the list, so the ranks of a first run share the work (and a shard two
ranks both index is just written twice, identically). A DALI index (``.idx``, wds2idx's format
v1.2) listing only the good samples is written beside it, for DALI's own ``fn.readers.webdataset``
(the DALI loader no longer reads it: it takes the same byte ranges from the JSON index as the PyTorch
loader). Its members are named by sample number, not by key (the format is space-separated and DALI's
``source_info`` is ':'-separated; keys may hold both).
In memory, an index holds its samples packed, one ``sample_table.PackedSamples`` per shard (about 50
bytes a sample instead of about 700 as a list of ``Sample``); the file keeps the JSON form.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import tarfile
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from fasttips.safe_io import write_atomic

from . import storage
from .caption_fields import CAPTION_KINDS, DEFAULT, CaptionFields
from .decode import container_ok
from .sample_table import CAPTION_EXT, PackedSamples, Sample

log = logging.getLogger("fasttips.data")

IMAGE_EXTS = ("jpg", "jpeg", "png")
INDEX_VERSION = 5            # 2: captions are the CAPTION_KINDS fields only; 3: damaged tars, DALI names,
                             # caption members per data.caption_fields; 4: in the cache, keyed by fingerprint,
                             # with the validation level; 5: duplicate keys counted, the first complete kept
VALIDATION = ("header", "full")   # image checks, cheapest first (a full index also serves a header request)
VALIDATE_CHUNK = 256         # images decoded per batch while indexing
REMOTE_THREADS = 8           # remote shards indexed at once (index_shards)
MAX_OPEN_SHARDS = 64        # local shard files a MemberReader keeps open (least recently used closed first)
MAX_SKIPPED_KEYS = 1000      # skipped keys remembered per shard (with their reason), for `data check`
# corrupt_image: does not decode; missing_caption: no .json or no usable caption in it; non_image_member:
# a group of members without an image; damaged_sample: a sample left incomplete by damage in the tar;
# damaged_tar: places where a tar is damaged (a bad header, or cut off); unreadable_shard: nothing readable.
# duplicate_key: another sample of the shard has the same key (the first complete one is kept: _pick_duplicates).
SKIP_REASONS = ("corrupt_image", "missing_caption", "non_image_member", "damaged_sample", "damaged_tar",
                "unreadable_shard", "duplicate_key")


def split_name(name: str) -> tuple[str, str]:
    """``dir/abc.mask.png`` -> (``dir/abc``, ``mask.png``): key up to the first dot of the basename."""
    head, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(head, stem) if head else stem), ext.lower() if dot else ""


def cache_dir() -> Path:
    return Path(os.environ.get("FASTTIPS_DATA_DIR") or Path.home() / ".cache" / "fasttips")


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
class ShardWriter:
    """Writes samples into ``{prefix}-{n:06d}.tar`` files of at most ``samples_per_shard`` samples."""

    def __init__(self, out_dir: str | Path, prefix: str = "shard", samples_per_shard: int = 1000):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.per_shard = prefix, samples_per_shard
        self.paths: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0   # mtime 0: byte-identical reruns
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, image: bytes, image_ext: str, captions: dict[str, str],
              extras: dict[str, bytes] | None = None) -> None:
        if "." in os.path.basename(key):
            raise ValueError(f"sample key {key!r} must not contain a dot (the extension starts there)")
        if image_ext not in IMAGE_EXTS:
            raise ValueError(f"image_ext {image_ext!r}: allowed {list(IMAGE_EXTS)}")
        if self._tar is None or self._in_shard >= self.per_shard:
            self._next_shard()
        self._add(f"{key}.{image_ext}", image)
        self._add(f"{key}.{CAPTION_EXT}", json.dumps(captions, ensure_ascii=False).encode())
        for ext, data in (extras or {}).items():
            self._add(f"{key}.{ext}", data)
        self._in_shard += 1

    def _next_shard(self) -> None:
        self._close_tar()
        path = self.out_dir / f"{self.prefix}-{len(self.paths):06d}.tar"
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self.paths.append(path)
        self._in_shard = 0

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def close(self) -> list[Path]:
        self._close_tar()
        return self.paths

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------
# Finding shards
# ----------------------------------------------------------------------------------------------
def list_shards(path: str | os.PathLike | list, what: str = "data.path") -> list[str]:
    """Sorted .tar files of a folder (recursive), a glob, a single file, or a list of those.

    Fails with a message naming ``what`` when nothing is there, so a typo stops the run at start.
    """
    items = path if isinstance(path, (list, tuple)) else [path]
    if not items or all(not str(p) for p in items):
        raise FileNotFoundError(f"{what} is empty: give a folder of .tar shards, a glob or a .tar file")
    found: list[str] = []
    remote: list[str] = []
    for item in items:
        p = storage.local_path(str(item))
        if storage.is_url(p):
            remote += storage.list_remote(p)
            continue
        if os.path.isdir(p):
            found += glob.glob(os.path.join(p, "**", "*.tar"), recursive=True)
        elif any(ch in p for ch in "*?["):
            found += [f for f in glob.glob(p, recursive=True) if f.endswith(".tar")]
        elif os.path.exists(p):
            found.append(p)
        else:
            raise FileNotFoundError(f"{what}={p!r} does not exist (expected a folder of .tar shards, "
                                    "a glob such as 'shards/*.tar', or a .tar file)")
    found = sorted(set(os.path.abspath(f) for f in found)) + sorted(set(remote))
    if not found:
        raise FileNotFoundError(f"{what}={path!r} holds no .tar shards")
    return found


# ----------------------------------------------------------------------------------------------
# Indexing and validation
# ----------------------------------------------------------------------------------------------
@dataclass
class ShardIndex:
    shard: str
    samples: Sequence[Sample]               # a PackedSamples (sample_table.py): read-only, Samples on demand
    skipped: dict[str, int]
    dali_index: str | None = None           # path of the wds2idx-format index of the good samples
    skipped_keys: list[tuple[str, str]] = field(default_factory=list)   # (key, reason), up to MAX_SKIPPED_KEYS
    validation: str = "full"                # the image check the samples passed (VALIDATION)
    fingerprint: list | None = None         # the shard's fingerprint when indexed (None: not a file)


def parse_captions(data: bytes) -> dict[str, str]:
    """The non-empty string captions (keys ``CAPTION_KINDS``) of a .json member; other fields are
    ignored, and a member that is not a JSON object, or holds none of them, gives {}."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(obj, dict):
        return {}
    return {k: obj[k].strip() for k in CAPTION_KINDS if isinstance(obj.get(k), str) and obj[k].strip()}


def _member_ranges(members: dict[str, tuple[int, int]], exts) -> dict[str, tuple[int, int]]:
    return {e: members[e] for e in exts if e in members}


def image_is_valid(data: bytes) -> bool:
    """Decode the whole image (at reduced scale for JPEG, which still reads every entropy-coded byte)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in ("JPEG", "PNG"):
                return False
            if not container_ok(im.format, data):          # DALI would refuse it (decode.py)
                return False
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        return True
    except Exception:  # PIL raises many types for broken files (OSError, SyntaxError, ValueError...)
        return False


def image_header_ok(data: bytes) -> bool:
    """The cheap check (``validate=header``): Pillow recognises a JPEG or PNG header with a non-empty
    size, and the container is well formed (``decode.container_ok``: a JPEG's marker segments up to the
    scan, a PNG's chunk layout and CRCs up to IEND, so a cut-off or bit-flipped PNG fails). It does not
    decode pixels, so a JPEG damaged or cut off inside its compressed data passes; the PyTorch loader
    skips and counts such an image when it meets it (the DALI loader would stop: it gets ``full``)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in ("JPEG", "PNG") or im.width < 1 or im.height < 1:
                return False
            return container_ok(im.format, data)
    except Exception:  # PIL raises many types for broken files
        return False


def index_root(index_dir: str | os.PathLike = "") -> Path:
    """Where indexes are kept: ``data.index_dir``, else the cache's ``index`` folder."""
    return Path(index_dir) if str(index_dir) else cache_dir() / "index"


def index_paths(shard: str, stamp, index_dir: str | os.PathLike = "") -> tuple[Path, Path]:
    """(json index, DALI .idx) of a shard at its current fingerprint ``stamp``, in ``index_root``."""
    digest = hashlib.sha1(f"{shard}|{json.dumps(stamp)}".encode()).hexdigest()[:20]
    stem = os.path.basename(shard.rstrip("/")).split(".tar")[0][:60] or "shard"
    base = index_root(index_dir) / f"{stem}-{digest}"
    return base.with_name(base.name + ".index.json"), base.with_name(base.name + ".idx")


def fingerprint(shard: str) -> list:
    """A cheap content fingerprint: [size, mtime in ns] of a file, [size, ETag or the like] of a URL
    (``storage.fingerprint``); a rewrite changes it."""
    if storage.is_url(shard):
        return storage.fingerprint(shard)
    st = os.stat(shard)
    return [st.st_size, st.st_mtime_ns]


def _open(shard: str, size: int):
    return storage.open_shard(shard, size) if storage.is_url(shard) else open(shard, "rb")


def _size(shard: str) -> int:
    return fingerprint(shard)[0] if storage.is_url(shard) else os.path.getsize(shard)


def _zero_bytes(f, start: int, stop: int) -> bool:
    """True when bytes [start, stop) of the open file are all zero (tar padding, end-of-archive)."""
    f.seek(start)
    left = stop - start
    while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False
        left -= len(chunk)
    return True


def _tar_members(shard: str, file_size: int | None = None) -> tuple[list[tuple[str, dict[str, tuple[int, int]]]], set[int], int]:
    """(samples as (key, members by extension) in tar order, indexes of the samples next to damage,
    damaged places) of a tar.

    A key normally names one sample, whatever the order of its members. A member whose key already
    holds that extension (a second ``key.jpg``) starts another sample with the same key: ``_scan``
    keeps one of them (``_pick_duplicates``) and counts the others as ``duplicate_key``, so nothing is
    overwritten unseen.

    Damage does not lose the rest of the shard: a header that fails its checksum is skipped block by
    block to the next valid one (``ignore_zeros``), and a shard cut off mid-member keeps every member
    before the cut. The samples on either side of a damaged place are remembered, so the ones left
    incomplete are counted as ``damaged_sample`` rather than as a missing image or caption.
    Raises ``tarfile.ReadError`` when nothing in the file is a readable member.
    """
    file_size = _size(shard) if file_size is None else file_size
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    latest: dict[str, dict[str, tuple[int, int]]] = {}   # key -> the members of its latest sample
    near_damage: set[int] = set()
    damaged = 0
    after_damage = False                            # the next member follows a damaged place
    expected = 0                                    # where the next header should start
    # ``raw`` is a second handle for looking at gaps, so tarfile's own file position is left alone
    with _open(shard, file_size) as raw, _open(shard, file_size) as f, \
            tarfile.open(fileobj=f, mode="r:", ignore_zeros=True) as tar:
        while True:
            try:
                m = tar.next()
            except storage.RemoteError:
                raise                                        # the network, not the shard (storage.py)
            except (tarfile.ReadError, EOFError, OSError):   # cut off inside a member's data
                m, cut = None, True
            else:
                cut = False
            if m is not None and m.offset > expected and not _zero_bytes(raw, expected, m.offset):
                damaged += 1                                 # skipped over a damaged header
                if samples:
                    near_damage.add(len(samples) - 1)
                after_damage = True
            if m is None:
                # cut off (mid-member, or exactly between members: a tar ends with zero blocks), or
                # garbage after the last member
                if cut or expected >= file_size or not _zero_bytes(raw, expected, file_size):
                    damaged += 1
                    if samples:
                        near_damage.add(len(samples) - 1)
                break
            expected = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if not m.isfile():
                continue
            key, ext = split_name(m.name)
            members = latest.get(key)
            if members is None or ext in members:            # a new key, or this key once more
                members = latest[key] = {}
                samples.append((key, members))
            if after_damage:
                near_damage.add(len(samples) - 1)
                after_damage = False
            if m.offset_data + m.size > file_size:          # the member's data runs past the end
                damaged += 1
                near_damage.add(len(samples) - 1)
                break
            members[ext] = (m.offset_data, m.size)
    if not any(members for _, members in samples):
        raise tarfile.ReadError("no readable member" + (f" ({damaged} damaged place(s))" if damaged else ""))
    return samples, near_damage, damaged


def _pick_duplicates(samples: list[tuple[str, dict]], fields: CaptionFields) -> list[bool]:
    """Which of ``samples`` (``_tar_members``) to keep when a key appears more than once in a shard:
    the first one with an image member and a caption member (the first one, when none has both). The
    rule is the same for every loader and ``data check``; the others are counted as ``duplicate_key``."""
    def complete(members) -> bool:
        return any(e in members for e in IMAGE_EXTS) and bool(_member_ranges(members, fields.exts))
    chosen: dict[str, int] = {}
    for i, (key, members) in enumerate(samples):
        if key not in chosen or (complete(members) and not complete(samples[chosen[key]][1])):
            chosen[key] = i
    return [chosen[key] == i for i, (key, _) in enumerate(samples)]


def _scan(shard: str, fields: CaptionFields = DEFAULT, skipped_keys: list | None = None,
          validate: str = "full") -> tuple[list[Sample], dict[str, int]]:
    """(good samples, skip counts by reason) of a shard; ``skipped_keys`` (if given) receives
    (key, reason) of the first MAX_SKIPPED_KEYS skipped samples. ``validate``: the image check
    (``full`` decodes, ``header`` is ``image_header_ok``)."""
    if validate not in VALIDATION:
        raise ValueError(f"validate={validate!r}: allowed {list(VALIDATION)}")
    check = image_is_valid if validate == "full" else image_header_ok
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    keys_out = skipped_keys if skipped_keys is not None else []

    def skip(key: str, reason: str) -> None:
        skipped[reason] += 1
        if len(keys_out) < MAX_SKIPPED_KEYS:
            keys_out.append((key, reason))
    try:
        size = _size(shard)                          # (one metadata request for a remote shard)
        members_of, near_damage, damaged = _tar_members(shard, size)
    except (OSError, tarfile.TarError, EOFError) as exc:
        if isinstance(exc, storage.RemoteError):
            raise                                        # a 404, refused access or an outage: not cached
        log.warning("skipping unreadable shard %s (%s)", shard, exc)
        skipped["unreadable_shard"] = 1
        return [], skipped
    if damaged:
        log.warning("shard %s is damaged in %d place(s); its intact samples are kept", shard, damaged)
    skipped["damaged_tar"] = damaged
    keep = _pick_duplicates(members_of, fields)
    if not all(keep):
        log.warning("shard %s holds %d sample(s) whose key another sample already has; the first complete "
                    "sample of each key is kept, the others are skipped (duplicate_key)", shard, keep.count(False))
    samples = []
    pool = None
    try:
        with _open(shard, size) as f:
            def read(off_size):
                f.seek(off_size[0])
                return f.read(off_size[1])

            def check_chunk(chunk, images):
                nonlocal pool
                if validate == "full" and len(images) > 8 and pool is None:
                    pool = ThreadPoolExecutor(max_workers=2)     # PIL releases the GIL while decoding
                # (the header check is too cheap to pay for threads: starting them cost more than it saved)
                for (key, image_ext, members), ok in zip(chunk, (pool.map if pool is not None else map)(check, images)):
                    if not ok:
                        skip(key, "corrupt_image")
                        continue
                    texts = _member_ranges(members, fields.exts)
                    extras = {e: members[e] for e in members if e != image_ext and e not in texts}
                    samples.append(Sample(shard, key, (image_ext, *members[image_ext]), texts, extras, fields))

            # one pass in tar order (a remote shard is read front to back), checking VALIDATE_CHUNK images at a
            # time, so only that many encoded images are held at once (shards can be GBs)
            chunk, images = [], []
            for i, (key, members) in enumerate(members_of):
                if not keep[i]:
                    skip(key, "duplicate_key")
                    continue
                image_ext = next((e for e in IMAGE_EXTS if e in members), None)
                texts = _member_ranges(members, fields.exts)
                if image_ext is None or not texts:
                    skip(key, "damaged_sample" if i in near_damage else
                         "non_image_member" if image_ext is None else "missing_caption")
                    continue
                # members in file order: the image and the caption members are usually neighbours
                ranges = sorted([(e, r) for e, r in texts.items()] + [(image_ext, members[image_ext])],
                                key=lambda er: er[1][0])
                data = {e: read(r) for e, r in ranges}
                if not fields.extract({e: data[e] for e in texts}):
                    skip(key, "missing_caption")
                    continue
                chunk.append((key, image_ext, members))
                images.append(data[image_ext])
                if len(chunk) >= VALIDATE_CHUNK:
                    check_chunk(chunk, images)
                    chunk, images = [], []
            check_chunk(chunk, images)
    finally:
        if pool is not None:
            pool.shutdown()
    return samples, skipped


def dali_member_name(i: int, ext: str) -> str:
    """The name of the ``i``-th good sample's member in the DALI index. Not the real key: DALI's index
    is space-separated and its ``source_info`` is ``path:offset:name``, so a key with a space or a ':'
    would break one or the other. The loader maps ``i`` back to the key (``ShardIndex.samples[i]``)."""
    return f"{i}.{ext}"


def dali_caption_labels(fields: CaptionFields) -> list[str]:
    """The DALI index's component names of the caption members, in ``fields.exts`` order."""
    return [f"cap{j}" for j in range(len(fields.exts))]


def _write_dali_index(path: Path, samples: list[Sample], fields: CaptionFields = DEFAULT) -> None:
    """wds2idx format v1.2: one line per sample, ``ext offset size name`` per component: ``img``, then
    ``cap0``, ``cap1``... for the caption members the sample has (``dali_caption_labels``)."""
    lines = [f"v1.2 {len(samples)}"]
    labels = dict(zip(fields.exts, dali_caption_labels(fields)))
    for i, s in enumerate(samples):
        ext, off, size = s.image
        parts = [f"img {off} {size} {dali_member_name(i, ext)}"]
        parts += [f"{labels[e]} {s.texts[e][0]} {s.texts[e][1]} {dali_member_name(i, e)}"
                  for e in fields.exts if e in s.texts]
        lines.append(" ".join(parts))
    write_atomic(path, ("\n".join(lines) + "\n").encode())   # another rank's DALI reader may be reading this file


def parse_dali_source(source_info: str) -> tuple[str, int]:
    """(shard path, sample number) from DALI's ``source_info`` (``path:offset:name``) of a member
    named by ``dali_member_name``; the path itself may hold ':'."""
    path, _offset, name = source_info.rsplit(":", 2)
    return path, int(name.split(".", 1)[0])




def _load_index(json_path: Path, dali_path: Path | None, shard: str, stamp, fields: CaptionFields,
                validate: str) -> ShardIndex | None:
    """The cached index if it is complete and answers this request (same fingerprint and caption
    mapping, validated at least as strictly), else None."""
    try:
        d = json.loads(json_path.read_text())
        if not (d.get("version") == INDEX_VERSION and d.get("fingerprint") == stamp
                and d.get("caption_fields") == fields.spec and d.get("shard") == shard
                and VALIDATION.index(d.get("validation")) >= VALIDATION.index(validate)):
            return None
        samples = [Sample(shard, s["key"], tuple(s["image"]), {k: tuple(v) for k, v in s["texts"].items()},
                          {k: tuple(v) for k, v in s.get("extras", {}).items()}, fields)
                   for s in d["samples"]]
        skipped, validation = d["skipped"], d["validation"]
        skipped_keys = [tuple(k) for k in d.get("skipped_keys", [])]
        del d                                            # (the parsed file: freed before the samples are packed)
        if dali_path is not None and not dali_path.is_file():
            _write_dali_index(dali_path, samples, fields)
        return ShardIndex(shard, PackedSamples.from_samples(samples, shard, fields), skipped,
                          str(dali_path) if dali_path else None, skipped_keys, validation, stamp)
    except (OSError, ValueError, KeyError, TypeError):
        return None                                      # missing or damaged: (re)built by the caller


def index_shard(shard: str, rebuild: bool = False, fields: CaptionFields = DEFAULT, validate: str = "full",
                index_dir: str | os.PathLike = "") -> ShardIndex:
    """The index of one shard (module docstring), built on first use and kept in ``index_root`` until
    the shard or the caption mapping (``fields``) changes. ``validate``: ``full`` (decode every image)
    or ``header`` (``image_header_ok``); a cached ``full`` index answers a ``header`` request."""
    if validate not in VALIDATION:
        raise ValueError(f"validate={validate!r}: allowed {list(VALIDATION)}")
    remote = storage.is_url(shard)
    shard = shard if remote else os.path.abspath(shard)
    if remote:
        stamp = fingerprint(shard)                       # a 404 / refused access stops here, naming the URL
    else:
        stamp = fingerprint(shard) if os.path.isfile(shard) else None
    if stamp is not None:
        json_path, dali_path = index_paths(shard, stamp, index_dir)
        dali_path = None if remote else dali_path        # DALI reads local files only (storage.py)
        if not rebuild:
            cached = _load_index(json_path, dali_path, shard, stamp, fields, validate)
            if cached is not None:
                return cached
    skipped_keys: list[tuple[str, str]] = []
    samples, skipped = _scan(shard, fields, skipped_keys, validate)
    if stamp is None:                                    # not a file: nothing to cache
        return ShardIndex(shard, PackedSamples.from_samples(samples, shard, fields), skipped, None, skipped_keys,
                          validate)
    try:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        if dali_path is not None:
            _write_dali_index(dali_path, samples, fields)
        payload = {"version": INDEX_VERSION, "shard": shard, "fingerprint": stamp, "validation": validate,
                   "caption_fields": fields.spec, "skipped": skipped,
                   "skipped_keys": [list(k) for k in skipped_keys],
                   "samples": [{"key": s.key, "image": list(s.image),
                                "texts": {k: list(v) for k, v in s.texts.items()},
                                "extras": {k: list(v) for k, v in s.extras.items()}} for s in samples]}
        write_atomic(json_path, json.dumps(payload).encode())
    except OSError as exc:
        raise OSError(f"cannot write the shard index in {json_path.parent} ({exc.strerror or exc}); set "
                      "data.index_dir (or FASTTIPS_DATA_DIR) to a writable folder") from None
    return ShardIndex(shard, PackedSamples.from_samples(samples, shard, fields), skipped,
                      str(dali_path) if dali_path else None, skipped_keys, validate, stamp)


def index_shards(shards: list[str], fields: CaptionFields = DEFAULT, validate: str = "full",
                 index_dir: str | os.PathLike = "", rank: int = 0, world_size: int = 1,
                 progress=None) -> list[ShardIndex]:
    """The indexes of ``shards`` (in their order). Rank ``r`` of ``world_size`` works through the list
    starting at ``r / world_size`` of the way in, so on a first run the ranks build different shards'
    indexes and then find the others' in the shared ``index_dir`` (no collective needed; a shard two
    ranks build at once is written twice, atomically and identically). ``progress(done, total)`` is
    called after each shard. Remote shards are indexed by ``REMOTE_THREADS`` threads (the time is
    spent waiting on the network)."""
    n = len(shards)
    start = (n * rank) // world_size if world_size > 0 else 0
    order = list(range(start, n)) + list(range(start))
    out: list[ShardIndex | None] = [None] * n

    def build(i: int) -> ShardIndex:
        return index_shard(shards[i], fields=fields, validate=validate, index_dir=index_dir)
    threads = min(REMOTE_THREADS, n) if any(storage.is_url(s) for s in shards) else 1
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            results = pool.map(build, order)
            for done, (i, ix) in enumerate(zip(order, results), 1):
                out[i] = ix
                if progress is not None:
                    progress(done, n)
        return out
    for done, i in enumerate(order, 1):
        out[i] = build(i)
        if progress is not None:
            progress(done, n)
    return out


def total_skipped(indexes: list[ShardIndex]) -> dict[str, int]:
    out = dict.fromkeys(SKIP_REASONS, 0)
    for ix in indexes:
        for k, v in ix.skipped.items():
            out[k] = out.get(k, 0) + v
    return out


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
class MemberReader:
    """Reads byte ranges from shards (one reader per worker process), keeping the ``max_open`` local
    files it used last open: a shuffled epoch over thousands of local shards touches them all, and an
    open file each would run into the process's limit (``ulimit -n``, often 1024).

    ``outage_deadline_s`` (training): a remote read whose retries are spent is tried again for up to
    that long, then raises ``storage.RemoteOutage`` (refused access: ``storage.AccessLost``, at once;
    ``storage.through_outage``); None: it raises at
    once (start-up and tools, which stop with the message)."""

    def __init__(self, outage_deadline_s: float | None = None, max_open: int = MAX_OPEN_SHARDS):
        if max_open < 1:
            raise ValueError(f"max_open={max_open} must be >= 1")
        self._files: OrderedDict[str, io.BufferedReader] = OrderedDict()   # least recently used first
        self.outage_deadline_s = outage_deadline_s
        self.max_open = max_open

    def read(self, shard: str, offset: int, size: int) -> bytes:
        if storage.is_url(shard):                    # one ranged request, retried (storage.py)
            if self.outage_deadline_s is None:
                return storage.read_range(shard, offset, size)
            return storage.through_outage(shard, lambda: storage.read_range(shard, offset, size),
                                          self.outage_deadline_s)
        f = self._files.get(shard)
        if f is None:
            if len(self._files) >= self.max_open:
                self._files.popitem(last=False)[1].close()
            f = self._files[shard] = open(shard, "rb")
        else:
            self._files.move_to_end(shard)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{shard}: short read at offset {offset} ({len(data)} of {size} bytes)")
        return data

    def image(self, s: Sample) -> bytes:
        return self.read(s.shard, s.image[1], s.image[2])

    def captions(self, s: Sample) -> dict[str, str]:
        return s.fields.extract({e: self.read(s.shard, *r) for e, r in s.texts.items()})

    def extra(self, s: Sample, ext: str) -> bytes:
        return self.read(s.shard, *s.extras[ext])

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __getstate__(self):          # open files do not pickle into worker processes
        return {"_files": OrderedDict(), "outage_deadline_s": self.outage_deadline_s, "max_open": self.max_open}


def rank_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, non-overlapping [start, stop) of n samples for a rank (DALI's shard_id/num_shards)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    return (n * rank) // world_size, (n * (rank + 1)) // world_size
