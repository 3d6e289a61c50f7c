"""The TIPSv2 objective: every loss term of one batch (``compute_losses``) and the loss-side state
that checkpoints (``LossState``: the DINO and iBOT centers). The training step that calls it, with
backward, clipping, the optimiser and the EMA, is ``fasttips.training.Training.train_step``.

Passes per step (docs/loss_math.md §2.9; DESIGN.md):
  1. one packed student pass with gradient over [unmasked globals, masked globals, local crops];
  2. the text tower over [alt-text; synthetic caption] in one call;
  3. teacher features of the unmasked globals (the detached pass-1 output by default) → EMA heads.
Losses: CLIP(CLS#1, alt) and CLIP(CLS#2, synthetic) on global crop 0 (the contrastive view); DINO on
CLS#1 (locals, and the masked globals' cross pairs when n_global = 2) vs the teacher CLS#1; iBOT++ on
the masked pass's patch tokens vs the teacher patch tokens; KoLeo on the unmasked CLS#1 per crop.
"""
from __future__ import annotations

import torch
from torch import nn

from fasttips.data.batch import check_batch, to_device
from fasttips.losses import Centering, contrastive_loss, dino_loss, ibot_loss, ibot_rows, koleo_loss

TERMS = ("clip_alt", "clip_syn", "dino", "ibot", "koleo")


class LossState(nn.Module):
    """Loss-side state that must checkpoint: the DINO and iBOT centers (softmax centering)."""

    def __init__(self, cfg, group=None):
        super().__init__()
        K, m = cfg.heads.prototypes, cfg.loss.center_momentum
        self.dino_center = Centering(K, m, group)
        self.ibot_center = Centering(K, m, group)
        self.group = group

    def begin_step(self) -> None:
        """Call once per optimiser step, before its micro-batches (one center update per step)."""
        self.dino_center.begin_step()
        self.ibot_center.begin_step()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _prototypes(head) -> tuple[torch.Tensor, torch.Tensor]:
    return head.prototypes.v, head.prototypes.g


def _centered(state: Centering, cfg):
    return state.current() if cfg.loss.centering == "softmax" else None


def _record_center(state: Centering, stat, cfg) -> None:
    if cfg.loss.centering == "softmax":
        state.update(stat)


def compute_losses(model: nn.Module, teacher, state: LossState, batch: dict, teacher_temp: float,
                   cfg) -> dict[str, torch.Tensor]:
    """Every loss term (``TERMS``) and the weighted total ``"loss"`` (DESIGN.md weights), plus logged
    scalars (the logit scales, the teacher temperature). ``teacher_temp`` is this step's value of the
    schedule (``StepValues.teacher_temp``)."""
    if not isinstance(teacher_temp, (int, float)) or isinstance(teacher_temp, bool) or not teacher_temp > 0:
        raise ValueError(f"compute_losses: teacher_temp must be a number > 0, got {teacher_temp!r}")
    lc = cfg.loss
    G = cfg.data.n_global
    patch = cfg.vision.patch_size
    B = batch["alt_ids"].shape[0] if "alt_ids" in batch else 0
    n_local_rows = batch["local_crops"].shape[0] if "local_crops" in batch else 0
    if B < 1 or n_local_rows % B:
        raise ValueError(f"local_crops: {n_local_rows} rows is not a multiple of the batch size {B}")
    L = n_local_rows // B
    check_batch(batch, G, L, patch)
    batch = to_device(batch, _device_of(model))
    globals_, masks = batch["global_crops"], batch["masks"]

    # 1. one packed student pass: unmasked globals, masked globals, local crops
    crops, crop_masks = [globals_, globals_], [None, masks]
    if L:
        crops.append(batch["local_crops"])
        crop_masks.append(None)
    outs = model.vision(crops, masks=crop_masks)
    full, masked = outs[0], outs[1]

    # 2. text: alt-text and synthetic caption in one call
    text = model.text(torch.cat([batch["alt_ids"], batch["syn_ids"]]),
                      torch.cat([batch["alt_pad"], batch["syn_pad"]]))
    alt_text, syn_text = text[:B], text[B:]

    out: dict[str, torch.Tensor] = {}
    scale, bias = model.logit_scale, model.logit_bias
    for i, (name, cls, txt) in enumerate((("clip_alt", "cls1", alt_text), ("clip_syn", "cls2", syn_text))):
        out[name] = contrastive_loss(lc.contrastive, full[cls][:B], txt, scale[i:i + 1], bias[i:i + 1],
                                     group=state.group)

    # 3. teacher targets from the unmasked globals (no grad, fp32)
    feats = teacher.global_features(model, globals_, student_unmasked=full)
    D = feats["patch"].shape[-1]
    select = ibot_rows(masks, lc.ibot_tokens)
    t_patch = feats["patch"].reshape(-1, D)
    s_patch = masked["patch"].reshape(-1, D)
    if select is not None:
        t_patch, s_patch = t_patch[select], s_patch[select]
    t_cls_z = teacher.dino_bottleneck(feats["cls1"])
    t_patch_z = teacher.ibot_bottleneck(t_patch)

    # 4. DINO: local CLS#1 (+ masked globals' CLS#1 for the cross-global pairs) vs teacher CLS#1
    # teacher_temp as given (no float()): under train.compile=step a float() would bake each step's value into
    # the graph and recompile it every step of the temperature warm-up
    shared = dict(student_temp=lc.student_temp, teacher_temp=teacher_temp,
                  centering=lc.centering, sk_iterations=lc.sk_iterations, group=state.group,
                  prototype_ce=lc.prototype_ce)
    s_local_z = (model.dino_head.bottleneck(outs[2]["cls1"]) if L
                 else feats["cls1"].new_zeros(0, t_cls_z.shape[1]))
    s_global_z = model.dino_head.bottleneck(masked["cls1"]) if G > 1 else None
    out["dino"], dino_stat = dino_loss(
        s_local_z, t_cls_z, _prototypes(model.dino_head), teacher.prototypes("dino"), n_global=G,
        student_global=s_global_z, center=_centered(state.dino_center, cfg), **shared)
    if dino_stat is not None:
        _record_center(state.dino_center, dino_stat, cfg)

    # 5. iBOT++ (or masked-only iBOT) on the masked pass's patch tokens
    out["ibot"], ibot_stat = ibot_loss(
        model.ibot_head.bottleneck(s_patch), t_patch_z, masks, _prototypes(model.ibot_head),
        teacher.prototypes("ibot"), tokens=lc.ibot_tokens, masked_weight=lc.ibot_masked_weight,
        visible_weight=lc.ibot_visible_weight, center=_centered(state.ibot_center, cfg), **shared)
    _record_center(state.ibot_center, ibot_stat, cfg)

    # 6. KoLeo on the backbone CLS#1 of each unmasked global crop (skipped at weight 0)
    if lc.koleo_weight > 0:
        cls1 = full["cls1"]
        out["koleo"] = sum(koleo_loss(cls1[g * B:(g + 1) * B]) for g in range(G))
    else:
        out["koleo"] = full["cls1"].new_zeros(())

    out["loss"] = (lc.contrastive_weight * (out["clip_alt"] + out["clip_syn"])
                   + lc.dino_weight * out["dino"] + lc.ibot_weight * out["ibot"]
                   + lc.koleo_weight * out["koleo"])
    with torch.no_grad():
        # exactly the scale the losses used (the parameter is capped after each optimiser step)
        inv_temp = scale.detach().float().exp()
        out["logit_scale_alt"], out["logit_scale_syn"] = inv_temp[0], inv_temp[1]
        out["teacher_temp"] = torch.ones(()) * teacher_temp    # (torch.tensor would bake it in, as float())
    return out
