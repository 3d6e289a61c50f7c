"""TIPSModel: the vision tower, the text tower, the DINO / iBOT heads and the contrastive scalars."""
from __future__ import annotations

import torch
from torch import nn

from .heads import ProjectionHead
from .text import TextEncoder, text_from_config
from .vit import VisionTransformer, vision_from_config


class TIPSModel(nn.Module):
    """Submodules ``vision``, ``text``, ``dino_head``, ``ibot_head`` (the same object when
    ``cfg.heads.shared``); parameters ``logit_scale`` [2] (log 1/τ of the two contrastive losses)
    and ``logit_bias`` [2] (SigLIP only). Both are 1-d because FSDP2 rejects 0-d parameters."""

    def __init__(self, cfg):
        super().__init__()
        self.init_logit_scale = float(cfg.loss.init_logit_scale)
        self.vision: VisionTransformer = vision_from_config(cfg.vision)
        self.text: TextEncoder = text_from_config(cfg)
        h = cfg.heads
        self.dino_head = ProjectionHead(cfg.vision.width, h.hidden, h.bottleneck, h.prototypes, h.nlayers)
        # Shared: registered under both names (like tied weights); parameters() lists it once.
        self.ibot_head = self.dino_head if h.shared else ProjectionHead(
            cfg.vision.width, h.hidden, h.bottleneck, h.prototypes, h.nlayers)
        self.logit_scale = nn.Parameter(torch.empty(2))
        self.logit_bias = nn.Parameter(torch.empty(2))

    @property
    def heads_shared(self) -> bool:
        return self.ibot_head is self.dino_head

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter, e.g. after ``to_empty`` from the meta device."""
        self.vision.init_weights()
        self.text.init_weights()
        self.dino_head.init_weights()
        if not self.heads_shared:
            self.ibot_head.init_weights()
        self.logit_scale.fill_(self.init_logit_scale)
        self.logit_bias.fill_(-10.0)


def build_model(cfg, device=None) -> TIPSModel:
    """Build on ``device`` (default: torch's default device). ``device="meta"`` allocates nothing
    and leaves the weights uninitialised (call ``to_empty`` then ``init_weights`` later)."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    with torch.device("meta"):
        model = TIPSModel(cfg)
    if device.type != "meta":
        model.to_empty(device=device)
        model.init_weights()
    return model


def param_count(module: nn.Module) -> int:
    """Number of distinct parameter elements (shared parameters counted once; works on meta)."""
    return sum(p.numel() for p in module.parameters())
