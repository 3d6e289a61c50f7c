"""Sample keys of any form WebDataset allows, and tars damaged in the middle or cut off, through
the index and both loaders."""
from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest

from fasttips.data import loader as loader_mod
from fasttips.data.shards import _scan, index_shard

from data_helpers import jpeg, tiny_cfg, write_shards

KINDS = ["pytorch", "dali"]
ODD_KEYS = ["a b", "2024-01-01T10:00:00", "dir.v1/x", "ünï 日本", "x:y z", "semi;colon", "tab\tkey", "plain"]


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _need(kind):
    if kind == "dali" and not loader_mod.dali_available():
        pytest.skip("nvidia.dali is not installed")


@pytest.mark.parametrize("kind", KINDS)
def test_any_webdataset_key_reaches_the_batch_unchanged(kind, tmp_path, seed):
    _need(kind)
    rng = np.random.default_rng(seed)
    with tarfile.open(tmp_path / "odd.tar", "w", format=tarfile.PAX_FORMAT) as tar:   # PAX: unicode names
        for i, key in enumerate(ODD_KEYS):
            _add(tar, f"{key}.jpg", jpeg(rng))
            _add(tar, f"{key}.json", json.dumps({"alt": f"caption {i}"}).encode())
    L = loader_mod.build_loader(tiny_cfg(tmp_path, f"data.loader={kind}"))
    assert L.kind == kind
    keys = [k for _, batch in zip(range(2), L) for k in batch["keys"]]   # 8 samples, one epoch
    assert sorted(keys) == sorted(ODD_KEYS)


def test_dali_source_info_parsing_keeps_colons_in_the_path():
    from fasttips.data.shards import parse_dali_source
    assert parse_dali_source("/data/2024:01/shard.tar:51200:7.jpg") == ("/data/2024:01/shard.tar", 7)


def _cut_shard(tmp_path, n=6):
    (path,) = write_shards(tmp_path / "src", n, n)
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar}
    return path.read_bytes(), members


@pytest.mark.parametrize("where", ["mid_image", "mid_caption", "between_samples"])
def test_a_cut_off_tar_keeps_every_sample_before_the_cut(tmp_path, where):
    data, members = _cut_shard(tmp_path)
    m = members["s0003.jpg" if where != "mid_caption" else "s0003.json"]
    cut = {"mid_image": m.offset_data + m.size // 2, "mid_caption": m.offset_data + 3,
           "between_samples": m.offset}[where]
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    samples, skipped = _scan(str(tmp_path / "cut.tar"))
    assert [s.key for s in samples] == ["s0000", "s0001", "s0002"]
    assert skipped["damaged_tar"] == 1 and skipped["unreadable_shard"] == 0
    assert skipped["damaged_sample"] == (0 if where == "between_samples" else 1)


def test_a_damaged_header_loses_only_its_sample(tmp_path):
    data, members = _cut_shard(tmp_path)
    broken = bytearray(data)
    broken[members["s0002.jpg"].offset + 20] ^= 0xFF        # the header fails its checksum
    (tmp_path / "hdr.tar").write_bytes(bytes(broken))
    samples, skipped = _scan(str(tmp_path / "hdr.tar"))
    assert [s.key for s in samples] == ["s0000", "s0001", "s0003", "s0004", "s0005"]
    assert skipped["damaged_sample"] == 1 and skipped["damaged_tar"] == 1


def test_garbage_after_the_last_member_is_counted(tmp_path):
    data, members = _cut_shard(tmp_path)
    end = max(m.offset_data + m.size for m in members.values())
    end += -end % 512
    (tmp_path / "tail.tar").write_bytes(data[:end] + b"\x01" * 1024)
    samples, skipped = _scan(str(tmp_path / "tail.tar"))
    assert len(samples) == 6 and skipped["damaged_tar"] == 1 and skipped["damaged_sample"] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_loaders_read_the_intact_part_of_a_cut_off_tar(kind, tmp_path, caplog):
    _need(kind)
    data, members = _cut_shard(tmp_path, n=8)
    m = members["s0005.jpg"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cut.tar").write_bytes(data[: m.offset_data + m.size // 3])
    with caplog.at_level(logging.WARNING, logger="fasttips.data"):
        L = loader_mod.build_loader(tiny_cfg(tmp_path / "data", f"data.loader={kind}"))
    assert "damaged" in caplog.text
    assert L.stats["damaged_sample"] == 1 and L.stats["unreadable_shard"] == 0
    keys = {k for _, batch in zip(range(5), L) for k in batch["keys"]}
    assert keys == {f"s{i:04d}" for i in range(5)}
    assert index_shard(str(tmp_path / "data" / "cut.tar")).skipped == L.stats


# --- a key seen twice in one shard (issue 25.5): the first complete sample is kept, the rest counted --
def _duplicate_shard(path, rng):
    """s0, s1 (a complete sample, written again later with another caption), s2 (an image alone, then
    later its complete sample), s3; and s1's image a third time on its own at the end."""
    images = {k: jpeg(rng) for k in ("s0", "s1", "s1-again", "s2-alone", "s2", "s3", "s1-third")}
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [("s0.jpg", images["s0"]), ("s0.json", b'{"alt": "zero"}'),
                           ("s1.jpg", images["s1"]), ("s1.json", b'{"alt": "one, first"}'),
                           ("s2.jpg", images["s2-alone"]),
                           ("s1.jpg", images["s1-again"]), ("s1.json", b'{"alt": "one, second"}'),
                           ("s2.jpg", images["s2"]), ("s2.json", b'{"alt": "two"}'),
                           ("s3.jpg", images["s3"]), ("s3.json", b'{"alt": "three"}'),
                           ("s1.jpg", images["s1-third"])]:
            _add(tar, name, data)
    return images


def test_a_duplicate_key_is_counted_and_the_first_complete_sample_kept(tmp_path, seed):
    from fasttips.data.shards import MemberReader
    images = _duplicate_shard(tmp_path / "dup.tar", np.random.default_rng(seed))
    ix = index_shard(str(tmp_path / "dup.tar"), index_dir=tmp_path / "idx")
    assert [s.key for s in ix.samples] == ["s0", "s1", "s2", "s3"]      # each key once, in tar order
    reader = MemberReader()
    by_key = {s.key: s for s in ix.samples}
    assert reader.captions(by_key["s1"]) == {"alt": "one, first"}
    assert reader.image(by_key["s1"]) == images["s1"]
    assert reader.image(by_key["s2"]) == images["s2"]     # s2's first occurrence had no caption
    # s1 twice more, s2's lone image once; nothing is counted as anything else
    assert ix.skipped["duplicate_key"] == 3 and sum(ix.skipped.values()) == 3
    assert sorted(ix.skipped_keys) == [("s1", "duplicate_key"), ("s1", "duplicate_key"),
                                       ("s2", "duplicate_key")]


@pytest.mark.parametrize("kind", KINDS)
def test_both_loaders_read_a_duplicated_key_once(kind, tmp_path, seed):
    _need(kind)
    (tmp_path / "data").mkdir()
    _duplicate_shard(tmp_path / "data" / "dup.tar", np.random.default_rng(seed))
    L = loader_mod.build_loader(tiny_cfg(tmp_path / "data", f"data.loader={kind}",
                                         f"data.index_dir={tmp_path / 'idx'}"))
    assert L.num_samples == 4 and L.stats["duplicate_key"] == 3
    keys = [k for k in next(L)["keys"]]                  # batch 4 = one epoch
    assert sorted(keys) == ["s0", "s1", "s2", "s3"]


def test_data_check_lists_duplicate_keys_and_says_which_one_is_kept(tmp_path, seed, capsys):
    from fasttips.data import cli
    (tmp_path / "data").mkdir()
    _duplicate_shard(tmp_path / "data" / "dup.tar", np.random.default_rng(seed))
    assert cli.main(["check", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["duplicate_key"] == 3 and json.loads(out[-1])["good_samples"] == 4
    listed = [line for line in out if "duplicate_key" in line and not line.startswith("{")]
    assert len(listed) == 3 and all("first complete" in line for line in listed), out
