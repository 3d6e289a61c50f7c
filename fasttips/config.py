"""Configuration: dataclasses, named presets, YAML files and dotted ``key=value`` overrides.

Every field has a default; presets change a few of them. A wrong key or value fails at start with
a ``ConfigError`` that names the field and what is allowed. The resolved config is saved to the run
directory as YAML so a run can be reproduced or resumed.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config field has a wrong name, type or value."""


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
@dataclass
class VisionConfig:
    width: int = 384
    depth: int = 12
    heads: int = 6
    mlp_hidden: int = 1536            # SwiGLU: hidden of each of the two branches
    ffn: Literal["gelu", "swiglu"] = "gelu"
    patch_size: int = 14
    pos_grid: int = 16                # learned 2-D position grid, resized to the crop
    layerscale: float = 0.0           # 0 = no LayerScale (TIPS scenic); else init value
    drop_path: float = 0.0            # uniform stochastic depth
    ln_eps: float = 1e-6
    qkv_bias: bool = True
    n_cls: int = 2                    # CLS#1 (alt-text) and CLS#2 (synthetic caption)


@dataclass
class TextConfig:
    vocab_size: int = 32000
    depth: int = 12                   # width, heads and MLP follow the vision tower
    max_len: int = 64
    ln_eps: float = 1e-6
    dropout: float = 0.0


@dataclass
class HeadConfig:
    hidden: int = 2048
    bottleneck: int = 256
    prototypes: int = 65536
    nlayers: int = 3
    shared: bool = False              # one head for DINO and iBOT


@dataclass
class LossConfig:
    contrastive: Literal["clip", "siglip"] = "clip"
    contrastive_weight: float = 0.5   # per contrastive loss (TIPS: 1/2 (L + L^))
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.0
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    teacher_temp_final: float = 0.07
    teacher_temp_warmup_steps: int = 30
    centering: Literal["softmax", "sinkhorn_knopp"] = "softmax"
    center_momentum: float = 0.9
    sk_iterations: int = 3
    ibot_tokens: Literal["all", "masked"] = "all"   # "all" = iBOT++; "masked" = DINOv2 iBOT
    ibot_masked_weight: float = 1.0
    ibot_visible_weight: float = 1.0
    init_logit_scale: float = 2.6592600  # log(1/0.07)
    max_logit_scale: float = 100.0


@dataclass
class TeacherConfig:
    mode: Literal["head_ema", "full_ema"] = "head_ema"
    features: Literal["detached", "separate_no_grad"] = "detached"
    momentum: float = 0.994
    momentum_final: float = 1.0
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class DataConfig:
    source: Literal["demo", "shards", "synthetic"] = "demo"
    path: str = ""                    # shard folder / glob when source = shards
    loader: Literal["auto", "dali", "pytorch"] = "auto"
    batch_size: int = 32              # images per process
    num_workers: int = 2
    global_size: int = 224
    n_global: int = 1
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_size: int = 98
    n_local: int = 8
    local_scale: tuple[float, float] = (0.05, 0.32)
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    caption_short_prob: float = 0.5   # CLS#2 gets "short" with this probability, else "long"
    pixel_norm: Literal["tips", "imagenet"] = "tips"
    tokenizer: str = ""               # SentencePiece .model; empty = train one from the captions


@dataclass
class OptimConfig:
    lr: float = 1e-3                  # peak lr at batch 1024 (scaled by sqrt(global_batch/1024))
    min_lr: float = 1e-6
    warmup_steps: int = 10
    weight_decay: float = 0.04
    weight_decay_final: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 1.0
    patch_embed_lr_mult: float = 0.2
    freeze_prototypes_steps: int = 0
    clip_grad: float = 3.0            # per module; 0 disables
    accum_steps: int = 1


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    run_dir: str = "runs/default"
    log_every: int = 1
    ckpt_every: int = 50
    keep_ckpts: int = 2
    max_nonfinite: int = 5            # consecutive non-finite losses before stopping
    compile: bool = False
    activation_checkpointing: bool = False


@dataclass
class EvalConfig:
    every: int = 0                    # 0 = only when asked
    n_images: int = 64


@dataclass
class Config:
    preset: str = "tiny"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    heads: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------
# Presets: only what differs from the defaults above.
# ----------------------------------------------------------------------------------------------
_LARGE_HEADS = {"heads.prototypes": 65536, "heads.hidden": 2048, "heads.bottleneck": 256}

PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo: 64-d heads (the attention kernel's head dim), tiny images, finishes in minutes.
    "tiny": {
        "vision.width": 128, "vision.depth": 2, "vision.heads": 2, "vision.mlp_hidden": 256,
        "text.vocab_size": 1000, "text.depth": 2, "text.max_len": 32,
        "heads.hidden": 256, "heads.bottleneck": 64, "heads.prototypes": 512,
        "data.batch_size": 16, "data.global_size": 112, "data.local_size": 56, "data.n_local": 2,
        "data.num_workers": 0,
        # lr 8e-3 is a peak of 1e-3 after the sqrt(batch/1024) rule; 300 steps is about a minute on
        # 2 cores and is enough for retrieval to rise well above chance (docs/ablation.md).
        "optim.lr": 8e-3, "optim.warmup_steps": 30, "train.steps": 300, "train.ckpt_every": 100,
        "loss.teacher_temp_warmup_steps": 20,
    },
    "vit-s": {"vision.width": 384, "vision.depth": 12, "vision.heads": 6, "vision.mlp_hidden": 1536,
              **_LARGE_HEADS},
    "vit-b": {"vision.width": 768, "vision.depth": 12, "vision.heads": 12, "vision.mlp_hidden": 3072,
              **_LARGE_HEADS},
    "vit-l": {"vision.width": 1024, "vision.depth": 24, "vision.heads": 16, "vision.mlp_hidden": 4096,
              **_LARGE_HEADS},
    "so400m": {"vision.width": 1152, "vision.depth": 27, "vision.heads": 16, "vision.mlp_hidden": 4304,
               "text.depth": 27, **_LARGE_HEADS},
    "vit-g": {"vision.width": 1536, "vision.depth": 40, "vision.heads": 24, "vision.mlp_hidden": 4096,
              "vision.ffn": "swiglu", "vision.pos_grid": 32, **_LARGE_HEADS},
}


# ----------------------------------------------------------------------------------------------
# Validation and parsing
# ----------------------------------------------------------------------------------------------
def _hints(cls) -> dict[str, Any]:
    return get_type_hints(cls)


def _coerce(path: str, typ: Any, value: Any) -> Any:
    """Turn ``value`` (from YAML or a CLI string) into ``typ``, or raise ConfigError naming ``path``."""
    origin = get_origin(typ)
    if origin is Literal:
        allowed = get_args(typ)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin is tuple:
        args = get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(path, a, v) for a, v in zip(args, value))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a {typ.__name__}, got {value!r}")
        try:
            out = typ(value) if not isinstance(value, str) else typ(float(value) if typ is float else int(value))
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a {typ.__name__}, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{path}: expected an int, got {value!r}")
        return out
    if typ is str:
        return str(value)
    raise ConfigError(f"{path}: unsupported type {typ}")


def _section_and_field(cfg: Config, dotted: str):
    parts = dotted.split(".")
    if len(parts) == 1 and parts[0] == "preset":
        return cfg, "preset"
    if len(parts) != 2:
        raise ConfigError(f"{dotted}: keys look like 'section.field'; sections are {_section_names()}")
    section, name = parts
    if section not in _section_names():
        raise ConfigError(f"{dotted}: unknown section {section!r}; choose one of {_section_names()}")
    obj = getattr(cfg, section)
    names = [f.name for f in fields(obj)]
    if name not in names:
        raise ConfigError(f"{dotted}: unknown field {name!r} in [{section}]; fields are {names}")
    return obj, name


def _section_names() -> list[str]:
    return [f.name for f in fields(Config) if f.name != "preset"]


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    obj, name = _section_and_field(cfg, dotted)
    typ = _hints(type(obj))[name]
    setattr(obj, name, _coerce(dotted, typ, value))


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"preset: {name!r} is not a preset; choose one of {list(PRESETS)}")
    cfg = Config(preset=name)
    for key, value in PRESETS[name].items():
        set_value(cfg, key, value)
    return cfg


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Preset (from the file's or an override's ``preset``), then the YAML file, then overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: no such file {str(p)!r}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"--config: {p} must hold a mapping of sections")
        values.update(_flatten(data))
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=10")
        key, value = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(value) if value.strip() else ""))
    name = dict(parsed).get("preset", values.get("preset", "tiny"))
    cfg = preset(str(name))
    for key, value in list(values.items()) + parsed:
        if key != "preset":
            set_value(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a single field's type cannot express."""
    v = cfg.vision
    if v.width % v.heads:
        raise ConfigError(f"vision.heads: {v.heads} must divide vision.width={v.width}")
    for name in ("global_size", "local_size"):
        size = getattr(cfg.data, name)
        if size % v.patch_size:
            raise ConfigError(f"data.{name}: {size} is not a multiple of vision.patch_size={v.patch_size}")
    positive = {"vision.depth": v.depth, "data.batch_size": cfg.data.batch_size,
                "data.n_global": cfg.data.n_global, "heads.prototypes": cfg.heads.prototypes,
                "train.steps": cfg.train.steps, "optim.accum_steps": cfg.optim.accum_steps}
    for key, val in positive.items():
        if val < 1:
            raise ConfigError(f"{key}: must be >= 1, got {val}")
    if cfg.data.n_local < 0:
        raise ConfigError(f"data.n_local: must be >= 0, got {cfg.data.n_local}")
    if not 0.0 <= cfg.data.mask_probability <= 1.0:
        raise ConfigError(f"data.mask_probability: must be in [0, 1], got {cfg.data.mask_probability}")
    lo, hi = cfg.data.mask_ratio
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"data.mask_ratio: need 0 <= lo <= hi <= 1, got {cfg.data.mask_ratio}")
    if not 0.0 <= cfg.data.caption_short_prob <= 1.0:
        raise ConfigError(f"data.caption_short_prob: must be in [0, 1], got {cfg.data.caption_short_prob}")
    if cfg.loss.max_logit_scale <= 0:
        raise ConfigError(f"loss.max_logit_scale: must be > 0, got {cfg.loss.max_logit_scale}")
    if cfg.loss.init_logit_scale > math.log(cfg.loss.max_logit_scale) + 1e-6:
        # the parameter is clamped to ln(max) after each step; starting above it would train one step unclamped
        raise ConfigError(f"loss.init_logit_scale: {cfg.loss.init_logit_scale} is above "
                          f"ln(loss.max_logit_scale) = {math.log(cfg.loss.max_logit_scale):.4f}")
    if cfg.data.source == "shards" and not cfg.data.path:
        raise ConfigError("data.path: required when data.source=shards (a folder or glob of .tar shards)")
    if cfg.teacher.mode == "full_ema" and cfg.teacher.features == "detached":
        # full EMA backbone produces its own features; "detached" has no meaning there.
        cfg.teacher.features = "separate_no_grad"


def to_dict(cfg: Config) -> dict[str, Any]:
    def convert(x):
        if is_dataclass(x):
            return {f.name: convert(getattr(x, f.name)) for f in fields(x)}
        if isinstance(x, tuple):
            return list(x)
        return x
    return convert(cfg)


def from_dict(d: dict[str, Any]) -> Config:
    flat = _flatten(d)
    cfg = preset(str(flat.pop("preset", "tiny")))
    for key, value in flat.items():
        set_value(cfg, key, value)
    validate(cfg)
    return cfg


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe() -> str:
    """One line per field: name, type and default (used by ``--help`` and the README)."""
    lines = []
    cfg = Config()
    for sec in _section_names():
        obj = getattr(cfg, sec)
        for f in fields(obj):
            typ = _hints(type(obj))[f.name]
            if get_origin(typ) is Literal:
                tname = "|".join(map(str, get_args(typ)))
            elif get_origin(typ) is tuple:
                tname = "a,b"
            else:
                tname = typ.__name__
            lines.append(f"  {sec}.{f.name} ({tname}) = {getattr(obj, f.name)!r}")
    return "\n".join(lines)


__all__ = ["Config", "ConfigError", "PRESETS", "load", "preset", "save", "set_value", "to_dict",
           "from_dict", "validate", "describe"] + [c.__name__ for c in (
               VisionConfig, TextConfig, HeadConfig, LossConfig, TeacherConfig, DataConfig,
               OptimConfig, TrainConfig, EvalConfig)]



if __name__ == "__main__":  # `python -m fasttips.config` prints the field reference used in the README
    print(describe())
