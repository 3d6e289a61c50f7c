"""Fixtures for the data tests: tiny shards in a temp folder, caches kept in temp folders."""
from __future__ import annotations

import pytest

from data_helpers import write_shards


@pytest.fixture(autouse=True)
def data_dir(tmp_path_factory, monkeypatch):
    """Caches (tokenizers, read-only-shard indexes) go to a temp folder, never to ~/.cache."""
    d = tmp_path_factory.getbasetemp() / "fasttips-data-cache"
    monkeypatch.setenv("FASTTIPS_DATA_DIR", str(d))
    return d


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """24 good samples in 3 shards of 8 (64×64 JPEGs)."""
    folder = tmp_path_factory.mktemp("tiny_shards")
    write_shards(folder, 24, 8)
    return folder
