"""One table for all suites (value and chance level side by side, in %) and the JSON file."""
from __future__ import annotations

import json
import math
from pathlib import Path


def _pct(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.2f}"


def table(results: dict[str, dict]) -> str:
    """``results``: {suite: {"metrics": {name: value}, "chance": {name: value}, "notes": [str]?, ...}};
    each suite's notes are printed under the table as ``suite: note``."""
    rows = [(suite, name, _pct(value), _pct(res.get("chance", {}).get(name)))
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
