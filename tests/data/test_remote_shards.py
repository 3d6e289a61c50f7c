"""Shards at fsspec URLs: memory:// fully, http:// against a local server (ranges, a 404, a 403,
a server that fails the first requests), file://, and the loader choice for remote shards."""
import http.server
import json
import logging
import os
import threading
import time
import uuid

import fsspec
import pytest

from fasttips.data import cli, loader as loader_mod, storage
from fasttips.data.shards import MemberReader, index_shard, list_shards

from data_helpers import tiny_cfg, write_shards


@pytest.fixture(autouse=True)
def fast_retries():
    storage.configure(retries=3, backoff_s=0.01)
    yield
    storage.configure(retries=3, backoff_s=0.5)


@pytest.fixture
def memory_shards(tmp_path):
    """12 samples in 3 shards, copied into fsspec's memory filesystem under a fresh bucket."""
    paths = write_shards(tmp_path / "local", 12, 4)
    fs, bucket = fsspec.filesystem("memory"), f"/b{uuid.uuid4().hex[:8]}"
    for p in paths:
        fs.pipe(f"{bucket}/shards/{p.name}", p.read_bytes())
    yield f"memory://{bucket}/shards", paths
    fs.rm(bucket, recursive=True)


def test_memory_shards_list_index_and_read_like_local_ones(memory_shards, tmp_path):
    url, local = memory_shards
    urls = list_shards(url)
    assert urls == [f"{url}/{p.name}" for p in local]
    assert list_shards(f"{url}/*.tar") == urls and list_shards(urls[1]) == [urls[1]]
    reader = MemberReader()
    for u, p in zip(urls, local):
        remote, here = index_shard(u, validate="full"), index_shard(str(p))
        assert remote.dali_index is None                              # DALI reads local files only
        assert [(s.key, s.image) for s in remote.samples] == [(s.key, s.image) for s in here.samples]
        assert [reader.image(s) for s in remote.samples] == [reader.image(s) for s in here.samples]
        assert [reader.captions(s) for s in remote.samples] == [reader.captions(s) for s in here.samples]


def test_training_loader_streams_memory_shards(memory_shards, tmp_path, caplog, monkeypatch):
    url, _ = memory_shards
    monkeypatch.setattr(loader_mod, "dali_available", lambda: True)   # as if DALI were installed
    cfg = tiny_cfg(url, f"data.index_dir={tmp_path / 'idx'}")
    with caplog.at_level(logging.INFO, logger="fasttips.data"):
        assert loader_mod.resolve_loader_kind(cfg, list_shards(url)) == "pytorch"
    assert "DALI loader reads local files only" in caplog.text
    dali_cfg = tiny_cfg(url)
    dali_cfg.data.loader = "dali"                 # (set after loading: the config's own check wants DALI installed)
    with pytest.raises(ValueError, match="data.loader=dali: memory://.* is remote"):
        loader_mod.resolve_loader_kind(dali_cfg, list_shards(url))
    ld = loader_mod.build_loader(tiny_cfg(url, "data.loader=pytorch", f"data.index_dir={tmp_path / 'idx'}"))
    assert ld.num_samples == 12
    batch = next(ld)
    assert len(batch["keys"]) == 4 and batch["global_crops"].shape[-1] == 56
    # the index was cached (keyed by URL and the store's version tag): the next start reads it
    assert any(n.endswith(".index.json") for n in os.listdir(tmp_path / "idx"))


def test_missing_remote_shard_is_one_line_naming_the_url(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"memory://nope/x\.tar: not found"):
        list_shards("memory://nope/x.tar")
    assert cli.main(["check", "memory://nope/x.tar"]) == 2
    err = capsys.readouterr().err
    assert "memory://nope/x.tar: not found" in err and len(err.strip().splitlines()) == 1


def test_file_urls_are_local_paths(tmp_path):
    paths = write_shards(tmp_path, 4, 2)
    assert list_shards(f"file://{tmp_path}") == [str(p) for p in paths]


def test_missing_backend_names_the_package(monkeypatch):
    def no_backend(url, **kw):
        err = ImportError("Install s3fs to access S3")
        err.name = "s3fs"
        raise err
    monkeypatch.setattr(fsspec.core, "url_to_fs", no_backend)
    with pytest.raises(ImportError, match=r"s3://b/x\.tar: reading s3:// needs the optional package s3fs"):
        storage.filesystem("s3://b/x.tar")


# --- http:// against a local server ----------------------------------------------------------
class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder with HTTP Range support; ``fail_next`` requests get a 503, paths under
    /private/ a 403. Requests are counted by method."""
    fail_next = 0
    fail_ranges = 0                 # ranged GETs (reads of the data, after the size is known) to fail
    fail_status = 503               # ... with this status (403: access refused, e.g. expired credentials)
    ok_ranges = 0                   # ... after letting this many through
    only = ""                       # ... of the paths holding this (all when empty)
    counts: dict = {}

    def log_message(self, *args):
        pass

    def _refuse(self) -> bool:
        type(self).counts[self.command] = type(self).counts.get(self.command, 0) + 1
        if type(self).fail_next > 0:
            type(self).fail_next -= 1
            self.send_error(503, "try again")
            return True
        if self.path.startswith("/private/"):
            self.send_error(403, "Forbidden")
            return True
        return False

    def do_HEAD(self):
        if not self._refuse():
            super().do_HEAD()

    def do_GET(self):
        if self._refuse():
            return
        rng = self.headers.get("Range") if type(self).only in self.path else None
        if rng and type(self).fail_ranges > 0 and type(self).ok_ranges > 0:
            type(self).ok_ranges -= 1
        elif rng and type(self).fail_ranges > 0:
            type(self).fail_ranges -= 1
            self.send_error(type(self).fail_status, "try again" if type(self).fail_status == 503 else "Forbidden")
            return
        path = self.translate_path(self.path)
        rng = self.headers.get("Range")
        if not rng or not os.path.isfile(path):
            return super().do_GET()
        start, _, end = rng.removeprefix("bytes=").partition("-")
        data = open(path, "rb").read()
        start, end = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
        body = data[start:end + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def http_shards(tmp_path):
    pytest.importorskip("aiohttp", reason="fsspec's http:// backend needs aiohttp (the remote extra)")
    paths = write_shards(tmp_path / "www", 8, 4)

    class H(Handler):
        counts = {}

        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(tmp_path / "www"), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", paths, H
    server.shutdown()
    server.server_close()


def test_http_shards_index_and_read(http_shards, tmp_path):
    base, paths, H = http_shards
    url = f"{base}/{paths[0].name}"
    ix = index_shard(url, validate="full", index_dir=tmp_path / "i")
    assert [s.key for s in ix.samples] == [s.key for s in index_shard(str(paths[0])).samples]
    assert MemberReader().image(ix.samples[2]) == MemberReader().image(index_shard(str(paths[0])).samples[2])
    gets = H.counts["GET"]
    again = index_shard(url, validate="full", index_dir=tmp_path / "i")
    assert H.counts["GET"] == gets and len(again.samples) == 4    # cached by URL + Last-Modified: no re-read


def test_http_server_failing_the_first_requests_is_retried(http_shards, tmp_path, caplog):
    base, paths, H = http_shards
    H.fail_next = 2
    with caplog.at_level(logging.WARNING, logger="fasttips.data"):
        ix = index_shard(f"{base}/{paths[1].name}", index_dir=tmp_path / "i")
    assert len(ix.samples) == 4 and "retry 1 of 3" in caplog.text and "503" in caplog.text
    H.fail_ranges = 10                                            # the data reads fail more than retries
    with pytest.raises(OSError, match=r"shard-000000\.tar: reading bytes .* failed after 4 tries.*503"):
        index_shard(f"{base}/{paths[0].name}", index_dir=tmp_path / "i")
    H.fail_ranges = 0                                             # the outage was not cached as damage
    assert len(index_shard(f"{base}/{paths[0].name}", index_dir=tmp_path / "i").samples) == 4
    H.fail_next = 10
    with pytest.raises(OSError, match=r"http://127\.0\.0\.1:\d+/shard-000000\.tar: .* failed after 4 tries"):
        MemberReader().read(f"{base}/{paths[0].name}", 0, 10)


def test_http_404_and_403_are_one_line_errors(http_shards, tmp_path):
    base, _, H = http_shards
    with pytest.raises(FileNotFoundError, match=r"/nope\.tar: not found"):
        index_shard(f"{base}/nope.tar", index_dir=tmp_path / "i")
    H.counts.clear()
    with pytest.raises(PermissionError, match=r"/private/x\.tar: access denied .*credentials"):
        index_shard(f"{base}/private/x.tar", index_dir=tmp_path / "i")
    assert H.counts == {"HEAD": 1, "GET": 1}      # one info() (fsspec tries HEAD, then GET): not retried


def test_http_folder_trains_with_worker_processes(http_shards, tmp_path):
    base, paths, H = http_shards
    assert list_shards(f"{base}/") == [f"{base}/{p.name}" for p in paths]      # the index page's links
    ld = loader_mod.build_loader(tiny_cfg(f"{base}/", "data.loader=pytorch", "data.num_workers=2"))
    try:
        keys = [k for _ in range(2) for k in next(ld)["keys"]]
    finally:
        ld.close()
    assert len(set(keys)) == 8 and ld.stats["unreadable_shard"] == 0


def test_cli_index_of_remote_shards(memory_shards, tmp_path, capsys):
    url, _ = memory_shards
    assert cli.main(["index", url, "--index-dir", str(tmp_path / "i"), "--jobs", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # remote shards are read by the PyTorch loader, whose default check is the header one
    assert out["shards"] == 3 and out["good_samples"] == 12 and out["validation"] == "header"
    assert len([n for n in os.listdir(tmp_path / "i") if n.endswith(".index.json")]) == 3
    assert not [n for n in os.listdir(tmp_path / "i") if n.endswith(".idx")]      # no DALI index for URLs


def test_an_outage_in_the_middle_of_a_shard_is_not_cached_as_damage(http_shards, tmp_path, monkeypatch):
    base, paths, H = http_shards
    monkeypatch.setattr(storage, "CHUNK", 1024)                   # many requests per shard
    H.ok_ranges, H.fail_ranges = 3, 4             # one read of the tar headers fails 4 times (1 + 3 retries)
    with pytest.raises(OSError, match=r"shard-000000\.tar: reading bytes .* failed after 4 tries"):
        index_shard(f"{base}/{paths[0].name}", index_dir=tmp_path / "i")
    H.ok_ranges = H.fail_ranges = 0
    ix = index_shard(f"{base}/{paths[0].name}", index_dir=tmp_path / "i")
    assert len(ix.samples) == 4 and sum(ix.skipped.values()) == 0


# --- an outage is not damage (issue 25.2) ------------------------------------------------------------
def _keys(ld, n):
    return [k for _ in range(n) for k in next(ld)["keys"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_outage_longer_than_the_deadline_skips_nothing_and_stops_the_loader(http_shards, tmp_path,
                                                                                 workers, capfd):
    base, _, H = http_shards
    cfg = tiny_cfg(f"{base}/", "data.loader=pytorch", f"data.num_workers={workers}",
                   "data.outage_deadline_s=0.3", f"data.index_dir={tmp_path / 'i'}")
    reference = loader_mod.build_loader(cfg)
    expected = _keys(reference, 8)
    reference.close()
    ld = loader_mod.build_loader(cfg)
    seen = _keys(ld, 1)
    H.fail_ranges = 10**9                                       # the store stops answering, for good
    with pytest.raises(storage.RemoteOutage, match=r"did not answer for .* \(data\.outage_deadline_s=0\.3\)"):
        for _ in range(6):                                      # (batches the workers built ahead come first)
            seen += next(ld)["keys"]
    assert seen == expected[:len(seen)] and ld.batches == len(seen) // 4
    assert sum(ld.stats.values()) == 0                          # nothing skipped
    assert "skipped" not in capfd.readouterr().err
    H.fail_ranges = 0                                           # it answers again: a resumed loader goes on
    again = loader_mod.build_loader(cfg)
    again.load_state_dict(ld.state_dict())
    assert _keys(again, 2) == expected[len(seen):len(seen) + 8]
    again.close()


def test_an_outage_shorter_than_the_deadline_is_waited_out(http_shards, tmp_path, caplog):
    base, _, H = http_shards
    cfg = tiny_cfg(f"{base}/", "data.loader=pytorch", "data.outage_deadline_s=30",
                   f"data.index_dir={tmp_path / 'i'}")
    expected = _keys(loader_mod.build_loader(cfg), 2)
    ld = loader_mod.build_loader(cfg)
    H.fail_ranges = 10                                          # more failures in a row than data.retries
    with caplog.at_level(logging.WARNING, logger="fasttips.data"):
        assert _keys(ld, 2) == expected
    assert sum(ld.stats.values()) == 0 and "trying again" in caplog.text and "skipped" not in caplog.text


def test_access_refused_while_training_skips_nothing_and_stops_at_once(http_shards, tmp_path, capfd):
    """Expired credentials are not damage: the loader stops at the batch it cannot read (no waiting for
    data.outage_deadline_s, no skip counted) and a loader resumed once access is back goes on."""
    base, _, H = http_shards
    cfg = tiny_cfg(f"{base}/", "data.loader=pytorch", "data.outage_deadline_s=600",
                   f"data.index_dir={tmp_path / 'i'}")
    reference = loader_mod.build_loader(cfg)
    expected = _keys(reference, 6)
    reference.close()
    ld = loader_mod.build_loader(cfg)
    seen = _keys(ld, 1)
    H.fail_status, H.fail_ranges = 403, 10**9
    H.counts.clear()
    started = time.monotonic()
    with pytest.raises(storage.AccessLost, match=r"access denied .*credentials") as caught:
        for _ in range(4):
            seen += next(ld)["keys"]
    assert time.monotonic() - started < 30                      # not waited for (the deadline is 600 s)
    assert isinstance(caught.value, storage.DataStop) and isinstance(caught.value, PermissionError)
    assert H.counts["GET"] == 1                                 # a refusal is not retried
    assert seen == expected[:len(seen)] and sum(ld.stats.values()) == 0
    assert "skipped" not in capfd.readouterr().err
    H.fail_ranges = 0
    again = loader_mod.build_loader(cfg)
    again.load_state_dict(ld.state_dict())
    assert _keys(again, 2) == expected[len(seen):len(seen) + 8]
    again.close()


def test_load_time_skips_are_counted_once_each_with_one_line_each(tmp_path, capfd, caplog):
    """With worker processes building batches ahead: each sample skipped in a batch handed out is one
    line and one count; batches built ahead but never handed out count nothing."""
    from data_helpers import write_shards as write
    paths = write(tmp_path / "d", 16, 4)
    ld = loader_mod.build_loader(tiny_cfg(tmp_path / "d", "data.loader=pytorch", "data.num_workers=2",
                                          f"data.index_dir={tmp_path / 'i'}"))
    with open(paths[1], "r+b") as f:
        f.truncate(1024)                                        # a quarter of the samples can no longer be read
    capfd.readouterr()
    with caplog.at_level(logging.WARNING, logger="fasttips.data"):
        _keys(ld, 3)
    ld.close()
    lines = [r.getMessage() for r in caplog.records if "skip" in r.getMessage()]
    assert not [line for line in capfd.readouterr().err.splitlines() if "skip" in line]   # none from workers
    assert ld.stats["unreadable_shard"] > 0
    assert len(lines) == sum(ld.stats.values()), lines
    assert all("at load time: unreadable_shard" in line for line in lines), lines


def _train(*args):
    from fasttips.train import main
    return main(["--no-progress", "vision.depth=1", "text.depth=1", "text.max_len=8", "text.vocab_size=200",
                 "heads.hidden=64", "heads.bottleneck=32", "heads.prototypes=64", "data.batch_size=4",
                 "data.global_size=28", "data.local_size=14", "data.n_local=2", "optim.warmup_steps=2",
                 "data.loader=pytorch", "data.num_workers=0", "train.steps=4", "train.ckpt_every=100", *args])


@pytest.mark.parametrize("status", [503, 403], ids=["outage", "access-refused"])
def test_training_through_an_outage_checkpoints_stops_and_resumes_with_the_samples_not_seen(
        http_shards, tmp_path, capsys, status):
    """503s past the deadline, or a 403 (credentials expired mid-run): either way no sample is skipped,
    the run checkpoints the state before the step it could not feed, exits 5 with one line saying
    which, and the resumed run is bit for bit the uninterrupted one."""
    import json as json_

    base, _, H = http_shards

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json_.loads, (run / "metrics.jsonl").read_text().splitlines())}
    data = [f"data.path={base}/", f"data.index_dir={tmp_path / 'i'}", "data.outage_deadline_s=0.3"]
    assert _train(*data, f"train.run_dir={tmp_path / 'ref'}") == 0           # uninterrupted (and caches
    capsys.readouterr()                                                       # the index and tokenizer)
    H.fail_status = status
    H.ok_ranges, H.fail_ranges = 2 * 4 * 2, 10**9     # 2 steps of 4 samples (image + caption), then down
    assert _train(*data, f"train.run_dir={tmp_path / 'run'}") == 5
    out, err = capsys.readouterr()
    stop = [line for line in err.splitlines() if line.startswith("fasttips train: stopped")]
    assert len(stop) == 1 and "no sample was skipped" in stop[0], err[-2000:]
    if status == 503:
        assert "stayed unavailable past data.outage_deadline_s=0.3" in stop[0]
    else:
        assert "refused access" in stop[0] and "renewed credentials" in stop[0] and "deadline" not in stop[0]
    assert "--resume" in stop[0] and "skipped" not in out and "unreadable_shard" not in out + err
    done = [p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file()]
    assert done == ["step_00000002"]
    H.ok_ranges = H.fail_ranges = 0
    assert _train("--resume", str(tmp_path / "run")) == 0
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")             # bit for bit: same samples, same draws


def test_an_outage_on_one_rank_stops_every_rank_after_a_checkpoint_of_the_step_before(http_shards, tmp_path):
    """2 ranks under torchrun, each with its own shard; only rank 1's shard stops answering during step 2.
    Rank 1 runs the step on stand-ins, the step's flags tell rank 0, no rank updates anything, and both
    write the checkpoint of step 1 with their data position before step 2."""
    pytest.importorskip("torch.distributed.run")
    import subprocess
    import sys

    import torch
    base, _, H = http_shards
    data = [f"data.path={base}/", f"data.index_dir={tmp_path / 'i'}", "data.outage_deadline_s=0.2",
            "data.retries=0", "data.loader=pytorch", "data.num_workers=0", "data.batch_size=4",
            "text.vocab_size=200"]
    loader_mod.build_loader(tiny_cfg(f"{base}/", *data)).close()       # the index and the tokenizer, cached
    H.only, H.ok_ranges, H.fail_ranges = "shard-000001", 4 * 2, 10**9   # rank 1: one step, then down
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "fasttips.train", "--no-progress", "vision.depth=1", "text.depth=1", "text.max_len=8",
         "heads.hidden=64", "heads.bottleneck=32", "heads.prototypes=64", "data.global_size=28",
         "data.local_size=14", "data.n_local=2", "train.steps=4", "train.ckpt_every=100", *data,
         f"train.run_dir={run_dir}"],
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"), capture_output=True, text=True,
        timeout=300)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "rank 1: data: the storage did not answer" in done.stderr, done.stderr[-3000:]
    assert "stopped before step 2" in done.stderr and "no sample was skipped" in done.stderr
    (ckpt,) = [p for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file()]
    assert ckpt.name == "step_00000001"
    for rank in (0, 1):
        state = torch.load(ckpt / f"rank_{rank:05d}.pt", weights_only=True)
        assert state["data"]["batches"] == 1, state["data"]
    assert "skipped" not in done.stdout
