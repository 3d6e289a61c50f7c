"""``fasttips data``: pack shards, train a tokenizer, build the demo data, check or index shards.

    fasttips data pack IMAGES CAPTIONS.jsonl OUT [--samples-per-shard N] [--prefix P]
    fasttips data tokenizer SHARDS --out FILE.model [--vocab-size N] [--max-captions N]
    fasttips data demo [--root DIR]
    fasttips data check SHARDS [--max-listed N]
    fasttips data index SHARDS [--validate] [--index-dir DIR] [--jobs N]

Exit codes: 0 done; 1 nothing usable (pack wrote no sample, check found no usable sample);
2 bad arguments or paths.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from pathlib import Path

from PIL import Image

from fasttips.argtypes import int_at_least

from .caption_fields import DEFAULT_CAPTION_FIELDS, missing_caption_hint, parse_caption_fields
from . import storage
from .shards import (CAPTION_KINDS, IMAGE_EXTS, SKIP_REASONS, ShardWriter, index_root, index_shard, index_shards,
                     list_shards, total_skipped)


def _key_for(rel: str, used: set) -> str:
    """A tar-safe sample key from an image's relative path (no dots, unique)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.splitext(rel)[0]).strip("_") or "sample"
    key, n = stem, 1
    while key in used:
        key, n = f"{stem}_{n}", n + 1
    used.add(key)
    return key


def _image_bytes(path: Path) -> tuple[bytes, str]:
    """(bytes, ext): JPEG and PNG files are copied as they are; other formats become JPEG."""
    ext = path.suffix.lower().lstrip(".")
    data = path.read_bytes()
    if ext in IMAGE_EXTS:
        return data, "jpg" if ext == "jpeg" else ext
    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue(), "jpg"


def _caption_record(raw: bytes, captions: str, lineno: int) -> dict | None:
    """One JSONL line as {"image": non-empty str, ...}, or None (blank, or said why on stderr)."""
    if not raw.strip():
        return None
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        print(f"{captions}:{lineno}: not UTF-8 text (byte {exc.start}); skipped", file=sys.stderr)
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        print(f"{captions}:{lineno}: not JSON ({exc.msg}); skipped", file=sys.stderr)
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not rec["image"].strip():
        print(f"{captions}:{lineno}: expected a JSON object with an 'image' path (a non-empty string); "
              "skipped", file=sys.stderr)
        return None
    return rec


def pack(images: str, captions: str, out: str, samples_per_shard: int = 1000, prefix: str = "shard") -> dict:
    """Write shards from a folder of images and a captions JSONL; return counts of what was written
    and skipped. Each JSONL line: {"image": "relative/path.jpg", "alt": ..., "short": ..., "long": ...}
    (any non-empty subset of the captions; an optional "key")."""
    root = Path(images)
    if not root.is_dir():
        raise FileNotFoundError(f"IMAGES={images!r} is not a folder")
    if not Path(captions).is_file():
        raise FileNotFoundError(f"CAPTIONS={captions!r}: no such JSONL file")
    counts = {"written": 0, "missing_image": 0, "unreadable_image": 0, "missing_caption": 0, "bad_line": 0}
    used: set[str] = set()
    with ShardWriter(out, prefix=prefix, samples_per_shard=samples_per_shard) as writer, \
            open(captions, "rb") as lines:
        for lineno, raw in enumerate(lines, 1):
            rec = _caption_record(raw, captions, lineno)
            if rec is None:
                if raw.strip():
                    counts["bad_line"] += 1
                continue
            rel = rec["image"]
            caps = {k: rec[k].strip() for k in CAPTION_KINDS if isinstance(rec.get(k), str) and rec[k].strip()}
            if not caps:
                counts["missing_caption"] += 1
                continue
            path = root / rel
            if not path.is_file():
                counts["missing_image"] += 1
                continue
            try:
                data, ext = _image_bytes(path)
            except Exception as exc:  # PIL raises many types for a broken file
                print(f"{path}: unreadable image ({exc}); skipped", file=sys.stderr)
                counts["unreadable_image"] += 1
                continue
            key = _key_for(str(rec.get("key") or rel), used)
            writer.write(key, data, ext, caps)
            counts["written"] += 1
    paths = writer.paths
    if paths:
        stats = total_skipped(index_shards([str(p) for p in paths]))
        counts["corrupt_image"] = stats["corrupt_image"]
    counts["shards"] = len(paths)
    return counts


def _cmd_pack(args) -> int:
    counts = pack(args.images, args.captions, args.out, args.samples_per_shard, args.prefix)
    print(json.dumps(counts))
    return 0 if counts["written"] else 1


def _cmd_tokenizer(args) -> int:
    from .loader import shard_captions
    from .tokenizer import Tokenizer
    indexes = index_shards(list_shards(args.shards, what="SHARDS"))
    texts = shard_captions(indexes, limit=args.max_captions)
    if not texts:
        raise ValueError(f"SHARDS={args.shards!r}: no usable caption to train on "
                         f"(fasttips data check {args.shards} lists what was skipped)")
    try:
        tok = Tokenizer.train(texts, args.vocab_size, path=args.out, model_type=args.model_type)
    except RuntimeError as exc:                # SentencePiece's own errors, e.g. a vocabulary too small
        raise ValueError(f"SentencePiece could not train: {str(exc).strip().splitlines()[-1]}") from None
    print(f"trained {tok.vocab_size} pieces on {len(texts)} captions -> {args.out}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import demo_shards, ensure_demo_data
    root = ensure_demo_data(args.root)
    for split in ("train", "eval", "photos"):
        shards = demo_shards(args.root, split)
        n = sum(len(ix.samples) for ix in index_shards(shards))
        print(f"{split:7s} {n:5d} samples in {len(shards)} shard(s)")
    print(root)
    return 0


def _cmd_check(args) -> int:
    fields = args.caption_fields                  # parsed by argparse (_caption_fields)
    indexes = index_shards(list_shards(args.shards, what="SHARDS"), fields)
    stats = total_skipped(indexes)
    good = sum(len(ix.samples) for ix in indexes)
    shown = 0
    for ix in indexes:                      # the index keeps each skipped key with its reason
        for key, reason in ix.skipped_keys[:max(0, args.max_listed - shown)]:
            note = " (another sample with this key is kept: the first complete one in the shard)" \
                if reason == "duplicate_key" else ""
            print(f"skipped {ix.shard} {key!r}: {reason}{note}")
            shown += 1
    total = sum(stats.values())
    if total > shown:
        print(f"... {total - shown} more skipped (--max-listed N lists more)")
    if stats.get("missing_caption"):
        print(missing_caption_hint(fields))
    print(json.dumps({"shards": len(indexes), "good_samples": good, **{k: stats[k] for k in SKIP_REASONS}}))
    if not good:
        print(f"fasttips data check: no usable sample in {len(indexes)} shard(s)", file=sys.stderr)
        return 1
    return 0


def _index_one(job):
    shard, fields_spec, validate, index_dir = job
    ix = index_shard(shard, fields=parse_caption_fields(fields_spec), validate=validate, index_dir=index_dir)
    return len(ix.samples), ix.skipped


def _cmd_index(args) -> int:
    import time
    from concurrent.futures import ProcessPoolExecutor
    from .loader import dali_available
    fields = args.caption_fields                  # parsed by argparse (_caption_fields)
    storage.configure(retries=args.retries)
    shards = list_shards(args.shards, what="SHARDS")
    # without --validate: what training with data.loader=auto and data.validate=auto will ask for
    local = not any(storage.is_url(s) for s in shards)
    validate = "full" if args.validate or (dali_available() and local) else "header"
    jobs = [(s, fields.spec, validate, args.index_dir) for s in shards]
    t0 = time.monotonic()
    if args.jobs > 1 and len(shards) > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(_index_one, jobs, chunksize=max(1, len(jobs) // (4 * args.jobs))))
    else:
        results = [_index_one(j) for j in jobs]
    stats = dict.fromkeys(SKIP_REASONS, 0)
    for _, skipped in results:
        for k, v in skipped.items():
            stats[k] = stats.get(k, 0) + v
    good = sum(n for n, _ in results)
    print(json.dumps({"shards": len(shards), "good_samples": good, "validation": validate,
                      "seconds": round(time.monotonic() - t0, 2), "index_dir": str(index_root(args.index_dir)),
                      **{k: stats[k] for k in SKIP_REASONS}}))
    if not good:
        print(f"fasttips data index: no usable sample in {len(shards)} shard(s) "
              f"(fasttips data check {args.shards} lists why)", file=sys.stderr)
        return 1
    return 0


_count, _positive = int_at_least(0), int_at_least(1)


def _caption_fields(text: str):
    """argparse type for --caption-fields: a bad mapping is one usage line, exit 2."""
    try:
        return parse_caption_fields(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``data`` and its sub-commands to an argparse ``subparsers`` object."""
    p = subparsers.add_parser("data", help="pack shards, train a tokenizer, build the demo data",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _fill(p)
    return p


def _fill(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True, metavar="{pack,tokenizer,demo,check,index}")
    pk = sub.add_parser("pack", help="images + captions JSONL -> WebDataset shards (+ validated indexes)",
                        description="Write WebDataset shards ({key}.jpg|png + {key}.json captions) and index "
                                    "them (validated; kept in the index cache, not in OUT).")
    pk.add_argument("images", help="folder of images; paths in the JSONL are relative to it")
    pk.add_argument("captions", help='JSONL, one object per line: {"image": "a/b.jpg", "alt": "...", '
                                     '"short": "...", "long": "..."} (any non-empty subset of captions; '
                                     'optional "key")')
    pk.add_argument("out", help="output folder for the .tar shards")
    pk.add_argument("--samples-per-shard", type=_positive, default=1000, help="samples per shard (default 1000)")
    pk.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    pk.set_defaults(func=_cmd_pack)

    tk = sub.add_parser("tokenizer", help="train a SentencePiece model on the captions of shards",
                        description="Train a lower-case SentencePiece model (pad id 0, no BOS/EOS) on every "
                                    "caption of the shards. Any existing .model can be used instead via "
                                    "data.tokenizer=PATH.")
    tk.add_argument("shards", help="folder, glob or .tar file of shards")
    tk.add_argument("--out", required=True, help="path of the .model file to write")
    tk.add_argument("--vocab-size", type=_positive, default=32000,
                    help="upper bound on the number of pieces (default 32000; a small corpus gives fewer)")
    tk.add_argument("--max-captions", type=_positive, default=2_000_000, help="captions read at most (default 2e6)")
    tk.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe",
                    help="SentencePiece model type (default bpe: fast and exact size)")
    tk.set_defaults(func=_cmd_tokenizer)

    dm = sub.add_parser("demo", help="build the embedded demo data (scenes + photos) and print its folder",
                        description="Create (once) the procedural scenes (train/eval, with class masks) and "
                                    "the real-photo set from scikit-image's sample images.")
    dm.add_argument("--root", default=None,
                    help="parent folder (default $FASTTIPS_DATA_DIR or ~/.cache/fasttips)")
    dm.set_defaults(func=_cmd_demo)

    ck = sub.add_parser("check", help="index shards, list skipped samples, print good/skipped counts",
                        description="Validate shards (tar readable, image decodes, caption present), list "
                                    "each skipped sample with its reason, and print the counts by reason: "
                                    + ", ".join(SKIP_REASONS) + " (of a key seen twice in a shard, the first "
                                    "complete sample is kept). Exit 1 when no sample is usable.")
    ck.add_argument("shards", help="folder, glob or .tar file of shards")
    ck.add_argument("--caption-fields", type=_caption_fields, default=DEFAULT_CAPTION_FIELDS,
                    help="shard members/fields giving each caption granularity, as data.caption_fields "
                         f"(default {DEFAULT_CAPTION_FIELDS!r}; img2dataset shards: 'alt=txt|json:caption')")
    ck.add_argument("--max-listed", type=_count, default=100,
                    help="skipped samples listed by key and reason, at most (default 100; 0 = none)")
    ck.set_defaults(func=_cmd_check)

    ix = sub.add_parser("index", help="build the shards' indexes ahead of training (once, shared by all ranks)",
                        description="Build each shard's index (members, good samples, skip counts) and DALI "
                                    "index, as training would on its first start, into the index folder "
                                    "(data.index_dir; default $FASTTIPS_DATA_DIR/index or "
                                    "~/.cache/fasttips/index). Without --validate the image check is what "
                                    "training with data.validate=auto uses: a full decode when DALI is "
                                    "installed and the shards are local, else headers only. SHARDS may be "
                                    "fsspec URLs (s3://, gs://, https://...).")
    ix.add_argument("shards", help="folder, glob, .tar file or URL of shards")
    ix.add_argument("--validate", action="store_true",
                    help="decode every image (as data check and the DALI loader do) instead of headers only")
    ix.add_argument("--index-dir", default="", help="where the indexes go, as data.index_dir (default: the cache)")
    ix.add_argument("--caption-fields", type=_caption_fields, default=DEFAULT_CAPTION_FIELDS,
                    help="as data.caption_fields (the index depends on it; default the built-in mapping)")
    ix.add_argument("--jobs", type=_positive, default=max(1, min(8, os.cpu_count() or 1)),
                    help="processes indexing in parallel (default: the CPU count, at most 8)")
    ix.add_argument("--retries", type=_count, default=3, help="retries of a failed remote read (default 3)")
    ix.set_defaults(func=_cmd_index)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fasttips data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _fill(parser)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (OSError, ValueError, ImportError) as exc:   # a missing path, bad content, no backend: one line
        print(f"fasttips data {args.data_command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
