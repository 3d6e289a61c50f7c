"""One table for all suites (value and chance level side by side, in %) and the JSON file."""
from __future__ import annotations

import json
import math
from pathlib import Path


def _pct(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.2f}"


def _cell(value, unit: str | None) -> str:
    """A fraction in %, or (``unit`` given) the value itself with its unit."""
    if unit is None:
        return _pct(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f} {unit}".rstrip()


def table(results: dict[str, dict]) -> str:
    """``results``: {suite: {"metrics": {name: value}, "chance": {name: value}, "notes": [str]?,
    "units": {name: unit}?, "lower_is_better": [name]?, ...}}. Fractions print in %; a metric with a
    unit ("m", "deg", "" for a plain ratio) prints as is, with its unit; "(lower is better)" follows
    the names in ``lower_is_better``. Each suite's notes are printed under the table as ``suite: note``."""
    def label(res, name):
        return f"{name} (lower is better)" if name in res.get("lower_is_better", ()) else name
    rows = [(suite, label(res, name), _cell(value, res.get("units", {}).get(name)),
             _cell(res.get("chance", {}).get(name), res.get("units", {}).get(name)))
            for suite, res in results.items() for name, value in res["metrics"].items()]
    head = ("suite", "metric", "value %", "chance %")
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    fmt = lambda r: f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}"  # noqa: E731
    lines = [fmt(head), "-" * (sum(widths) + 6)]
    lines += [fmt(r) for r in rows]
    lines += [f"{suite}: {note}" for suite, res in results.items() for note in res.get("notes", [])]
    return "\n".join(lines)


def _clean(v):
    """JSON has no NaN: write null."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_clean(payload), indent=2))
    tmp.replace(path)            # a crash mid-write leaves the previous file intact
    return path
