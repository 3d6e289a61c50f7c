"""Start-up indexing time for many small shards: cold (no index yet) and warm (indexes cached).

    python bench/bench_index.py [--shards 1000] [--per-shard 8] [--size 96]

Writes ``--shards`` tar shards of ``--per-shard`` JPEG samples (``--size`` px, with captions) into a
temporary folder, then times ``shards.index_shards`` over all of them, as one rank's start-up does:

- ``header``: the PyTorch loader's index (``data.validate=auto`` without DALI): tar headers, captions,
  image headers and container structure, no pixel decoding;
- ``full``: every image decoded once (the DALI loader's index, ``data check``).

Each is timed cold (a fresh index folder) and warm (the same call again: every index is read from
the folder), ``--repeat`` times; the fastest run is reported. The shard files themselves are in the
page cache in both cases (just written), so "cold" is the CPU cost of indexing, not of a cold disk.
Run against an older checkout (``PYTHONPATH=<its root>``; its ``index_shards`` takes no ``validate``)
it times that version's only mode, reported as ``legacy``.
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


def _rank(paths, level, folder, rank, world):
    from fasttips.data import shards as S
    S.index_shards(paths, validate=level, index_dir=folder, rank=rank, world_size=world)


def ranks_cold(paths, level, folder, world) -> float:
    """Wall time of ``world`` processes starting together on a cold index folder (every rank gets all
    indexes; each builds about 1/world of them and reads the rest)."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(paths, level, folder, r, world)) for r in range(world)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--per-shard", type=int, default=8)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--ranks", type=int, default=1,
                    help="also time N processes indexing concurrently as ranks 0..N-1 of one cold start")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each; the fastest is reported (shared machines)")
    args = ap.parse_args(argv)
    from fasttips.data import shards as S
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FASTTIPS_DATA_DIR"] = os.path.join(tmp, "cache")
        t0 = time.perf_counter()
        paths = make_shards(os.path.join(tmp, "data"), args.shards, args.per_shard, args.size)
        print(f"wrote {len(paths)} shards x {args.per_shard} samples in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        rows = {}
        new_api = "validate" in inspect.signature(S.index_shards).parameters
        for level in ("header", "full") if new_api else ("legacy",):
            cold, warm = [], []
            for rep in range(args.repeat):
                folder = os.path.join(tmp, f"index-{level}-{rep}")
                if new_api:
                    def run():
                        S.index_shards(paths, validate=level, index_dir=folder)
                else:                             # an older checkout: one mode, indexes beside the shards
                    for f in os.listdir(os.path.join(tmp, "data")):
                        if not f.endswith(".tar"):
                            os.remove(os.path.join(tmp, "data", f))

                    def run():
                        S.index_shards(paths)
                cold.append(timed(run))
                warm.append(timed(run))
            rows[level] = {"cold_s": min(cold), "warm_s": min(warm)}
            if new_api and args.ranks > 1:
                rows[level][f"cold_{args.ranks}_ranks_s"] = min(
                    ranks_cold(paths, level, os.path.join(tmp, f"ranks-{level}-{rep}"), args.ranks)
                    for rep in range(args.repeat))
    for name, r in rows.items():
        print(json.dumps({"mode": name, "shards": args.shards, "per_shard": args.per_shard, "size": args.size,
                          **{k: round(v, 2) for k, v in r.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
