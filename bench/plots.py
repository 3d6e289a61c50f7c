"""Redraw the benchmark plots (PNG) from bench/results/*.jsonl.

Each plot uses the newest run (by the row's ``date`` to the minute and ``git_commit``) of each device, so
re-running a benchmark replaces its curves instead of piling them up. Used by ``fasttips bench --plot``.
"""
from __future__ import annotations

import glob
import json
import os
from collections import defaultdict

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PLOTS_DIR = os.path.join(RESULTS_DIR, "plots")


def load_rows(results_dir: str = RESULTS_DIR) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.jsonl"))):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def newest_run(rows: list[dict]) -> list[dict]:
    """Keep, per (bench, device), only the rows of the most recent run."""
    by_key = defaultdict(list)
    for r in rows:
        by_key[(r.get("bench"), r.get("device"))].append(r)
    kept = []
    for group in by_key.values():
        run_of = lambda r: (r.get("date", "")[:16], r.get("git_commit"))  # noqa: E731
        latest = max(run_of(r) for r in group)
        kept += [r for r in group if run_of(r) == latest]
    return kept


def _facets(rows, facet_keys):
    out = defaultdict(list)
    for r in rows:
        out[tuple((k, r["case"].get(k)) for k in facet_keys if k in r["case"])].append(r)
    return out


def line_plot(rows, x_key, y_key, title, ylabel, path, facet_keys=(), logx=False):
    """One figure per facet; one line per impl; x from the case, y from the row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    facets = _facets(rows, facet_keys)
    if not facets:
        return None
    fig, axes = plt.subplots(1, len(facets), figsize=(5.5 * len(facets), 4), squeeze=False)
    for ax, (facet, frows) in zip(axes[0], sorted(facets.items(), key=lambda kv: str(kv[0]))):
        series = defaultdict(list)
        for r in frows:
            if r.get(y_key) is not None and x_key in r["case"]:
                series[r["impl"]].append((r["case"][x_key], r[y_key]))
        for impl, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(x_key)
        ax.set_ylabel(ylabel)
        ax.set_title(", ".join(f"{k}={v}" for k, v in facet) or title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    device = rows[0].get("device", "?")
    date = rows[0].get("date", "")[:10]
    fig.suptitle(f"{title} — {device}, {date}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTS = [
    # bench, x, y, title, ylabel, file stem, facets, logx
    ("attention", "N", "tflops", "attention throughput", "useful TFLOP/s", "attention_tflops",
     ("mode",), True),
    ("dino_loss", "T", "ms", "prototype CE time", "ms", "dino_loss_time", ("K", "mode"), True),
    ("dino_loss", "T", "peak_mem", "prototype CE peak extra memory", "bytes", "dino_loss_memory",
     ("K", "mode"), True),
    ("train_step", "batch", "images_per_s", "training step", "images/s", "train_step_images",
     ("preset",), False),
    ("train_step", "batch", "peak_mem", "training step memory", "bytes", "train_step_memory",
     ("preset",), False),
]


def draw_all(results_dir: str = RESULTS_DIR, out_dir: str = PLOTS_DIR) -> list[str]:
    rows = newest_run(load_rows(results_dir))
    written = []
    for bench, x, y, title, ylabel, stem, facets, logx in PLOTS:
        by_device = defaultdict(list)
        for r in rows:
            if r.get("bench") == bench:
                by_device[r.get("device", "unknown")].append(r)
        for device, drows in by_device.items():
            slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
            path = line_plot(drows, x, y, title, ylabel, os.path.join(out_dir, f"{stem}-{slug}.png"),
                             facets, logx)
            if path:
                written.append(path)
    return written


if __name__ == "__main__":
    for p in draw_all():
        print(p)
