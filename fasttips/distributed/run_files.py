"""Tolerant readers for the run directory's own logs, so that a crash mid-write never blocks --resume.

A run killed while appending to ``metrics.jsonl`` leaves a truncated last line; one damaged line must
not stop a resume or a plot. Lines that do not parse are skipped, and a warning names the file and the
line numbers.

``read_jsonl(path, warn=...) -> list[dict]``      every parseable JSON-object line
``drop_metrics_after(path, step) -> int``         on resume: keep rows with ``step <= step`` (and drop
                                                  damaged lines), rewriting the file atomically;
                                                  returns the number of rows dropped
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

__all__ = ["read_jsonl", "drop_metrics_after"]


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


def read_jsonl(path: str | Path, warn=_stderr) -> list[dict]:
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
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped
