"""The in-memory form of the shard index: where each good sample's members lie, packed into columns.

A ``Sample`` (one dataclass with a tuple and two dicts) costs about 700 bytes of Python objects; a
training set of 100 M samples would take tens of GB per process, and every forked DataLoader worker
copies the pages whose reference counts it touches, so each worker would copy all of it. So an index
keeps its samples in a ``PackedSamples`` table per shard (numpy columns and one bytes blob of keys,
about 60 bytes a sample, and no per-sample Python object), which builds a ``Sample`` only when one is
asked for, equal to the one it was packed from. ``ConcatSamples`` chains the tables of many shards
into one sequence (the loader's epoch) without listing their samples. The index file on disk is not
affected (``shards.index_shard`` writes it from the ``Sample`` list before packing).
"""
from __future__ import annotations

import bisect
import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .caption_fields import DEFAULT, CaptionFields

CAPTION_EXT = "json"         # the caption member ShardWriter writes (the default caption_fields read it)
_KEY_ERRORS = "surrogatepass"    # any str key round-trips (tar names may hold undecodable bytes)


@dataclass
class Sample:
    """Where one good sample lives: byte ranges (offset, size) of its members in the tar."""
    shard: str
    key: str
    image: tuple[str, int, int]             # (ext, offset, size)
    texts: dict[str, tuple[int, int]]       # the caption members (extension -> range), see caption_fields
    extras: dict[str, tuple[int, int]] = field(default_factory=dict)
    fields: CaptionFields = DEFAULT         # how the captions are read from ``texts``

    @property
    def caption(self) -> tuple[int, int]:
        """The .json member (e.g. for its other fields, such as the demo's "objects")."""
        return self.texts[CAPTION_EXT] if CAPTION_EXT in self.texts else self.extras[CAPTION_EXT]


def _index(i, n: int) -> int:
    """``i`` as a position in [0, n), negative counting from the end (IndexError outside)."""
    i = operator.index(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"sample index {i} out of range for {n} samples")
    return i


def _ranges(samples: Sequence[Sample], attr: str) -> tuple[tuple[str, ...], np.ndarray]:
    """(member extensions in first-seen order, int64 [n, len(exts), 2] of (offset, size), -1 where a
    sample has no such member) of the ``texts`` or ``extras`` of ``samples``."""
    exts: dict[str, int] = {}
    for s in samples:
        for e in getattr(s, attr):
            exts.setdefault(e, len(exts))
    width = 2 * len(exts)
    flat = [-1] * (width * len(samples))      # (filled as a list: numpy item assignment is slower)
    for i, s in enumerate(samples):
        for e, (offset, size) in getattr(s, attr).items():
            j = i * width + 2 * exts[e]
            flat[j], flat[j + 1] = offset, size
    return tuple(exts), np.array(flat, dtype=np.int64).reshape(len(samples), len(exts), 2)


class PackedSamples(Sequence):
    """The good samples of one shard, read-only, as columns; ``table[i]`` is a new ``Sample`` equal to
    the i-th one it was built from (``from_samples``). Slices give lists of ``Sample``."""

    def __init__(self, shard: str, fields: CaptionFields, keys: bytes, key_offsets: np.ndarray,
                 image_exts: tuple[str, ...], image_ext: np.ndarray, image: np.ndarray,
                 text_exts: tuple[str, ...], texts: np.ndarray, extra_exts: tuple[str, ...], extras: np.ndarray):
        self.shard, self.fields = shard, fields
        self._keys, self._key_offsets = keys, key_offsets        # key i: keys[offsets[i]:offsets[i + 1]]
        self._image_exts, self._image_ext, self._image = image_exts, image_ext, image
        self._text_exts, self._texts = text_exts, texts
        self._extra_exts, self._extras = extra_exts, extras

    @classmethod
    def from_samples(cls, samples: Sequence[Sample], shard: str | None = None,
                     fields: CaptionFields | None = None) -> PackedSamples:
        """Pack the samples of one shard (all with the same ``shard`` and ``fields``; for an empty list
        give them, else they are taken from the first sample)."""
        if samples:
            shard = samples[0].shard if shard is None else shard
            fields = samples[0].fields if fields is None else fields
            for s in samples:
                if s.shard != shard or s.fields != fields:
                    raise ValueError(f"a PackedSamples holds one shard with one caption mapping: {s.key!r} "
                                     f"is from {s.shard!r} ({s.fields.spec}), not {shard!r} ({fields.spec})")
        elif shard is None:
            raise ValueError("an empty PackedSamples needs its shard")
        fields = DEFAULT if fields is None else fields
        encoded = [s.key.encode("utf-8", _KEY_ERRORS) for s in samples]
        key_offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum([len(k) for k in encoded], out=key_offsets[1:])
        image_exts: dict[str, int] = {}
        for s in samples:
            image_exts.setdefault(s.image[0], len(image_exts))
        if len(image_exts) > 255:
            raise ValueError(f"{len(image_exts)} image extensions in one shard (at most 255)")
        image_ext = np.array([image_exts[s.image[0]] for s in samples], dtype=np.uint8)
        image = np.array([s.image[1:] for s in samples], dtype=np.int64).reshape(len(samples), 2)
        text_exts, texts = _ranges(samples, "texts")
        extra_exts, extras = _ranges(samples, "extras")
        return cls(shard, fields, b"".join(encoded), key_offsets, tuple(image_exts), image_ext, image,
                   text_exts, texts, extra_exts, extras)

    def __len__(self) -> int:
        return len(self._image)

    def key(self, i: int) -> str:
        start, stop = self._key_offsets[_index(i, len(self)):][:2].tolist()    # (Python ints slice faster)
        return self._keys[start:stop].decode("utf-8", _KEY_ERRORS)

    @property
    def keys(self) -> _Keys:
        """The samples' keys as a read-only sequence, without building the samples."""
        return _Keys(self)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = _index(i, len(self))
        off, size = self._image[i].tolist()
        texts = {e: tuple(r) for e, r in zip(self._text_exts, self._texts[i].tolist()) if r[0] >= 0}
        extras = {e: tuple(r) for e, r in zip(self._extra_exts, self._extras[i].tolist()) if r[0] >= 0}
        return Sample(self.shard, self.key(i), (self._image_exts[self._image_ext[i]], off, size), texts, extras,
                      self.fields)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"PackedSamples({self.shard!r}, {len(self)} samples)"

    def nbytes(self) -> int:
        """Bytes held by the columns and the key blob (what the samples cost, bar a few fixed objects)."""
        return len(self._keys) + sum(a.nbytes for a in (self._key_offsets, self._image_ext, self._image,
                                                         self._texts, self._extras))


class _Keys(Sequence):
    """The keys of a ``PackedSamples`` (``table.keys``)."""

    def __init__(self, table: PackedSamples):
        self._table = table

    def __len__(self) -> int:
        return len(self._table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._table.key(j) for j in range(*i.indices(len(self)))]
        return self._table.key(i)


class ConcatSamples(Sequence):
    """The samples of several tables (or lists) in order, as one read-only sequence: ``[s for t in
    tables for s in t]`` without the list. Position -> table by a binary search of the cumulative
    counts (one int per table, a plain list: bisect on it is several times faster than
    np.searchsorted for one position); empty tables are allowed."""

    def __init__(self, tables: Sequence[Sequence[Sample]]):
        self._tables = list(tables)
        self._ends = list(itertools.accumulate(len(t) for t in self._tables))   # end of each table

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = _index(i, len(self))
        t = bisect.bisect_right(self._ends, i)
        return self._tables[t][i - (self._ends[t - 1] if t else 0)]

    def __iter__(self):
        for t in self._tables:
            yield from t

    def __repr__(self) -> str:
        return f"ConcatSamples({len(self._tables)} tables, {len(self)} samples)"
