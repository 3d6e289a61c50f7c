"""What dispatch decides about and what it decides: ``Site``, ``Candidate``, ``Decision``, and the rule
that picks a winner from timings (``select``), shared by live dispatch and the replay of bench rows.

A *site* is one (op, mode, shape class): ``mode`` is ``fwd`` (no gradient: the teacher, eval, export),
``fwd_bwd`` (a call that will be differentiated) or ``update`` (the EMA); the shape class is a tuple of
``(name, value)`` pairs with the batch-like sizes rounded up to a power of two (``size_class``), so a
last, smaller eval batch reuses the decision of the full one, while sequence lengths and head dims stay
exact (N = 256 and N = 257 run very differently).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

MODES = ("fwd", "fwd_bwd", "update")


def size_class(n: int) -> int:
    """The power of two at or above ``n`` (0 and 1 stay as they are)."""
    n = int(n)
    return n if n <= 1 else 1 << (n - 1).bit_length()


def dtype_name(dtype) -> str:
    """torch.bfloat16 → 'bf16', torch.float16 → 'fp16', torch.float32 → 'fp32' (else str(dtype))."""
    text = str(dtype).replace("torch.", "")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}.get(text, text)


def freeze(value):
    """JSON lists back into (nested) tuples, so a site read from a file hashes like a live one."""
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class Site:
    op: str
    mode: str
    fields: tuple      # ((name, value), ...): ints, strs, bools, None, nested tuples of ints

    def __getitem__(self, name: str):
        for key, value in self.fields:
            if key == name:
                return value
        raise KeyError(name)

    def get(self, name: str, default=None):
        try:
            return self[name]
        except KeyError:
            return default

    def key(self) -> str:
        """A stable string (cache files, JSON output)."""
        return json.dumps([self.op, self.mode, [list(kv) for kv in self.fields]], separators=(",", ":"))

    @classmethod
    def from_key(cls, key: str) -> "Site":
        op, mode, fields = json.loads(key)
        return cls(op, mode, tuple((name, freeze(value)) for name, value in fields))

    def shape_text(self) -> str:
        """'bf16 B=64 H=24 N=257 D=64' (the device only when it is not CUDA)."""
        parts = []
        for name, value in self.fields:
            if name == "device":
                if value != "cuda":
                    parts.append(str(value))
            elif name == "dtype":
                parts.append(str(value))
            elif name == "runs":
                parts.append("runs=" + ("?" if value is None else runs_text(value)))
            elif isinstance(value, bool):
                if value:
                    parts.append(name)
            elif value is not None:
                parts.append(f"{name}={value}")
        return " ".join(parts)

    def text(self) -> str:
        return f"{self.op} {self.mode} [{self.shape_text()}]"


def runs_text(runs) -> str:
    """((64, 257), (256, 50)) → '64x257+256x50'."""
    return "+".join(f"{count}x{length}" for count, length in runs)


@dataclass(frozen=True)
class Candidate:
    """One implementation of an op.

    ``run`` has the op's own signature (per op: see ``dispatch/<op>.py``). ``family``: ``fasttips`` (this
    project's kernels), ``pytorch`` (PyTorch's own ops and the references) or ``external`` (flash-attn,
    xformers). ``unavailable()`` says why it cannot run in this process at all (not installed), and
    ``supports(site)`` why not on these inputs; both None when it can. ``deterministic``: its backward
    gives bit-identical gradients run to run (every forward here is deterministic). ``working_bytes``:
    extra device memory it needs at this site (the memory budget rule). ``timed=False`` keeps it out
    of measured dispatch (it is only a policy's choice, e.g. SDPA's own backend choice for
    ``kernels.dispatch=pytorch``). ``prepare(site, timing)``: run before it is timed (a composed
    candidate decides its parts there).
    """
    name: str
    family: str
    run: Callable
    unavailable: Callable[[], str | None] = lambda: None
    supports: Callable[[Site], str | None] = lambda site: None
    deterministic: bool = True
    working_bytes: Callable[[Site], int] | None = None
    timed: bool = True
    prepare: Callable | None = None


@dataclass
class Decision:
    """The implementation a site runs, and why (``reason``: measured, cached, agreed, forced, policy,
    cpu, fallback). ``timings``: median ms of each timed candidate; ``dropped``: candidate → why it was
    not timed or not admitted; ``parts``: a composed winner's parts (segments → dense implementation);
    ``samples``: every timed call, per candidate (measured here only)."""
    site: Site
    winner: str
    reason: str
    timings: dict[str, float] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    parts: list[dict[str, Any]] = field(default_factory=list)
    seconds: float | None = None
    budget_s: float | None = None
    samples: dict[str, list[float]] = field(default_factory=dict, repr=False)   # the timer's, per candidate

    def winner_text(self) -> str:
        return composed_name(self.winner, self.parts)

    def record(self) -> dict[str, Any]:
        """Plain JSON: what metrics.jsonl and ``--json`` show for this decision."""
        out = {"op": self.site.op, "mode": self.site.mode, "shape": self.site.shape_text(),
               "impl": self.winner_text(), "why": self.reason}
        if self.timings:
            out["ms"] = {name: round(ms, 4) for name, ms in self.timings.items()}
        if self.dropped:
            out["dropped"] = dict(self.dropped)
        return out


def composed_name(name: str, parts) -> str:
    """'per-size' with its parts → 'per-size(64x257:sdpa-cudnn+256x50:sdpa-efficient)'."""
    if not parts:
        return name
    return f"{name}({'+'.join(p['segments'] + ':' + p['impl'] for p in parts)})"


def select(timings: dict[str, float], order: list[str]) -> str | None:
    """The winner: the lowest finite time; a tie goes to the candidate listed first in ``order``.
    None when nothing has a time. Live dispatch and replay both decide with this."""
    rank = {name: i for i, name in enumerate(order)}
    finite = [(ms, rank.get(name, len(rank)), name) for name, ms in timings.items()
              if ms is not None and math.isfinite(ms)]
    return min(finite)[2] if finite else None
