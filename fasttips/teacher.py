"""The EMA teacher (docs/loss_math.md §2.8, §2.9; DESIGN.md "teacher backbone").

``teacher.mode = "head_ema"`` (TIPSv2, default): EMA copies of the DINO and iBOT heads only. The
teacher features are the student's own unmasked forward:
  - ``teacher.features = "detached"``: that forward's output, ``detach()``ed (no extra pass);
  - ``teacher.features = "separate_no_grad"``: an extra ``no_grad`` eval-mode pass of the student
    backbone (no drop-path noise in the targets).
``teacher.mode = "full_ema"`` (TIPS v1 / DINOv2): an EMA copy of the vision backbone as well, run
under ``no_grad`` in eval mode.

``update(model, momentum)`` moves every EMA tensor towards the student's in ONE call to
``fasttips.kernels.ema_update_``. Weight-normed prototype layers hold ``v`` and ``g`` as separate
parameters, so they are averaged separately (DINOv2). With FSDP2 the teacher modules are sharded
like the student's, so the local shards (``DTensor.to_local()``) line up element for element.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from fasttips import kernels
from fasttips.config import TEACHER_FEATURES as FEATURES, TEACHER_MODES as MODES
from fasttips.optim import clean_name


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)          # DTensor (FSDP2 shard) → its local tensor
    return to_local() if to_local is not None else t


def _named_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {clean_name(n): p for n, p in module.named_parameters()}


class Teacher(nn.Module):
    def __init__(self, model: nn.Module, cfg):
        super().__init__()
        mode, features = cfg.teacher.mode, cfg.teacher.features
        if mode not in MODES:
            raise ValueError(f"teacher.mode: {mode!r} is not allowed; choose one of {list(MODES)}")
        if features not in FEATURES:
            raise ValueError(f"teacher.features: {features!r} is not allowed; choose one of {list(FEATURES)}")
        self.mode, self.features = mode, features
        self.dino_head = copy.deepcopy(model.dino_head)
        shared = model.ibot_head is model.dino_head
        self.ibot_head = self.dino_head if shared else copy.deepcopy(model.ibot_head)
        self.backbone = copy.deepcopy(model.vision) if mode == "full_ema" else None
        self.requires_grad_(False)
        self.train(False)

    @property
    def heads_shared(self) -> bool:
        return self.ibot_head is self.dino_head

    def train(self, mode: bool = True):
        """The teacher always stays in eval mode (deterministic targets, no drop-path)."""
        return super().train(False)

    def modules_to_shard(self) -> list[nn.Module]:
        """The teacher modules that FSDP2 shards with the student's mesh (one per student module)."""
        mods = [self.dino_head] + ([] if self.heads_shared else [self.ibot_head])
        return mods + ([self.backbone] if self.backbone is not None else [])

    # -- EMA ----------------------------------------------------------------------------------
    def _pairs(self, model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
        pairs = [("dino_head", self.dino_head, model.dino_head)]
        if not self.heads_shared:
            pairs.append(("ibot_head", self.ibot_head, model.ibot_head))
        if self.backbone is not None:
            pairs.append(("vision", self.backbone, model.vision))
        return pairs

    def ema_tensors(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher, student) local tensors, matched by parameter name."""
        teacher, student = [], []
        for prefix, t_mod, s_mod in self._pairs(model):
            t_params, s_params = _named_params(t_mod), _named_params(s_mod)
            if t_params.keys() != s_params.keys():
                missing = sorted(set(t_params) ^ set(s_params))
                raise ValueError(f"Teacher.update: {prefix} parameters differ from the student's: {missing}")
            for name in sorted(t_params):
                t, s = _local(t_params[name]), _local(s_params[name])
                if t.shape != s.shape:
                    raise ValueError(f"Teacher.update: {prefix}.{name} has shape {list(t.shape)} in the "
                                     f"teacher but {list(s.shape)} in the student (shard mismatch?)")
                teacher.append(t)
                student.append(s.detach())
        return teacher, student

    @torch.no_grad()
    def update(self, model: nn.Module, momentum: float) -> None:
        """ξ ← m·ξ + (1 − m)·θ over all EMA tensors, in one op call (m = 0 copies the student)."""
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"Teacher.update: momentum must be in [0, 1], got {momentum}")
        teacher, student = self.ema_tensors(model)
        kernels.ema_update_(teacher, student, float(momentum))

    # -- targets ------------------------------------------------------------------------------
    @torch.no_grad()
    def global_features(self, model: nn.Module, global_crops: torch.Tensor,
                        student_unmasked: dict | None = None) -> dict[str, torch.Tensor]:
        """Teacher backbone features {"cls1", "patch"} of the unmasked global crops (no grad)."""
        if self.backbone is not None:
            out = self.backbone(global_crops)
        elif self.features == "detached":
            if student_unmasked is None:
                raise ValueError("Teacher.global_features: features='detached' needs the student's "
                                 "unmasked forward output (student_unmasked)")
            out = student_unmasked
        else:
            vision = model.vision
            was_training = vision.training
            vision.train(False)
            try:
                out = vision(global_crops)
            finally:
                vision.train(was_training)
        return {"cls1": out["cls1"].detach(), "patch": out["patch"].detach()}

    @torch.no_grad()
    def dino_bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return self.dino_head.bottleneck(x).float()

    @torch.no_grad()
    def ibot_bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return self.ibot_head.bottleneck(x).float()

    def prototypes(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.dino_head if which == "dino" else self.ibot_head
        return head.prototypes.v.detach(), head.prototypes.g.detach()
