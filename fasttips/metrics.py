"""What a run reports: metrics.jsonl, TensorBoard (when installed), a progress bar, the loss-curve PNG,
and an explicit FLOP model of the config for MFU.

FLOP model (matmul FLOPs only, the usual MFU convention; a multiply-add counts 2; backward = 2×
forward). Per token and block, with width D, MLP hidden H and N tokens in the sequence:
``qkv 6D² + proj 2D² + MLP (4DH GELU/ReLU, 6DH SwiGLU) + attention 4ND``. A training image costs:

- vision, with gradients: each global crop twice (the contrastive view and its masked copy) and each
  local crop once; without gradients: one more global pass when ``teacher.features=separate_no_grad``
  or ``teacher.mode=full_ema``;
- text: the two captions (alt-text for CLS#1, synthetic for CLS#2), padded length ``text.max_len``;
- heads: the DINO head on the local CLS rows (student) and the global CLS rows (teacher, forward
  only), the iBOT head on the patch rows of the masked view (student) and of the full view
  (teacher): every patch for iBOT++ (``loss.ibot_tokens=all``), the expected number of masked ones
  for masked-only iBOT (``mask_probability`` × the mean of ``mask_ratio``);
- contrastive logits: two [B_global × B_global × D] products (negligible, but counted).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fasttips.models.text import text_mlp_hidden

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


def _vision_pass(cfg, size: int) -> float:
    v = cfg.vision
    patches = (size // v.patch_size) ** 2
    tokens = patches + v.n_cls
    embed = 2 * patches * 3 * v.patch_size ** 2 * v.width
    return embed + v.depth * _block_flops(tokens, v.width, v.mlp_hidden, v.ffn)


def _text_pass(cfg) -> float:
    return cfg.text.depth * _block_flops(cfg.text.max_len, cfg.vision.width, text_mlp_hidden(cfg), "relu")


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
    """Training FLOPs per image, by part (forward + backward where gradients flow)."""
    vision: float
    text: float
    heads: float
    contrastive: float

    @property
    def per_image(self) -> float:
        return self.vision + self.text + self.heads + self.contrastive

    def describe(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / 1e9:.2f}" for k in ("vision", "text", "heads", "contrastive"))
        return f"{self.per_image / 1e9:.2f} GFLOP per training image ({parts})"


def flop_model(cfg, global_batch: int | None = None) -> FlopModel:
    d = cfg.data
    grad, no_grad = 3.0, 1.0
    vision = d.n_global * 2 * _vision_pass(cfg, d.global_size) * grad
    vision += d.n_local * _vision_pass(cfg, d.local_size) * grad
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
    return FlopModel(vision, text, heads, contrastive)


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
    if not peak or not images_per_s_per_device:
        return None
    return flops_per_image * images_per_s_per_device / peak


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------
class MetricsWriter:
    """One JSON line per logged step in ``metrics.jsonl``; TensorBoard scalars when it is installed."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            except Exception:      # tensorboard not installed: jsonl only
                self._tb = None

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(value):
    if torch.is_tensor(value):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)          # JSON has no NaN/inf; keep them readable
    return value


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ProgressBar:
    """``step 12/60 [#####     ] loss 3.210 (clip 1.2 dino 0.8) 41.3 img/s ETA 0:01:10``.

    Redraws in place on a terminal; elsewhere (logs, CI) prints a line every ``every`` steps.
    """

    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream=None, every: int = 10):
        self.total, self.start = total, start
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = max(1, every)
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, terms: dict, images_per_s: float) -> None:
        if not self.enabled:
            return
        done = step + 1
        if not self.tty and done % self.every and done != self.total:
            return
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        width = 20
        filled = int(width * done / max(1, self.total))
        bar = "#" * filled + " " * (width - filled)
        parts = " ".join(f"{k} {v:.3f}" for k, v in terms.items())
        line = (f"step {done}/{self.total} [{bar}] loss {loss:.4f} ({parts}) "
                f"{images_per_s:.1f} img/s ETA {_hms(eta)}")
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
            if done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Loss and its terms against step, from metrics.jsonl; None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = [r for r in read_metrics(metrics_path) if isinstance(r.get("loss"), (int, float))]
    if not records:
        return None
    keys = ["loss"] + sorted(k for k in records[0] if k.startswith("loss/"))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [r["step"] for r in records]
    for key in keys:
        ax.plot(steps, [r.get(key, float("nan")) for r in records], label=key, lw=1.5 if key == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


__all__ = ["FlopModel", "flop_model", "head_params", "text_mlp_hidden", "peak_flops", "mfu", "MetricsWriter",
           "read_metrics", "ProgressBar", "plot_loss_curve", "PEAK_BF16_FLOPS"]
