"""Redraw the benchmark plots (PNG) from bench/results/*.jsonl.

    python bench/plots.py [--results DIR] [--out DIR]        (or: fasttips bench --plot)

One figure per (plot, device), named ``<stem>-<device slug>.png`` in bench/results/plots/:
- ``attention_tflops``: attention useful TFLOP/s vs sequence length N, one line per implementation,
  one panel per mode (fwd, fwd_bwd); the dense rows of bench_attention.py (the multi-crop rows have
  no single N and are left out).
- ``dino_loss_time`` / ``dino_loss_memory``: prototype cross-entropy time and peak extra memory vs
  tokens T, one line per implementation, one panel per (K, mode); bench_dino_loss.py.
- ``train_step``: training-step images/s and peak memory per preset (and batch), one bar per
  implementation, MFU written on the bars; bench_train_step.py.

Every (case, implementation) keeps only its newest row (by ``date``), so a re-run replaces its
points and a partial re-run does not hide the older cases. The figure title names the device and
the date range of the rows drawn.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
from collections import defaultdict

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PLOTS_DIR = os.path.join(RESULTS_DIR, "plots")
GIB = 2 ** 30


def load_rows(results_dir: str = RESULTS_DIR) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.jsonl"))):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def newest_rows(rows: list[dict]) -> list[dict]:
    """Keep the newest row of each (bench, device, case, impl); on equal dates the later line wins."""
    latest: dict[tuple, dict] = {}
    for r in rows:
        key = (r.get("bench"), r.get("device"), json.dumps(r.get("case", {}), sort_keys=True), r.get("impl"))
        if key not in latest or r.get("date", "") >= latest[key].get("date", ""):
            latest[key] = r
    return list(latest.values())


def device_slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "unknown"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and value == value and value not in (float("inf"), float("-inf"))


def _minor_label(value, _pos) -> str:
    """Minor log ticks: label only the 2s and 5s of each decade, so the axis stays readable."""
    if value <= 0:
        return ""
    lead = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if round(lead) in (2, 5) and abs(lead - round(lead)) < 1e-6 else ""


def _impl_colors(rows) -> dict[str, str]:
    """One colour per implementation, the same in every panel of a figure."""
    impls = sorted({r["impl"] for r in rows})
    return {impl: f"C{i % 10}" for i, impl in enumerate(impls)}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _suptitle(fig, title: str, rows: list[dict]) -> None:
    dates = sorted(r.get("date", "")[:10] for r in rows if r.get("date"))
    span = dates[0] if dates and dates[0] == dates[-1] else (f"{dates[0]} to {dates[-1]}" if dates else "?")
    fig.suptitle(f"{title}: {rows[0].get('device', '?')}, {span}", fontsize=10)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# Line plots: y (a row field) vs x (a case field), one line per impl, one panel per facet
# ------------------------------------------------------------------------------------------------
def line_plot(rows, x_key, y_key, title, ylabel, path, facet_keys=(), logx=False, logy=False, scale=1.0):
    usable = [r for r in rows if x_key in r.get("case", {}) and _finite(r.get(y_key))]
    if not usable:
        return None
    facets = defaultdict(list)
    for r in usable:
        facets[tuple((k, r["case"].get(k)) for k in facet_keys)].append(r)
    plt = _pyplot()
    ncols = min(2, len(facets))
    nrows = -(-len(facets) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, 3.9 * nrows), squeeze=False)
    colors = _impl_colors(usable)
    for ax in axes.flat[len(facets):]:
        ax.set_visible(False)
    for ax, (facet, frows) in zip(axes.flat, sorted(facets.items(), key=lambda kv: str(kv[0]))):
        series = defaultdict(list)
        for r in frows:
            series[r["impl"]].append((r["case"][x_key], r[y_key] * scale))
        for impl, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl, color=colors[impl])
        xs = sorted({r["case"][x_key] for r in frows})
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            from matplotlib.ticker import FuncFormatter
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))   # 20, not 2×10¹
            ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
            ax.tick_params(axis="y", which="minor", labelsize=6)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel(x_key)
        ax.set_ylabel(ylabel)
        ax.set_title(", ".join(f"{k}={v}" for k, v in facet), fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    _suptitle(fig, title, usable)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------
# The training step: bars per (preset, batch), one per impl
# ------------------------------------------------------------------------------------------------
def step_plot(rows, path):
    usable = [r for r in rows if "preset" in r.get("case", {}) and _finite(r.get("images_per_s"))]
    if not usable:
        return None
    def group(r):      # a preset cut to fewer blocks (vit-g "layers") is its own group
        blocks = r["case"].get("depth") if any("vision.depth" in o for o in r.get("overrides") or []) else None
        return r["case"]["preset"], blocks, r["case"].get("batch_per_device", 0)

    by_key = {}
    for r in sorted(usable, key=lambda r: r.get("date", "")):   # the newest row of a bar wins
        by_key[group(r) + (r["impl"],)] = r
    groups = sorted({key[:3] for key in by_key}, key=lambda g: (_preset_rank(g[0]), g[1] or 0, g[2]))
    impls = sorted({key[3] for key in by_key})
    plt = _pyplot()
    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(max(9.0, 2.2 * len(groups) * len(impls) / 2 + 5), 4.4))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        xs, speed, mem, labels = [], [], [], []
        for g, key in enumerate(groups):
            r = by_key.get(key + (impl,))
            if r is None:
                continue
            xs.append(g + (i - (len(impls) - 1) / 2) * width)
            speed.append(r["images_per_s"])
            mem.append(r["peak_mem"] / GIB if _finite(r.get("peak_mem")) else 0.0)
            label = f"MFU {r['mfu']:.0%}" if _finite(r.get("mfu")) else ""
            if r.get("max_batch"):
                label += f"\nmax batch {r['max_batch']}"
            labels.append(label)
        bars = ax_speed.bar(xs, speed, width, label=impl)
        ax_speed.bar_label(bars, labels=labels, fontsize=7)
        mem_bars = ax_mem.bar(xs, mem, width, label=impl)
        ax_mem.bar_label(mem_bars, labels=[f"{m:.1f}" if m else "n/a" for m in mem], fontsize=7)
    ticks = [f"{p}{f' ({n} blocks)' if n else ''}\nbatch {b}" for p, n, b in groups]
    for ax, ylabel in ((ax_speed, "images/s per device"), (ax_mem, "peak memory (GiB)")):
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(ticks, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
        ax.margins(y=0.15)
    if not any(_finite(r.get("peak_mem")) for r in by_key.values()):
        ax_mem.cla()
        ax_mem.set_axis_off()
        ax_mem.text(0.5, 0.5, "peak memory not measured\n(only CUDA allocations are counted)",
                    ha="center", va="center", transform=ax_mem.transAxes, fontsize=9)
    ax_speed.set_title("throughput (MFU on the bars)", fontsize=9)
    ax_mem.set_title("peak allocated memory", fontsize=9)
    _suptitle(fig, "training step", usable)
    return _save(fig, path)


PRESET_ORDER = ("tiny", "vit-s", "vit-b", "vit-l", "so400m", "vit-g")   # by model size


def _preset_rank(preset: str) -> tuple[int, str]:
    return (PRESET_ORDER.index(preset) if preset in PRESET_ORDER else len(PRESET_ORDER), preset)


def _dense_attention(rows):
    return [r for r in rows if r["case"].get("layer") != "multicrop"]


# (bench, file stem, draw(rows, path) -> path or None)
PLOTS = [
    ("attention", "attention_tflops", lambda rows, path: line_plot(
        _dense_attention(rows), "N", "tflops", "attention (d=64, bf16), useful TFLOP/s vs sequence length",
        "useful TFLOP/s", path,
        facet_keys=("mode",), logx=True)),
    ("dino_loss", "dino_loss_time", lambda rows, path: line_plot(
        rows, "T", "ms", "prototype cross-entropy time vs tokens", "ms", path,
        facet_keys=("K", "mode"), logx=True, logy=True)),
    ("dino_loss", "dino_loss_memory", lambda rows, path: line_plot(
        rows, "T", "peak_mem", "prototype cross-entropy peak extra memory vs tokens", "GiB", path,
        facet_keys=("K", "mode"), logx=True, logy=True, scale=1 / GIB)),
    ("train_step", "train_step", step_plot),
]


def draw_all(results_dir: str = RESULTS_DIR, out_dir: str = PLOTS_DIR) -> list[str]:
    rows = newest_rows(load_rows(results_dir))
    written = []
    for bench, stem, draw in PLOTS:
        by_device = defaultdict(list)
        for r in rows:
            if r.get("bench") == bench:
                by_device[r.get("device", "unknown")].append(r)
        for device, drows in sorted(by_device.items()):
            path = draw(drows, os.path.join(out_dir, f"{stem}-{device_slug(device)}.png"))
            if path:
                written.append(path)
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=RESULTS_DIR, help="folder of *.jsonl results (default bench/results)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: <results>/plots)")
    args = p.parse_args(argv)
    for path in draw_all(args.results, args.out or os.path.join(args.results, "plots")):
        print(path)


if __name__ == "__main__":
    main()
