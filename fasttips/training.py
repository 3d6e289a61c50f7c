"""What trains: the model, its EMA teacher, the objective and the optimiser, built by one constructor,
and the one training step that the CLI's loop, the benchmarks and the tests all run.

    training = build_training(cfg, ctx)                 # ctx: fasttips.distributed.fsdp.init_distributed
    out = training.train_step(batches, schedules(step))  # → StepOutcome (floats, read back once)

``build_training`` in order (the order matters for FSDP2 and for identical weights on every rank):

    seed → build the model (on the meta device when it is large and sharded) → Teacher (head copies)
    → AC / compile / FSDP2 (``fsdp.parallelize``) → materialise meta weights → ``load_weights`` hook
    → teacher EMA tensors ← the student's → loss state → optimiser.

One step: ``accum_steps`` × (forward → backward), gradient sync only on the last micro-batch →
hold frozen parameters still → per-module clip → one all-reduce of {non-finite, stop requested, no
data} → AdamW → logit-scale cap → head EMA. A non-finite loss or gradient on any rank skips the step
on every rank: no optimiser, EMA or center update; so does a rank without data (a storage outage).
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fasttips.distributed import fsdp
from fasttips.kernels import dispatch as kernel_dispatch
from fasttips.flops import head_params
from fasttips.interop.warmstart import backbone_parameters
from fasttips.models import build_model
from fasttips.models.text import text_mlp_hidden
from fasttips.optim import (build_optimizer, clamp_logit_scale_, clip_gradients, clip_modules, is_prototype,
                            set_hyperparameters)
from fasttips.schedules import StepValues
from fasttips.step import TERMS, LossState, compute_losses
from fasttips.teacher import Teacher

# Above this many parameters a sharded run builds the model on the meta device and allocates only
# its own shards (a ViT-g built whole on every rank would not fit in host memory).
META_INIT_PARAMS = 100_000_000


@dataclass
class StepOutcome:
    """One optimiser step, read back to the host in one transfer."""
    loss: float
    terms: dict[str, float]          # every scalar compute_losses returns besides "loss" (TERMS first)
    grad_norms: dict[str, float]     # per clipping unit, before clipping
    skipped: bool                    # non-finite on some rank: no update happened
    stop: bool                       # some rank was asked to stop
    seconds: float
    images: int                      # images this process trained on
    data_failed: bool = False        # some rank had no data (a storage outage): no update happened


@dataclass
class Training:
    """The trained objects and the step that updates them (see the module docstring)."""
    cfg: object
    ctx: fsdp.DistContext
    model: nn.Module
    teacher: Teacher
    loss_state: LossState
    loss_forward: nn.Module          # the FSDP2 root; call it for the losses of one micro-batch
    optimizer: torch.optim.Optimizer
    clip_units: dict[str, list[nn.Parameter]]
    prototype_params: list[nn.Parameter]
    backbone_params: list[nn.Parameter]   # the towers and logit scales (optim.freeze_backbone_steps)
    gather_modules: list[nn.Module]  # teacher modules held gathered for a whole step
    kernels_decided: bool = False    # every op's implementation chosen (the first completed step)

    def stateful_modules(self) -> dict[str, nn.Module]:
        """Checkpointed modules besides the model and optimiser (schedules are a function of the step)."""
        return {"loss_state": self.loss_state, "teacher": self.teacher}

    def train_step(self, batches: list[dict], values: StepValues, stop_requested: bool = False,
                   inject_nan: bool = False, data_failed: bool = False) -> StepOutcome:
        """One optimiser step over ``batches`` (the micro-batches, already on the device); see ``_step``.

        Until one step completes, the step runs inside ``kernels.dispatch.deciding()``: every op call
        decides its implementation (timing the new ones, agreed over ranks), compiled blocks run eagerly,
        and torch.compile traces them at a later step with those choices fixed."""
        if self.kernels_decided:
            return self._step(batches, values, stop_requested, inject_nan, data_failed)
        with kernel_dispatch.deciding():
            out = self._step(batches, values, stop_requested, inject_nan, data_failed)
        self.kernels_decided = not out.skipped          # a skipped step never reached the EMA
        return out

    def _step(self, batches: list[dict], values: StepValues, stop_requested: bool = False,
              inject_nan: bool = False, data_failed: bool = False) -> StepOutcome:
        """One optimiser step over ``batches`` (the micro-batches, already on the device).

        ``stop_requested``: this rank wants to stop (a signal); the answer, agreed over ranks, comes
        back in ``StepOutcome.stop``. ``inject_nan``: make this step's loss NaN (fault injection).
        ``data_failed``: this rank could not read its data (``batches`` are stand-ins, so that every
        rank still meets the step's collectives); if any rank says so no rank updates anything, and
        ``StepOutcome.data_failed`` says so on every rank.
        """
        cfg, ctx = self.cfg, self.ctx
        t0 = time.perf_counter()
        set_hyperparameters(self.optimizer, values.lr, values.weight_decay, values.freeze_prototypes)
        # Saved before begin_step so that a skipped step leaves the centers exactly as they were.
        centers = {k: v.clone() for k, v in self.loss_state.state_dict().items()}
        self.loss_state.begin_step()          # one center update per optimiser step, not per micro-batch
        accum = len(batches)
        loss_sum, term_sums, images = None, {}, 0
        # The teacher heads are gathered once for all micro-batches (one all-gather per step, not
        # per micro-batch) and sharded again before the EMA update.
        with fsdp.gathered(self.gather_modules):
            for i, batch in enumerate(batches):
                if ctx.sharded:
                    self.loss_forward.set_requires_gradient_sync(i == accum - 1)
                losses = self.loss_forward(self.teacher, self.loss_state, batch, values.teacher_temp, cfg)
                loss = losses["loss"]
                if inject_nan:
                    loss = loss * float("nan")
                (loss / accum).backward()
                loss_sum = loss.detach() / accum if loss_sum is None else loss_sum + loss.detach() / accum
                for k, v in losses.items():
                    if k != "loss" and torch.is_tensor(v) and v.numel() == 1:
                        v = v.detach().float().reshape(()).to(loss.device)
                        term_sums[k] = term_sums.get(k, 0) + v / accum
                images += batch["alt_ids"].shape[0]
        self._hold_still(values)
        norms = clip_gradients(self.clip_units, cfg.optim.clip_grad)

        # One sync: did any rank see a non-finite loss/gradient, a stop signal, or no data?
        finite = torch.isfinite(loss_sum.float()) & torch.stack(
            [torch.isfinite(n) for n in norms.values()] or [torch.tensor(True, device=loss_sum.device)]).all()
        asked = torch.tensor([float(stop_requested), float(data_failed)], device=finite.device)   # one copy
        flags = torch.cat([(~finite).float().reshape(1), asked])
        skipped, stop, data_failed = (bool(x) for x in ctx.all_max(flags).tolist())
        if skipped or data_failed:
            self.optimizer.zero_grad(set_to_none=True)
            self.loss_state.load_state_dict(centers)             # the step never happened
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            clamp_logit_scale_(self.model, cfg.loss.max_logit_scale)   # OpenCLIP's cap, on the parameter
            self.teacher.update(self.model, values.momentum)
        seconds = time.perf_counter() - t0
        # One more sync for everything logged: the loss terms (mean over ranks) and the grad norms
        # (already global), read back together rather than one .item() per norm.
        scalars = self._mean_over_ranks(torch.stack([loss_sum.float().reshape(())] + list(term_sums.values())))
        host = torch.cat([scalars] + [n.reshape(1).to(scalars) for n in norms.values()]).tolist()
        n_scalars = scalars.numel()
        return StepOutcome(host[0], dict(zip(term_sums, host[1:n_scalars])),
                           dict(zip(norms, host[n_scalars:])), skipped, stop, seconds, images, data_failed)

    def _hold_still(self, values: StepValues) -> None:
        """Drop the gradients of the parameters frozen this step (no Adam moments either), as DINOv2
        does for the prototypes in the first ``optim.freeze_prototypes_steps``. Any other
        step-dependent freeze belongs here too."""
        if values.freeze_prototypes:
            for p in self.prototype_params:
                p.grad = None
        if values.freeze_backbone:
            for p in self.backbone_params:
                p.grad = None

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.ctx.world_size > 1:
            import torch.distributed as dist
            values = values.clone()
            dist.all_reduce(values)
            values /= self.ctx.world_size
        return values


def configure_dispatch(cfg, policy: str | None = None) -> None:
    """``kernels.*`` → how every fasttips.kernels op picks its implementation in this process
    (``policy``, when given, in place of ``kernels.dispatch``: ``fasttips eval --kernels``)."""
    k = cfg.kernels
    kernel_dispatch.configure(policy=policy or k.dispatch, deterministic=k.deterministic, budget_s=k.budget_s,
                              memory_fraction=k.memory_fraction, cache=k.cache)


def build_training(cfg, ctx: fsdp.DistContext, load_weights: Callable[[nn.Module], None] | None = None,
                   meta_init: bool | None = None) -> Training:
    """The model, teacher, objective and optimiser of ``cfg`` on ``ctx``, ready for ``train_step``.

    ``load_weights(model)``, when given, is called once the model's weights exist on the device
    (sharded under FSDP2: load them with ``torch.distributed.checkpoint.state_dict.set_model_state_dict``)
    and before the teacher copies the student and the optimiser is built; the place for starting
    from other weights. ``meta_init``: build on the meta device and initialise only the local shards
    (default: when sharded and larger than ``META_INIT_PARAMS``).
    """
    configure_dispatch(cfg)
    seed_everything(cfg.train.seed)          # same weights on every rank before sharding
    meta = ctx.sharded and (estimate_params(cfg) > META_INIT_PARAMS if meta_init is None else meta_init)
    model = build_model(cfg, device="meta" if meta else "cpu")
    teacher = Teacher(model, cfg)
    if not meta:                             # small models: whole on the device, then sharded
        model.to(ctx.device)
        teacher.to(ctx.device)
    teacher_modules = teacher.modules_to_shard()
    loss_forward = fsdp.parallelize(model, teacher_modules, ctx, cfg, compute_losses)
    if meta:                                 # allocate the local shards, then initialise them
        model.to_empty(device=ctx.device)
        model.init_weights()
        for module in teacher_modules:
            module.to_empty(device=ctx.device)
    if load_weights is not None:
        load_weights(model)
    copy_into_teacher(teacher, model)        # the teacher heads start as copies of the student's
    group = None
    if ctx.world_size > 1:
        import torch.distributed as dist
        group = dist.group.WORLD
    return Training(
        cfg=cfg, ctx=ctx, model=model, teacher=teacher,
        loss_state=LossState(cfg, group=group).to(ctx.device),
        loss_forward=loss_forward,
        optimizer=build_optimizer(model, cfg, ctx.device),
        clip_units=clip_modules(model),
        prototype_params=[p for n, p in model.named_parameters() if is_prototype(n)],
        backbone_params=backbone_parameters(model),
        gather_modules=[m for m in teacher_modules if fsdp.needs_gathering(m)])


@torch.no_grad()
def copy_into_teacher(teacher: Teacher, model: nn.Module) -> None:
    """Teacher EMA tensors ← the student's, exactly (``to_empty`` memory may hold NaN, which a
    momentum-0 lerp would keep)."""
    for t, s in zip(*teacher.ema_tensors(model)):
        t.copy_(s)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def estimate_params(cfg) -> int:
    """Rough parameter count from the config (decides meta-device initialisation)."""
    v = cfg.vision
    vision_block = 4 * v.width ** 2 + (3 if v.ffn == "swiglu" else 2) * v.width * v.mlp_hidden
    text_block = 4 * v.width ** 2 + 2 * v.width * text_mlp_hidden(cfg)
    heads = (1 if cfg.heads.shared else 2) * head_params(cfg)
    return v.depth * vision_block + cfg.text.depth * text_block + cfg.text.vocab_size * v.width + heads


__all__ = ["Training", "StepOutcome", "build_training", "copy_into_teacher", "seed_everything",
           "estimate_params", "META_INIT_PARAMS", "TERMS"]
