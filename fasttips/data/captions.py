"""Which caption each text tower sees (DESIGN.md, "caption sampling").

CLS#1 is always paired with the alt-text. CLS#2 gets "short" with probability ``short_prob`` and
"long" otherwise, drawn per example; a missing granularity falls back to the other one, then to alt.
A sample without alt-text uses its short (else long) caption for CLS#1, so every sample that has at
least one caption is usable. The draw is a pure function of (seed, epoch, rank, key), so it does not
depend on the loader, the worker count or the order in which samples arrive.
"""
from __future__ import annotations

import hashlib

from .batch import CAPTION_KINDS

ALT, SHORT, LONG = range(3)


def _unit(seed: int, epoch: int, rank: int, key: str) -> float:
    """A deterministic uniform draw in [0, 1) from the sample's identity."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{rank}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def alt_text(captions: dict[str, str]) -> str:
    for kind in ("alt", "short", "long"):
        if captions.get(kind):
            return captions[kind]
    raise ValueError("sample has no caption (need one of 'alt', 'short', 'long')")


def pick_synthetic(captions: dict[str, str], u: float, short_prob: float) -> tuple[str, int]:
    """(caption, kind) for CLS#2 from one uniform draw ``u``."""
    first, second = ("short", "long") if u < short_prob else ("long", "short")
    for kind in (first, second, "alt"):
        if captions.get(kind):
            return captions[kind], CAPTION_KINDS.index(kind)
    return alt_text(captions), ALT


def sample_captions(captions: dict[str, str], key: str, seed: int, epoch: int, rank: int,
                    short_prob: float) -> tuple[str, str, int]:
    """(alt caption for CLS#1, caption for CLS#2, kind of the CLS#2 caption: 0 alt, 1 short, 2 long)."""
    syn, kind = pick_synthetic(captions, _unit(seed, epoch, rank, key), short_prob)
    return alt_text(captions), syn, kind
