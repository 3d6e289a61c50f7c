"""Where a sample's captions come from: a mapping from shard members / JSON fields to the caption
granularities (``alt``, ``short``, ``long``).

The mapping is a string (the config field ``data.caption_fields``)::

    alt=json:alt,short=json:short,long=json:long        the default: fasttips' own shards
    alt=txt|json:caption                                img2dataset / LAION / DataComp shards

Each granularity lists one or more sources, tried in order until one gives a non-empty string:
``json:FIELD`` is a string field of the sample's ``.json`` member, anything else is the extension of
a member read whole as UTF-8 text (``txt`` for ``{key}.txt``). Granularities left out stay empty (a
sample needs at least one caption; ``captions.py`` decides which one each text tower sees).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

CAPTION_KINDS = ("alt", "short", "long")    # the caption granularities; the order gives batch["caption_kind"]
DEFAULT_CAPTION_FIELDS = "alt=json:alt,short=json:short,long=json:long"
IMG2DATASET_CAPTION_FIELDS = "alt=txt|json:caption"
FIELD = "data.caption_fields"
_EXT = re.compile(r"^[a-z0-9_][a-z0-9_.-]*$")


@dataclass(frozen=True)
class Source:
    ext: str                    # member extension ("json", "txt", ...)
    field: str | None = None    # JSON field, or None for the whole member as text

    def describe(self) -> str:
        return f".{self.ext} field {self.field!r}" if self.field is not None else f".{self.ext} text"


@dataclass(frozen=True)
class CaptionFields:
    spec: str
    sources: tuple[tuple[str, tuple[Source, ...]], ...]     # (kind, sources in order)

    @property
    def exts(self) -> tuple[str, ...]:
        """The member extensions the captions are read from, in a fixed order."""
        return tuple(sorted({src.ext for _, sources in self.sources for src in sources}))

    def extract(self, members: dict[str, bytes]) -> dict[str, str]:
        """The non-empty captions of a sample from its caption members (extension -> bytes); a member
        that is missing, not UTF-8, or not a JSON object where a field is asked for gives nothing."""
        parsed: dict[str, object] = {}

        def text(src: Source) -> str:
            data = members.get(src.ext)
            if not data:
                return ""
            if src.field is None:
                try:
                    return data.decode("utf-8").strip()
                except UnicodeDecodeError:
                    return ""
            if src.ext not in parsed:
                try:
                    parsed[src.ext] = json.loads(data.decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    parsed[src.ext] = None
            obj = parsed[src.ext]
            value = obj.get(src.field) if isinstance(obj, dict) else None
            return value.strip() if isinstance(value, str) else ""

        out = {}
        for kind, sources in self.sources:
            for src in sources:
                t = text(src)
                if t:
                    out[kind] = t
                    break
        return out

    def describe(self) -> str:
        """What a sample must hold, for the missing_caption message."""
        parts = [f"{kind} from " + " or ".join(s.describe() for s in sources) for kind, sources in self.sources]
        return "; ".join(parts)


def parse_caption_fields(spec: str | None) -> CaptionFields:
    """Parse a mapping (module docstring); a bad one raises ValueError naming ``data.caption_fields``."""
    spec = (spec or DEFAULT_CAPTION_FIELDS).strip()
    sources: dict[str, tuple[Source, ...]] = {}
    for item in spec.split(","):
        kind, eq, rhs = item.partition("=")
        kind = kind.strip()
        if not eq or kind not in CAPTION_KINDS:
            raise ValueError(f"{FIELD}: {item.strip()!r} must be KIND=SOURCE with KIND one of {list(CAPTION_KINDS)} "
                             f"(e.g. {IMG2DATASET_CAPTION_FIELDS!r})")
        if kind in sources:
            raise ValueError(f"{FIELD}: {kind!r} is given twice; list alternatives with '|'")
        found = []
        for raw in rhs.split("|"):
            raw = raw.strip()
            ext, colon, field = raw.partition(":")
            ext = ext.lower()
            if not _EXT.match(ext) or (colon and (ext != "json" or not field)):
                raise ValueError(f"{FIELD}: source {raw!r} for {kind!r}: use a member extension (e.g. 'txt') "
                                 "or 'json:FIELD'")
            found.append(Source(ext, field if colon else None))
        sources[kind] = tuple(found)
    ordered = tuple((k, sources[k]) for k in CAPTION_KINDS if k in sources)
    return CaptionFields(spec, ordered)


DEFAULT = parse_caption_fields(DEFAULT_CAPTION_FIELDS)


def caption_fields_of(cfg) -> CaptionFields:
    """The mapping of a config (``data.caption_fields``; the default where the field does not exist)."""
    return parse_caption_fields(getattr(getattr(cfg, "data", None), "caption_fields", "") or DEFAULT_CAPTION_FIELDS)


def missing_caption_hint(fields: CaptionFields) -> str:
    return (f"captions are read as: {fields.describe()} ({FIELD}={fields.spec!r}); for img2dataset / LAION "
            f"shards (.jpg + .txt + .json) set {FIELD}={IMG2DATASET_CAPTION_FIELDS!r}")
