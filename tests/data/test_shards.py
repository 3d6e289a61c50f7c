"""Shard round trip, index validation, and every bad-input case (skipped, counted, reported)."""
import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest

from fasttips.data import loader as loader_mod
from fasttips.data.shards import (MemberReader, ShardWriter, index_shard, list_shards, rank_slice,
                                  split_name)

from data_helpers import captions_of, jpeg, tiny_cfg, write_shards


def test_round_trip(tmp_path, seed):
    rng = np.random.default_rng(seed)
    written = {}
    with ShardWriter(tmp_path, samples_per_shard=3) as w:
        for i in range(7):
            img = jpeg(rng)
            extra = os.urandom(20)
            caps = {"alt": f"alt {i} ü", "short": f"short {i}"} if i % 2 else captions_of(i)
            w.write(f"k{i}", img, "jpg", caps, extras={"mask.png": extra})
            written[f"k{i}"] = (img, caps, extra)
    assert [p.name for p in w.paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    reader = MemberReader()
    seen = {}
    for shard in list_shards(str(tmp_path)):
        ix = index_shard(shard)
        assert sum(ix.skipped.values()) == 0 and os.path.isfile(ix.dali_index)
        for s in ix.samples:
            seen[s.key] = (reader.image(s), reader.captions(s), reader.extra(s, "mask.png"))
    assert seen == written
    # the DALI index lists the same members at the same offsets as wds2idx would, named by the
    # sample's number (keys may hold spaces, which the index format cannot)
    with tarfile.open(w.paths[0]) as tar:
        offsets = {m.name: (m.offset_data, m.size) for m in tar}
    ix = index_shard(str(w.paths[0]))
    lines = open(ix.dali_index).read().split("\n")
    assert lines[0] == "v1.2 3"
    for i, line in enumerate(lines[1:4]):
        _, off, size, name, _, joff, jsize, jname = line.split()
        key = ix.samples[i].key
        assert (name, jname) == (f"{i}.jpg", f"{i}.json")
        assert offsets[f"{key}.jpg"] == (int(off), int(size)) and offsets[f"{key}.json"] == (int(joff), int(jsize))


def _open_shard_files(folder) -> int:
    fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
           if os.path.exists(f"/proc/self/fd/{fd}")]
    return sum(str(folder) in target and target.endswith(".tar") for target in fds)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_reader_keeps_at_most_max_open_shard_files_open(tmp_path, seed):
    """A shuffled epoch over many local shards must not hold one open file per shard (ulimit -n)."""
    import pickle
    paths = write_shards(tmp_path / "d", 12, 2)                     # 6 shards
    samples = [s for p in paths for s in index_shard(str(p)).samples]
    order = np.random.default_rng(seed).permutation(len(samples) * 3) % len(samples)
    reader, unbounded = MemberReader(max_open=2), MemberReader(max_open=10**6)
    most = 0
    for i in order:
        assert reader.image(samples[i]) == unbounded.image(samples[i])
        assert reader.captions(samples[i]) == unbounded.captions(samples[i])
        most = max(most, len(reader._files))
    assert most == 2 and len(unbounded._files) == len(paths)
    unbounded.close()
    assert _open_shard_files(tmp_path / "d") == 2                   # the others were closed, not leaked
    worker_copy = pickle.loads(pickle.dumps(reader))                 # as a DataLoader worker gets it
    assert worker_copy.max_open == 2 and not worker_copy._files
    reader.close()
    assert _open_shard_files(tmp_path / "d") == 0
    with pytest.raises(ValueError, match="max_open=0"):
        MemberReader(max_open=0)


def test_index_is_cached_and_rebuilt_when_the_shard_changes(tmp_path):
    (path,) = write_shards(tmp_path, 3, 10)
    first = index_shard(str(path))
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.tar"]      # nothing written beside the shards
    assert [s.key for s in index_shard(str(path)).samples] == [s.key for s in first.samples]
    write_shards(tmp_path, 2, 10)                        # same file name, new content
    assert len(index_shard(str(path)).samples) == 2


def test_split_name():
    assert split_name("a/b/key.mask.png") == ("a/b/key", "mask.png")
    assert split_name("key.JPG") == ("key", "jpg")
    assert split_name("README") == ("README", "")


def test_missing_path_fails_at_start_naming_data_path(tmp_path):
    for path in (tmp_path / "nope", ""):
        with pytest.raises((FileNotFoundError, ValueError), match="data.path"):
            loader_mod.build_loader(tiny_cfg(path, "data.loader=pytorch") if path else
                                    tiny_cfg(tmp_path / "x", "data.loader=pytorch", "data.source=shards",
                                             "data.path=''"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="data.path.*no .tar shards"):
        loader_mod.build_loader(tiny_cfg(empty, "data.loader=pytorch"))


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def bad_shards(tmp_path, seed):
    """One shard with each bad-sample kind next to good ones, a garbage 'tar', a truncated tar."""
    rng = np.random.default_rng(seed)
    good = []
    with tarfile.open(tmp_path / "mixed.tar", "w") as tar:
        for i in range(6):                                   # good samples
            _add(tar, f"good{i}.jpg", jpeg(rng))
            _add(tar, f"good{i}.json", json.dumps(captions_of(i)).encode())
            good.append(f"good{i}")
        img = jpeg(rng)
        _add(tar, "trunc.jpg", img[: len(img) // 2])         # corrupt: truncated JPEG
        _add(tar, "trunc.json", b'{"alt": "x"}')
        _add(tar, "junk.jpg", b"this is not an image")       # corrupt: not an image at all
        _add(tar, "junk.json", b'{"alt": "x"}')
        _add(tar, "nocap.jpg", jpeg(rng))                    # missing caption member
        _add(tar, "emptycap.jpg", jpeg(rng))                 # empty captions
        _add(tar, "emptycap.json", b'{"alt": "", "short": "   "}')
        _add(tar, "badjson.jpg", jpeg(rng))                  # caption that is not JSON
        _add(tar, "badjson.json", b"{not json")
        _add(tar, "otherkeys.jpg", jpeg(rng))                # JSON without alt / short / long
        _add(tar, "otherkeys.json", b'{"caption": "a cat", "objects": []}')
        _add(tar, "README.txt", b"hello")                    # non-image member
        _add(tar, "labels.cls", b"3")                        # non-image member
    (tmp_path / "garbage.tar").write_bytes(os.urandom(3000))  # unreadable shard
    (paths := write_shards(tmp_path / "t", 4, 10, prefix="cut"))
    data = paths[0].read_bytes()
    with tarfile.open(paths[0]) as tar:                      # cut in the middle of the third image
        third = tar.getmember("s0002.jpg")
    (tmp_path / "truncated.tar").write_bytes(data[: third.offset_data + third.size // 2])
    paths[0].unlink()
    return tmp_path, good + ["s0000", "s0001"]            # the samples before the cut are kept


EXPECTED = {"corrupt_image": 2, "missing_caption": 4, "non_image_member": 2, "unreadable_shard": 1,
            "damaged_sample": 1, "damaged_tar": 1}


def test_bad_input_is_skipped_counted_and_reported(bad_shards, caplog):
    folder, good = bad_shards
    with caplog.at_level(logging.WARNING, logger="fasttips.data"):
        # (full: the truncated JPEG is counted at start; with the PyTorch loader's default header check it
        # may only be met, skipped and counted while loading: test_index_once.py)
        L = loader_mod.build_loader(tiny_cfg(folder, "data.loader=pytorch", "data.validate=full"))
    assert {k: L.stats[k] for k in EXPECTED} == EXPECTED
    assert "skipped" in caplog.text and "unreadable shard" in caplog.text
    mixed = index_shard(str(folder / "mixed.tar"))                   # (cached: the same index)
    assert dict(mixed.skipped_keys) == {
        "trunc": "corrupt_image", "junk": "corrupt_image", "nocap": "missing_caption",
        "emptycap": "missing_caption", "badjson": "missing_caption", "otherkeys": "missing_caption",
        "README": "non_image_member", "labels": "non_image_member"}
    assert dict(index_shard(str(folder / "truncated.tar"), rebuild=True).skipped_keys) == {"s0002": "damaged_sample"}
    keys = set()
    for _, batch in zip(range(8), L):                       # 32 samples = 4 epochs of the 8 good ones
        keys |= set(batch["keys"])
    assert keys == set(good)


def test_a_sample_that_breaks_after_indexing_is_replaced_and_counted(tmp_path, caplog):
    paths = write_shards(tmp_path, 8, 8)
    L = loader_mod.build_loader(tiny_cfg(tmp_path, "data.loader=pytorch"))
    victim = L.stream.samples[int(L.stream.order(0)[0])]
    with open(paths[0], "r+b") as f:                       # damage the first image of epoch 0
        f.seek(victim.image[1] + 200)
        f.write(b"\x00" * (victim.image[2] - 200))
    with caplog.at_level(logging.WARNING, logger="fasttips.data"):
        batch = next(iter(L))
    assert len(batch["keys"]) == 4 and victim.key not in batch["keys"]
    assert L.stats["corrupt_image"] == 1 and "corrupt_image" in caplog.text


def test_rank_slice_partitions():
    for n in (0, 1, 7, 24):
        for world in (1, 2, 3):
            parts = [range(*rank_slice(n, r, world)) for r in range(world)]
            assert sorted(i for p in parts for i in p) == list(range(n))
    with pytest.raises(ValueError, match="rank"):
        rank_slice(4, 2, 2)


@pytest.mark.parametrize("kind", ["pytorch", pytest.param("dali", marks=pytest.mark.skipif(
    not loader_mod.dali_available(), reason="nvidia-dali not installed"))])
def test_a_shard_that_shrinks_after_indexing_is_counted_as_unreadable(tmp_path, kind):
    paths = write_shards(tmp_path, 8, 4)                  # two shards of 4
    L = loader_mod.build_loader(tiny_cfg(tmp_path, f"data.loader={kind}"))
    with open(paths[1], "r+b") as f:
        f.truncate(1024)                                  # keeps the first member header only
    keys = [k for _, b in zip(range(4), L) for k in b["keys"]]
    assert len(keys) == 16 and all(int(k[1:]) < 4 for k in keys)
    assert L.stats["unreadable_shard"] >= 4
