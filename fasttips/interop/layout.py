"""Name and shape conversions between a fasttips state dict and the released layouts.

Three layouts exist outside fasttips (docs/interop.md describes them):

- the *release* layout: the TIPS PyTorch port's names (DINOv2 names for the vision tower, CLIP
  names for the text tower). The TIPS npz files use it bare; the Hugging Face ``tipsv2`` folders
  use it under the prefixes ``vision_encoder.`` / ``text_encoder.`` (transformers renames on load);
- the *timm* layout of ``vit_*_patch14_reg1_tipsv2`` (vision only).

Everything here is plain tensor shuffling: no file I/O, no optional package. The conversions are
exact (copies, reshapes, concatenations); the one addition is folding the release's CLS#1 position
embedding into fasttips' CLS#1 (fasttips' CLS tokens carry no position), which export undoes by
writing a zero CLS position.
"""
from __future__ import annotations

import math
import re

import torch

Tensors = dict[str, torch.Tensor]

# Heads per width of the released variants (the npz / timm files do not record it).
RELEASE_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16, 1536: 24}


class LayoutError(ValueError):
    """Weights that do not fit the layout or the model (names the key and both shapes)."""


def _get(sd: Tensors, key: str, where: str) -> torch.Tensor:
    if key not in sd:
        raise LayoutError(f"{where}: missing weight {key!r}")
    return sd[key]


def _block_count(sd: Tensors, pattern: str) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    if ids and ids != set(range(len(ids))):
        raise LayoutError(f"block numbers are not contiguous: {sorted(ids)}")
    return len(ids)


# ------------------------------------------------------------------------------------------------
# fasttips → release layout
# ------------------------------------------------------------------------------------------------
def vision_to_release(sd: Tensors, mlp_names: tuple[str, str] = ("fc1", "fc2")) -> Tensors:
    """fasttips ``vision.*`` → release vision names. A tower without LayerScale gets gammas of 1
    (x·1 = x exactly). ``mlp_names``: transformers writes the GELU MLP as c_fc / c_proj."""
    v = {k[len("vision."):]: t for k, t in sd.items() if k.startswith("vision.")}
    D = v["cls_tokens"].shape[1]
    grid = v["pos_embed"][0]                                             # [D, G, G]
    patch_pos = grid.flatten(1).transpose(0, 1)                          # [G·G, D], row-major
    out = {
        "cls_token": v["cls_tokens"][0].reshape(1, 1, D).clone(),
        "register_tokens": v["cls_tokens"][1].reshape(1, 1, D).clone(),
        "pos_embed": torch.cat([torch.zeros(1, D, dtype=grid.dtype), patch_pos]).unsqueeze(0),
        "mask_token": v["mask_token"].reshape(1, D).clone(),
        "norm.weight": v["norm.weight"], "norm.bias": v["norm.bias"],
    }
    w = v["patch_embed.proj.weight"]
    p = math.isqrt(w.shape[1] // 3)
    out["patch_embed.proj.weight"] = w.reshape(D, 3, p, p).clone()
    out["patch_embed.proj.bias"] = v["patch_embed.proj.bias"]
    fc1, fc2 = mlp_names
    for i in range(_block_count(v, r"blocks\.(\d+)\.")):
        b, o = f"blocks.{i}.", f"blocks.{i}."
        for name in ("norm1", "norm2", "attn.qkv", "attn.proj"):
            for kind in ("weight", "bias"):
                if b + f"{name}.{kind}" in v:
                    out[o + f"{name}.{kind}"] = v[b + f"{name}.{kind}"]
        for ls in ("ls1", "ls2"):
            out[o + f"{ls}.gamma"] = v.get(b + f"{ls}.gamma", torch.ones(D, dtype=w.dtype))
        if b + "mlp.w12.weight" in v:
            for name in ("w12", "w3"):
                for kind in ("weight", "bias"):
                    out[o + f"mlp.{name}.{kind}"] = v[b + f"mlp.{name}.{kind}"]
        else:
            for src, dst in (("fc1", fc1), ("fc2", fc2)):
                for kind in ("weight", "bias"):
                    out[o + f"mlp.{dst}.{kind}"] = v[b + f"mlp.{src}.{kind}"]
    return out


_TEXT_BLOCK = {"norm1": "ln_1", "attn.qkv": None, "attn.proj": "attn.out_proj", "norm2": "ln_2",
               "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}


def text_to_release(sd: Tensors) -> Tensors:
    t = {k[len("text."):]: x for k, x in sd.items() if k.startswith("text.")}
    out = {"token_embedding.weight": t["token_embed.weight"],
           "ln_final.weight": t["norm.weight"], "ln_final.bias": t["norm.bias"]}
    for i in range(_block_count(t, r"blocks\.(\d+)\.")):
        b, o = f"blocks.{i}.", f"transformer.resblocks.{i}."
        out[o + "attn.in_proj_weight"] = t[b + "attn.qkv.weight"]
        out[o + "attn.in_proj_bias"] = t[b + "attn.qkv.bias"]
        for src, dst in _TEXT_BLOCK.items():
            if dst is not None:
                out[o + f"{dst}.weight"] = t[b + f"{src}.weight"]
                out[o + f"{dst}.bias"] = t[b + f"{src}.bias"]
    return out


# ------------------------------------------------------------------------------------------------
# release layout → fasttips
# ------------------------------------------------------------------------------------------------
def vision_from_release(r: Tensors, where: str = "vision") -> Tensors:
    """Release vision names → fasttips ``vision.*``. CLS#1 absorbs the release's CLS position."""
    cls = _get(r, "cls_token", where)
    D = cls.shape[-1]
    reg = _get(r, "register_tokens", where)
    if reg.numel() != D:
        raise LayoutError(f"{where}: register_tokens has shape {list(reg.shape)}; fasttips needs exactly "
                          f"one register token (CLS#2), i.e. [1, 1, {D}]")
    pos = _get(r, "pos_embed", where)[0]                                  # [1 + G·G, D]
    G = math.isqrt(pos.shape[0] - 1)
    if G * G != pos.shape[0] - 1:
        raise LayoutError(f"{where}: pos_embed {list(pos.shape)} is not 1 + a square grid of positions")
    out = {
        "cls_tokens": torch.stack([cls.reshape(D) + pos[0], reg.reshape(D)]),
        "pos_embed": pos[1:].reshape(G, G, D).permute(2, 0, 1).unsqueeze(0).contiguous(),
        "mask_token": _get(r, "mask_token", where).reshape(D).clone(),
        "norm.weight": _get(r, "norm.weight", where), "norm.bias": _get(r, "norm.bias", where),
        "patch_embed.proj.bias": _get(r, "patch_embed.proj.bias", where),
    }
    out["patch_embed.proj.weight"] = _get(r, "patch_embed.proj.weight", where).reshape(D, -1).clone()
    for i in range(_block_count(r, r"blocks\.(\d+)\.")):
        b = f"blocks.{i}."
        for key in [k for k in r if k.startswith(b)]:
            name = key[len(b):]
            name = name.replace("mlp.c_fc.", "mlp.fc1.").replace("mlp.c_proj.", "mlp.fc2.")
            out[b + name] = r[key]
    return {f"vision.{k}": v for k, v in out.items()}


def text_from_release(r: Tensors, where: str = "text") -> Tensors:
    out = {"token_embed.weight": _get(r, "token_embedding.weight", where),
           "norm.weight": _get(r, "ln_final.weight", where), "norm.bias": _get(r, "ln_final.bias", where)}
    for i in range(_block_count(r, r"transformer\.resblocks\.(\d+)\.")):
        b, o = f"transformer.resblocks.{i}.", f"blocks.{i}."
        out[o + "attn.qkv.weight"] = _get(r, b + "attn.in_proj_weight", where)
        out[o + "attn.qkv.bias"] = _get(r, b + "attn.in_proj_bias", where)
        for dst, src in _TEXT_BLOCK.items():
            if src is not None:
                out[o + f"{dst}.weight"] = _get(r, b + f"{src}.weight", where)
                out[o + f"{dst}.bias"] = _get(r, b + f"{src}.bias", where)
    return {f"text.{k}": v for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# timm (vit_*_patch14_reg1_tipsv2: no class position, one reg_token)
# ------------------------------------------------------------------------------------------------
def vision_to_timm(sd: Tensors) -> Tensors:
    r = vision_to_release(sd)
    D = r["cls_token"].shape[-1]
    out = {"cls_token": r.pop("cls_token"), "reg_token": r.pop("register_tokens").reshape(1, 1, D),
           "pos_embed": r.pop("pos_embed")[:, 1:].contiguous()}
    r.pop("mask_token")                          # timm has no mask token (a training-only weight)
    for key, tensor in r.items():                # SwiGLUPacked: fc1 = [gate; value], fc2 = out
        out[key.replace("mlp.w12.", "mlp.fc1.").replace("mlp.w3.", "mlp.fc2.")] = tensor
    return out


def vision_from_timm(t: Tensors, swiglu: bool) -> Tensors:
    """timm names → fasttips ``vision.*``; ``mask_token`` is absent from timm files (zeros here,
    as a fresh fasttips model starts it)."""
    D = _get(t, "cls_token", "timm").shape[-1]
    if "reg_token" not in t:
        raise LayoutError("timm: no 'reg_token': the file is not a *_reg1_tipsv2 model (fasttips needs "
                          "exactly one register token as CLS#2)")
    pos = _get(t, "pos_embed", "timm")
    r = {k: v for k, v in t.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    r["cls_token"], r["register_tokens"] = t["cls_token"], t["reg_token"]
    r["pos_embed"] = torch.cat([torch.zeros(1, 1, D, dtype=pos.dtype), pos], dim=1)
    r["mask_token"] = torch.zeros(1, D, dtype=pos.dtype)
    if swiglu:
        r = {k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3."): v for k, v in r.items()}
    unknown = sorted(k for k in r if k.startswith(("head.", "fc_norm.", "attn_pool.")) and r[k].numel())
    if unknown:
        raise LayoutError(f"timm: the file has a classifier/pooling head ({unknown[0]!r}, ...); export "
                          "the backbone with num_classes=0, global_pool='token'")
    return vision_from_release(r, "timm")


# ------------------------------------------------------------------------------------------------
# temperatures
# ------------------------------------------------------------------------------------------------
def temperature_from_logit_scale(scale: float) -> float:
    """τ = 1/exp(s): the release stores the divisor of the cosine similarity."""
    return math.exp(-float(scale))


def logit_scale_from_temperature(tau: float, where: str) -> float:
    if not tau > 0:
        raise LayoutError(f"{where}: temperature {tau} must be > 0")
    return -math.log(float(tau))
