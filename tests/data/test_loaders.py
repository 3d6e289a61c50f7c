"""Both loaders on the same shards: the batch contract, epochs, determinism, resume, rank split."""
import pytest
import torch

from fasttips.data.batch import check_batch
from fasttips.data.loader import build_loader, dali_available

from data_helpers import tiny_cfg

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
def test_dali_resume_from_checkpoint_and_from_replay(tiny_shards, caplog):
    cfg = tiny_cfg(tiny_shards, "data.loader=dali")
    L = build_loader(cfg)
    take(L, 7)                                             # past the first epoch (6 batches)
    state = L.state_dict()
    assert isinstance(state["dali_checkpoint"], str) and state["dali_checkpoint"]
    expected = take(L, 2)
    broken = dict(state, dali_checkpoint="bm90IGEgY2hlY2twb2ludA==")
    for st in (state, broken):
        R = build_loader(cfg)
        R.load_state_dict(st)
        got = take(R, 2)
        assert [b["keys"] for b in got] == [b["keys"] for b in expected]
        assert all(torch.equal(e["global_crops"], g["global_crops"]) for e, g in zip(expected, got))
    assert "replaying 7 batches" in caplog.text


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
