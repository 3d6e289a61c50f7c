"""An explicit FLOP model of the config, and MFU.

FLOP model (matmul FLOPs only, the usual MFU convention; a multiply-add counts 2; backward = 2×
forward, except the patch embedding, whose input (the pixels) needs no gradient: its backward is the
weight gradient alone, 1× forward). Per token and block, with width D, MLP hidden H and N tokens in
the sequence: ``qkv 6D² + proj 2D² + MLP (4DH GELU/ReLU, 6DH SwiGLU) + attention 4ND``; the patch
embedding ``2·P²·3·D`` per patch. Left out, as in every MFU figure: softmax, LayerNorm, GELU/SiLU,
bias and residual adds, the weight-norm and L2 normalisations, the EMA and the optimiser (all
elementwise or reductions, a few percent of the step's FLOPs at most). tests/test_flops.py checks
each part against ``torch.utils.flop_counter.FlopCounterMode`` on the tiny preset. A training image costs:

- vision, with gradients: each global crop twice (the contrastive view and its masked copy) and each
  local crop once; without gradients: one more global pass when ``teacher.features=separate_no_grad``
  or ``teacher.mode=full_ema``;
- text: the two captions (alt-text for CLS#1, synthetic for CLS#2), padded length ``text.max_len``;
- heads: the DINO head on the local CLS rows (student) and the global CLS rows (teacher, forward
  only), the iBOT head on the patch rows of the masked view (student) and of the full view
  (teacher): every patch for iBOT++ (``loss.ibot_tokens=all``), the expected number of masked ones
  for masked-only iBOT (``mask_probability`` × the mean of ``mask_ratio``);
- contrastive logits: two [B_global × B_global × D] products (negligible, but counted).

Recomputation (``train.activation_checkpointing``, fasttips/recompute.py) is not useful work: the
model FLOPs above, and MFU, leave it out. The hardware FLOPs add the forward the backward runs
again (as torchtitan and the PaLM paper count MFU and HFU; ``FlopModel.recompute``): under ``full``
and ``every_k``, each checkpointed block's forward in every pass with gradients, up to the last
tensor its backward needs (torch stops the recomputation there). In a vision block without
LayerScale and drop-path that leaves out the MLP's output projection, whose output only enters the
residual sum; a text block masks the padding after it, so it runs whole. ``selective`` keeps every
matmul and attention output: no matmul FLOPs are repeated. (Under ``torch.compile`` the partitioner
may repeat less than eager, e.g. skip that projection with drop-path too.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fasttips.models.text import text_mlp_hidden
from fasttips.recompute import checkpointed_blocks, recomputes_matmuls

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment; MFU is not reported elsewhere.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
                   "A10G": 125e12, "L4": 121e12, "B200": 2250e12}


# ----------------------------------------------------------------------------------------------
# FLOP model
# ----------------------------------------------------------------------------------------------
def _block_flops(tokens: int, width: int, hidden: int, ffn: str) -> float:
    """Forward matmul FLOPs of one pre-LN transformer block over a sequence of ``tokens``."""
    mlp = (6 if ffn == "swiglu" else 4) * width * hidden
    return tokens * (8 * width * width + mlp) + 4 * tokens * tokens * width


def _vision_block(cfg, size: int) -> float:
    """Forward matmul FLOPs of one vision block over one image at ``size`` pixels."""
    v = cfg.vision
    return _block_flops((size // v.patch_size) ** 2 + v.n_cls, v.width, v.mlp_hidden, v.ffn)


def _vision_parts(cfg, size: int) -> tuple[float, float]:
    """Forward matmul FLOPs of one image at ``size`` pixels: (patch embedding, blocks)."""
    v = cfg.vision
    patches = (size // v.patch_size) ** 2
    embed = 2 * patches * 3 * v.patch_size ** 2 * v.width
    return embed, v.depth * _vision_block(cfg, size)


def _vision_pass(cfg, size: int) -> float:
    """One forward pass (no gradient)."""
    return sum(_vision_parts(cfg, size))


def _vision_train(cfg, size: int) -> float:
    """Forward + backward: the blocks' backward is 2× their forward (input and weight gradients);
    the patch embedding's is 1× (weight gradient only: the pixels need none)."""
    embed, blocks = _vision_parts(cfg, size)
    return 2 * embed + 3 * blocks


def _text_block(cfg) -> float:
    return _block_flops(cfg.text.max_len, cfg.vision.width, text_mlp_hidden(cfg), "relu")


def _text_pass(cfg) -> float:
    return cfg.text.depth * _text_block(cfg)


def _recomputed_blocks(cfg, depth: int) -> int:
    """Blocks of a tower whose forward matmuls the backward runs again."""
    t = cfg.train
    if not recomputes_matmuls(t.activation_checkpointing):
        return 0
    return len(checkpointed_blocks(depth, t.activation_checkpointing, t.ac_every))


def _vision_block_recomputed(cfg, size: int) -> float:
    """What a checkpointed vision block's recomputation runs: its forward, less the MLP's output
    projection when nothing after it keeps a tensor for the backward (no LayerScale, no drop-path)."""
    v = cfg.vision
    flops = _vision_block(cfg, size)
    if v.layerscale == 0 and v.drop_path == 0:
        flops -= 2 * ((size // v.patch_size) ** 2 + v.n_cls) * v.mlp_hidden * v.width
    return flops


def head_params(cfg) -> int:
    """Matmul weights of one projection head: its MLP (width → hidden → … → bottleneck, ``nlayers``
    linears; models/heads.py) and the prototype layer (bottleneck → K)."""
    h = cfg.heads
    dims = [cfg.vision.width] + [h.hidden] * (h.nlayers - 1) + [h.bottleneck]
    return sum(a * b for a, b in zip(dims[:-1], dims[1:])) + h.bottleneck * h.prototypes


def _head_row(cfg) -> float:
    return 2 * head_params(cfg)


@dataclass
class FlopModel:
    """Training FLOPs per image, by part (forward + backward where gradients flow), and the forward
    FLOPs that activation recomputation runs again on top of them."""
    vision: float
    text: float
    heads: float
    contrastive: float
    recompute: float = 0.0

    @property
    def per_image(self) -> float:
        """Model FLOPs: the useful work (MFU)."""
        return self.vision + self.text + self.heads + self.contrastive

    @property
    def hardware_per_image(self) -> float:
        """Hardware FLOPs: the model FLOPs plus the recomputed forward (HFU)."""
        return self.per_image + self.recompute

    def describe(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / 1e9:.2f}" for k in ("vision", "text", "heads", "contrastive"))
        text = f"{self.per_image / 1e9:.2f} GFLOP per training image ({parts})"
        if self.recompute:
            text += f"; {self.hardware_per_image / 1e9:.2f} with the recomputed forward"
        return text


def flop_model(cfg, global_batch: int | None = None) -> FlopModel:
    d = cfg.data
    grad, no_grad = 3.0, 1.0
    vision = d.n_global * 2 * _vision_train(cfg, d.global_size)
    vision += d.n_local * _vision_train(cfg, d.local_size)
    if cfg.teacher.features == "separate_no_grad" or cfg.teacher.mode == "full_ema":
        vision += d.n_global * _vision_pass(cfg, d.global_size) * no_grad
    text = 2 * _text_pass(cfg) * grad
    patches = (d.global_size // cfg.vision.patch_size) ** 2
    if cfg.loss.ibot_tokens == "masked":     # only the masked patches reach the iBOT head
        patches *= d.mask_probability * sum(d.mask_ratio) / 2
    dino_rows = d.n_local + (d.n_global if d.n_global > 1 else 0)
    heads = _head_row(cfg) * (dino_rows * grad + d.n_global * no_grad
                              + d.n_global * patches * grad + d.n_global * patches * no_grad)
    batch = global_batch or d.batch_size
    contrastive = 2 * 2 * batch * cfg.vision.width * grad
    blocks_v = _recomputed_blocks(cfg, cfg.vision.depth)
    recompute = blocks_v * (d.n_global * 2 * _vision_block_recomputed(cfg, d.global_size)
                            + d.n_local * _vision_block_recomputed(cfg, d.local_size))
    recompute += 2 * _recomputed_blocks(cfg, cfg.text.depth) * _text_block(cfg)
    return FlopModel(vision, text, heads, contrastive, recompute)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak of one device for ``dtype`` compute, or None when unknown (CPU, fp32)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peak in PEAK_BF16_FLOPS.items():
        if fragment in name:
            return peak
    return None


def mfu(flops_per_image: float, images_per_s_per_device: float, peak: float | None) -> float | None:
    """The fraction of ``peak`` that ``flops_per_image`` at this rate is: MFU with the model FLOPs
    (``FlopModel.per_image``), HFU with the hardware FLOPs (``FlopModel.hardware_per_image``)."""
    if not peak or not images_per_s_per_device:
        return None
    return flops_per_image * images_per_s_per_device / peak


__all__ = ["FlopModel", "flop_model", "head_params", "peak_flops", "mfu", "PEAK_BF16_FLOPS"]
