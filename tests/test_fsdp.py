"""FSDP2 on 2 CPU ranks (gloo) against one process on the same global batch.

One ``torchrun --nproc_per_node=2`` subprocess runs this file as a script and performs every check
(torchrun start-up costs seconds, so it is paid once). Each rank also keeps a plain, unsharded copy
of the model that trains on the whole global batch: the single-process reference.

Checks (fsdp2_layout_notes.md Part A, "Tolerance note"):
  grads          the real TIPSv2 losses, one backward: sharded grads == reference grads (tight)
  adamw          two steps of the engine's AdamW (param groups, per-module clipping): params close
                 (max |Δ| ≤ 0.1·lr, mean |Δ| ≤ 1e-3·lr; skipping the key third of qkv.bias, whose
                 true gradient is 0)
  ema            Teacher.update on local shards == the reference teacher
  accumulation   2 micro-batches with set_requires_gradient_sync(False) on the first == reference
  checkpoint     CheckpointManager save → scramble → load restores every shard bitwise
  meta_init      meta build → shard → to_empty → init_weights; teacher heads copy the student
  trainer        the Trainer itself for 2 steps on 2 ranks, then a resume
"""
from __future__ import annotations

import copy
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
    import torch
    import torch.distributed as dist

    from fasttips import config as config_lib
    from fasttips.data.batch import synthetic_batch
    from fasttips.distributed import fsdp
    from fasttips.distributed.checkpoint import (CheckpointManager, latest_checkpoint, restore_training_state,
                                                 training_state)
    from fasttips.models import build_model
    from fasttips.optim import build_optimizer, clip_gradients, clip_modules, set_hyperparameters
    from fasttips.step import LossState, compute_losses
    from fasttips.teacher import Teacher
    from fasttips.train import Trainer, copy_into_teacher

    torch.set_num_threads(1)
    tmp = Path(os.environ["FASTTIPS_FSDP_TMP"])
    cfg = config_lib.load(None, SMALL)
    ctx = fsdp.init_distributed(cfg)
    rank, world = ctx.rank, ctx.world_size
    assert world == WORLD and ctx.sharded
    # Each rank's reference must not gather across ranks: give it a group of its own, on which
    # the contrastive all-gather is the identity.
    own = [dist.new_group([r]) for r in range(world)][rank]
    d = cfg.data

    def global_batch(seed):
        g = torch.Generator().manual_seed(seed)
        return synthetic_batch(GLOBAL_BATCH, d.global_size, d.local_size, d.n_global, d.n_local,
                               cfg.vision.patch_size, cfg.text.max_len, cfg.text.vocab_size,
                               mask_ratio=0.3, generator=g)

    def build():
        torch.manual_seed(0)
        model = build_model(cfg, device="cpu")
        reference = copy.deepcopy(model)
        teacher, ref_teacher = Teacher(model, cfg), Teacher(reference, cfg)
        root = fsdp.parallelize(model, teacher.modules_to_shard(), ctx, cfg, compute_losses)
        state = LossState(cfg, group=dist.group.WORLD)
        ref_state = LossState(cfg, group=own)
        ref_root = fsdp.LossForward(reference, compute_losses)
        return model, root, reference, ref_root, teacher, ref_teacher, state, ref_state

    values = {"teacher_temp": 0.05}

    def forward_backward(root, teacher, state, batch, scale=1.0):
        with fsdp.gathered(teacher.modules_to_shard()):       # a no-op for the unsharded reference
            losses = root(teacher, state, batch, values, cfg)
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
    model, root, reference, ref_root, teacher, ref_teacher, state, ref_state = build()
    batch = global_batch(1)
    loss = forward_backward(root, teacher, state, _split(batch, rank, world, d.n_global, d.n_local))
    ref_loss = forward_backward(ref_root, ref_teacher, ref_state, batch)
    dist.all_reduce(loss)
    torch.testing.assert_close(loss / world, ref_loss, atol=1e-5, rtol=1e-5)
    compare_grads(model, reference, "grads")
    print(f"PASS grads (rank {rank})", flush=True)

    # adamw + ema -------------------------------------------------------------------------------
    lr = 1e-3
    opt, ref_opt = build_optimizer(model, cfg, ctx.device), build_optimizer(reference, cfg, ctx.device)
    units, ref_units = clip_modules(model), clip_modules(reference)
    for step in range(2):
        if step:
            batch = global_batch(10 + step)
            forward_backward(root, teacher, state, _split(batch, rank, world, d.n_global, d.n_local))
            forward_backward(ref_root, ref_teacher, ref_state, batch)
        norms, ref_norms = clip_gradients(units, cfg.optim.clip_grad), clip_gradients(ref_units, cfg.optim.clip_grad)
        for key in ref_norms:
            torch.testing.assert_close(norms[key], ref_norms[key], atol=1e-5, rtol=1e-5, msg=key)
        for o in (opt, ref_opt):
            set_hyperparameters(o, lr, 0.04, freeze_prototypes=False)
            o.step()
            o.zero_grad(set_to_none=True)
        teacher.update(model, 0.9)
        ref_teacher.update(reference, 0.9)
    ref = dict(reference.named_parameters())
    width = cfg.vision.width
    for name, p in model.named_parameters():
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
    ref_t = dict(ref_teacher.named_parameters())
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(_full(p), ref_t[name], atol=0.1 * lr * 0.1, rtol=0, msg=name)
    print(f"PASS ema (rank {rank})", flush=True)

    # accumulation ------------------------------------------------------------------------------
    model, root, reference, ref_root, teacher, ref_teacher, state, ref_state = build()
    for micro in range(2):
        batch = global_batch(20 + micro)
        root.set_requires_gradient_sync(micro == 1)
        forward_backward(root, teacher, state, _split(batch, rank, world, d.n_global, d.n_local), 0.5)
        forward_backward(ref_root, ref_teacher, ref_state, batch, 0.5)
    compare_grads(model, reference, "accumulation")
    print(f"PASS accumulation (rank {rank})", flush=True)

    # checkpoint --------------------------------------------------------------------------------
    opt = build_optimizer(model, cfg, ctx.device)
    opt.step()                                            # grads from above: creates AdamW state
    manager = CheckpointManager(tmp / "ckpt", keep=1, ctx=ctx)

    def sharded():
        return training_state(model, opt, teacher=teacher, loss_state=state)

    saved = {k: _full(v).clone() for k, v in model.state_dict().items()}
    saved_t = {k: _full(v).clone() for k, v in teacher.state_dict().items()}
    manager.save(3, sharded(), {"rank": rank}, {"note.txt": b"x"}, {})
    with torch.no_grad():
        for p in list(model.parameters()) + list(teacher.parameters()):
            p.zero_()
    target = sharded()
    rank_state, meta = manager.load(latest_checkpoint(tmp / "ckpt")[1], target)
    restore_training_state(target, model, opt, teacher=teacher, loss_state=state)
    assert rank_state == {"rank": rank} and meta["step"] == 3 and meta["world_size"] == world
    for k, v in model.state_dict().items():
        assert torch.equal(_full(v), saved[k]), k
    for k, v in teacher.state_dict().items():
        assert torch.equal(_full(v), saved_t[k]), k
    print(f"PASS checkpoint (rank {rank})", flush=True)

    # meta init ---------------------------------------------------------------------------------
    torch.manual_seed(0)
    model = build_model(cfg, device="meta")
    teacher = Teacher(model, cfg)
    fsdp.parallelize(model, teacher.modules_to_shard(), ctx, cfg, compute_losses)
    model.to_empty(device=ctx.device)
    model.init_weights()
    for module in teacher.modules_to_shard():
        module.to_empty(device=ctx.device)
    copy_into_teacher(teacher, model)
    assert all(torch.isfinite(p.to_local()).all() for p in model.parameters())
    for (n, t), s in zip(teacher.dino_head.named_parameters(), model.dino_head.parameters()):
        assert torch.equal(t.to_local(), s.to_local()), n
    print(f"PASS meta_init (rank {rank})", flush=True)

    # trainer -----------------------------------------------------------------------------------
    run_dir = tmp / "run"
    # two micro-batches per step: the sharded Trainer's accumulation path (teacher heads gathered once)
    trainer_cfg = config_lib.load(None, SMALL + ["train.steps=3", "train.ckpt_every=2", "optim.accum_steps=2",
                                                 f"train.run_dir={run_dir}"])
    assert Trainer(trainer_cfg, run_dir, progress=False).run() == 0
    trainer_cfg.train.steps = 4
    assert Trainer(trainer_cfg, run_dir, resuming=True, progress=False).run() == 0
    assert latest_checkpoint(run_dir / "checkpoints")[0] == 4
    print(f"PASS trainer (rank {rank})", flush=True)


if __name__ == "__main__":
    _worker()
