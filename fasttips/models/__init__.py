"""TIPS models: the vision transformer, the text encoder, the projection heads and ``build_model``."""
from .heads import ProjectionHead, WeightNormPrototypes
from .layers import Packing
from .text import TextEncoder, sinusoidal_positions
from .tips import TIPSModel, build_model, param_count
from .vit import PatchEmbed, VisionTransformer

__all__ = ["build_model", "param_count", "TIPSModel", "VisionTransformer", "PatchEmbed", "TextEncoder",
           "ProjectionHead", "WeightNormPrototypes", "Packing", "sinusoidal_positions"]
