"""Fuzzed shards: random byte flips and truncations of a small shard, read through the index and both
loaders. Nothing crashes, and every sample is either good or skipped with a reason (a sample lost
with a damaged region is covered by the ``damaged_tar`` count)."""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from fasttips.data import loader as loader_mod
from fasttips.data.shards import SKIP_REASONS, ShardWriter, index_shard
from fasttips.data.tokenizer import Tokenizer

from data_helpers import captions_of, jpeg, tiny_cfg

N = 6
PER_SAMPLE = ("corrupt_image", "missing_caption", "non_image_member", "damaged_sample")
VARIANTS = int(os.environ.get("FASTTIPS_FUZZ_VARIANTS", 24))     # more for a longer fuzzing session


def mutate(data: bytes, headers: list[int], rng: np.random.Generator) -> bytes:
    """Flip 1-8 random bytes, or cut the shard, or both; or flip bytes in 1-2 tar headers (random
    flips mostly land in image data, the largest part)."""
    out = bytearray(data)
    what = rng.integers(4)
    if what == 3:
        for h in rng.choice(headers, size=int(rng.integers(1, 3)), replace=False):
            out[int(h) + int(rng.integers(0, 512))] ^= int(rng.integers(1, 256))
        return bytes(out)
    if what != 1:
        for pos in rng.integers(0, len(out), size=int(rng.integers(1, 9))):
            out[pos] ^= int(rng.integers(1, 256))
    if what == 1 or what == 2:
        out = out[: int(rng.integers(1, len(out)))]
    return bytes(out)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_src")
    rng = np.random.default_rng(0)
    with ShardWriter(folder, samples_per_shard=N) as w:     # JPEG and PNG (palette, grey, RGB) samples
        for i in range(N):
            if i % 2:
                w.write(f"s{i:04d}", jpeg(rng), "jpg", captions_of(i))
            else:
                img = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
                img = [img.quantize(8), img.convert("L"), img][(i // 2) % 3]
                buf = io.BytesIO()
                img.save(buf, "PNG")
                w.write(f"s{i:04d}", buf.getvalue(), "png", captions_of(i))
    (path,) = w.paths
    tok = folder / "tok.model"
    Tokenizer.train([c for i in range(N) for c in captions_of(i).values()], 200, path=tok)
    with tarfile.open(path) as tar:
        headers = [m.offset for m in tar]
    return path.read_bytes(), headers, tok


def test_fuzzed_shards_never_crash_and_every_sample_is_accounted_for(tmp_path, source, seed):
    data, headers, tok = source
    rng = np.random.default_rng(seed)
    kinds = ["pytorch"] + (["dali"] if loader_mod.dali_available() else [])
    loaded = 0
    for v in range(VARIANTS):
        folder = tmp_path / f"v{v}"
        folder.mkdir()
        (folder / "f.tar").write_bytes(mutate(data, headers, rng))
        ix = index_shard(str(folder / "f.tar"))
        assert set(ix.skipped) == set(SKIP_REASONS), f"variant {v} (seed {seed})"
        counted = len(ix.samples) + sum(ix.skipped[r] for r in PER_SAMPLE)
        if ix.skipped["unreadable_shard"]:
            assert not ix.samples
        elif ix.skipped["damaged_tar"] == 0:
            assert counted == N, f"variant {v} (seed {seed}): {len(ix.samples)} good, skipped {ix.skipped}"
        else:
            assert counted <= N
        if not ix.samples:
            continue
        good = {s.key for s in ix.samples}
        kind = kinds[v % len(kinds)]                   # alternate the loaders to keep the test short
        L = loader_mod.build_loader(tiny_cfg(folder, f"data.loader={kind}", f"data.tokenizer={tok}"))
        keys = {k for _, batch in zip(range(2), L) for k in batch["keys"]}
        assert keys <= good, f"variant {v} (seed {seed}, {kind})"
        loaded += 1
    assert loaded > 0
