"""Caption field mapping: shards laid out as img2dataset / LAION write them (``.jpg`` + ``.txt`` +
``.json`` with ``caption``) train with ``data.caption_fields``, in both loaders; the default reads
fasttips' own ``.json`` alt / short / long, and a missing caption says what was expected."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from fasttips.data import loader as loader_mod
from fasttips.data.caption_fields import (DEFAULT, IMG2DATASET_CAPTION_FIELDS, caption_fields_of,
                                          parse_caption_fields)
from fasttips.data.shards import MemberReader, index_shard

from data_helpers import jpeg, tiny_cfg

N = 8


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def img2dataset_shards(tmp_path, seed):
    """What img2dataset writes: {key}.jpg, {key}.txt (the caption), {key}.json (metadata with
    "caption", "url", "key", "status"...). Half the samples carry the caption only in the .json."""
    rng = np.random.default_rng(seed)
    expected = {}
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i in range(N):
            key = f"{i:09d}"
            caption = f"a photo of thing {i} on a table"
            meta = {"url": f"https://example.com/{i}.jpg", "key": key, "status": "success", "width": 64,
                    "height": 64, "caption": caption}
            _add(tar, f"{key}.jpg", jpeg(rng))
            if i % 2 == 0:
                _add(tar, f"{key}.txt", caption.encode())
                meta["caption"] = None                          # the .txt is the caption here
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            expected[key] = caption
    return tmp_path, expected


def test_default_mapping_skips_them_and_says_what_it_expects(img2dataset_shards):
    folder, _ = img2dataset_shards
    with pytest.raises(ValueError) as info:
        loader_mod.build_loader(tiny_cfg(folder, "data.loader=pytorch"))
    msg = str(info.value)
    assert "missing_caption" in msg and ".json field 'alt'" in msg and IMG2DATASET_CAPTION_FIELDS in msg


@pytest.mark.parametrize("kind", ["pytorch", "dali"])
def test_img2dataset_shards_train_with_a_caption_mapping(kind, img2dataset_shards):
    if kind == "dali" and not loader_mod.dali_available():
        pytest.skip("nvidia.dali is not installed")
    folder, expected = img2dataset_shards
    cfg = tiny_cfg(folder, f"data.loader={kind}")
    cfg.data.caption_fields = IMG2DATASET_CAPTION_FIELDS     # config field data.caption_fields (str)
    L = loader_mod.build_loader(cfg)
    assert L.kind == kind and sum(L.stats.values()) == 0
    seen = set()
    for _, batch in zip(range(2), L):
        want, _ = L.tokenizer.encode([expected[k] for k in batch["keys"]])
        assert torch.equal(batch["alt_ids"], want)
        seen |= set(batch["keys"])
    assert seen == set(expected)


def test_mapping_parsing_and_extraction():
    f = parse_caption_fields("alt=txt|json:caption, long=json:description")
    assert f.exts == ("json", "txt")
    assert f.extract({"txt": b" a cat \n", "json": b'{"description": "a long cat"}'}) == {
        "alt": "a cat", "long": "a long cat"}
    assert f.extract({"txt": b"", "json": b'{"caption": "from json"}'}) == {"alt": "from json"}
    assert f.extract({"txt": b"\xff\xfe", "json": b"[1, 2]"}) == {}       # not UTF-8, not an object
    assert DEFAULT.extract({"json": b'{"alt": "x", "short": "  ", "long": 3}'}) == {"alt": "x"}
    for bad in ("caption=txt", "alt", "alt=json:", "alt=txt,alt=json:x", "alt=a b", "alt=txt:x"):
        with pytest.raises(ValueError, match="data.caption_fields"):
            parse_caption_fields(bad)
    assert caption_fields_of(tiny_cfg("x")) == DEFAULT      # a config without the field: the default


def test_the_index_follows_the_mapping(img2dataset_shards):
    folder, expected = img2dataset_shards
    shard = str(folder / "00000.tar")
    assert index_shard(shard).skipped["missing_caption"] == N
    ix = index_shard(shard, fields=parse_caption_fields(IMG2DATASET_CAPTION_FIELDS))
    reader = MemberReader()
    assert {s.key: reader.captions(s)["alt"] for s in ix.samples} == expected
    assert index_shard(shard).skipped["missing_caption"] == N          # rebuilt for the default again
