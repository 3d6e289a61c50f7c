"""``data.path`` means the user's shards: it selects them even when ``data.source`` is left at its
default, and the demo data is never built into (or read from) that folder."""
from __future__ import annotations

import pytest

from fasttips.config import ConfigError, load
from fasttips.data import demo
from fasttips.data import loader as loader_mod
from fasttips.eval import data as eval_data

SMALL = ["data.batch_size=4", "data.num_workers=0", "data.global_size=56", "data.local_size=28",
         "data.n_local=2", "text.max_len=16", "text.vocab_size=200", "data.loader=pytorch"]


def _no_demo(*args, **kwargs):
    raise AssertionError("the demo data was built although data.path names shards")


def test_data_path_without_source_trains_on_those_shards(tiny_shards, monkeypatch):
    monkeypatch.setattr(demo, "ensure_demo_data", _no_demo)
    cfg = load(overrides=[f"data.path={tiny_shards}", *SMALL])      # data.source left at its default
    L = loader_mod.build_loader(cfg)
    keys = {k for _, batch in zip(range(6), L) for k in batch["keys"]}
    assert keys == {f"s{i:04d}" for i in range(24)}
    assert not (tiny_shards / demo.VERSION).exists()
    assert loader_mod.effective_source(cfg.data) == "shards"


def test_demo_data_lives_in_the_cache_only(tmp_path, monkeypatch):
    roots = []
    monkeypatch.setattr(demo, "demo_shards", lambda root=None, split="train": roots.append(root) or [])
    user = tmp_path / "my-data"
    with pytest.raises(ConfigError, match="data.path"):                # demo never touches data.path
        load(overrides=["data.source=demo", f"data.path={user}", *SMALL])
    cfg = load(overrides=["data.source=demo", *SMALL])
    loader_mod.resolve_shards(cfg)
    cfg.data.path = str(user)                                         # eval's default set: the demo cache
    eval_data.eval_shards(cfg, "eval")
    assert roots == [None, None] and not user.exists()
