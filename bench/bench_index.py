"""Start-up indexing time for many small shards: cold (no index yet) and warm (indexes cached).

    python bench/bench_index.py [--shards 1000] [--per-shard 8] [--size 96]

Writes ``--shards`` tar shards of ``--per-shard`` JPEG samples (``--size`` px, with captions) into a
temporary folder, then times ``shards.index_shards`` over all of them, as one rank's start-up does:

- ``header``: the PyTorch loader's index (``data.validate=auto`` without DALI): tar headers, captions,
  image headers and container structure, no pixel decoding;
- ``full``: every image decoded once (the DALI loader's index, ``data check``).

Each is timed cold (a fresh index folder) and warm (the same call again: every index is read from
the folder). The shard files themselves are in the page cache in both cases (just written), so
"cold" is the CPU cost of indexing, not of a cold disk. Run against an older checkout (whose
``index_shards`` takes no ``validate``) it times that version's only mode, reported as ``legacy``.
Numbers are recorded in docs/data.md.
"""
from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image


def make_shards(folder: str, n: int, per_shard: int, size: int) -> list[str]:
    from fasttips.data.shards import ShardWriter
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    with ShardWriter(folder, samples_per_shard=per_shard) as w:
        for i in range(n * per_shard):
            buf = io.BytesIO()
            Image.fromarray(np.roll(base, i, axis=1)).save(buf, "JPEG", quality=85)
            w.write(f"s{i:07d}", buf.getvalue(), "jpg", {"alt": f"a photo {i}", "short": f"photo {i}"})
    return [str(p) for p in w.paths]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--per-shard", type=int, default=8)
    ap.add_argument("--size", type=int, default=96)
    args = ap.parse_args(argv)
    from fasttips.data import shards as S
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FASTTIPS_DATA_DIR"] = os.path.join(tmp, "cache")
        t0 = time.perf_counter()
        paths = make_shards(os.path.join(tmp, "data"), args.shards, args.per_shard, args.size)
        print(f"wrote {len(paths)} shards x {args.per_shard} samples in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        rows = {}
        if "validate" in inspect.signature(S.index_shards).parameters:
            for level in ("header", "full"):
                folder = os.path.join(tmp, f"index-{level}")
                rows[level] = {"cold_s": timed(lambda: S.index_shards(paths, validate=level, index_dir=folder)),
                               "warm_s": timed(lambda: S.index_shards(paths, validate=level, index_dir=folder))}
        else:                                     # an older checkout: one mode, indexes beside the shards
            rows["legacy"] = {"cold_s": timed(lambda: S.index_shards(paths)),
                              "warm_s": timed(lambda: S.index_shards(paths))}
    for name, r in rows.items():
        print(json.dumps({"mode": name, "shards": args.shards, "per_shard": args.per_shard, "size": args.size,
                          **{k: round(v, 2) for k, v in r.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
