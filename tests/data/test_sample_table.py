"""The packed in-memory index (``sample_table.py``): each shard's samples as columns give back the very
``Sample`` objects a list held (keys, image, caption members, extras, caption mapping), the loader's
concatenation over shards keeps the stream order, and a sample costs a small fraction of the memory."""
from __future__ import annotations

import gc
import pickle
import tracemalloc

import numpy as np
import pytest

from fasttips.data.caption_fields import parse_caption_fields
from fasttips.data.pipeline import SampleStream, StreamSpec, seed_words
from fasttips.data.sample_table import ConcatSamples, PackedSamples
from fasttips.data.shards import Sample, ShardWriter, _scan, index_shard

from data_helpers import captions_of, jpeg, write_shards


def _same(table, samples):
    """``table`` behaves as the list ``samples`` does: length, items, negative items, iteration."""
    assert len(table) == len(samples)
    assert [table[i] for i in range(len(samples))] == samples
    assert list(table) == samples
    for i in range(1, len(samples) + 1):
        assert table[-i] == samples[-i]
    assert table[1:] == samples[1:] and table[::-2] == samples[::-2]
    for bad in (len(samples), -len(samples) - 1):
        with pytest.raises(IndexError):
            table[bad]


def test_tables_equal_the_list_of_samples_fresh_and_from_the_cached_index(tmp_path):
    paths = write_shards(tmp_path / "shards", 7, 3)                  # shards of 3, 3 and 1 samples
    for p in paths:
        listed, _ = _scan(str(p))
        fresh = index_shard(str(p), index_dir=tmp_path / "i")
        cached = index_shard(str(p), index_dir=tmp_path / "i")      # read back from the .index.json
        assert isinstance(fresh.samples, PackedSamples) and isinstance(cached.samples, PackedSamples)
        _same(fresh.samples, listed)
        _same(cached.samples, listed)
        assert list(fresh.samples.keys) == [s.key for s in listed]
        assert fresh.samples.keys[-1] == listed[-1].key


def test_extras_and_caption_members_a_sample_lacks(tmp_path):
    """Several caption extensions (txt and json), present in some samples only, and extras of varying
    kinds come back as the list had them: an absent member is absent, not a (-1, -1) range."""
    fields = parse_caption_fields("alt=txt|json:alt,short=json:short,long=caption.txt")
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path, samples_per_shard=100) as w:
        for i in range(9):
            extras = {}
            if i % 3 == 0:
                extras["txt"] = f"plain caption {i}".encode()
            if i % 2 == 0:
                extras["mask.png"] = b"\x89PNG not really"
            if i % 4 == 1:
                extras["caption.txt"] = f"long caption {i}".encode()
            if i == 5:
                extras["meta.bin"] = b""                             # an empty member: (offset, 0)
            w.write(f"k{i}", jpeg(rng), "png" if i == 4 else "jpg", captions_of(i), extras)
    shard = str(tmp_path / "shard-000000.tar")
    listed, _ = _scan(shard, fields)
    assert {len(s.texts) for s in listed} == {1, 2}                  # some lack txt / caption.txt
    assert {len(s.extras) for s in listed} >= {0, 1}
    ix = index_shard(shard, fields=fields, index_dir=tmp_path / "i")
    _same(ix.samples, listed)
    _same(index_shard(shard, fields=fields, index_dir=tmp_path / "i").samples, listed)
    assert ix.samples[4].image[0] == "png" and ix.samples[5].extras["meta.bin"][1] == 0
    assert all(s.fields == fields for s in ix.samples)


def test_odd_keys_round_trip():
    """Keys hold what tar names can: spaces, ':', non-ASCII, and undecodable bytes (surrogate escapes)."""
    keys = ["a b:c", "ключ/x", "bad\udcff\udc80", "", "日本"]
    samples = [Sample("s.tar", k, ("jpg", 10 * i, 5), {"json": (10 * i + 5, 3)}) for i, k in enumerate(keys)]
    table = PackedSamples.from_samples(samples)
    _same(table, samples)
    assert list(table.keys) == keys


def test_one_shard_and_one_caption_mapping_per_table():
    a = Sample("a.tar", "k", ("jpg", 0, 1), {"json": (1, 1)})
    with pytest.raises(ValueError):
        PackedSamples.from_samples([a, Sample("b.tar", "k", ("jpg", 0, 1), {"json": (1, 1)})])
    with pytest.raises(ValueError):
        PackedSamples.from_samples([a, Sample("a.tar", "k", ("jpg", 0, 1), {"txt": (1, 1)},
                                              fields=parse_caption_fields("alt=txt"))])
    with pytest.raises(ValueError):
        PackedSamples.from_samples([])                               # an empty one needs its shard
    assert len(PackedSamples.from_samples([], shard="e.tar")) == 0


def test_concatenation_over_shards_of_different_sizes_and_an_empty_one(tmp_path):
    paths = [str(p) for p in write_shards(tmp_path / "shards", 12, 5)]   # 5, 5 and 2 samples
    (tmp_path / "shards" / "broken.tar").write_bytes(b"not a tar at all" * 64)
    paths.insert(1, str(tmp_path / "shards" / "broken.tar"))
    indexes = [index_shard(p, index_dir=tmp_path / "i") for p in paths]
    assert [len(ix.samples) for ix in indexes] == [5, 0, 5, 2]
    listed = [s for ix in indexes for s in ix.samples]
    both = ConcatSamples([ix.samples for ix in indexes])
    _same(both, listed)
    empty = PackedSamples.from_samples([], shard="e.tar")
    _same(ConcatSamples([empty, indexes[0].samples, empty]), listed[:5])
    assert len(ConcatSamples([])) == 0 and not ConcatSamples([empty])
    with pytest.raises(IndexError):
        ConcatSamples([])[0]


def test_the_stream_over_the_tables_is_the_stream_over_the_list(tmp_path):
    """Resume compatibility: the same seed gives the same samples in the same order as the list did,
    across epoch boundaries, and the permutation is the one seed_words gives."""
    indexes = [index_shard(str(p), index_dir=tmp_path / "i") for p in write_shards(tmp_path / "s", 11, 4)]
    listed = [s for ix in indexes for s in ix.samples]
    spec = StreamSpec(seed=5, rank=0, world_size=1, batch_size=4)
    packed = SampleStream(ConcatSamples([ix.samples for ix in indexes]), spec)
    plain = SampleStream(listed, spec)
    n = len(listed)
    assert [packed.at(p) for p in range(4 * n)] == [plain.at(p) for p in range(4 * n)]
    for epoch in range(4):
        expected = np.random.default_rng(seed_words(5, epoch, 0)).permutation(n)
        assert packed.order(epoch).tolist() == expected.tolist()
        assert [packed.at(epoch * n + i)[1] for i in range(n)] == [listed[j] for j in expected]


def test_the_stream_keeps_two_epoch_orders():
    samples = [Sample("a.tar", f"k{i}", ("jpg", i, 1), {"json": (i, 1)}) for i in range(50)]
    stream = SampleStream(PackedSamples.from_samples(samples), StreamSpec(1, 0, 1, 4))
    first = stream.order(0).copy()
    for epoch in (1, 0, 2, 3):
        stream.order(epoch)
    assert sorted(stream._orders) == [2, 3]
    assert stream.order(0).tolist() == first.tolist()                  # recomputed, identical
    assert pickle.loads(pickle.dumps(stream))._orders == {}           # not shipped to a worker


def test_tables_pickle_and_round_trip(tmp_path):
    indexes = [index_shard(str(p), index_dir=tmp_path / "i") for p in write_shards(tmp_path / "s", 7, 4)]
    for ix in indexes:
        again = pickle.loads(pickle.dumps(ix.samples))
        assert list(again) == list(ix.samples) and list(again.keys) == list(ix.samples.keys)
    both = ConcatSamples([ix.samples for ix in indexes])
    assert list(pickle.loads(pickle.dumps(both))) == list(both)
    assert pickle.loads(pickle.dumps(indexes[0])).samples[2] == indexes[0].samples[2]


def _traced_bytes(build):
    """Bytes still allocated (traced) after ``build()``, with what it returns kept alive."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, kept
    finally:
        tracemalloc.stop()


def test_a_packed_sample_costs_a_fraction_of_a_listed_one():
    """20k samples of one shard as the TIPS shards hold them (key, .jpg, .json), and with one extra
    member (the demo's mask). Measured (Python 3.11, numpy 64-bit): ~660 and ~880 bytes a sample as a
    list, ~56 and ~82 packed."""
    n = 20_000
    shard = "/data/laion/shards/part-00123/shard-004567.tar"

    def listed(extra: bool):
        return [Sample(shard, f"{123_000_000 + i:09d}", ("jpg", 1536 * i + 512, 40_000 + i),
                       {"json": (1536 * i + 1024, 300)}, {"mask.png": (1536 * i + 1500, 900)} if extra else {})
                for i in range(n)]
    for extra in (False, True):
        list_bytes, samples = _traced_bytes(lambda: listed(extra))
        packed_bytes, table = _traced_bytes(lambda: PackedSamples.from_samples(samples))
        assert table[-1] == samples[-1]
        per_list, per_packed = list_bytes / n, packed_bytes / n
        assert per_list > 500, per_list
        assert per_packed < (110 if extra else 80), per_packed
        assert per_packed * 6 < per_list, (per_packed, per_list)
        assert table.nbytes() <= packed_bytes
