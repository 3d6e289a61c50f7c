"""AdamW with DINOv2-style parameter groups, per-step hyper-parameters and per-module clipping.

Each parameter gets two multipliers, fixed for the run:

- ``lr_mult``: layer-wise lr decay ``layer_decay ** (depth + 1 - layer_id)`` inside each tower
  (layer 0 = patch/token embeddings and position tables, ``i + 1`` = block i, ``depth + 1`` = the rest),
  times ``optim.patch_embed_lr_mult`` for the patch embedding. Heads and temperatures get 1.
- ``wd_mult``: 0 for biases, norms, LayerScale and the contrastive temperatures/biases, else 1.
  The prototype gain ``g`` keeps its weight decay (as DINOv2's ``weight_g``).

Parameters with the same multipliers share a group. The schedules (lr, wd) change every step through
:func:`set_hyperparameters`; the prototype layer's lr is held at 0 for the first
``optim.freeze_prototypes_steps`` steps (DINOv2's frozen last layer).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict

import torch
from torch import nn

# FQN pieces that wrappers add and that say nothing about the parameter.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
_TOWERS = ("vision", "text")
_EMBEDDING_WORDS = ("patch_embed", "pos_embed", "cls_token", "mask_token", "register", "token_embed",
                    "embedding")
_NO_DECAY_WORDS = ("norm", "layerscale", "ls1", "ls2", "gamma", "logit_scale", "logit_bias")


def clean_name(name: str) -> str:
    """The parameter's name without the prefixes that AC / compile / FSDP wrappers insert."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def is_prototype(name: str) -> bool:
    return ".prototypes." in f".{clean_name(name)}"


def weight_decay_mult(name: str, param: torch.Tensor) -> float:
    name = clean_name(name).lower()
    if is_prototype(name):
        return 1.0                                   # weight-normed gain g keeps wd (DINOv2)
    if name.endswith("bias") or any(word in name for word in _NO_DECAY_WORDS):
        return 0.0
    return 1.0


def layer_id(name: str, depth: int) -> int:
    """0 for embeddings, i + 1 for block i, depth + 1 for everything after the blocks."""
    rest = clean_name(name).split(".", 1)[1] if "." in name else name
    match = re.match(r"blocks\.(\d+)\.", rest)
    if match:
        return int(match.group(1)) + 1
    if any(rest.startswith(word) or f".{word}" in rest for word in _EMBEDDING_WORDS):
        return 0
    return depth + 1


def lr_mult(name: str, cfg) -> float:
    name = clean_name(name)
    tower = name.split(".", 1)[0]
    if tower not in _TOWERS:
        return 1.0                                   # heads, temperatures
    depth = cfg.vision.depth if tower == "vision" else cfg.text.depth
    mult = cfg.optim.layer_decay ** (depth + 1 - layer_id(name, depth))
    if tower == "vision" and "patch_embed" in name:
        mult *= cfg.optim.patch_embed_lr_mult
    return mult


def param_groups(model: nn.Module, cfg) -> list[dict]:
    """Trainable parameters grouped by (lr_mult, wd_mult, prototype), in a deterministic order."""
    buckets: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (round(lr_mult(name, cfg), 12), weight_decay_mult(name, param), is_prototype(name))
        group = buckets.setdefault(key, {"params": [], "lr_mult": key[0], "wd_mult": key[1],
                                         "prototype": key[2]})
        group["params"].append(param)
    return [buckets[k] for k in sorted(buckets)]


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; fused on CUDA, foreach elsewhere (fused CPU + DTensor is fragile)."""
    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    kwargs = dict(lr=0.0, betas=tuple(cfg.optim.betas), weight_decay=0.0, eps=1e-8)
    if device.type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(groups, **kwargs)


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float,
                        freeze_prototypes: bool) -> None:
    """Apply this step's lr and weight decay to every group through its multipliers (1 when a group
    has none, e.g. a plain optimiser not built from :func:`param_groups`)."""
    for group in optimizer.param_groups:
        frozen = freeze_prototypes and group.get("prototype", False)
        group["lr"] = 0.0 if frozen else lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


def clip_modules(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters per clipping unit: each top-level child (vision, text, heads) and 'other'."""
    units: dict[str, list] = defaultdict(list)
    for name, param in model.named_parameters():
        if param.requires_grad:
            top = clean_name(name).split(".", 1)[0]
            units[top if "." in clean_name(name) else "other"].append(param)
    return dict(units)


def _to_float(norm: torch.Tensor) -> torch.Tensor:
    full = getattr(norm, "full_tensor", None)           # DTensor norms from sharded grads
    return (full() if full is not None else norm).detach().float()


@torch.no_grad()
def clip_gradients(units: dict[str, list[nn.Parameter]], max_norm: float) -> dict[str, torch.Tensor]:
    """Per-module clipping (DINOv2: backbone and each head separately); returns each unit's norm.

    ``max_norm <= 0`` only measures. Norms stay on the device (0-d tensors) so the caller decides
    when to synchronise.
    """
    norms = {}
    for name, params in units.items():
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            continue
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(with_grad, max_norm, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad], foreach=True)
        norms[name] = _to_float(norm)
    return norms


@torch.no_grad()
def clamp_logit_scale_(model: nn.Module, max_logit_scale: float) -> None:
    """After an optimiser step: clamp the model's ``logit_scale`` (log 1/τ) in place to
    ``≤ ln(max_logit_scale)``, as OpenCLIP does.

    The cap lives here rather than in the loss because clamping ``exp(logit_scale)`` inside the
    forward zeroes the gradient above the cap, and the parameter could then never come back down.
    Only the upper bound of ``loss.max_logit_scale`` is enforced. Under FSDP2 the parameter is a
    DTensor; the clamp is element-wise, so each rank clamps its own shard.
    """
    param = getattr(model, "logit_scale", None)
    if param is None:
        return
    if max_logit_scale <= 0:
        raise ValueError(f"clamp_logit_scale_: max_logit_scale must be > 0, got {max_logit_scale}")
    local = param.to_local() if hasattr(param, "to_local") else param
    local.clamp_(max=math.log(max_logit_scale))


__all__ = ["clamp_logit_scale_", "param_groups", "build_optimizer", "set_hyperparameters", "clip_modules",
           "clip_gradients", "lr_mult", "weight_decay_mult", "layer_id", "clean_name", "is_prototype"]
