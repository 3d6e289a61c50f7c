"""Read and write the released formats: Hugging Face ``tipsv2`` folders, TIPS npz pairs, timm files
and fasttips runs.

Everything read from outside fasttips goes through formats that cannot run code: JSON,
safetensors and ``np.load(allow_pickle=False)``. A fasttips run is read with the project's own
checkpoint loader, which unpickles nothing but DCP's own metadata records, tensors and plain
containers (``fasttips.distributed.checkpoint``), so a run from someone else is data too.

``read_source(path)`` gives an :class:`Imported`: the weights under fasttips names, the config
fields that describe the architecture, and the tokenizer. The writers take a fasttips state dict and
the config that built it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import hf_tokenizer, layout
from .layout import LayoutError, Tensors

HF_PREFIXES = {"vision": "vision_encoder.", "text": "text_encoder."}
TOKENIZER_FILE = "tokenizer.model"

# transformers' defaults for keys a config.json may leave out (Tipsv2VisionConfig / Tipsv2TextConfig)
_HF_VISION_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                           hidden_act="gelu", layer_norm_eps=1e-6, image_size=448, patch_size=14,
                           num_channels=3, qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False,
                           num_register_tokens=1)
_HF_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=64, hidden_act="relu",
                         layer_norm_eps=1e-5, pad_token_id=0, scale_sqrt_depth=True, pooling_epsilon=1e-8)
# The TIPS PyTorch port builds its LayerNorms with torch's default eps (1e-5) in the text tower and
# 1e-6 in the vision tower; transformers does the same.
RELEASE_TEXT_LN_EPS = 1e-5
RELEASE_VISION_LN_EPS = 1e-6
RELEASE_MAX_LEN = 64
# The releases take pixels in [0, 1] with no mean/std normalisation.
RELEASE_PIXELS = {"data.pixel_norm": "tips"}
# fasttips' evaluation preprocessing (fasttips.eval: zero-shot classification and retrieval): the
# shorter side resized to the input size with PIL bicubic, then the central square, i.e. timm's
# crop_pct 1.0 (DINOv2's kNN protocol would be crop_pct 0.875: 256 → 224).
EVAL_INTERPOLATION = "bicubic"
EVAL_CROP_PCT = 1.0


def pixel_stats(pixel_norm: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a ``data.pixel_norm`` on pixels in [0, 1]."""
    from fasttips.data.augment import IMAGENET_MEAN, IMAGENET_STD
    return {"tips": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
            "imagenet": (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))}[pixel_norm]


def pixel_norm_of(mean, std, where) -> str:
    """The ``data.pixel_norm`` whose mean/std these are; refused when fasttips has none."""
    for name in ("tips", "imagenet"):
        m, s = pixel_stats(name)
        if len(mean) == 3 and len(std) == 3 and all(abs(a - b) < 1e-6 for a, b in zip([*mean, *std], [*m, *s])):
            return name
    raise SourceError(f"{where}: mean {list(mean)} / std {list(std)} is neither data.pixel_norm=tips (0 / 1) "
                      "nor imagenet; fasttips normalises pixels one of those two ways")


@dataclass
class Imported:
    kind: str                                  # "hf" | "tips" | "timm" | "fasttips"
    path: Path
    state: Tensors                             # fasttips names: vision.*, text.*, logit_scale
    overrides: dict = field(default_factory=dict)   # config fields of the architecture
    tokenizer: bytes | None = None
    tokenizer_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    cfg: object = None                         # the run's own config (fasttips sources only)
    # settings the files do not record, filled from the released models' conventions (an explicit
    # value wins), and settings they do not determine at all (key → why; must be given explicitly)
    conventions: dict = field(default_factory=dict)
    undetermined: dict = field(default_factory=dict)

    @property
    def has_text(self) -> bool:
        return any(k.startswith("text.") for k in self.state)


class SourceError(ValueError):
    """A path that is not a readable model source (names the path and what is accepted)."""


ACCEPTED = ("a Hugging Face tipsv2 folder (config.json + model.safetensors) or a hub cache folder, "
            "a TIPS npz pair (<name>_vision.npz + <name>_text.npz, or a folder holding one), "
            "a timm .safetensors file, or a fasttips run dir / step_* checkpoint")


# ------------------------------------------------------------------------------------------------
# safe primitives
# ------------------------------------------------------------------------------------------------
def load_safetensors(path: Path) -> Tensors:
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as exc:                  # a header that is not JSON, a truncated file, ...
        raise SourceError(f"{path}: not a readable safetensors file ({exc})") from None


def load_npz(path: Path) -> Tensors:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: torch.from_numpy(np.array(data[k])) for k in data.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise SourceError(f"{path}: holds pickled objects; refusing to unpickle a downloaded file "
                              "(weights must be plain arrays)") from None
        raise SourceError(f"{path}: not a readable npz file ({exc})") from None
    except (OSError, EOFError) as exc:
        raise SourceError(f"{path}: not a readable npz file ({exc})") from None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: not a readable JSON file ({exc})") from None


# ------------------------------------------------------------------------------------------------
# architecture → config fields
# ------------------------------------------------------------------------------------------------
def _shape_overrides(state: Tensors) -> dict:
    """Architecture fields read off the tensors' shapes (npz / timm / HF alike)."""
    v = {k[len("vision."):]: t for k, t in state.items() if k.startswith("vision.")}
    D = v["cls_tokens"].shape[1]
    depth = sum(1 for k in v if k.endswith(".norm1.weight"))
    swiglu = "blocks.0.mlp.w12.weight" in v
    mlp = v["blocks.0.mlp.w12.weight"].shape[0] // 2 if swiglu else v["blocks.0.mlp.fc1.weight"].shape[0]
    out = {"vision.width": D, "vision.depth": depth, "vision.mlp_hidden": mlp,
           "vision.ffn": "swiglu" if swiglu else "gelu",
           "vision.patch_size": math.isqrt(v["patch_embed.proj.weight"].shape[1] // 3),
           "vision.pos_grid": v["pos_embed"].shape[-1],
           "vision.layerscale": 1.0 if "blocks.0.ls1.gamma" in v else 0.0,
           "vision.qkv_bias": "blocks.0.attn.qkv.bias" in v}
    if any(k.startswith("text.") for k in state):
        out["text.vocab_size"] = state["text.token_embed.weight"].shape[0]
        out["text.depth"] = sum(1 for k in state if k.startswith("text.") and k.endswith(".norm1.weight"))
    return out


def _unrecorded_heads(imported: "Imported", heads: int | None = None) -> None:
    """The head count is not recoverable from fused qkv weights: take ``heads`` when a config beside
    the weights gives it, else the released models' count for this width, else require it."""
    width = imported.overrides["vision.width"]
    if heads is not None:
        imported.overrides["vision.heads"] = int(heads)
    elif width in layout.RELEASE_HEADS:
        imported.conventions["vision.heads"] = layout.RELEASE_HEADS[width]
        imported.notes.append(f"{imported.path}: vision.heads={layout.RELEASE_HEADS[width]}, the released models' "
                              f"head count for width {width} (the files do not record it; give vision.heads=N "
                              "if this model has another)")
    else:
        imported.undetermined["vision.heads"] = (f"the files do not record the head count and width {width} is "
                                                 "not a released size")


def undetermined_error(imported: "Imported", given) -> "SourceError | None":
    """The error naming the first setting the source does not determine and ``given`` lacks."""
    for key, why in imported.undetermined.items():
        if key not in given:
            width = imported.overrides.get("vision.width")
            return SourceError(f"{imported.path}: {key} is not determined by the weights ({why}); give it "
                               f"explicitly: {key}=N (N divides vision.width={width}; the model's own head count)")
    return None


def _hf_overrides(config: dict, where: Path) -> dict:
    vc = {**_HF_VISION_DEFAULTS, **(config.get("vision_config") or {})}
    tc = {**_HF_TEXT_DEFAULTS, **(config.get("text_config") or {})}

    def need(ok: bool, what: str):
        if not ok:
            raise LayoutError(f"{where}: {what}; fasttips cannot represent this model exactly")

    need(vc["hidden_act"] == "gelu", f"vision_config.hidden_act={vc['hidden_act']!r} (fasttips: exact 'gelu')")
    need(tc["hidden_act"] == "relu", f"text_config.hidden_act={tc['hidden_act']!r} (fasttips: 'relu')")
    need(vc["num_register_tokens"] == 1, f"vision_config.num_register_tokens={vc['num_register_tokens']} "
                                         "(fasttips: exactly one, CLS#2)")
    need(bool(tc["scale_sqrt_depth"]), "text_config.scale_sqrt_depth=false (fasttips scales by √D)")
    need(tc["hidden_size"] == vc["hidden_size"], "text and vision hidden sizes differ")
    need(tc["num_attention_heads"] == vc["num_attention_heads"],
         f"text heads {tc['num_attention_heads']} ≠ vision heads {vc['num_attention_heads']} "
         "(fasttips' text tower takes the vision tower's heads)")
    need(vc["num_channels"] == 3, f"vision_config.num_channels={vc['num_channels']}")
    need(tc.get("pad_token_id", 0) == 0, f"text_config.pad_token_id={tc.get('pad_token_id')} (fasttips pads with 0)")
    D = vc["hidden_size"]
    hidden = int(D * vc["mlp_ratio"])
    swiglu = bool(vc["use_swiglu_ffn"])
    mlp = (int(hidden * 2 / 3) + 7) // 8 * 8 if swiglu else hidden
    text_mlp = mlp * 3 // 2 if swiglu else mlp
    need(tc["intermediate_size"] == text_mlp,
         f"text_config.intermediate_size={tc['intermediate_size']} but fasttips derives {text_mlp} from the "
         "vision MLP")
    patch = vc["patch_size"] if isinstance(vc["patch_size"], int) else vc["patch_size"][0]
    size = vc["image_size"] if isinstance(vc["image_size"], int) else vc["image_size"][0]
    return {"vision.width": D, "vision.depth": vc["num_hidden_layers"], "vision.heads": vc["num_attention_heads"],
            "vision.mlp_hidden": mlp, "vision.ffn": "swiglu" if swiglu else "gelu", "vision.patch_size": patch,
            "vision.pos_grid": size // patch, "vision.layerscale": float(vc["layerscale_value"]) or 1.0,
            "vision.ln_eps": float(vc["layer_norm_eps"]), "vision.qkv_bias": bool(vc["qkv_bias"]),
            "text.vocab_size": tc["vocab_size"], "text.depth": tc["num_hidden_layers"],
            "text.max_len": tc["max_position_embeddings"], "text.ln_eps": float(tc["layer_norm_eps"])}


def _tokenizer_beside(folder: Path) -> tuple[bytes | None, Path | None]:
    path = folder / TOKENIZER_FILE
    return (path.read_bytes(), path) if path.is_file() else (None, None)


# ------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------
def _hub_snapshot(folder: Path) -> Path | None:
    """A hub cache folder (models--org--name) → its newest snapshot holding a config.json."""
    snaps = folder / "snapshots"
    if not snaps.is_dir():
        return None
    found = [s for s in snaps.iterdir() if (s / "config.json").is_file()]
    return max(found, key=lambda s: (s / "config.json").stat().st_mtime) if found else None


def read_hf(folder: Path) -> Imported:
    config = read_json(folder / "config.json")
    if config.get("model_type") != "tipsv2":
        raise SourceError(f"{folder / 'config.json'}: model_type={config.get('model_type')!r}; only 'tipsv2' "
                          "folders can be imported")
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        raw = load_safetensors(folder / "model.safetensors")
    elif index.is_file():
        raw = {}
        for shard in sorted(set(read_json(index).get("weight_map", {}).values())):
            raw.update(load_safetensors(folder / shard))
    else:
        raise SourceError(f"{folder}: no model.safetensors (nor a sharded index); "
                          "download the weights next to config.json")
    if any(k.startswith(("vision_model.", "text_model.")) for k in raw):
        raise SourceError(f"{folder}: the weights use transformers' in-memory names (vision_model.*); "
                          "re-save the model with save_pretrained, which writes the release layout")
    towers = {t: {k[len(p):]: v for k, v in raw.items() if k.startswith(p)} for t, p in HF_PREFIXES.items()}
    if not towers["vision"]:
        raise SourceError(f"{folder}: model.safetensors holds no vision_encoder.* weights")
    state = layout.vision_from_release(towers["vision"], f"{folder}: vision_encoder")
    if towers["text"]:
        state.update(layout.text_from_release(towers["text"], f"{folder}: text_encoder"))
    tau = float(raw["temperature"]) if "temperature" in raw else float(
        config.get("temperature_init_value", 0.005065968260169029))
    scale = layout.logit_scale_from_temperature(tau, f"{folder}: temperature")
    state["logit_scale"] = torch.tensor([scale, scale], dtype=torch.float32)
    exact = _exact_logit_scale(folder / "model.safetensors")
    if exact is not None:
        state["logit_scale"] = exact
    tok, tok_path = _tokenizer_beside(folder)
    imported = Imported("hf", folder, state, {**_hf_overrides(config, folder), **RELEASE_PIXELS}, tok, tok_path)
    _check_shapes_match_overrides(imported)
    return imported


def _exact_logit_scale(path: Path) -> torch.Tensor | None:
    """fasttips' own exports record both logit scales exactly in the safetensors metadata (the
    tipsv2 model has one temperature); other folders have none."""
    if not path.is_file():
        return None
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "fasttips.logit_scale" not in meta:
        return None
    values = [float.fromhex(x) for x in meta["fasttips.logit_scale"].split(",")]
    return torch.tensor(values, dtype=torch.float32)


def tips_pair(path: Path) -> tuple[Path, Path]:
    """The (vision, text) npz files named by ``path``: either file of the pair, their common
    prefix, or a folder holding exactly one pair."""
    if path.is_dir():
        visions = sorted(path.glob("*_vision.npz"))
        if len(visions) != 1:
            raise SourceError(f"{path}: expected one *_vision.npz in the folder, found {len(visions)}")
        path = visions[0]
    name = str(path)
    for suffix in ("_vision.npz", "_text.npz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    vision, text = Path(name + "_vision.npz"), Path(name + "_text.npz")
    if not vision.is_file():
        raise SourceError(f"{vision}: no such file (the vision half of the TIPS npz pair)")
    return vision, text


def read_tips(path: Path) -> Imported:
    vision, text = tips_pair(path)
    state = layout.vision_from_release(load_npz(vision), str(vision))
    notes = []
    if text.is_file():
        raw = load_npz(text)
        temps = {k: raw.pop(k) for k in ("temperature", "temperature_contrastive") if k in raw}
        state.update(layout.text_from_release(raw, str(text)))
        # CLS#1 (alt-text) pairs with temperature_contrastive, as the release's scenic inference uses
        # it with the first CLS token; the other temperature goes to CLS#2. One value → both.
        first = temps.get("temperature_contrastive", temps.get("temperature"))
        second = temps.get("temperature", first)
        if first is not None:
            scales = [layout.logit_scale_from_temperature(float(t), f"{text}: temperature")
                      for t in (first, second)]
            state["logit_scale"] = torch.tensor(scales, dtype=torch.float32)
        else:
            notes.append(f"{text}: no temperature; the logit scales start from loss.init_logit_scale")
    overrides = _shape_overrides(state)
    overrides.update({"vision.ln_eps": RELEASE_VISION_LN_EPS, "text.ln_eps": RELEASE_TEXT_LN_EPS,
                      "text.max_len": RELEASE_MAX_LEN, **RELEASE_PIXELS})
    tok, tok_path = _tokenizer_beside(vision.parent)
    imported = Imported("tips", vision, state, overrides, tok, tok_path, notes)
    _unrecorded_heads(imported)
    return imported


def read_timm(path: Path) -> Imported:
    """A timm state dict; a timm ``config.json`` beside it (``save_pretrained`` / fasttips' export)
    gives the head count and the pixel normalisation."""
    raw = load_safetensors(path)
    fc1, fc2 = raw.get("blocks.0.mlp.fc1.weight"), raw.get("blocks.0.mlp.fc2.weight")
    if fc1 is None or fc2 is None:
        raise SourceError(f"{path}: no blocks.0.mlp.fc1/fc2 weights; not a timm ViT state dict")
    swiglu = fc1.shape[0] == 2 * fc2.shape[1]
    state = layout.vision_from_timm(raw, swiglu)
    overrides = _shape_overrides(state)
    overrides.update({"vision.ln_eps": RELEASE_VISION_LN_EPS, **RELEASE_PIXELS})
    imported = Imported("timm", path, state, overrides, None, None,
                        ["timm files hold the vision tower only (no text tower, temperatures or mask token)"])
    config = _timm_config(path.parent)
    heads = None
    if config is not None:
        where = path.parent / "config.json"
        arch = config.get("architecture")
        heads = (config.get("model_args") or {}).get("num_heads", _TIMM_STANDARD.get(arch, (None,) * 3)[2])
        pre = config.get("pretrained_cfg") or {}
        if "mean" in pre and "std" in pre:
            overrides["data.pixel_norm"] = pixel_norm_of(pre["mean"], pre["std"], where)
    _unrecorded_heads(imported, heads)
    return imported


def _timm_config(folder: Path) -> dict | None:
    """timm's hub ``config.json`` (it names an ``architecture``), or None."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    config = read_json(path)
    return config if isinstance(config, dict) and "architecture" in config else None


def read_fasttips(path: Path, weights: str = "student") -> Imported:
    from fasttips.eval.loading import load_for_eval
    model, tokenizer, cfg, ckpt = load_for_eval(path)
    state = {k: v for k, v in model.state_dict().items()
             if k.startswith(("vision.", "text.")) or k in ("logit_scale", "logit_bias")}
    notes = []
    if weights == "teacher":
        teacher = _teacher_backbone(ckpt, model)
        if teacher is None:
            notes.append(f"{ckpt}: teacher.mode=head_ema: the teacher's towers are the student's")
        else:
            state.update(teacher)
    # the architecture only: drop-path and dropout are the new run's choice
    overrides = {f"{section}.{f}": getattr(getattr(cfg, section), f)
                 for section in ("vision", "text") for f in vars(getattr(cfg, section))
                 if f not in ("drop_path", "dropout")}
    overrides["data.pixel_norm"] = cfg.data.pixel_norm
    return Imported("fasttips", ckpt, state, overrides, tokenizer.serialized(), ckpt / TOKENIZER_FILE, notes,
                    cfg)


def _teacher_backbone(ckpt: Path, model) -> Tensors | None:
    """The full-EMA teacher's vision tower (``teacher.backbone.*`` in the DCP shards), or None."""
    from fasttips.distributed.checkpoint import load_dcp, saved_keys
    saved = saved_keys(ckpt)
    prefixes = sorted((k[: -len("cls_tokens")] for k in saved if k.endswith("backbone.cls_tokens")), key=len)
    if not prefixes:
        return None
    prefix = prefixes[0]
    wanted = {prefix + k: torch.empty_like(v) for k, v in model.vision.state_dict().items()}
    missing = [k for k in wanted if k not in saved]
    if missing:
        raise SourceError(f"{ckpt}: teacher backbone lacks {missing[0]!r}")
    load_dcp(wanted, ckpt)
    return {"vision." + k[len(prefix):]: v for k, v in wanted.items()}


def detect(path: str | Path) -> tuple[str, Path]:
    p = Path(path).expanduser()
    if not p.exists():
        # a bare TIPS prefix: <dir>/<name> with <name>_vision.npz beside it
        if Path(str(p) + "_vision.npz").is_file():
            return "tips", p
        raise SourceError(f"{p}: no such file or folder; expected {ACCEPTED}")
    if p.is_dir():
        if _timm_config(p) is not None and (p / "model.safetensors").is_file():
            return "timm", p / "model.safetensors"
        if (p / "config.json").is_file():
            return "hf", p
        snapshot = _hub_snapshot(p)
        if snapshot is not None:
            return "hf", snapshot
        if (p / "checkpoints").is_dir() or (p / "COMPLETE").is_file() or p.name.startswith("step_"):
            return "fasttips", p
        if list(p.glob("*_vision.npz")):
            return "tips", p
        raise SourceError(f"{p}: a folder with no config.json, npz pair or checkpoints; expected {ACCEPTED}")
    if p.suffix == ".npz":
        return "tips", p
    if p.suffix == ".safetensors":
        if (p.parent / "config.json").is_file() and p.name.startswith("model") and _timm_config(p.parent) is None:
            return "hf", p.parent
        return "timm", p
    if p.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
        raise SourceError(f"{p}: a pickle-based file; it is not read because unpickling can run code. "
                          f"Convert it to safetensors first; expected {ACCEPTED}")
    raise SourceError(f"{p}: unknown file type {p.suffix!r}; expected {ACCEPTED}")


def read_source(path: str | Path, weights: str = "student") -> Imported:
    """Any accepted source → :class:`Imported` (fasttips names, architecture, tokenizer)."""
    if weights not in ("student", "teacher"):
        raise ValueError(f"weights: {weights!r} is not allowed; choose 'student' or 'teacher'")
    kind, p = detect(path)
    if kind == "fasttips":
        return read_fasttips(p, weights)
    reader = {"hf": read_hf, "tips": read_tips, "timm": read_timm}[kind]
    imported = reader(p)
    if weights == "teacher":
        imported.notes.append(f"{kind} files hold one set of weights; --weights teacher has no effect")
    return imported


def _check_shapes_match_overrides(imported: Imported) -> None:
    """A config.json that disagrees with its weights is refused before anything is built."""
    from_shapes = _shape_overrides(imported.state)
    for key, value in from_shapes.items():
        if key in imported.overrides and imported.overrides[key] != value and key != "vision.layerscale":
            raise LayoutError(f"{imported.path}: config.json says {key}={imported.overrides[key]} but the "
                              f"weights have {value}")


# ------------------------------------------------------------------------------------------------
# writers
# ------------------------------------------------------------------------------------------------
def _fp32(sd: Tensors) -> Tensors:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}


def hf_mlp_ratio(width: int, mlp_hidden: int, swiglu: bool) -> float:
    """An ``mlp_ratio`` from which transformers derives exactly ``mlp_hidden`` (SwiGLU: each
    branch's width after its 2/3, multiple-of-8 rule)."""
    def derived(ratio):
        h = int(width * ratio)
        return (int(h * 2 / 3) + 7) // 8 * 8 if swiglu else h

    targets = range(mlp_hidden * 3 // 2 - 8, mlp_hidden * 3 // 2 + 9) if swiglu else [mlp_hidden]
    for hidden in targets:
        ratio = hidden / width
        for r in (ratio, math.nextafter(ratio, math.inf)):
            if derived(r) == mlp_hidden:
                return float(r)
    raise LayoutError(f"vision.mlp_hidden={mlp_hidden}: transformers' Tipsv2 SwiGLU sizing cannot give this "
                      "width (it rounds each branch to a multiple of 8)")


def hf_config(cfg, logit_scale: torch.Tensor) -> dict:
    from fasttips.models.text import text_mlp_hidden
    v, t = cfg.vision, cfg.text
    swiglu = v.ffn == "swiglu"
    return {
        "architectures": ["Tipsv2Model"], "model_type": "tipsv2", "dtype": "float32",
        "temperature_init_value": layout.temperature_from_logit_scale(float(logit_scale[0])),
        "vision_config": {
            "model_type": "tipsv2_vision_model", "hidden_size": v.width, "num_hidden_layers": v.depth,
            "num_attention_heads": v.heads, "mlp_ratio": hf_mlp_ratio(v.width, v.mlp_hidden, swiglu),
            "hidden_act": "gelu", "layer_norm_eps": v.ln_eps, "image_size": v.pos_grid * v.patch_size,
            "patch_size": v.patch_size, "num_channels": 3, "qkv_bias": v.qkv_bias, "layerscale_value": 1.0,
            "use_swiglu_ffn": swiglu, "num_register_tokens": 1, "drop_path_rate": 0.0},
        "text_config": {
            "model_type": "tipsv2_text_model", "vocab_size": t.vocab_size, "hidden_size": v.width,
            "intermediate_size": text_mlp_hidden(cfg), "num_hidden_layers": t.depth,
            "num_attention_heads": v.heads, "max_position_embeddings": t.max_len, "hidden_act": "relu",
            "layer_norm_eps": t.ln_eps, "pad_token_id": 0, "scale_sqrt_depth": True,
            "pooling_epsilon": 1e-8},
    }


def _hf_tokenizer_config(proto: bytes, max_len: int) -> dict:
    """transformers' generic fast tokenizer over tokenizer.json (``Tipsv2Tokenizer`` would rebuild its
    own pipeline, which drops characters outside the vocabulary); "<pad>" typed in a caption is
    text, as in SentencePiece."""
    pieces = hf_tokenizer.read_spec(proto).pieces
    unk = next(p for p, _, kind in pieces if kind == 2)
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
            "pad_token": pieces[0][0], "unk_token": unk, "padding_side": "right", "truncation_side": "right",
            "split_special_tokens": True, "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False}


def _hf_preprocessor_config(cfg) -> dict:
    """fasttips' evaluation preprocessing at the native grid's size: shorter side to S (bicubic),
    central S×S crop, [0, 1]; mean/std only for imagenet-normalised runs."""
    size = cfg.vision.pos_grid * cfg.vision.patch_size
    out = {"image_processor_type": "Tipsv2ImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
           "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
           "do_rescale": True, "rescale_factor": 1 / 255, "do_convert_rgb": True,
           "do_normalize": cfg.data.pixel_norm == "imagenet"}
    if out["do_normalize"]:
        mean, std = pixel_stats(cfg.data.pixel_norm)
        out.update(image_mean=list(mean), image_std=list(std))
    return out


def write_hf(out: Path, state: Tensors, cfg, tokenizer: bytes) -> list[Path]:
    from safetensors.torch import save_file
    fast_tokenizer = hf_tokenizer.tokenizer_json(tokenizer)     # refused before anything is written
    hf_tokenizer.check_ids(fast_tokenizer, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    scale = state["logit_scale"].detach().float().cpu()
    tensors = {HF_PREFIXES["vision"] + k: v
               for k, v in layout.vision_to_release(state, mlp_names=("c_fc", "c_proj")).items()}
    tensors.update({HF_PREFIXES["text"] + k: v for k, v in layout.text_to_release(state).items()})
    tau = layout.temperature_from_logit_scale(float(scale[0]))
    tensors["temperature"] = torch.tensor(tau, dtype=torch.float32)
    meta = {"format": "pt", "fasttips.logit_scale": ",".join(float(x).hex() for x in scale.tolist())}
    save_file(_fp32(tensors), str(out / "model.safetensors"), metadata=meta)
    (out / "config.json").write_text(json.dumps(hf_config(cfg, scale), indent=2) + "\n")
    (out / TOKENIZER_FILE).write_bytes(tokenizer)
    (out / "tokenizer.json").write_text(json.dumps(fast_tokenizer, ensure_ascii=False) + "\n")
    (out / "tokenizer_config.json").write_text(
        json.dumps(_hf_tokenizer_config(tokenizer, cfg.text.max_len), indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(_hf_preprocessor_config(cfg), indent=2) + "\n")
    return [out / n for n in ("config.json", "model.safetensors", TOKENIZER_FILE, "tokenizer.json",
                              "tokenizer_config.json", "preprocessor_config.json")]


def write_tips(out: Path, state: Tensors, tokenizer: bytes | None) -> list[Path]:
    """``OUT/<OUT name>_vision.npz`` and ``_text.npz`` in the release layout (+ tokenizer.model)."""
    out.mkdir(parents=True, exist_ok=True)
    vision = {k: v.numpy() for k, v in _fp32(layout.vision_to_release(state)).items()}
    text = {k: v.numpy() for k, v in _fp32(layout.text_to_release(state)).items()}
    scale = state["logit_scale"].detach().float().cpu().tolist()
    text["temperature_contrastive"] = np.array(layout.temperature_from_logit_scale(scale[0]), dtype=np.float32)
    text["temperature"] = np.array(layout.temperature_from_logit_scale(scale[1]), dtype=np.float32)
    paths = [out / f"{out.name}_vision.npz", out / f"{out.name}_text.npz"]
    np.savez(paths[0], **vision)
    np.savez(paths[1], **text)
    if tokenizer is not None:
        (out / TOKENIZER_FILE).write_bytes(tokenizer)
        paths.append(out / TOKENIZER_FILE)
    return paths


TIMM_NAMES = {768: "vit_base_patch14_reg1_tipsv2", 1024: "vit_large_patch14_reg1_tipsv2",
              1152: "vit_so400m_patch14_reg1_tipsv2", 1536: "vit_giant_patch14_reg1_tipsv2"}
_TIMM_STANDARD = {  # (width, depth, heads, mlp_hidden, ffn) of each registered model
    "vit_base_patch14_reg1_tipsv2": (768, 12, 12, 3072, "gelu"),
    "vit_large_patch14_reg1_tipsv2": (1024, 24, 16, 4096, "gelu"),
    "vit_so400m_patch14_reg1_tipsv2": (1152, 27, 16, 4304, "gelu"),
    "vit_giant_patch14_reg1_tipsv2": (1536, 40, 24, 4096, "swiglu"),
}


def timm_model_args(cfg, img_size: int | None = None) -> tuple[str, dict]:
    """The registered timm model to create and the keyword arguments that make it this model."""
    v = cfg.vision
    name = "vit_giant_patch14_reg1_tipsv2" if v.ffn == "swiglu" else TIMM_NAMES.get(
        v.width, "vit_base_patch14_reg1_tipsv2")
    kwargs = {"img_size": img_size or v.pos_grid * v.patch_size, "num_classes": 0}
    if (v.width, v.depth, v.heads, v.mlp_hidden, v.ffn) != _TIMM_STANDARD[name] or v.patch_size != 14:
        hidden = 2 * v.mlp_hidden if v.ffn == "swiglu" else v.mlp_hidden
        ratio = hidden / v.width
        if int(v.width * ratio) != hidden:
            ratio = math.nextafter(ratio, math.inf)
        kwargs.update(embed_dim=v.width, depth=v.depth, num_heads=v.heads, mlp_ratio=ratio,
                      patch_size=v.patch_size)
    if not v.qkv_bias:
        kwargs["qkv_bias"] = False
    if v.ln_eps != 1e-6:
        raise LayoutError(f"vision.ln_eps={v.ln_eps}: timm's reg1_tipsv2 models use 1e-6")
    return name, kwargs


def resized_grid(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """The position grid [1, D, G, G] resized the release's way (as fasttips does per crop)."""
    if pos.shape[-1] == grid:
        return pos
    import torch.nn.functional as F
    return F.interpolate(pos.float(), size=(grid, grid), mode="bilinear", align_corners=False,
                         antialias=True).to(pos.dtype)


def timm_pretrained_cfg(cfg, img_size: int | None = None) -> dict:
    """What timm's ``resolve_data_config`` needs to preprocess as fasttips evaluates: the input size,
    bicubic resize of the shorter side, centre crop (crop_pct 1.0), the run's mean/std."""
    size = img_size or cfg.vision.pos_grid * cfg.vision.patch_size
    mean, std = pixel_stats(cfg.data.pixel_norm)
    return {"input_size": [3, size, size], "interpolation": EVAL_INTERPOLATION, "crop_pct": EVAL_CROP_PCT,
            "crop_mode": "center", "mean": list(mean), "std": list(std), "num_classes": 0,
            "fixed_input_size": True, "first_conv": "patch_embed.proj", "classifier": "head", "tag": "fasttips"}


def write_timm(out: Path, state: Tensors, cfg, img_size: int | None = None) -> list[Path]:
    """``model.safetensors`` + ``config.json`` in timm's hub format (``timm.create_model('local-dir:OUT',
    pretrained=True)`` reads both, preprocessing included) + ``timm_model.json`` (the same for
    ``create_model(name, pretrained_cfg_overlay=...)``). timm resizes its grid bicubically, unlike the
    release: ``img_size`` stores the grid already resized (bilinear, antialiased) for that input size,
    so timm matches fasttips there."""
    from safetensors.torch import save_file
    if img_size is not None and img_size % cfg.vision.patch_size:
        raise LayoutError(f"--img-size {img_size}: not a multiple of the patch size {cfg.vision.patch_size}")
    name, kwargs = timm_model_args(cfg, img_size)
    out.mkdir(parents=True, exist_ok=True)
    if img_size is not None:
        state = {**state, "vision.pos_embed": resized_grid(state["vision.pos_embed"],
                                                           img_size // cfg.vision.patch_size)}
    pretrained = timm_pretrained_cfg(cfg, img_size)
    save_file(_fp32(layout.vision_to_timm(state)), str(out / "model.safetensors"), metadata={"format": "pt"})
    hub = {"architecture": name, "num_classes": 0, "num_features": cfg.vision.width, "global_pool": "token",
           "model_args": {k: v for k, v in kwargs.items() if k != "num_classes"}, "pretrained_cfg": pretrained}
    (out / "config.json").write_text(json.dumps(hub, indent=2) + "\n")
    (out / "timm_model.json").write_text(json.dumps({"model_name": name, "kwargs": kwargs,
                                                     "pretrained_cfg": pretrained}, indent=2) + "\n")
    return [out / "model.safetensors", out / "config.json", out / "timm_model.json"]


def timm_create_call(out: Path) -> str:
    return f"timm.create_model({'local-dir:' + str(out)!r}, pretrained=True)"
