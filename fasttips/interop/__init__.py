"""Interoperability with the released TIPS / TIPSv2 weights, transformers and timm.

- :func:`read_source`: a Hugging Face ``tipsv2`` folder, a TIPS npz pair, a timm file or a fasttips
  run → weights under fasttips names, the architecture as config fields, the tokenizer;
- :func:`resolve_init_config` / :func:`init_from`: warm-start a fasttips model from any of them;
- :func:`backbone_parameters` / :func:`drop_backbone_grads_`: ``optim.freeze_backbone_steps``;
- ``fasttips export`` / ``fasttips import`` (:mod:`fasttips.interop.cli`).

docs/interop.md describes the layouts and conventions.
"""
from .formats import Imported, SourceError, read_source
from .layout import LayoutError
from .warmstart import (InitReport, backbone_parameters, check_tokenizer, drop_backbone_grads_, init_from,
                        is_backbone, resolve_init_config)

__all__ = ["Imported", "SourceError", "LayoutError", "read_source", "InitReport", "init_from",
           "resolve_init_config", "check_tokenizer", "backbone_parameters", "drop_backbone_grads_",
           "is_backbone"]
