"""The TIPSv2 objective, one small module per term (docs/loss_math.md §2; DESIGN.md defaults).

DINO and iBOT compute their prototype cross-entropy through ``fasttips.kernels.prototype_cross_entropy``;
contrastive and KoLeo are plain PyTorch.
"""
from .centering import Centering
from .contrastive import clip_loss, contrastive_loss, siglip_loss
from .dino import dino_loss, dino_pairing
from .ibot import ibot_loss, ibot_rows, ibot_weights
from .koleo import koleo_loss

__all__ = ["Centering", "clip_loss", "siglip_loss", "contrastive_loss", "dino_loss", "dino_pairing",
           "ibot_loss", "ibot_rows", "ibot_weights", "koleo_loss"]
