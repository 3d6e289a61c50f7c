"""DOCCI image-text retrieval with long descriptions: the 5,000 images of DOCCI's ``test`` split, one
human-written description each (136 words on average), Recall@1/5/10 image→text and text→image, for
CLS#1 and CLS#2.

Accepted layout of ``ROOT`` (default ``DATA_ROOT/docci``), as the DOCCI release unpacks:
  ``ROOT/docci_descriptions.jsonlines``  one JSON object per line with ``example_id``, ``split``
                                         (train / test / qual_dev / qual_test), ``image_file`` and
                                         ``description``;
  ``ROOT/images/<image_file>``           the JPEGs (``docci_images.tar.gz`` unpacks to ``images/``).

Text length: a description is lower-cased, split into SentencePiece tokens and cut to the text
tower's ``text.max_len`` tokens (64 for the TIPS release and fasttips' default): the first tokens
are kept and the rest dropped, with no end token, as the release's tokenizer does. Most DOCCI
descriptions are longer than that; the result reports how many were cut.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .common import DatasetLayoutError, SuiteContext, limited, require_dir, require_file
from .retrieval import score_retrieval

SUITE = "docci"
DESCRIPTIONS = "docci_descriptions.jsonlines"
IMAGES = "images"
SPLIT = "test"
FIELDS = ("example_id", "split", "image_file", "description")


def read_descriptions(root: Path, split: str = SPLIT) -> list[tuple[Path, str]]:
    """[(image path, description)] of ``split``, in file order; the images must exist."""
    path = require_file(root / DESCRIPTIONS, SUITE, "DOCCI descriptions, one JSON object per line")
    images = require_dir(root / IMAGES, SUITE, "DOCCI images, from docci_images.tar.gz")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                missing = [k for k in FIELDS if k not in record]
            except ValueError:
                record, missing = None, ["valid JSON"]
            if missing:
                raise DatasetLayoutError(f"{SUITE}: {path} line {n}: no {missing[0]!r} (expected an object with "
                                         f"{', '.join(FIELDS)})")
            if record["split"] == split:
                out.append((images / record["image_file"], " ".join(str(record["description"]).split())))
    if not out:
        raise DatasetLayoutError(f"{SUITE}: {path} has no examples in split {split!r}")
    missing_image = next((p for p, _ in out if not p.is_file()), None)
    if missing_image is not None:
        raise DatasetLayoutError(f"{SUITE}: missing file {missing_image} (named in {DESCRIPTIONS})")
    return out


def check_layout(root: Path, suite: str = SUITE) -> None:
    read_descriptions(root)


def token_counts(tokenizer, texts: list[str]) -> list[int] | None:
    """Tokens per text before the cut, or None when the tokenizer cannot say."""
    count = getattr(tokenizer, "n_tokens", None)
    return list(count(texts)) if count is not None else None


@torch.no_grad()
def run(ctx: SuiteContext, root: Path, suite: str = SUITE) -> dict:
    pairs = limited(read_descriptions(root), ctx)
    max_len = getattr(ctx.tokenizer, "max_len", None)
    counts = token_counts(ctx.tokenizer, [d for _, d in pairs])
    cut = sum(c > max_len for c in counts) if counts is not None and max_len else None
    ctx.say(f"[{SUITE}] {len(pairs)} test images, one description each"
            + (f"; {cut} of {len(pairs)} descriptions are longer than {max_len} tokens and are cut"
               if cut is not None else ""))
    result = score_retrieval(ctx, SUITE, root, [(p, [d]) for p, d in pairs], per_image=1)
    result["text"] = {"max_len": max_len, "rule": "first max_len SentencePiece tokens kept, no end token",
                      "n_truncated": cut, "max_tokens": max(counts) if counts else None,
                      "mean_tokens": round(sum(counts) / len(counts), 1) if counts else None}
    if cut:
        result["notes"] = [f"{cut} of {len(pairs)} descriptions were cut to their first {max_len} tokens"]
    return result
