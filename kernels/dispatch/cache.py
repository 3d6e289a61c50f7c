"""The file of measured decisions, so that later runs on the same machine time nothing.

Location: ``kernels.cache`` (config), else ``$FASTTIPS_DISPATCH_CACHE``, else
``~/.cache/fasttips/dispatch.json``; ``off`` disables it. One JSON file holds a section per
*environment*: the device name and compute capability, the torch, Triton, cuDNN, CUDA runtime and
driver versions, the fasttips version and a hash of the kernels' source (``environment``). A changed
key means new timings; the other sections stay (a home folder shared by several machines). Each
section maps a site (``Site.key``) to its decision: the winner, every candidate's time, the dropped
candidates and why, and the candidates that were considered (a candidate added since, e.g. a newly
installed flash-attn, makes the entry stale).

Writes are atomic (``fasttips.safe_io.write_atomic``) and merge with what the file holds by then.
A damaged file is ignored with one warning and replaced at the next write.
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from fasttips.safe_io import UnreadableFileError, load_json, write_atomic

from .._backend import warn_once

FORMAT = "fasttips-dispatch-1"
OFF = "off"


def resolve_path(setting: str | None = None) -> Path | None:
    """The cache file for a ``kernels.cache`` value ('' or None: $FASTTIPS_DISPATCH_CACHE, else the
    default), or None when it is ``off``."""
    value = setting or os.environ.get("FASTTIPS_DISPATCH_CACHE") or ""
    if value == OFF:
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "fasttips" / "dispatch.json"


@functools.lru_cache(maxsize=None)
def kernels_source_hash() -> str:
    """12 hex digits over every .py file of the kernels package: code changes mean new timings."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _driver_version() -> str | None:
    try:   # Linux: the kernel module's version line
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    words = text.split()
    for i, word in enumerate(words):
        if word == "Module" and i + 1 < len(words):
            return words[i + 1]
    return None


def _fasttips_version() -> str:
    try:
        from importlib.metadata import version
        return version("fasttips")
    except Exception:
        return "unknown"


@functools.lru_cache(maxsize=None)
def environment(device_type: str, index: int | None = None) -> dict:
    """What the timings depend on, besides the site (see the module docstring)."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    env = {"torch": torch.__version__, "triton": triton_version, "fasttips": _fasttips_version(),
           "kernels": kernels_source_hash()}
    if device_type == "cuda" and torch.cuda.is_available():
        index = torch.cuda.current_device() if index is None else index
        major, minor = torch.cuda.get_device_capability(index)
        env.update(device=torch.cuda.get_device_name(index), capability=f"{major}.{minor}",
                   cudnn=torch.backends.cudnn.version(), cuda=torch.version.cuda, driver=_driver_version())
    else:
        env.update(device=f"{device_type}-{platform.machine()}")
    return env


def environment_key(env: dict) -> str:
    return json.dumps(env, sort_keys=True, separators=(",", ":"))


def _read(path: Path) -> dict:
    """The file's content, or an empty cache (and one warning) when it is damaged."""
    if not path.is_file():
        return {"format": FORMAT, "environments": {}}
    try:
        data = load_json(path)
        if not (isinstance(data, dict) and data.get("format") == FORMAT
                and isinstance(data.get("environments"), dict)
                and all(isinstance(v, dict) and isinstance(v.get("decisions"), dict)
                        for v in data["environments"].values())):
            raise UnreadableFileError(f"{path}: not a {FORMAT} file")
        return data
    except (UnreadableFileError, OSError) as exc:
        warn_once(f"fasttips dispatch: ignoring the damaged decision cache ({exc}); its decisions are "
                  f"measured again and the file is rewritten")
        return {"format": FORMAT, "environments": {}}


def _valid_entry(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("winner"), str)
            and isinstance(entry.get("timings", {}), dict)
            and all(isinstance(v, (int, float)) for v in entry.get("timings", {}).values())
            and isinstance(entry.get("considered", []), list))


def load(path: Path | None, env: dict) -> dict[str, dict]:
    """site key → entry for this environment ({} when there is none, or no cache)."""
    if path is None:
        return {}
    section = _read(path)["environments"].get(environment_key(env), {})
    entries = section.get("decisions", {})
    bad = [key for key, entry in entries.items() if not _valid_entry(entry)]
    if bad:
        warn_once(f"fasttips dispatch: {path}: {len(bad)} damaged entries ignored (measured again)")
    return {key: entry for key, entry in entries.items() if key not in bad}


def save(path: Path | None, env: dict, entries: dict[str, dict]) -> None:
    """Merge ``entries`` into this environment's section, atomically."""
    if path is None or not entries:
        return
    data = _read(path)
    section = data["environments"].setdefault(environment_key(env), {"environment": env, "decisions": {}})
    section["decisions"].update(entries)
    write_atomic(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def entry(decision, considered: list[str]) -> dict:
    return {"winner": decision.winner, "timings": dict(decision.timings), "dropped": dict(decision.dropped),
            "parts": list(decision.parts), "considered": sorted(considered),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
