"""Activation recomputation (``train.activation_checkpointing``, fasttips/recompute.py).

- Every policy trains exactly as no checkpointing: the same losses and gradients (fp32) through the
  real training step, with drop-path and dropout on (the recomputed forward must replay their RNG).
- Each policy recomputes what it says: the ops that run during the backward are counted with a
  TorchDispatchMode. ``full`` re-runs every matmul of every block, ``every_k`` those of blocks k, 2k,
  ..., ``selective`` none (and still recomputes the norms and activations); the attention ops
  (the reference's bmm, SDPA, fasttips' own flash-attention op) are kept by ``selective``.
- It composes with per-block torch.compile (a dynamo + AOT graph with the selective policy).
- The config: the words, the old true/false, and bad values as one line.
"""
from __future__ import annotations

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.utils._python_dispatch import TorchDispatchMode

from fasttips import config as config_lib
from fasttips import flops
from fasttips.data.batch import synthetic_batch
from fasttips.distributed import fsdp
from fasttips.optim import clean_name
from fasttips.recompute import SAVED_OPS, checkpointed_blocks, wrap_block
from fasttips.schedules import Schedules
from fasttips.training import build_training

# Small and deep enough for every_k to leave some blocks out (vision 3 blocks → [1], text 2 → [1]).
SMALL = ["data.source=synthetic", "vision.depth=3", "text.depth=2", "text.max_len=8", "heads.hidden=64",
         "heads.bottleneck=32", "heads.prototypes=64", "data.batch_size=2", "data.global_size=28",
         "data.local_size=14", "data.n_local=2", "train.precision=fp32", "train.device=cpu"]
RANDOM = ["vision.drop_path=0.2", "text.dropout=0.1"]      # the recomputation must replay these draws
POLICIES = ["full", "every_k", "selective"]
MATMULS = ("aten::addmm", "aten::mm", "aten::bmm")


def small(*overrides):
    return config_lib.load(None, [*SMALL, *overrides])


def _batches(cfg, n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    d = cfg.data
    return [synthetic_batch(d.batch_size, d.global_size, d.local_size, n_global=d.n_global, n_local=d.n_local,
                            max_len=cfg.text.max_len, vocab_size=cfg.text.vocab_size, generator=g)
            for _ in range(n)]


def _train(cfg, steps: int = 2):
    """``steps`` real training steps; per step the outcome and the gradients the optimiser saw."""
    training = build_training(cfg, fsdp.init_distributed(cfg))
    grads = []
    training.optimizer.register_step_pre_hook(lambda opt, args, kwargs: grads.append(
        {clean_name(n): p.grad.clone() for n, p in training.model.named_parameters() if p.grad is not None}))
    schedules = Schedules(cfg, world_size=1)
    torch.manual_seed(1)                          # the same drop-path / dropout stream for every policy
    outcomes = [training.train_step([b], schedules(step)) for step, b in enumerate(_batches(cfg, steps))]
    return training, outcomes, grads


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_trains_as_no_checkpointing(policy):
    base = [*RANDOM, "train.ac_every=2"]
    _, ref_out, ref_grads = _train(small(*base))
    training, out, grads = _train(small(*base, f"train.activation_checkpointing={policy}"))
    wrapped = sum(isinstance(b, CheckpointWrapper) for blocks in fsdp.block_lists(training.model) for b in blocks)
    assert wrapped == {"full": 5, "every_k": 2, "selective": 5}[policy]
    for step in range(len(ref_out)):
        assert out[step].loss == pytest.approx(ref_out[step].loss, rel=1e-6, abs=1e-7)
        assert out[step].terms == pytest.approx(ref_out[step].terms, rel=1e-6, abs=1e-7)
        assert out[step].grad_norms == pytest.approx(ref_out[step].grad_norms, rel=1e-6)
        assert grads[step].keys() == ref_grads[step].keys()
        for name, g in ref_grads[step].items():
            torch.testing.assert_close(grads[step][name], g, rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------------------
# What is recomputed: ops counted during the backward
# ------------------------------------------------------------------------------------------------
class OpCounter(TorchDispatchMode):
    """Counts ops by schema name (e.g. ``aten::addmm``) while active."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def __getitem__(self, name: str) -> int:
        return self.counts.get(name, 0)


def _backward_counts(cfg, block_forward: dict | None = None) -> OpCounter:
    """Ops run by the backward of one micro-batch's losses. ``block_forward``, when given, collects
    the ops of each block's own forward, keyed by (tower, block index)."""
    training = build_training(cfg, fsdp.init_distributed(cfg))
    handles = []
    if block_forward is not None:
        for tower, blocks in zip(("vision", "text"), fsdp.block_lists(training.model)):
            for i, block in enumerate(blocks):
                counter = block_forward[(tower, i)] = OpCounter()
                handles.append(block.register_forward_pre_hook(lambda m, a, c=counter: c.__enter__() and None))
                handles.append(block.register_forward_hook(lambda m, a, o, c=counter: c.__exit__(None, None, None)))
    torch.manual_seed(0)
    losses = training.loss_forward(training.teacher, training.loss_state, _batches(cfg, 1)[0], 0.05, cfg)
    for h in handles:
        h.remove()
    with OpCounter() as counter:
        losses["loss"].backward()
    return counter


def test_each_policy_recomputes_what_it_says():
    per_block: dict = {}
    off = _backward_counts(small(), per_block)
    full, every_k, selective = (_backward_counts(small(f"train.activation_checkpointing={p}", "train.ac_every=2"))
                                for p in POLICIES)
    # Every block's matmuls run again, but torch stops a recomputation at the last tensor the
    # backward needs: in a vision block (no LayerScale, no drop-path) that is before the MLP's
    # output projection (one addmm per block call; one GELU per call counts them). Text blocks
    # mask the padding after theirs, so they run whole.
    def recomputed(key, op):
        skipped = per_block[key]["aten::gelu"] if key[0] == "vision" and op == "aten::addmm" else 0
        return per_block[key][op] - skipped

    for op in MATMULS:
        assert full[op] - off[op] == sum(recomputed(k, op) for k in per_block), op
        assert every_k[op] - off[op] == sum(recomputed(k, op) for k in [("vision", 1), ("text", 1)]), op
        assert selective[op] == off[op], op                        # none do
    assert full["aten::addmm"] - off["aten::addmm"] > 0 and full["aten::bmm"] > off["aten::bmm"]
    # selective still recomputes the cheap ops: the norms and activations of every block
    for op in ("aten::native_layer_norm", "aten::gelu", "aten::relu", "aten::_softmax"):
        in_blocks = sum(c[op] for c in per_block.values())
        assert in_blocks > 0, op
        assert selective[op] - off[op] == in_blocks == full[op] - off[op], op


def _sdpa(q, k, v, key_padding_mask=None, scale=None):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


@pytest.mark.parametrize("attention", ["reference", "sdpa", "triton"])
def test_selective_keeps_the_attention_output(attention, monkeypatch, seed):
    """One vision block on one sequence (the dense attention path); the attention op of each
    backend runs again in the backward under ``full`` and never under ``selective``."""
    from fasttips import kernels
    from fasttips.kernels._backend import interpreting
    from fasttips.models.layers import Packing
    from fasttips.models.vit import Block
    op = {"reference": "aten::bmm", "sdpa": "aten::_scaled_dot_product_flash_attention_for_cpu",
          "triton": "fasttips::flash_attention_fwd"}[attention]
    if attention == "triton":
        if not interpreting():
            pytest.skip("the Triton attention on CPU tensors needs TRITON_INTERPRET=1")
        monkeypatch.setenv("FASTTIPS_KERNELS", "triton")
    elif attention == "sdpa":
        monkeypatch.setattr(kernels, "attention", _sdpa)
    assert op in SAVED_OPS
    block = Block(64, 1, 128, "gelu", True, 0.0, 0.0, 1e-6)
    x = torch.randn(1 * 20, 64)
    packing = Packing.from_lengths([20], "cpu")
    counts, grads = {}, {}
    for policy in ("off", "full", "selective"):
        model = block if policy == "off" else wrap_block(block, policy)
        xi = x.clone().requires_grad_()
        out = model(xi, packing)
        with OpCounter() as counter:
            out.square().sum().backward()
        counts[policy], grads[policy] = counter, xi.grad
        block.zero_grad()
    per_call = 2 if attention == "reference" else 1              # q·kᵀ and p·v
    assert counts["full"][op] - counts["off"][op] == per_call
    assert counts["selective"][op] == counts["off"][op]
    for policy in ("full", "selective"):
        torch.testing.assert_close(grads[policy], grads["off"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Which blocks, the FLOP model, torch.compile
# ------------------------------------------------------------------------------------------------
def test_every_k_wraps_blocks_k_2k_of_each_tower():
    assert checkpointed_blocks(5, "every_k", 2) == [1, 3]
    assert checkpointed_blocks(5, "every_k", 1) == checkpointed_blocks(5, "full") == [0, 1, 2, 3, 4]
    assert checkpointed_blocks(5, "every_k", 5) == [4]
    assert checkpointed_blocks(5, "off") == []
    from fasttips.models import build_model
    cfg = small("vision.depth=5", "text.depth=3")
    model = build_model(cfg)
    fsdp.apply_activation_checkpointing(model, "every_k", 2)
    wrapped = [[i for i, b in enumerate(blocks) if isinstance(b, CheckpointWrapper)]
               for blocks in fsdp.block_lists(model)]
    assert wrapped == [[1, 3], [1]]


def test_flop_model_recompute_per_policy():
    """The model FLOPs do not change with the policy; the recomputed forward is the blocks' forward
    of every pass with gradients, per checkpointed block (the FlopCounterMode check is in
    tests/test_flops.py)."""
    base = ["preset=vit-l", "vision.depth=4", "text.depth=4"]
    models = {p: flops.flop_model(config_lib.load(None, [*base, f"train.activation_checkpointing={p}",
                                                         "train.ac_every=2"]))
              for p in ("off", *POLICIES)}
    assert len({m.per_image for m in models.values()}) == 1
    assert models["off"].recompute == models["selective"].recompute == 0
    assert models["every_k"].recompute == pytest.approx(models["full"].recompute / 2)
    # by hand: 4 vision blocks over the full and masked global view and the local crops, less each
    # block's MLP output projection (torch stops the recomputation before it), and the text blocks
    D, H, T = 1024, 4096, 64
    n_g, n_l = (224 // 14) ** 2 + 2, (98 // 14) ** 2 + 2
    block = lambda n, h: n * (8 * D * D + 4 * D * h) + 4 * n * n * D                 # noqa: E731
    vision = 4 * (2 * (block(n_g, H) - 2 * n_g * H * D) + 8 * (block(n_l, H) - 2 * n_l * H * D))
    text = 2 * 4 * block(T, 4 * D)
    assert models["full"].recompute == pytest.approx(vision + text)
    with_ls = flops.flop_model(config_lib.load(None, [*base, "vision.layerscale=1e-5",
                                                      "train.activation_checkpointing=full"]))
    assert with_ls.recompute == pytest.approx(4 * (2 * block(n_g, H) + 8 * block(n_l, H)) + text)
    full = models["full"]
    assert full.hardware_per_image == full.per_image + full.recompute
    assert "with the recomputed forward" in full.describe()
    assert "recomputed" not in models["selective"].describe()
    assert flops.mfu(full.hardware_per_image, 10.0, 1e15) > flops.mfu(full.per_image, 10.0, 1e15)


@pytest.mark.parametrize("policy, attention", [("full", "reference"), ("selective", "reference"),
                                               ("selective", "triton-varlen"), ("full", "triton-dense")])
def test_checkpointed_blocks_compile(policy, attention, monkeypatch, seed):
    """AC → per-block compile (the engine's order): dynamo traces the checkpoint and the selective
    policy into the block's graph as one piece (fullgraph: a graph break inside the checkpoint
    would run the whole block uncompiled; ``aot_eager``: the AOT joint graph and partitioner, no
    C++ compiler), gradients as eager without checkpointing, and selective recomputes no matmul.
    Compiled first, from a fresh process's state: the kernels' Triton check not yet cached (caching
    it inside the checkpoint was a graph break). ``triton-*``: the GPU's attention paths (the custom
    op, dense and on packed crops of two sizes), here in the Triton interpreter."""
    import torch._dynamo
    from fasttips.kernels import _backend
    from fasttips.models.layers import Packing
    from fasttips.models.vit import Block
    torch._dynamo.reset()
    monkeypatch.setattr(_backend, "_TRITON_AVAILABLE", None)
    lengths = [10, 10]
    if attention.startswith("triton"):
        if not _backend.interpreting():
            pytest.skip("the Triton attention on CPU tensors needs TRITON_INTERPRET=1")
        monkeypatch.setenv("FASTTIPS_KERNELS", "triton")
        lengths = [12, 8] if attention == "triton-varlen" else lengths
    block = Block(64, 1, 128, "gelu", True, 0.0, 0.0, 1e-6)
    x = torch.randn(sum(lengths), 64)
    packing = Packing.from_lengths(lengths, "cpu")
    results = {}
    for name in (policy, "off"):
        model = block if name == "off" else wrap_block(block, policy)
        model = model if name == "off" else torch.compile(model, backend="aot_eager", fullgraph=True)
        xi = x.clone().requires_grad_()
        out = model(xi, packing)
        with OpCounter() as counter:
            out.square().sum().backward()
        results[name] = (out.detach(), xi.grad, {n: p.grad.clone() for n, p in block.named_parameters()}, counter)
        block.zero_grad()
    torch.testing.assert_close(results[policy][0], results["off"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[policy][1], results["off"][1], rtol=1e-5, atol=1e-6)
    for n, g in results["off"][2].items():
        torch.testing.assert_close(results[policy][2][n], g, rtol=1e-5, atol=1e-6, msg=n)
    recomputed = sum(results[policy][3][op] - results["off"][3][op]
                     for op in (*MATMULS, "fasttips::flash_attention_fwd"))
    # full: qkv, proj, fc1 and the attention (reference: q·kᵀ and p·v; Triton: one op); fc2's output
    # is not needed by the backward, so the partitioner does not repeat it (nor does eager, above)
    assert recomputed == (0 if policy == "selective" else 3 + (2 if attention == "reference" else 1))


# ------------------------------------------------------------------------------------------------
# The config
# ------------------------------------------------------------------------------------------------
def test_config_words_and_the_old_booleans(tmp_path):
    load = lambda *o: config_lib.load(None, list(o)).train.activation_checkpointing   # noqa: E731
    assert load() == "off"
    for word in ("off", "full", "every_k", "selective"):
        assert load(f"train.activation_checkpointing={word}") == word
    assert load("train.activation_checkpointing=true") == "full"     # configs from before the words
    assert load("train.activation_checkpointing=false") == "off"
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  activation_checkpointing: true\n")
    assert config_lib.load(old).train.activation_checkpointing == "full"
    cfg = config_lib.load(None, ["train.activation_checkpointing=off"])
    config_lib.save(cfg, tmp_path / "saved.yaml")                    # 'off' must not come back as false
    assert "activation_checkpointing: 'off'" in (tmp_path / "saved.yaml").read_text()
    assert config_lib.load(tmp_path / "saved.yaml").train.activation_checkpointing == "off"


@pytest.mark.parametrize("overrides, words", [
    (["train.activation_checkpointing=sometimes"], ["train.activation_checkpointing", "selective", "every_k"]),
    (["train.activation_checkpointing=2"], ["train.activation_checkpointing"]),
    (["train.ac_every=0"], ["train.ac_every", ">= 1"]),
    (["train.activation_checkpointing=every_k", "train.ac_every=3"], ["train.ac_every", "vision.depth=2"]),
])
def test_bad_values_are_one_config_line(overrides, words):
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.load(None, overrides)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_a_checkpoint_resumes_under_another_policy(tmp_path):
    """Checkpoints name parameters without the wrapper's part (DCP's FQNs), so a run written under
    one policy resumes under another (e.g. after an OOM): the same weights, optimiser state and
    next step. Saved under ``full`` after one step, loaded under ``off`` and ``every_k``."""
    from fasttips.distributed.checkpoint import (CheckpointManager, latest_checkpoint, restore_training_state,
                                                 training_state)

    def state(training):
        return training_state(training.model, training.optimizer, **training.stateful_modules())

    def next_step(training, cfg):
        torch.manual_seed(7)
        grads = []
        hook = training.optimizer.register_step_pre_hook(lambda opt, args, kwargs: grads.append(
            {clean_name(n): p.grad.clone() for n, p in training.model.named_parameters() if p.grad is not None}))
        out = training.train_step(_batches(cfg, 1, seed=5), Schedules(cfg)(1))
        hook.remove()
        return out, grads[0]

    base = [*RANDOM, "train.ac_every=2"]
    cfg = small(*base, "train.activation_checkpointing=full")
    writer = build_training(cfg, fsdp.init_distributed(cfg))
    writer.train_step(_batches(cfg, 1), Schedules(cfg)(0))
    manager = CheckpointManager(tmp_path / "ckpt", keep=1, ctx=writer.ctx)
    manager.save(1, state(writer), {}, {}, {})
    saved = {clean_name(n): p.detach().clone() for n, p in writer.model.named_parameters()}
    results = {}
    for policy in ("off", "every_k"):
        cfg = small(*base, f"train.activation_checkpointing={policy}")
        reader = build_training(cfg, fsdp.init_distributed(cfg))
        target = state(reader)
        manager.load(latest_checkpoint(tmp_path / "ckpt")[1], target)
        restore_training_state(target, reader.model, reader.optimizer, **reader.stateful_modules())
        for n, p in reader.model.named_parameters():
            assert torch.equal(p.detach(), saved[clean_name(n)]), (policy, n)
        results[policy] = next_step(reader, cfg)
    want, want_grads = next_step(writer, cfg)
    for policy, (out, grads) in results.items():
        assert out.loss == pytest.approx(want.loss, rel=1e-6, abs=1e-7), policy
        for name, g in want_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=f"{policy} {name}")


@pytest.mark.dist
def test_policies_under_fsdp2_two_ranks(tmp_path):
    """FSDP2 after AC (the engine's order) on 2 gloo ranks: every policy's losses and gradients
    equal the sharded run without checkpointing. The worker is this file run by torchrun."""
    import os
    import re
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    assert set(re.findall(r"PASS (\w+) \(rank 0\)", done.stdout)) == set(POLICIES), done.stdout


def _fsdp_worker() -> None:
    """Each rank trains its half of the batch (1 image) under FSDP2; gradients are compared as full
    tensors after the reduce-scatter."""
    torch.set_num_threads(1)
    results = {}
    for policy in ["off", *POLICIES]:
        cfg = small(*RANDOM, "data.batch_size=1", f"train.activation_checkpointing={policy}", "train.ac_every=2")
        training = build_training(cfg, fsdp.init_distributed(cfg))
        assert training.ctx.sharded and training.ctx.world_size == 2
        rank = training.ctx.rank
        grads = []
        training.optimizer.register_step_pre_hook(lambda opt, args, kwargs: grads.append(
            {clean_name(n): p.grad.full_tensor().clone() for n, p in training.model.named_parameters()
             if p.grad is not None}))
        schedules = Schedules(cfg, world_size=2)
        torch.manual_seed(1 + rank)
        outs = [training.train_step([b], schedules(step)) for step, b in enumerate(_batches(cfg, 1, seed=rank))]
        results[policy] = (outs, grads)
        if policy == "off":
            continue
        ref_outs, ref_grads = results["off"]
        for step in range(len(outs)):
            assert outs[step].loss == pytest.approx(ref_outs[step].loss, rel=1e-6, abs=1e-7)
            assert outs[step].grad_norms == pytest.approx(ref_outs[step].grad_norms, rel=1e-6)
            for name, g in ref_grads[step].items():
                torch.testing.assert_close(grads[step][name], g, rtol=1e-5, atol=1e-7, msg=f"{policy} {name}")
        print(f"PASS {policy} (rank {rank})", flush=True)
    fsdp.shutdown()


if __name__ == "__main__":
    _fsdp_worker()
