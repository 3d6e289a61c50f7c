"""Indexes are built once, kept in the index folder (never beside the shards), shared by ranks,
written atomically, and checked at the level the loader needs (header for PyTorch, full for DALI)."""
import io
import json
import os
import threading

import numpy as np
import pytest
from PIL import Image

from fasttips.data import cli, loader as loader_mod, shards as shards_mod
from fasttips.data.shards import ShardWriter, image_header_ok, image_is_valid, index_shard, index_shards

from data_helpers import captions_of, jpeg, tiny_cfg, write_shards


def truncated_jpeg(rng) -> bytes:
    """A JPEG whose headers are intact but whose compressed data is cut short (header check passes,
    a decode fails)."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) * 2 // 3]


@pytest.fixture
def scans(monkeypatch):
    """The shards actually scanned (i.e. indexes built, not read from the cache), in order."""
    seen, real = [], shards_mod._scan

    def spy(shard, *a, **k):
        seen.append(os.path.basename(shard))
        return real(shard, *a, **k)
    monkeypatch.setattr(shards_mod, "_scan", spy)
    return seen


def test_index_goes_to_index_dir_and_never_beside_the_shards(tmp_path, scans):
    data, idx = tmp_path / "data", tmp_path / "idx"
    paths = write_shards(data, 6, 3)
    os.chmod(data, 0o555)                          # a read-only folder of shards works the same
    try:
        first = index_shards([str(p) for p in paths], index_dir=idx)
    finally:
        os.chmod(data, 0o755)
    assert sorted(os.listdir(data)) == ["shard-000000.tar", "shard-000001.tar"]
    names = sorted(os.listdir(idx))
    assert len(names) == 4 and sum(n.endswith(".index.json") for n in names) == 2
    assert all(os.path.dirname(ix.dali_index) == str(idx) for ix in first)
    again = index_shards([str(p) for p in paths], index_dir=idx)
    assert scans == ["shard-000000.tar", "shard-000001.tar"]          # the second call read the cache
    assert [[s.key for s in ix.samples] for ix in again] == [[s.key for s in ix.samples] for ix in first]


def test_ranks_start_at_different_shards_and_share_the_result(tmp_path, scans):
    paths = [str(p) for p in write_shards(tmp_path / "d", 8, 2)]       # 4 shards
    out = index_shards(paths, rank=1, world_size=2, index_dir=tmp_path / "i")
    assert scans == [f"shard-00000{i}.tar" for i in (2, 3, 0, 1)]       # rank 1 starts half-way
    assert [ix.shard for ix in out] == paths                           # ... and answers in list order
    scans.clear()
    index_shards(paths, rank=0, world_size=2, index_dir=tmp_path / "i")
    assert scans == []                                                  # rank 0 reads rank 1's work


def test_concurrent_ranks_never_read_half_an_index(tmp_path):
    paths = [str(p) for p in write_shards(tmp_path / "d", 16, 2)]      # 8 shards
    results, errors = {}, []

    def rank(r):
        try:
            results[r] = index_shards(paths, rank=r, world_size=4, index_dir=tmp_path / "i")
        except Exception as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    keys = {r: [[s.key for s in ix.samples] for ix in res] for r, res in results.items()}
    assert all(k == keys[0] for k in keys.values()) and sum(map(len, keys[0])) == 16
    assert not [n for n in os.listdir(tmp_path / "i") if ".tmp" in n]  # no temporary file left over


def test_a_damaged_or_stale_index_is_rebuilt(tmp_path, scans):
    (path,) = write_shards(tmp_path / "d", 3, 10)
    ix = index_shard(str(path), index_dir=tmp_path / "i")
    json_path = ix.dali_index[: -len(".idx")] + ".index.json"
    with open(json_path, "r+") as f:                                   # a half-written file
        f.truncate(os.path.getsize(json_path) // 2)
    assert len(index_shard(str(path), index_dir=tmp_path / "i").samples) == 3
    assert len(scans) == 2
    write_shards(tmp_path / "d", 2, 10)                                # rewritten in place
    assert len(index_shard(str(path), index_dir=tmp_path / "i").samples) == 2 and len(scans) == 3


def test_header_check_keeps_what_only_a_decode_catches_and_the_loader_skips_it(tmp_path, scans, caplog):
    rng = np.random.default_rng(0)
    bad = truncated_jpeg(rng)
    assert image_header_ok(bad) and not image_is_valid(bad)
    assert not image_header_ok(b"\xff\xd8garbage") and not image_header_ok(jpeg(rng)[:40])
    with ShardWriter(tmp_path / "d", samples_per_shard=100) as w:
        for i in range(7):
            w.write(f"s{i}", bad if i == 3 else jpeg(rng), "jpg", captions_of(i))
    shard, idx = str(w.paths[0]), tmp_path / "i"
    header = index_shard(shard, validate="header", index_dir=idx)
    assert len(header.samples) == 7 and header.validation == "header"
    full = index_shard(shard, validate="full", index_dir=idx)           # stricter: rebuilt
    assert len(full.samples) == 6 and full.skipped["corrupt_image"] == 1 and len(scans) == 2
    assert len(index_shard(shard, validate="header", index_dir=idx).samples) == 6   # full serves header
    assert len(scans) == 2
    # the PyTorch loader indexes with headers only, meets the bad image, skips and counts it
    cfg = tiny_cfg(tmp_path / "d", "data.loader=pytorch", f"data.index_dir={tmp_path / 'j'}")
    assert loader_mod.validation_level(cfg, "pytorch") == "header"
    assert loader_mod.validation_level(cfg, "dali") == "full"
    ld = loader_mod.build_loader(cfg)
    assert ld.num_samples == 7
    keys = set()
    for _ in range(4):                                                  # 16 draws of 7 samples
        batch = next(ld)
        assert len(batch["keys"]) == 4                                  # replaced, so batches keep their size
        keys.update(batch["keys"])
    assert ld.stats["corrupt_image"] >= 1 and "s3" not in keys
    assert os.listdir(tmp_path / "d") == ["shard-000000.tar"]          # nothing written into data.path


def test_cli_index_builds_ahead_and_training_only_reads(tmp_path, capsys, monkeypatch, scans):
    write_shards(tmp_path / "d", 12, 3)
    idx = tmp_path / "i"
    assert cli.main(["index", str(tmp_path / "d"), "--index-dir", str(idx), "--jobs", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["shards"] == 4 and out["good_samples"] == 12 and out["index_dir"] == str(idx)
    assert out["validation"] == ("full" if loader_mod.dali_available() else "header")
    assert cli.main(["index", str(tmp_path / "d"), "--index-dir", str(idx), "--validate", "--jobs", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["validation"] == "full"
    scans.clear()
    cfg = tiny_cfg(tmp_path / "d", "data.loader=pytorch", f"data.index_dir={idx}")
    assert loader_mod.build_loader(cfg).num_samples == 12 and scans == []   # nothing indexed at start
    assert cli.main(["index", str(tmp_path / "nope"), "--jobs", "1"]) == 2
    assert "SHARDS" in capsys.readouterr().err


def test_unwritable_index_dir_is_one_clear_error(tmp_path):
    (path,) = write_shards(tmp_path / "d", 2, 10)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="data.index_dir"):
        index_shard(str(path), index_dir=tmp_path / "file" / "sub")
