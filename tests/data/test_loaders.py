"""Both loaders on the same shards: the batch contract, epochs, determinism, resume, rank split."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fasttips.data.batch import check_batch
from fasttips.data.loader import build_loader, dali_available

from data_helpers import captions_of, tiny_cfg

LOADERS = ["pytorch", pytest.param("dali", marks=pytest.mark.skipif(
    not dali_available(), reason="nvidia-dali not installed (pip install 'fasttips[dali]')"))]
N_SAMPLES, B = 24, 4


def take(loader, n):
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("kind", LOADERS)
def test_contract_and_one_epoch_covers_every_sample(kind, tiny_shards):
    cfg = tiny_cfg(tiny_shards, f"data.loader={kind}", "data.n_global=2", "data.mask_probability=0.5")
    L = build_loader(cfg)
    assert L.kind == kind and L.tokenizer.vocab_size <= 200
    assert all(v == 0 for v in L.stats.values())
    batches = take(L, N_SAMPLES // B)
    keys = []
    for b in batches:
        assert check_batch(b, n_global=2, n_local=2, patch_size=14) == B
        assert b["global_crops"].shape == (2 * B, 3, 56, 56) and b["local_crops"].shape == (2 * B, 3, 28, 28)
        for name in ("global_crops", "local_crops"):
            x = b[name]
            assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1 and x.std() > 0.05
        assert b["masks"].dtype == torch.bool and int((b["masks"].sum(1) > 0).sum()) == B   # int(2B·0.5)
        assert b["alt_ids"].shape == (B, 16) and (b["alt_ids"][b["alt_pad"]] == 0).all()
        assert (b["syn_ids"][b["syn_pad"]] == 0).all() and (~b["alt_pad"][:, 0]).all()
        assert set(b["caption_kind"].tolist()) <= {1, 2}
        for key, ids in zip(b["keys"], b["alt_ids"]):          # CLS#1 text is the sample's alt-text
            assert L.tokenizer.decode(ids) == f"thing number {int(key[1:])}"
        keys += b["keys"]
    assert sorted(keys) == [f"s{i:04d}" for i in range(N_SAMPLES)]
    nxt = take(L, N_SAMPLES // B)                               # epoch 2: same samples, new order
    assert sorted(k for b in nxt for k in b["keys"]) == sorted(keys)
    assert [k for b in nxt for k in b["keys"]] != keys


@pytest.mark.parametrize("kind", LOADERS)
def test_resume_continues_with_the_same_batches(kind, tiny_shards):
    cfg = tiny_cfg(tiny_shards, f"data.loader={kind}")
    L = build_loader(cfg)
    take(L, 3)
    state = L.state_dict()
    expected = take(L, 2)
    R = build_loader(cfg)
    R.load_state_dict(state)
    got = take(R, 2)
    for e, g in zip(expected, got):
        assert e["keys"] == g["keys"]
        for name in ("global_crops", "local_crops", "masks", "alt_ids", "syn_ids", "caption_kind"):
            assert torch.equal(e[name], g[name]), name


def test_pytorch_loader_same_batches_with_any_worker_count(tiny_shards):
    ref = take(build_loader(tiny_cfg(tiny_shards, "data.loader=pytorch", "data.num_workers=0")), 3)
    par = take(build_loader(tiny_cfg(tiny_shards, "data.loader=pytorch", "data.num_workers=2")), 3)
    for a, b in zip(ref, par):
        assert a["keys"] == b["keys"] and torch.equal(a["global_crops"], b["global_crops"])
    other_seed = take(build_loader(tiny_cfg(tiny_shards, "data.loader=pytorch", "train.seed=5")), 3)
    assert [b["keys"] for b in other_seed] != [b["keys"] for b in ref]


@pytest.mark.parametrize("kind", LOADERS)
def test_negative_seed_is_a_seed_like_any_other(kind, tiny_shards):
    a = take(build_loader(tiny_cfg(tiny_shards, f"data.loader={kind}", "train.seed=-1")), 2)
    b = take(build_loader(tiny_cfg(tiny_shards, f"data.loader={kind}", "train.seed=-1")), 2)
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    assert all(torch.equal(x["global_crops"], y["global_crops"]) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", LOADERS)
def test_two_ranks_split_without_overlap(kind, tiny_shards):
    cfg = tiny_cfg(tiny_shards, f"data.loader={kind}")
    per_rank = []
    for rank in range(2):
        L = build_loader(cfg, rank=rank, world_size=2)
        per_rank.append({k for b in take(L, N_SAMPLES // 2 // B) for k in b["keys"]})
    assert len(per_rank[0]) == len(per_rank[1]) == N_SAMPLES // 2
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == {f"s{i:04d}" for i in range(N_SAMPLES)}


def test_synthetic_source():
    cfg = tiny_cfg("unused", "data.source=synthetic")
    L = build_loader(cfg)
    b = next(L)
    assert check_batch(b, 1, 2, 14) == B
    L.load_state_dict({"batches": 0})
    assert torch.equal(next(L)["global_crops"], b["global_crops"])


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_resume_needs_only_the_position(tiny_shards, caplog):
    """The DALI graph holds no random state: past an epoch, a resumed loader gives the same batches
    from the batch counter alone. A checkpoint of the earlier DALI loader (a pipeline checkpoint of
    its own shuffled reader, no global position) resumes at its batch count, with a warning."""
    cfg = tiny_cfg(tiny_shards, "data.loader=dali")
    L = build_loader(cfg)
    take(L, 7)                                             # past the first epoch (6 batches)
    state = L.state_dict()
    assert state["position"] == 7 * B and "dali_checkpoint" not in state
    expected = take(L, 2)
    R = build_loader(cfg)
    R.load_state_dict(state)
    got = take(R, 2)
    assert [b["keys"] for b in got] == [b["keys"] for b in expected]
    assert all(torch.equal(e["global_crops"], g["global_crops"]) for e, g in zip(expected, got))
    old = {"kind": "dali", "batches": 7, "seed": 0, "rank": 0, "world_size": 1, "num_samples": N_SAMPLES,
           "batch_size": B, "dali_checkpoint": "bm90IGEgY2hlY2twb2ludA=="}
    O = build_loader(cfg)
    O.load_state_dict(old)
    assert [b["keys"] for b in take(O, 2)] == [b["keys"] for b in expected]
    assert "DALI loader shuffled each rank's own slice" in caplog.text


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
@pytest.mark.parametrize("world", [1, 2])
def test_dali_and_pytorch_loaders_take_the_same_samples_in_the_same_order(tiny_shards, world):
    """One global stream for both loaders: the same keys, batch by batch, rank by rank, over two
    epochs; so a checkpoint of either resumes in the other at the same samples."""
    got = {}
    for kind in ("pytorch", "dali"):
        cfg = tiny_cfg(tiny_shards, f"data.loader={kind}", "train.seed=3")
        loaders = [build_loader(cfg, rank=r, world_size=world) for r in range(world)]
        got[kind] = [next(L)["keys"] for _ in range(2 * N_SAMPLES // (B * world)) for L in loaders]
    assert got["dali"] == got["pytorch"]
    assert sorted(k for b in got["dali"][: N_SAMPLES // B] for k in b) == [f"s{i:04d}" for i in range(N_SAMPLES)]


def smooth_jpeg(rng, width: int, height: int) -> bytes:
    """Smooth waves of random phase and frequency per channel: resampling filters barely differ on
    them, and a box or flip taken wrongly shows."""
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    f, phase = rng.uniform(0.6, 1.4, 3), rng.uniform(0, 1, 3)
    waves = [np.sin(2 * np.pi * (f[0] * x + phase[0])), np.sin(2 * np.pi * (f[1] * y + phase[1])),
             np.sin(2 * np.pi * (f[2] * (x + y) / 2 + phase[2]))]
    buf = io.BytesIO()
    Image.fromarray(np.dstack([128 + 100 * w for w in waves]).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def smooth_shards(tmp_path_factory):
    """16 non-square JPEGs; the 400×300 ones are decoded at half scale by the Pillow loader."""
    from fasttips.data.shards import ShardWriter
    folder = tmp_path_factory.mktemp("smooth_shards")
    rng = np.random.default_rng(1)
    with ShardWriter(folder, prefix="smooth", samples_per_shard=8) as w:
        for i in range(16):
            w.write(f"s{i:04d}", smooth_jpeg(rng, *((96, 72) if i % 2 else (400, 300))), "jpg", captions_of(i))
    return folder


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_crops_take_the_pytorch_loaders_boxes_and_flips(smooth_shards, monkeypatch):
    """The same box and flip for every crop of every sample, on the same decoded image size; and the
    DALI crops (before the photometric part) show about the pixels of Pillow's crop of that box."""
    from fasttips.data import augment, dali_loader

    def cfg(kind):
        return tiny_cfg(smooth_shards, f"data.loader={kind}", "data.n_global=2", "data.n_local=2", "data.batch_size=8")
    n_crops, n_batches = 4, 3
    pillow = []                                      # (image size, box, flip, geometric crop) per crop

    def record_apply(img, recipe, d, apply=augment.apply_crop):
        crop = img.resize((recipe.size, recipe.size), Image.BICUBIC, box=d.box)
        crop = np.asarray(crop.transpose(Image.FLIP_LEFT_RIGHT) if d.flip else crop)
        pillow.append((img.size, d.box, d.flip, crop))
        return apply(img, recipe, d)

    monkeypatch.setattr(augment, "apply_crop", record_apply)
    P = build_loader(cfg("pytorch"))
    pytorch_keys = [next(P)["keys"] for _ in range(n_batches)]
    monkeypatch.undo()

    crops_u8 = []

    def record_photometric(x, recipe, rng, pixel_norm, real=dali_loader.photometric):
        crops_u8.append(x.permute(0, 2, 3, 1).numpy().copy())
        return real(x, recipe, rng, pixel_norm)

    monkeypatch.setattr(dali_loader, "photometric", record_photometric)
    D = build_loader(cfg("dali"))
    assert D.kind == "dali"
    near, far = [], []
    for b in range(n_batches):
        assert next(D)["keys"] == pytorch_keys[b]
        fed = D.last_fed
        for j in range(8):
            for i in range(n_crops):
                size, box, flip, want = pillow[(b * 8 + j) * n_crops + i]
                assert fed.sizes[j] == size and fed.boxes[j][i] == (*box, flip), (b, j, i)
                got = crops_u8[b * n_crops + i][j].astype(float)
                near.append(np.abs(got - want).mean())
                far.append(np.abs(got - want[:, ::-1]).mean())        # the other flip
    assert {s for s, *_ in pillow} >= {(96, 72), (200, 150)}           # both decoding scales were taken
    assert np.median(near) < 1 and max(near) < 3, (np.median(near), max(near))       # (measured: 0.2, 0.33)
    assert min(far) > 5 * max(near)                                                   # (measured: 14)


@pytest.mark.gpu
@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_gpu_decoding(tiny_shards):
    """With CUDA, DALI decodes with nvJPEG ('mixed') and augments on the GPU; crops arrive on the GPU."""
    L = build_loader(tiny_cfg(tiny_shards, "data.loader=dali"))
    assert L.device_id is not None
    b = next(L)
    assert b["global_crops"].is_cuda and b["local_crops"].is_cuda
    assert check_batch(b, 1, 2, 14) == B
    assert 0 <= float(b["global_crops"].min()) and float(b["global_crops"].max()) <= 1


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_worker_processes_feed_the_same_samples_and_skips(tmp_path, caplog):
    """data.num_workers=2: the feed runs in DALI's worker processes and the loader gets the same
    keys, batch by batch, and reports the same samples passed over (a shard shrank after indexing)
    in the same batches as with the feed in the main thread and as the PyTorch loader; close()
    stops the workers."""
    import logging
    import multiprocessing

    from data_helpers import write_shards
    paths = write_shards(tmp_path, 8, 4)                  # two shards of 4
    loaders = {name: build_loader(tiny_cfg(tmp_path, *opts)) for name, opts in (
        ("pytorch", ["data.loader=pytorch"]), ("dali_0", ["data.loader=dali", "data.num_workers=0"]),
        ("dali_2", ["data.loader=dali", "data.num_workers=2"]))}
    with open(paths[1], "r+b") as f:
        f.truncate(1024)                                  # keeps the first member header only
    got = {}
    for name, L in loaders.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fasttips.data"):
            got[name] = [(next(L)["keys"], dict(L.stats)) for _ in range(4)]
        got[name].append([r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()])
    assert got["dali_2"] == got["dali_0"] == got["pytorch"]
    assert got["pytorch"][-2][1]["unreadable_shard"] >= 4
    assert len(multiprocessing.active_children()) == 2
    loaders["dali_2"].close()
    assert not multiprocessing.active_children()


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_worker_processes_resume_at_the_right_batch(tiny_shards):
    cfg = tiny_cfg(tiny_shards, "data.loader=dali", "data.num_workers=2")
    L = build_loader(cfg)
    take(L, 4)
    state = L.state_dict()
    expected = take(L, 3)                                 # into the second epoch
    L.close()
    R = build_loader(cfg)
    R.load_state_dict(state)
    got = take(R, 3)
    assert R.last_fed.index == 6
    assert [b["keys"] for b in got] == [b["keys"] for b in expected]
    assert all(torch.equal(e["global_crops"], g["global_crops"]) for e, g in zip(expected, got))


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_workers_started_by_spawn_feed_the_same_samples(tiny_shards, monkeypatch):
    """On a GPU the feed's workers are spawned (a forked child cannot use the parent's CUDA context):
    the Feed pickles into them and gives the batches the forked workers give."""
    from fasttips.data import dali_loader
    assert dali_loader.worker_start_method(gpu=True) == "spawn"
    cfg = tiny_cfg(tiny_shards, "data.loader=dali", "data.num_workers=1")
    forked = build_loader(cfg)
    expected = [b["keys"] for b in take(forked, 3)]
    forked.close()
    monkeypatch.setattr(dali_loader, "worker_start_method", lambda gpu: "spawn")
    spawned = build_loader(cfg)
    assert [b["keys"] for b in take(spawned, 3)] == expected
    spawned.close()
