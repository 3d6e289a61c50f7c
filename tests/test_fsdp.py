"""FSDP2 on 2 CPU ranks (gloo) against one process on the same global batch.

One ``torchrun --nproc_per_node=2`` subprocess runs this file as a script and performs every check
(torchrun start-up costs seconds, so it is paid once). Each rank also keeps a plain, unsharded copy
of the model that trains on the whole global batch: the single-process reference.

Checks (docs/fsdp_and_checkpoints.md Part A, "Tolerance note"):
Both sides are built by the engine's one constructor (``fasttips.training.build_training``).

  grads          the real TIPSv2 losses, one backward: sharded grads == reference grads (tight)
  adamw          two whole training steps (``Training.train_step``: AdamW with its param groups,
                 per-module clipping, logit-scale cap, EMA): losses and grad norms equal, params close
                 (max |Δ| ≤ 0.1·lr, mean |Δ| ≤ 1e-3·lr; skipping the key third of qkv.bias, whose
                 true gradient is 0)
  ema            Teacher.update on local shards == the reference teacher
  accumulation   2 micro-batches with set_requires_gradient_sync(False) on the first == reference
  checkpoint     CheckpointManager save → scramble → load restores every shard bitwise
  meta_init      the constructor's meta path: meta build → shard → to_empty → init_weights; teacher
                 heads copy the student
  trainer        the Trainer itself for 2 steps on 2 ranks, then a resume
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

WORLD = 2
GLOBAL_BATCH = 4
SMALL = ["data.source=synthetic", "vision.depth=2", "text.depth=1", "text.max_len=8",
         "heads.hidden=64", "heads.bottleneck=32", "heads.prototypes=64",
         f"data.batch_size={GLOBAL_BATCH // WORLD}", "data.global_size=28", "data.local_size=14",
         "data.n_local=2", "optim.clip_grad=1.0"]


@pytest.mark.dist
def test_fsdp_two_ranks_match_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", FASTTIPS_FSDP_TMP=str(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           __file__]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    passed = set(re.findall(r"PASS (\w+)", done.stdout))
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    assert set(passed) == set(["grads", "adamw", "ema", "accumulation", "checkpoint", "meta_init",
                             "trainer"]), done.stdout


# ------------------------------------------------------------------------------------------------
# The worker (run by torchrun)
# ------------------------------------------------------------------------------------------------
def _split(batch: dict, rank: int, world: int, n_global: int, n_local: int) -> dict:
    """This rank's images of a global batch (crop-major layouts are sliced per crop)."""
    B = batch["alt_ids"].shape[0]
    b = B // world
    lo, hi = rank * b, (rank + 1) * b

    def crop_major(t, n):
        return t.view(n, B, *t.shape[1:])[:, lo:hi].reshape(n * b, *t.shape[1:])

    out = {k: (v[lo:hi] if k not in ("global_crops", "local_crops", "masks") else v)
           for k, v in batch.items()}
    out["global_crops"] = crop_major(batch["global_crops"], n_global)
    out["masks"] = crop_major(batch["masks"], n_global)
    out["local_crops"] = crop_major(batch["local_crops"], n_local)
    return out


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _worker() -> None:
    import dataclasses

    import torch
    import torch.distributed as dist

    from fasttips import config as config_lib
    from fasttips.data.batch import synthetic_batch
    from fasttips.distributed import fsdp
    from fasttips.distributed.checkpoint import (CheckpointManager, latest_checkpoint, restore_training_state,
                                                 training_state)
    from fasttips.schedules import StepValues
    from fasttips.step import LossState
    from fasttips.train import train
    from fasttips.training import build_training

    torch.set_num_threads(1)
    tmp = Path(os.environ["FASTTIPS_FSDP_TMP"])
    cfg = config_lib.load(None, SMALL)
    ctx = fsdp.init_distributed(cfg)
    rank, world = ctx.rank, ctx.world_size
    assert world == WORLD and ctx.sharded
    # The reference: the same constructor on a one-process context, whose losses must not gather
    # across ranks: its loss state gets a group of its own, on which the contrastive all-gather and
    # the center all-reduce are the identity.
    own = [dist.new_group([r]) for r in range(world)][rank]
    alone = fsdp.DistContext(rank=0, world_size=1, local_rank=0, device=ctx.device, mesh=None,
                             param_dtype=torch.float32)
    d = cfg.data

    def global_batch(seed):
        g = torch.Generator().manual_seed(seed)
        return synthetic_batch(GLOBAL_BATCH, d.global_size, d.local_size, d.n_global, d.n_local,
                               cfg.vision.patch_size, cfg.text.max_len, cfg.text.vocab_size,
                               mask_ratio=0.3, generator=g)

    def local(batch):
        return _split(batch, rank, world, d.n_global, d.n_local)

    def build(**kwargs):
        """(sharded, reference): the engine's own training objects, same seed, same weights."""
        sharded = build_training(cfg, ctx, **kwargs)
        reference = build_training(cfg, alone)
        return sharded, dataclasses.replace(reference, loss_state=LossState(cfg, group=own))

    teacher_temp = 0.05

    def forward_backward(training, batch, scale=1.0):
        with fsdp.gathered(training.gather_modules):       # a no-op for the unsharded reference
            losses = training.loss_forward(training.teacher, training.loss_state, batch, teacher_temp, cfg)
        (losses["loss"] * scale).backward()
        return losses["loss"].detach()

    def compare_grads(model, reference, what):
        """Per tensor: ‖g − g_ref‖ ≤ 1e-5·‖g_ref‖ + 1e-7 (summation order differs between layouts)."""
        ref = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            if p.grad is None:
                assert ref[name].grad is None, f"{what}: {name} has no gradient"
                continue
            err = (_full(p.grad) - ref[name].grad).norm().item()
            scale = ref[name].grad.norm().item()
            assert err <= 1e-5 * scale + 1e-7, f"{what}: {name} grad off by {err:.2e} (norm {scale:.2e})"

    # grads -------------------------------------------------------------------------------------
    sharded, reference = build()
    for (n, p), q in zip(sharded.model.named_parameters(), reference.model.parameters()):
        assert torch.equal(_full(p.detach()), q.detach()), f"{n}: the two builds differ"
    batch = global_batch(1)
    loss = forward_backward(sharded, local(batch))
    ref_loss = forward_backward(reference, batch)
    dist.all_reduce(loss)
    torch.testing.assert_close(loss / world, ref_loss, atol=1e-5, rtol=1e-5)
    compare_grads(sharded.model, reference.model, "grads")
    print(f"PASS grads (rank {rank})", flush=True)

    # adamw + ema: two whole training steps (Training.train_step) -------------------------------
    lr = 1e-3
    sharded, reference = build()
    values = StepValues(lr=lr, weight_decay=0.04, momentum=0.9, teacher_temp=teacher_temp,
                        freeze_prototypes=False)
    for step in range(2):
        batch = global_batch(10 + step)
        out = sharded.train_step([local(batch)], values)
        ref_out = reference.train_step([batch], values)
        assert not out.skipped and not out.stop
        # the first step from identical weights is tight; after it, Adam's rounding noise (below)
        rel = 1e-5 if step == 0 else 1e-3
        assert out.loss == pytest.approx(ref_out.loss, rel=rel)
        for key in ref_out.grad_norms:
            assert out.grad_norms[key] == pytest.approx(ref_out.grad_norms[key], rel=rel, abs=1e-6), (
                key, step, out.grad_norms, ref_out.grad_norms)
    ref = dict(reference.model.named_parameters())
    width = cfg.vision.width
    for name, p in sharded.model.named_parameters():
        got, want = _full(p.detach()), ref[name].detach()
        if name.endswith("qkv.bias"):     # the key bias's true gradient is 0 (notes, Part A)
            got, want = torch.cat([got[:width], got[2 * width:]]), torch.cat([want[:width], want[2 * width:]])
        # Adam turns rounding noise in near-zero gradients into moves of up to ±lr on rare
        # elements (measured: ≤ 1e-4 of them, up to 0.06·lr), so the worst element gets a loose
        # bound and the mean a tight one (a wrong lr or a missing reduction moves the mean by ~lr).
        diff = (got - want).abs()
        assert diff.max() <= 0.1 * lr and diff.mean() <= 1e-3 * lr, (
            f"{name}: max |Δ| {diff.max():.2e}, mean |Δ| {diff.mean():.2e} after 2 AdamW steps at lr {lr}")
    print(f"PASS adamw (rank {rank})", flush=True)
    ref_t = dict(reference.teacher.named_parameters())
    for name, p in sharded.teacher.named_parameters():
        torch.testing.assert_close(_full(p), ref_t[name], atol=0.1 * lr * 0.1, rtol=0, msg=name)
    print(f"PASS ema (rank {rank})", flush=True)

    # accumulation ------------------------------------------------------------------------------
    sharded, reference = build()
    for micro in range(2):
        batch = global_batch(20 + micro)
        sharded.loss_forward.set_requires_gradient_sync(micro == 1)
        forward_backward(sharded, local(batch), 0.5)
        forward_backward(reference, batch, 0.5)
    compare_grads(sharded.model, reference.model, "accumulation")
    print(f"PASS accumulation (rank {rank})", flush=True)

    # checkpoint --------------------------------------------------------------------------------
    model, opt, teacher = sharded.model, sharded.optimizer, sharded.teacher
    opt.step()                                            # grads from above: creates AdamW state
    manager = CheckpointManager(tmp / "ckpt", keep=1, ctx=ctx)

    def sharded_state():
        return training_state(model, opt, **sharded.stateful_modules())

    saved = {k: _full(v).clone() for k, v in model.state_dict().items()}
    saved_t = {k: _full(v).clone() for k, v in teacher.state_dict().items()}
    manager.save(3, sharded_state(), {"rank": rank}, {"note.txt": b"x"}, {})
    with torch.no_grad():
        for p in list(model.parameters()) + list(teacher.parameters()):
            p.zero_()
    target = sharded_state()
    rank_state, meta = manager.load(latest_checkpoint(tmp / "ckpt")[1], target)
    restore_training_state(target, model, opt, **sharded.stateful_modules())
    assert rank_state == {"rank": rank} and meta["step"] == 3 and meta["world_size"] == world
    for k, v in model.state_dict().items():
        assert torch.equal(_full(v), saved[k]), k
    for k, v in teacher.state_dict().items():
        assert torch.equal(_full(v), saved_t[k]), k
    print(f"PASS checkpoint (rank {rank})", flush=True)

    # meta init: the constructor's large-model path (meta build → shard → to_empty → init_weights) --
    meta_built = build_training(cfg, ctx, meta_init=True)
    assert all(torch.isfinite(p.to_local()).all() for p in meta_built.model.parameters())
    for (n, t), s in zip(meta_built.teacher.dino_head.named_parameters(), meta_built.model.dino_head.parameters()):
        assert torch.equal(t.to_local(), s.to_local()), n
    print(f"PASS meta_init (rank {rank})", flush=True)

    # trainer -----------------------------------------------------------------------------------
    run_dir = tmp / "run"
    # two micro-batches per step: the sharded Trainer's accumulation path (teacher heads gathered once)
    trainer_cfg = config_lib.load(None, SMALL + ["train.steps=3", "train.ckpt_every=2", "optim.accum_steps=2",
                                                 f"train.run_dir={run_dir}"])
    assert train(trainer_cfg, run_dir, progress=False) == 0
    trainer_cfg.train.steps = 4
    assert train(trainer_cfg, run_dir, resuming=True, progress=False) == 0
    assert latest_checkpoint(run_dir / "checkpoints")[0] == 4
    print(f"PASS trainer (rank {rank})", flush=True)


if __name__ == "__main__":
    _worker()
