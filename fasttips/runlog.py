"""What a run writes while it trains: metrics.jsonl, TensorBoard scalars (when tensorboard is
installed), Weights & Biases (when ``train.wandb_project`` is set; fasttips/wandb_log.py), the
progress line, and the loss-curve PNG at the end."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from fasttips.safe_io import write_atomic


class MetricsWriter:
    """One JSON line per logged step in ``metrics.jsonl``; TensorBoard scalars when it is installed;
    the same scalars to W&B when ``cfg.train.wandb_project`` is set (``cfg`` given), plus the config at
    the start and the loss-curve PNG at ``close``. ``wandb``: a ready writer (tests) instead of cfg's."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True, cfg=None,
                 wandb=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        self._wandb = wandb if enabled else None
        if enabled and wandb is None and cfg is not None and getattr(cfg.train, "wandb_project", ""):
            from fasttips.wandb_log import wandb_writer      # only now: wandb is optional
            self._wandb = wandb_writer(cfg, run_dir)
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
        if self._wandb is not None:
            self._wandb.write(step, record)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            # the loss curve goes to W&B too (the trainer draws the same PNG again for its report)
            png = plot_loss_curve(self.path, self.path.with_name("loss_curve.png"))
            if png is not None:
                self._wandb.log_image("loss_curve", png)
            self._wandb.close()
            self._wandb = None


def _plain(value):
    if torch.is_tensor(value):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)          # JSON has no NaN/inf; keep them readable
    return value


# A run killed while appending leaves a truncated last line; one damaged line must not stop a resume
# or a plot: such lines are skipped with a warning naming the file and the line numbers.
def _stderr(message: str) -> None:
    print(f"fasttips: warning: {message}", file=sys.stderr, flush=True)


def _parse(path: Path) -> tuple[list[tuple[str, dict]], list[int]]:
    rows, bad = [], []
    try:
        text = path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad.append(number)
            continue
        if isinstance(record, dict):
            rows.append((line, record))
        else:
            bad.append(number)
    return rows, bad


def _say_bad(path: Path, bad: list[int], warn, what: str) -> None:
    if bad:
        lines = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        warn(f"{path}: line{'s' if len(bad) > 1 else ''} {lines} {'are' if len(bad) > 1 else 'is'} not "
             f"valid JSON (a write cut short by a crash?); {what}")


def read_metrics(path: str | Path, warn=_stderr) -> list[dict]:
    """Every line of ``path`` that is a JSON object; damaged lines are skipped with one warning."""
    path = Path(path)
    rows, bad = _parse(path)
    _say_bad(path, bad, warn, "skipped")
    return [record for _, record in rows]


def drop_metrics_after(path: str | Path, step: int, warn=_stderr) -> int:
    """Forget rows logged after ``step`` (a resume runs those steps again) and damaged lines."""
    path = Path(path)
    if not path.is_file():
        return 0
    rows, bad = _parse(path)
    _say_bad(path, bad, warn, "dropped")
    kept = [line for line, record in rows if not isinstance(record.get("step"), (int, float))
            or record["step"] <= step]
    dropped = len(rows) - len(kept)
    if dropped or bad:
        write_atomic(path, "".join(line + "\n" for line in kept).encode())
    return dropped


class ProgressBar:
    """``step 12/60 [#####     ] loss 3.210 (clip_alt 1.2 dino 0.8 ...) 41.3 img/s ETA 0:01:10``.

    Redraws in place on a terminal (unless ``redraw=False``, ``--no-progress``); otherwise (logs,
    CI) prints a plain line every ``every`` steps and at the last one.
    """

    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream=None, every: int = 10,
                 redraw: bool = True):
        self.total, self.start = total, start
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = redraw and self.stream.isatty()
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


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, bias-corrected (TensorBoard's smoothing): the first points are
    not pulled towards 0. Non-finite values (skipped steps) are left out of the average."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        if isinstance(v, (int, float)) and math.isfinite(v):
            avg = weight * avg + (1 - weight) * v
            norm = weight * norm + (1 - weight)
        out.append(avg / norm if norm else float("nan"))
    return out


def loss_series(records: list[dict], weight: float | None = None) -> dict[str, tuple[list[int], list[float]]]:
    """(steps, smoothed values) per loss term ``loss/*`` and for the total, from metrics records.
    ``weight`` defaults to a window of about a tenth of the run."""
    rows = [r for r in records if "loss" in r]
    if weight is None:
        weight = min(0.99, max(0.0, 1 - 10 / max(1, len(rows))))
    keys = sorted({k for r in rows for k in r if k.startswith("loss/")}) + ["loss"]
    steps = [r["step"] for r in rows]
    return {k: (steps, smooth([r.get(k) for r in rows], weight)) for k in keys}


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """One panel per loss term and one for the total, each smoothed (the raw values faint behind),
    from metrics.jsonl; None when matplotlib is missing or nothing was logged.

    Each term gets its own axis because they move differently in a healthy run: the contrastive
    terms fall, while DINO and iBOT can rise for a while as the teacher temperature drops."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = [r for r in read_metrics(metrics_path) if isinstance(r.get("loss"), (int, float))]
    if not records:
        return None
    series = loss_series(records)
    cols = 3
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), dpi=100, squeeze=False)
    for ax, (key, (steps, values)) in zip(axes.flat, series.items()):
        raw = [r.get(key) if isinstance(r.get(key), (int, float)) else float("nan") for r in records]
        ax.plot(steps, raw, lw=0.8, alpha=0.3, color="C0")
        ax.plot(steps, values, lw=1.5, color="C0")
        ax.set_title("total (weighted)" if key == "loss" else key.split("/", 1)[1], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


__all__ = ["MetricsWriter", "read_metrics", "drop_metrics_after", "ProgressBar", "smooth", "loss_series",
           "plot_loss_curve"]
