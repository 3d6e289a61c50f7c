"""Warm starts: load released (or fasttips) towers into a freshly built fasttips model.

``resolve_init_config(cfg, path)`` runs before the model is built: it takes the architecture from
the source (widths, depth, position grid, LayerScale, LayerNorm eps, vocabulary, text length) and
the source's tokenizer, and refuses settings that would change the imported model (a logit-scale
cap below the imported scales, a different tokenizer, a tokenizer fasttips would shift). What the
files do not record (the head count of a TIPS npz pair or a bare timm file) comes from the released
models' conventions unless set explicitly, and must be set explicitly where there is none.

``init_from(model, path, cfg)`` then copies the vision and text towers and the logit scales into
the built model. Every tensor is checked before the first one is copied, so a failure leaves the
model exactly as it was: nothing half-loaded ever trains. The DINO / iBOT heads, ``logit_bias``,
the optimiser and the step counter start fresh.

``backbone_parameters`` / ``drop_backbone_grads_`` implement ``optim.freeze_backbone_steps``: the
imported towers and logit scales get no update (no gradient, so no AdamW moments and no weight
decay either) while the new heads train.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fasttips.optim import clean_name

from .formats import Imported, SourceError, read_source, undetermined_error
from .layout import LayoutError

_CACHE: dict = {}


def _read(path) -> Imported:
    """Read once per (path, modification time): resolve_init_config and init_from share it."""
    p = Path(path).expanduser()
    key = (str(p.resolve()), p.stat().st_mtime_ns if p.exists() else 0)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = read_source(p)
    return _CACHE[key]


def check_tokenizer(proto: bytes | None, vocab_size: int, where) -> None:
    """The imported text tower was trained on the tokenizer's raw ids with 0 as padding: the
    tokenizer must have its pad piece at id 0 (so fasttips.data.tokenizer does not shift ids) and
    no more pieces than the embedding has rows."""
    if proto is None:
        raise SourceError(f"{where}: no tokenizer.model beside the weights; the text tower is useless "
                          "without the tokenizer it was trained with (put tokenizer.model next to them)")
    from fasttips.data.tokenizer import Tokenizer
    try:
        tok = Tokenizer.from_bytes(proto)
    except Exception as exc:
        raise SourceError(f"{where}: tokenizer.model is not a SentencePiece model ({exc})") from None
    if tok.offset != 0:                   # the same decision the data pipeline will make
        raise SourceError(f"{where}: tokenizer.model has pad id {tok.sp.pad_id()}, not 0; fasttips would shift "
                          "every id by one and the imported embeddings would no longer match")
    if tok.vocab_size > vocab_size:
        raise SourceError(f"{where}: tokenizer.model has {tok.vocab_size} pieces but the text "
                          f"embedding has {vocab_size} rows")


# ------------------------------------------------------------------------------------------------
# before building: the config
# ------------------------------------------------------------------------------------------------
def _require_text(imported: Imported, path, vision_only: bool) -> bool:
    """True when the text tower is to be loaded; a source without one is refused unless the caller
    asked for the vision tower alone (then the text tower, tokenizer and logit scales stay fresh)."""
    if imported.has_text:
        return True
    if not vision_only:
        raise SourceError(f"train.init_from={path}: {imported.kind} source holds no text tower; init_from "
                          "loads both towers: use a Hugging Face tipsv2 folder, a TIPS npz pair or a fasttips "
                          "run (a timm file is only the vision tower)")
    return False


def resolve_init_config(cfg, path, vision_only: bool = False, explicit=frozenset()):
    """(new cfg, list of "field: old → new") for a warm start from ``path``.

    The architecture fields (and the pixel normalisation) come from the source; ``data.tokenizer``
    is set to the source's tokenizer.model when empty. Raises ``ValueError`` naming the field when
    the settings cannot give back the imported model. ``vision_only``: accept a source without a
    text tower (a timm file); only the vision fields are taken then. ``explicit``: the keys the user
    set (config file and overrides, not the preset): they keep their value where the source does not
    record the setting, and a setting it does not determine must be among them.
    """
    from fasttips import config as config_lib

    imported = _read(path)
    with_text = _require_text(imported, path, vision_only)
    missing = undetermined_error(imported, explicit)
    if missing is not None:
        raise missing
    new = copy.deepcopy(cfg)
    changes = []
    conventions = {k: v for k, v in imported.conventions.items() if k not in explicit}
    for key, value in {**conventions, **imported.overrides}.items():
        old = _get(new, key)
        if old != value:
            config_lib.set_value(new, key, value)
            changes.append(f"{key}: {old} → {value}")
    if not with_text:
        return new, changes
    check_tokenizer(imported.tokenizer, imported.state["text.token_embed.weight"].shape[0], path)
    if new.data.tokenizer:
        mine = Path(new.data.tokenizer)
        if not mine.is_file() or mine.read_bytes() != imported.tokenizer:
            raise ValueError(f"data.tokenizer={new.data.tokenizer}: differs from the tokenizer of "
                             f"train.init_from={path}; leave data.tokenizer empty to use the imported one")
    else:
        config_lib.set_value(new, "data.tokenizer", str(imported.tokenizer_path))
        changes.append(f"data.tokenizer: '' → {imported.tokenizer_path}")
    _check_logit_cap(imported, new.loss.max_logit_scale, path)
    return new, changes


def _get(cfg, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def _check_logit_cap(imported: Imported, cap: float, path) -> None:
    scale = imported.state.get("logit_scale")
    if scale is None:
        return
    top = float(scale.max())
    if top > math.log(cap) + 1e-6:
        need = math.ceil(math.exp(top))
        raise ValueError(f"loss.max_logit_scale={cap}: below the imported logit scale exp({top:.4f}) = "
                         f"{math.exp(top):.1f} of train.init_from={path}; set loss.max_logit_scale={need} "
                         "(or higher) or the first step would clamp it")


# ------------------------------------------------------------------------------------------------
# after building: the weights
# ------------------------------------------------------------------------------------------------
@dataclass
class InitReport:
    source: str
    kind: str
    loaded: list[str]
    fresh: list[str]                               # parameters left at their initial values
    logit_scale: list[float] | None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        scale = ("" if self.logit_scale is None else
                 f"; logit scales {', '.join(f'{math.exp(s):.1f}' for s in self.logit_scale)}")
        return (f"init_from: {self.kind} weights from {self.source}: {len(self.loaded)} tensors loaded, "
                f"{len(self.fresh)} fresh (heads{', logit_bias' if 'logit_bias' in self.fresh else ''})"
                f"{scale}" + "".join(f"\n  note: {n}" for n in self.notes))


def _full(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)          # DTensor (FSDP2 shard) → the whole tensor
    return full() if full is not None else t


@torch.no_grad()
def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    value = value.to(dtype=param.dtype)
    if hasattr(param, "device_mesh"):               # DTensor: keep only this rank's shard
        from torch.distributed.tensor import distribute_tensor
        value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
        param.to_local().copy_(value.to_local())
    else:
        param.copy_(value)


@torch.no_grad()
def init_from(model: nn.Module, path, cfg, vision_only: bool = False) -> InitReport:
    """Copy the source's towers and logit scales into ``model`` (built from a config that
    :func:`resolve_init_config` prepared). Raises before copying anything if a tensor is missing or
    has another shape; the message names the first such key and both shapes. ``vision_only``: as
    in :func:`resolve_init_config`."""
    imported = _read(path)
    towers = ("vision.", "text.") if _require_text(imported, path, vision_only) else ("vision.",)
    if "text." in towers:
        check_tokenizer(imported.tokenizer, imported.state["text.token_embed.weight"].shape[0], path)
    _check_logit_cap(imported, cfg.loss.max_logit_scale, path)
    params = {clean_name(n): p for n, p in model.named_parameters()}
    wanted = [n for n in params if n.startswith(towers) or n == "logit_scale"]
    for name in wanted:
        if name not in imported.state:
            if name == "logit_scale":
                continue                            # a source without temperatures keeps the init
            raise LayoutError(f"train.init_from={path}: the source has no {name!r} (model shape "
                              f"{list(params[name].shape)}); it is not a {architecture(cfg)} model")
    for name, value in imported.state.items():
        if name == "logit_bias":
            continue                                # SigLIP's bias is not part of the release
        if name not in params:
            raise LayoutError(f"train.init_from={path}: {name!r} {list(value.shape)} has no place in the "
                              f"model ({architecture(cfg)}); build it with the source's architecture")
        if tuple(value.shape) != tuple(params[name].shape):
            raise LayoutError(f"train.init_from={path}: {name!r} is {list(value.shape)} in the source but "
                              f"{list(params[name].shape)} in the model ({architecture(cfg)})")
    loaded = [n for n in wanted if n in imported.state]
    for name in loaded:
        _assign(params[name], imported.state[name])
    cache = getattr(getattr(model, "vision", None), "_pos_cache", None)
    if cache is not None:
        cache.clear()
    scale = imported.state.get("logit_scale")
    return InitReport(str(path), imported.kind, loaded, [n for n in params if n not in loaded],
                      None if scale is None else [float(s) for s in scale], list(imported.notes))


def architecture(cfg) -> str:
    """The towers' shape in one phrase (start-up line and shape errors)."""
    v, t = cfg.vision, cfg.text
    return (f"vision width {v.width} depth {v.depth} heads {v.heads} mlp {v.mlp_hidden} {v.ffn} grid "
            f"{v.pos_grid}, text depth {t.depth} vocab {t.vocab_size}")


# ------------------------------------------------------------------------------------------------
# frozen backbone
# ------------------------------------------------------------------------------------------------
def is_backbone(name: str) -> bool:
    """The imported part of the model: both towers and the logit scales (heads and the SigLIP bias
    are new)."""
    name = clean_name(name)
    return name.startswith(("vision.", "text.")) or name == "logit_scale"


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if is_backbone(n)]


def drop_backbone_grads_(params) -> None:
    """Between backward and the optimiser step: no gradient → AdamW leaves these parameters (and
    their moments) untouched, weight decay included."""
    for p in params:
        p.grad = None
