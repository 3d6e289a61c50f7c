"""Evaluation results as JSON and as a short human-readable table."""
from __future__ import annotations

import json
import math
from pathlib import Path

# Row order and labels of the table; keys missing from a result are skipped.
TABLE_ROWS = (
    ("seg/miou", "zero-shot seg mIoU (patch vs class names)"),
    ("seg/pixel_acc", "zero-shot seg pixel accuracy"),
    ("seg/miou_fg", "zero-shot seg mIoU, objects only"),
    ("seg/pixel_acc_fg", "zero-shot seg pixel acc, objects only"),
    ("cls/cls1_acc", "zero-shot classification acc, CLS#1"),
    ("cls/cls2_acc", "zero-shot classification acc, CLS#2"),
    ("ret/cls1_alt/i2t_r1", "CLS#1 <-> alt-text  image->text R@1"),
    ("ret/cls1_alt/i2t_r5", "CLS#1 <-> alt-text  image->text R@5"),
    ("ret/cls1_alt/t2i_r1", "CLS#1 <-> alt-text  text->image R@1"),
    ("ret/cls1_alt/t2i_r5", "CLS#1 <-> alt-text  text->image R@5"),
    ("ret/cls2_short/i2t_r1", "CLS#2 <-> short cap image->text R@1"),
    ("ret/cls2_short/i2t_r5", "CLS#2 <-> short cap image->text R@5"),
    ("ret/cls2_short/t2i_r1", "CLS#2 <-> short cap text->image R@1"),
    ("ret/cls2_short/t2i_r5", "CLS#2 <-> short cap text->image R@5"),
    ("ret/cls2_long/i2t_r1", "CLS#2 <-> long cap  image->text R@1"),
    ("ret/cls2_long/i2t_r5", "CLS#2 <-> long cap  image->text R@5"),
    ("ret/cls2_long/t2i_r1", "CLS#2 <-> long cap  text->image R@1"),
    ("ret/cls2_long/t2i_r5", "CLS#2 <-> long cap  text->image R@5"),
)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:6.1f}"


def table(columns: dict[str, dict], rows=TABLE_ROWS) -> str:
    """A fixed-width table, one column per named result (values in %). ``columns`` maps a column
    title (a run, a seed, "iBOT++ mean") to a result dict from ``evaluate``."""
    titles = list(columns)
    present = [(k, label) for k, label in rows if any(k in columns[t] for t in titles)]
    width = max([len(label) for _, label in present] + [6])
    colw = [max(8, len(t)) for t in titles]
    lines = [f"{'metric (%)':<{width}}  " + "  ".join(f"{t:>{w}}" for t, w in zip(titles, colw))]
    lines.append("-" * len(lines[0]))
    for key, label in present:
        cells = [f"{_fmt(columns[t].get(key)):>{w}}" for t, w in zip(titles, colw)]
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def write_json(path: str | Path, result: dict) -> None:
    def clean(v):   # JSON has no NaN: write null
        return None if isinstance(v, float) and math.isnan(v) else v
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({k: clean(v) for k, v in result.items()}, indent=2, sort_keys=True))
