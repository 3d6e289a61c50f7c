"""Decisions from bench rows instead of a GPU: ``fasttips bench dispatch --timings FILE...``.

Each row of ``bench/results/*.jsonl`` (the format of ``bench/harness.py``) becomes a time of one
candidate at one site, through the same site builders as live calls:

- ``attention`` rows with ``N``: dense sites; ``attention`` rows of the multi-crop layer: varlen sites
  (global and local crops as two runs), ``<name>-varlen-1-launch`` being the packed kernel ``<name>``;
- ``dino_loss`` rows: prototype CE sites (S = T = the row's tokens, bf16 features);
- ``ema`` / ``ema-sweep`` rows: EMA sites; ``dispatch`` rows (``fasttips bench dispatch``) carry their
  site (``Site.key``) in a ``site`` field.

Implementations that are not dispatch candidates (SDPA's own default choice, the naive loss, sweeps,
CUDA-graph replays, ...) are listed as ignored. Several rows of one candidate at one site (several
runs) combine as the **minimum of their per-run medians** (``COMBINE``; docs/kernels.md says why).
The winner is then chosen by the rule live dispatch uses (``site.select``); a varlen site also gets the
composed ``per-size`` candidate, timed as the sum of each run's best dense time at the same device.
The memory rule is not applied (rows do not say how much memory was free).
"""
from __future__ import annotations

from pathlib import Path

from . import core
from .attention import dense_fields, part_site, varlen_fields
from .ema import fields as ema_fields
from .prototype_ce import fields as ce_fields
from .site import Site, composed_name, dtype_name, runs_text, select

COMBINE = "min of the per-run medians"
PACKED_SUFFIX = "-varlen-1-launch"
ORDER = ("attention", "prototype_cross_entropy", "ema_update_", "attention_varlen")   # parts before wholes


def _device_type(name: str) -> str:
    return "cpu" if str(name).lower().startswith("cpu") else "cuda"


def _count_length(text: str) -> tuple[int, int]:
    count, length = str(text).split("x")
    return int(count), int(length)


def row_site(row: dict) -> tuple[Site, str] | None:
    """(site, implementation name) of a bench row, or None for rows that are not op timings."""
    bench, case, impl = row.get("bench"), row.get("case") or {}, row.get("impl")
    if not isinstance(case, dict) or not isinstance(impl, str) or not isinstance(row.get("ms"), (int, float)):
        return None
    device = _device_type(row.get("device", "cuda"))
    try:
        if bench == "dispatch":
            return Site.from_key(row["site"]), impl
        if bench == "attention" and "N" in case:
            return Site("attention", case["mode"], dense_fields(device, case["dtype"], case["B"], case["H"],
                                                                case["N"], case["D"], False)), impl
        if bench == "attention" and case.get("layer") == "multicrop":
            runs = (_count_length(case["global"]), _count_length(case["local"]))
            return (Site("attention_varlen", case["mode"], varlen_fields(device, case["dtype"], case["H"],
                                                                          case["D"], runs, None)),
                    impl[:-len(PACKED_SUFFIX)] if impl.endswith(PACKED_SUFFIX) else impl)
        if bench == "dino_loss":
            return Site("prototype_cross_entropy", case["mode"], ce_fields(
                device, "bf16", case["T"], case["T"], case["K"], case["d"], case.get("centering", "softmax"),
                None)), impl
        if bench in ("ema", "ema-sweep"):
            return Site("ema_update_", "update", ema_fields(device, case["n_tensors"], case["n_params"],
                                                            dtype_name(case.get("student", "float32")))), impl
    except (KeyError, TypeError, ValueError):
        return None
    return None


def read_rows(paths) -> list[dict]:
    from fasttips.runlog import read_metrics    # JSON lines; a damaged line is skipped with a warning
    rows = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--timings: {path} does not exist")
        rows += read_metrics(path)
    return rows


def replay(rows: list[dict], deterministic: bool = False, commit: str | None = None) -> list[dict]:
    """One dict per decision (device, op, case, mode, winner, times, rows, parts, ignored, combine)."""
    groups: dict[tuple[str, Site], dict] = {}
    for row in rows:
        if commit and not str(row.get("git_commit") or "").startswith(commit):
            continue
        found = row_site(row)
        if found is None:
            continue
        site, impl = found
        group = groups.setdefault((row.get("device", "?"), site), {"case": _case(row), "times": {}, "ignored": {}})
        cands = core.registry(site.op)
        if impl in cands and cands[impl].timed:
            group["times"].setdefault(impl, []).append(float(row["ms"]))
        else:
            group["ignored"].setdefault(impl, []).append(float(row["ms"]))
    decided: dict[tuple[str, Site], dict] = {}
    out = []
    for op in ORDER:
        for (device, site), group in groups.items():
            if site.op == op:
                decision = _decide(device, site, group, decided, deterministic)
                decided[(device, site)] = decision
                out.append(decision)
    return out


def _case(row: dict) -> dict:
    return {k: v for k, v in row["case"].items() if k not in ("mode", "op")}


def _decide(device: str, site: Site, group: dict, decided: dict, deterministic: bool) -> dict:
    cands = core.registry(site.op)
    allowed = {name for name, c in cands.items()
               if not (deterministic and site.mode == "fwd_bwd" and not c.deterministic)}
    times = {name: min(ms) for name, ms in group["times"].items() if name in allowed}
    counts = {name: len(ms) for name, ms in group["times"].items() if name in allowed}
    parts = []
    if site.op == "attention_varlen" and site["runs"] is not None:
        parts = _per_size_parts(device, site, decided)
        if parts:
            times[composed_name("per-size", parts)] = sum(p["ms"] for p in parts)
    order = [composed_name(n, parts) if n == "per-size" else n for n in cands]
    winner = select(times, order)
    return {"device": device, "op": site.op, "case": group["case"], "mode": site.mode, "winner": winner,
            "times": {name: round(ms, 4) for name, ms in sorted(times.items(), key=lambda kv: kv[1])},
            "rows": counts, "parts": parts,
            "ignored": {name: round(min(ms), 4) for name, ms in group["ignored"].items()}, "combine": COMBINE}


def _per_size_parts(device: str, site: Site, decided: dict) -> list[dict]:
    """Each run's best dense candidate and time, when every run has a decision at this device."""
    parts = []
    for count, length in site["runs"]:
        dense = decided.get((device, part_site(site, count, length)))
        if dense is None or dense["winner"] is None:
            return []
        parts.append({"segments": f"{count}x{length}", "impl": dense["winner"], "ms": dense["times"][dense["winner"]]})
    return parts


def text(decisions: list[dict], n_rows: int, n_files: int) -> str:
    """The decisions table: op, mode, shape, winner, each candidate's time."""
    lines = [f"== dispatch replay: {n_rows} rows from {n_files} file(s); several rows of one candidate "
             f"combine as the {COMBINE} =="]
    device = None
    for d in decisions:
        if d["device"] != device:
            device = d["device"]
            lines.append(f"-- {device}")
        shape = " ".join(f"{k}={v}" for k, v in d["case"].items())
        times = ", ".join(f"{n} {ms:.4g}" + (f"×{d['rows'][n]}" if d["rows"].get(n, 1) > 1 else "")
                          for n, ms in d["times"].items())
        lines.append(f"  {d['op']:<24}{d['mode']:<8}{shape}")
        lines.append(f"      → {d['winner']}    ({times or 'no candidate rows'} ms)")
        if d["ignored"]:
            lines.append("        not candidates: " + ", ".join(f"{n} {ms:.4g}" for n, ms in d["ignored"].items()))
    return "\n".join(lines)


__all__ = ["COMBINE", "read_rows", "replay", "row_site", "runs_text", "text"]
