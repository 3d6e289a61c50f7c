"""HSDP (``dist.shard_size``): 4 CPU ranks (gloo) as 2 replicas × 2-rank shard groups against the same
4 ranks as plain 1-D FSDP.

One ``torchrun --nproc_per_node=4`` subprocess runs this file as a script and does every check (the
start-up of 4 processes is paid once):

  losses       3 training steps (``Training.train_step``) from the same weights on the same per-rank
               batches: every loss term and gradient norm of the HSDP run equals the 1-D run's to fp32
               tolerance (the contrastive all-gather, the centers and the DINO statistics stay global
               over the 4 ranks; only the parameters are laid out differently), and the two replicas
               hold identical shards (after the steps, and after a meta-device initialisation)
  reshard      a checkpoint written under HSDP resumes under 1-D FSDP and the next step matches the
               HSDP run's; that run's checkpoint resumes under HSDP again and matches once more
  trainer      the Trainer with dist.shard_size=2 for a step, then resumed with dist.shard_size=0
  bad_layout   dist.shard_size=3 on 4 ranks: one config-error line and exit code 2 on every rank
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORLD, SHARD = 4, 2
SMALL = ["data.source=synthetic", "vision.depth=1", "text.depth=1", "text.max_len=8", "heads.hidden=64",
         "heads.bottleneck=32", "heads.prototypes=64", "data.batch_size=2", "data.global_size=28",
         "data.local_size=14", "data.n_local=2", "optim.clip_grad=1.0", "train.device=cpu",
         "train.precision=fp32"]
CHECKS = {"losses", "reshard", "trainer", "bad_layout"}


@pytest.mark.dist
def test_hsdp_matches_fsdp_and_checkpoints_move_between_them(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", FASTTIPS_HSDP_TMP=str(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", __file__]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    for check in CHECKS:                                   # every rank passed every check
        assert len(re.findall(rf"PASS {check} \(rank \d\)", done.stdout)) == WORLD, done.stdout
    assert "HSDP 2 replicas × 2-rank shard groups" in done.stdout                   # the start-up line
    assert "was written as HSDP 2 replicas × 2-rank shard groups (2-D mesh replicate × shard), now FSDP2 " \
           "over 4 rank(s)" in done.stdout                                          # the resume line
    # the bad layout: the same single line from every rank, nothing else
    bad = [line for line in done.stderr.splitlines() if "dist.shard_size" in line]
    assert len(bad) == WORLD and len(set(bad)) == 1, done.stderr[-3000:]
    assert bad[0] == ("fasttips train: config error: dist.shard_size: 3 does not divide the 4 ranks of this "
                      "run; choose one of [1, 2, 4] (ranks per shard group) or 0 (all ranks)")
    print(f"4-rank HSDP job: {time.perf_counter() - t0:.1f} s")


# ------------------------------------------------------------------------------------------------
# The worker (run by torchrun)
# ------------------------------------------------------------------------------------------------
def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _worker() -> None:
    import dataclasses

    import torch
    import torch.distributed as dist

    from fasttips import config as config_lib
    from fasttips.data.batch import synthetic_batch
    from fasttips.distributed import fsdp
    from fasttips.distributed.checkpoint import CheckpointManager, restore_training_state, training_state
    from fasttips.schedules import StepValues
    from fasttips.train import train
    from fasttips.training import build_training

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tmp = Path(os.environ["FASTTIPS_HSDP_TMP"])
    cfg = config_lib.load(None, SMALL)
    flat = fsdp.init_distributed(cfg)                     # dist.shard_size=0: the 1-D mesh
    rank = flat.rank
    assert flat.world_size == WORLD and flat.replicas == 1 and flat.mesh.ndim == 1
    hsdp_cfg = config_lib.load(None, SMALL + [f"dist.shard_size={SHARD}"])
    replicas, shard = fsdp.mesh_shape(WORLD, hsdp_cfg.dist.shard_size)
    hsdp = dataclasses.replace(flat, mesh=fsdp.build_mesh("cpu", replicas, shard), replicas=replicas,
                               owns_group=False)
    assert hsdp.mesh.shape == (2, 2) and hsdp.shard_size == 2
    d = cfg.data
    values = StepValues(lr=1e-3, weight_decay=0.04, momentum=0.9, teacher_temp=0.05, freeze_prototypes=False)

    def batch(step):                                      # this rank's batch of a step (same on both runs)
        g = torch.Generator().manual_seed(1000 * step + rank)
        return synthetic_batch(d.batch_size, d.global_size, d.local_size, d.n_global, d.n_local,
                               cfg.vision.patch_size, cfg.text.max_len, cfg.text.vocab_size, mask_ratio=0.3,
                               generator=g)

    def same_outcome(a, b, what):
        assert not a.skipped and not b.skipped, what
        assert a.loss == pytest.approx(b.loss, rel=2e-5), (what, a.loss, b.loss)
        for key in b.terms:
            assert a.terms[key] == pytest.approx(b.terms[key], rel=2e-5, abs=1e-6), (what, key, a.terms, b.terms)
        for key in b.grad_norms:
            assert a.grad_norms[key] == pytest.approx(b.grad_norms[key], rel=2e-5, abs=1e-7), (what, key)

    # losses ------------------------------------------------------------------------------------
    one_d, two_d = build_training(cfg, flat), build_training(cfg, hsdp)
    for (n, p), q in zip(one_d.model.named_parameters(), two_d.model.parameters()):
        assert torch.equal(_full(p.detach()), _full(q.detach())), f"{n}: the two builds differ"
    for step in range(3):
        same_outcome(two_d.train_step([batch(step)], values), one_d.train_step([batch(step)], values),
                     f"step {step}")
    # The replicas of a shard group hold the same shard: gradients were all-reduced across them.
    replicate = hsdp.mesh.get_group("replicate")

    def replicas_agree(training, what):
        for name, p in list(training.model.named_parameters()) + list(training.teacher.named_parameters()):
            mine = p.detach().to_local().contiguous()
            other = [torch.empty_like(mine) for _ in range(replicas)]
            dist.all_gather(other, mine, group=replicate)
            assert all(torch.equal(o, mine) for o in other), f"{what}: {name} differs between the replicas"

    replicas_agree(two_d, "after 3 steps")
    # The large-model path (meta build → shard → to_empty → init_weights) initialises every replica alike.
    replicas_agree(build_training(cfg, hsdp, meta_init=True), "meta init")
    print(f"PASS losses (rank {rank}) {time.perf_counter() - t0:.1f} s", flush=True)

    # reshard: HSDP → 1-D FSDP → HSDP through checkpoints ---------------------------------------
    def save(training, ctx, step):
        manager = CheckpointManager(tmp / f"ckpt-{step}", keep=1, ctx=ctx)
        return manager.save(step, training_state(training.model, training.optimizer,
                                                 **training.stateful_modules()), {}, {}, {})

    def resumed(ctx, path):
        training = build_training(cfg, ctx)
        state = training_state(training.model, training.optimizer, **training.stateful_modules())
        CheckpointManager(path.parent, keep=1, ctx=ctx).load(path, state)
        restore_training_state(state, training.model, training.optimizer, **training.stateful_modules())
        return training

    def same_tensors(a, b, what):
        """Student, teacher and AdamW moments arrive bitwise in the other layout."""
        for mod_a, mod_b in ((a.model, b.model), (a.teacher, b.teacher)):
            for (n, p), q in zip(mod_a.named_parameters(), mod_b.parameters()):
                assert torch.equal(_full(p.detach()), _full(q.detach())), f"{what}: {n}"
        for p, q in zip(a.model.parameters(), b.model.parameters()):
            for key, value in a.optimizer.state[p].items():
                assert torch.equal(_full(value), _full(b.optimizer.state[q][key])), f"{what}: AdamW {key}"

    from_hsdp = resumed(flat, save(two_d, hsdp, 3))
    same_tensors(from_hsdp, two_d, "HSDP → FSDP")
    same_outcome(from_hsdp.train_step([batch(3)], values), two_d.train_step([batch(3)], values), "HSDP → FSDP")
    back = resumed(hsdp, save(from_hsdp, flat, 4))
    same_tensors(back, from_hsdp, "FSDP → HSDP")
    same_outcome(back.train_step([batch(4)], values), from_hsdp.train_step([batch(4)], values), "FSDP → HSDP")
    print(f"PASS reshard (rank {rank}) {time.perf_counter() - t0:.1f} s", flush=True)

    # trainer: the whole engine under HSDP, resumed under 1-D FSDP --------------------------------
    run_dir = tmp / "run"
    run_cfg = config_lib.load(None, SMALL + ["train.steps=1", f"dist.shard_size={SHARD}", f"train.run_dir={run_dir}"])
    assert train(run_cfg, run_dir, progress=False) == 0
    run_cfg.train.steps, run_cfg.dist.shard_size = 2, 0
    assert train(run_cfg, run_dir, resuming=True, progress=False) == 0
    print(f"PASS trainer (rank {rank}) {time.perf_counter() - t0:.1f} s", flush=True)

    # bad layout: one line, exit code 2, on every rank (before any collective) --------------------
    bad_cfg = config_lib.load(None, SMALL + ["dist.shard_size=3", f"train.run_dir={tmp / 'bad'}"])
    assert train(bad_cfg, tmp / "bad", progress=False) == 2
    print(f"PASS bad_layout (rank {rank}) {time.perf_counter() - t0:.1f} s", flush=True)
    fsdp.shutdown(flat)


if __name__ == "__main__":
    _worker()
