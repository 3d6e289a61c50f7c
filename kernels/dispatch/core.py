"""The decisions: which candidate each call runs, how a new site is measured, cached and agreed over
ranks, and what the run reports. ``__init__.py`` states the rules; this is their code.

Per call (``choose``):
1. forced: the op's ``backend=``, else ``FASTTIPS_KERNELS`` (``triton`` | ``reference``), else a
   prototype CE ``backward=`` path named by the caller;
2. ``kernels.dispatch`` = ``fasttips`` or ``pytorch``: that family's implementation, nothing timed;
3. ``measured``: CPU tensors run the reference and nothing is timed (unless a timer is injected);
   a site decided in this process is reused; else the cache file's entry if it is still valid; else
   the candidates are timed now (``_measure``). Timing never happens while torch.compile traces, while
   a CUDA graph is captured, or (in a distributed run) outside ``deciding()``: such a call runs the
   decision of the nearest measured site of the same op, or the fasttips policy's choice, with one
   warning (``_fallback``).
Inside ``deciding()`` of a distributed run every measured call also exchanges its timings with the
other ranks (``_agree``) and all ranks run the candidate that rank 0's timings make fastest among
those that ran on every rank.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from .. import _backend
from . import attention as _attention
from . import cache as _cache
from . import ema as _ema
from . import prototype_ce as _prototype_ce
from . import timing as _timing
from .site import Candidate, Decision, Site, composed_name, select

POLICIES = ("measured", "fasttips", "pytorch")
SIZE_FIELDS = ("B", "S", "T", "params", "tensors")     # rounded sizes: the fallback's "nearest" ignores them


@dataclass(frozen=True)
class OpSpec:
    """An op's candidates (timing order) and the names its fixed choices use."""
    build: Callable[[], list[Candidate]]
    reference: str        # backend="reference" / FASTTIPS_KERNELS=reference, and the CPU's choice
    fasttips: str         # backend="triton" / kernels.dispatch=fasttips
    pytorch: str          # kernels.dispatch=pytorch


SPECS = {
    "attention": OpSpec(_attention.dense_candidates, "reference", "fasttips", "sdpa-default"),
    "attention_varlen": OpSpec(_attention.varlen_candidates, "reference", "fasttips", "per-size"),
    "prototype_cross_entropy": OpSpec(_prototype_ce.candidates, "reference", "fasttips", "reference"),
    "ema_update_": OpSpec(_ema.candidates, "foreach_lerp", "fasttips", "foreach_lerp"),
}


@dataclass
class Settings:
    """``configure`` sets these (the trainer from ``kernels.*``; tests inject timer, clock, free_memory)."""
    policy: str = "measured"
    deterministic: bool = False
    budget_s: float = 30.0                    # first-use timing per op and site
    memory_fraction: float = 0.5              # of the free device memory (memory rule)
    cache: str | None = None                  # kernels.cache: None/'' = default place, 'off' = none
    timer: Callable | None = None             # timer(name, fn, give_up_ms, site) -> [ms]; None: CUDA events
    clock: Callable[[], float] = time.monotonic
    free_memory: Callable[[Site], int | None] | None = None    # None: the CUDA allocator's view
    log: Callable[[str], None] | None = None  # where measured decisions are announced (default stderr)
    verify: bool | None = None                # check each candidate against the reference before timing
                                              # it; None: when timing for real (no injected timer)


_settings = Settings()
_registry: dict[str, dict[str, Candidate]] = {}
_table: dict[Site, Decision] = {}             # final decisions: measured, cached, agreed
_seen: dict[Site, Decision] = {}              # the latest decision of every site, of any kind (report)
_cache_entries: dict[str, dict[str, dict]] = {}   # environment key → site key → entry (loaded once)
_phase = {"deciding": False, "agreed": set()}


# --------------------------------------------------------------------------------------------------
# settings and state
# --------------------------------------------------------------------------------------------------
def configure(**changes) -> Settings:
    """Change settings (unknown names or values raise ValueError); returns the settings now in force."""
    global _settings
    unknown = set(changes) - set(Settings.__dataclass_fields__)
    if unknown:
        raise ValueError(f"dispatch.configure: unknown setting(s) {sorted(unknown)}")
    new = replace(_settings, **changes)
    if new.policy not in POLICIES:
        raise ValueError(f"kernels.dispatch: {new.policy!r} is not allowed; choose one of {list(POLICIES)}")
    if (new.policy, new.deterministic, new.memory_fraction) != (_settings.policy, _settings.deterministic,
                                                                 _settings.memory_fraction):
        _table.clear()            # decisions made under other rules
    _settings = new
    return _settings


def settings() -> Settings:
    return _settings


def reset() -> None:
    """Forget every decision and the loaded cache, and restore the default settings (tests)."""
    global _settings
    _settings = Settings()
    _registry.clear()
    _table.clear()
    _seen.clear()
    _cache_entries.clear()
    _phase.update(deciding=False, agreed=set())


def registry(op: str) -> dict[str, Candidate]:
    """name → Candidate for ``op``, in timing order (built once per process)."""
    found = _registry.get(op)
    if found is None:
        found = _registry[op] = {c.name: c for c in SPECS[op].build()}
    return found


def candidate(op: str, name: str) -> Candidate:
    return _registry[op][name]        # built by choose(), which always runs first


def current_winner(site: Site) -> str:
    decision = _seen.get(site) or _table.get(site)
    return decision.winner_text() if decision is not None else "?"


# --------------------------------------------------------------------------------------------------
# the choice
# --------------------------------------------------------------------------------------------------
def choose(site: Site, backend: str | None = None, timing: Callable[[], Any] | None = None) -> str:
    """The candidate name this call runs. ``timing``: builds the op's timing object from the call's
    tensors, only when the site must be measured now. Under torch.compile the answer is a constant of
    the traced graph: computed once at trace time, never timed there, no graph break."""
    if torch.compiler.is_compiling():
        return _constant_choice(site.op, site.mode, site.fields, backend)
    return _choice(site, backend, timing).winner


@torch.compiler.assume_constant_result
def _constant_choice(op: str, mode: str, fields: tuple, backend: str | None) -> str:
    return _choice(Site(op, mode, fields), backend, None).winner


def _choice(site: Site, backend: str | None, timing) -> Decision:
    registry(site.op)
    decision = _forced(site, backend) or _by_policy(site)
    if decision is None:
        decision = _measured(site, timing)
    _seen[site] = decision
    return decision


def _forced(site: Site, backend: str | None) -> Decision | None:
    spec = SPECS[site.op]
    choice = backend or _backend.requested()
    if choice not in _backend.BACKENDS:
        raise ValueError(f"backend={choice!r} is not allowed; choose one of {list(_backend.BACKENDS)}")
    where = f"backend={backend!r}" if backend else f"FASTTIPS_KERNELS={choice}"
    path = site.get("backward")
    if choice == "reference":
        return Decision(site, spec.reference, f"forced: {where}")
    if choice == "triton":
        name = _fasttips_name(site, path)
        use = _backend.triton_chosen("triton", site["device"] == "cuda", op=site.op,
                                     unsupported=_unsupported(site))
        return Decision(site, name if use else spec.reference,
                        f"forced: {where}" + ("" if use else " (inputs unsupported: the reference)"))
    if path:   # a prototype CE path asked for by name: that Triton path wherever Triton runs
        return _fasttips_policy(site, f"forced: backward={path!r}")
    return None


def _fasttips_name(site: Site, path: str | None) -> str:
    if path:
        return next(name for name, p in _prototype_ce.PATHS.items() if p == path)
    return SPECS[site.op].fasttips


def _unsupported(site: Site):
    if site.op == "prototype_cross_entropy":
        return lambda interpreting: _prototype_ce.unsupported(site)
    return None


def _fasttips_policy(site: Site, reason: str) -> Decision:
    """Today's ``auto`` rule: the Triton kernel for CUDA tensors (inputs it takes), else the reference."""
    use = _backend.triton_chosen("auto", site["device"] == "cuda", op=site.op, unsupported=_unsupported(site))
    name = _fasttips_name(site, site.get("backward")) if use else SPECS[site.op].reference
    return Decision(site, name, reason)


def _by_policy(site: Site) -> Decision | None:
    policy = _settings.policy
    if policy == "fasttips":
        return _fasttips_policy(site, "kernels.dispatch=fasttips")
    if policy == "pytorch":
        spec = SPECS[site.op]
        plain = registry(site.op)[spec.pytorch]
        name = spec.pytorch if plain.unavailable() is None and plain.supports(site) is None else spec.reference
        return Decision(site, name, "kernels.dispatch=pytorch")
    return None


def _measurable(site: Site) -> bool:
    return _settings.timer is not None or site["device"] == "cuda"


def _capturing(site: Site) -> bool:
    return site["device"] == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _measured(site: Site, timing) -> Decision:
    if not _measurable(site):
        return Decision(site, SPECS[site.op].reference, "cpu: measured dispatch times nothing on the CPU")
    collective = _phase["deciding"] and _distributed()
    known = _table.get(site)
    if known is not None and not collective:
        return known
    fresh = False
    if known is None:
        known = _from_cache(site)
    if known is None:
        if timing is None:
            return _fallback(site, "torch.compile is tracing")
        if _capturing(site):
            return _fallback(site, "a CUDA graph is being captured")
        if _distributed() and not _phase["deciding"]:
            return _fallback(site, "a distributed run times only inside dispatch.deciding()")
        known, fresh = _measure(site, timing()), True
    if collective:
        agreed = _agree(site, known)
        if site in _phase["agreed"]:          # the first agreement for a site stays its decision
            return agreed
        _phase["agreed"].add(site)
        fresh, known = fresh or agreed.winner != known.winner, agreed
    _table[site] = known
    if fresh:
        _save(site, known)
    return known


# --------------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _memory_budget(site: Site) -> int | None:
    """``memory_fraction`` × the free device memory (what the driver has free plus what PyTorch's
    allocator holds unused), for ops with a memory rule; None: no rule applies."""
    if not any(c.working_bytes for c in registry(site.op).values()):
        return None
    if _settings.free_memory is not None:
        free = _settings.free_memory(site)
    elif site["device"] == "cuda" and torch.cuda.is_available():
        free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    else:
        free = None
    return None if free is None else int(_settings.memory_fraction * free)


def _inadmissible(c: Candidate, site: Site, budget: int | None) -> str | None:
    """Why ``c`` may not run at ``site`` under the current rules, or None."""
    why = c.unavailable() or c.supports(site)
    if why:
        return why
    if _settings.deterministic and site.mode == "fwd_bwd" and not c.deterministic:
        return "backward not deterministic (kernels.deterministic)"
    if budget is not None and c.working_bytes is not None:
        need = c.working_bytes(site)
        if need > budget:
            return f"needs {_gib(need)}, over the memory budget of {_gib(budget)} (kernels.memory_fraction)"
    return None


def admissible(site: Site) -> list[str]:
    """The timed candidates that may run at ``site`` now, in timing order."""
    budget = _memory_budget(site)
    return [c.name for c in registry(site.op).values() if c.timed and _inadmissible(c, site, budget) is None]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _measure(site: Site, timing) -> Decision:
    """Time every admissible candidate (in order, within the budget) and pick the fastest."""
    cands = registry(site.op)
    timer = _settings.timer or _timing.cuda_samples
    verify = _settings.verify if _settings.verify is not None else _settings.timer is None
    check = _checker(site, timing) if verify and hasattr(timing, "outputs") else None
    budget = _memory_budget(site)
    start = _settings.clock()
    timings: dict[str, float] = {}
    samples: dict[str, list[float]] = {}
    dropped: dict[str, str] = {}
    for c in cands.values():
        if not c.timed:
            continue
        why = _inadmissible(c, site, budget)
        if why:
            dropped[c.name] = why
            continue
        if _settings.clock() - start > _settings.budget_s:
            dropped[c.name] = f"not timed: the {_settings.budget_s:g} s budget was spent"
            continue
        try:
            if c.prepare is not None:
                c.prepare(site, timing)
            wrong = check(c) if check is not None else None
            if wrong:
                dropped[c.name] = f"wrong: {wrong}"
                _backend.warn_once(f"fasttips dispatch: {c.name} gives wrong results on {site.text()} and is "
                                   f"dropped: {wrong}")
                continue
            best = min(timings.values(), default=None)
            give_up = None if best is None else _timing.GIVE_UP * best
            samples[c.name] = timer(c.name, timing.bench(c, site), give_up, site)
            timings[c.name] = _timing.median(samples[c.name])
        except Exception as exc:     # a compile error, an unsupported shape, out of memory: dropped
            dropped[c.name] = f"failed: {_first_line(exc)}"
            _backend.warn_once(f"fasttips dispatch: {c.name} failed on {site.text()} and is dropped: "
                               f"{_first_line(exc)}")
            if isinstance(exc, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
    winner = select(timings, list(cands)) or SPECS[site.op].reference
    parts = _parts(site) if winner == "per-size" else []
    decision = Decision(site, winner, "measured", timings, dropped, parts,
                        seconds=_settings.clock() - start, budget_s=_settings.budget_s, samples=samples)
    if _rank() == 0:
        _announce(f"fasttips dispatch: {site.text()} → {decision.winner_text()} (timed {len(timings)} "
                  f"candidates in {decision.seconds:.1f} s of the {_settings.budget_s:g} s budget"
                  f"{': ' + _times_text(timings) if timings else ''})")
    return decision


# A check for gross errors (a kernel miscompiled for this device or Triton, a wrong code path), not a
# precision test: those are the kernels' parity tests. Relative error of each output against the
# reference's, by the site's dtype; a broken kernel is off by O(1) or gives NaN.
CHECK_TOLERANCE = {"bf16": 5e-2, "fp16": 2e-2}
CHECK_TOLERANCE_DEFAULT = 1e-2


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (‖out − ref‖ where ref is 0; inf for another shape)."""
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        return math.inf
    diff = torch.linalg.vector_norm(out - ref).item()
    scale = torch.linalg.vector_norm(ref).item()
    return diff / scale if scale > 0 else diff


def _checker(site: Site, timing) -> Callable[[Candidate], str | None]:
    """c → None when ``c`` computes what the op's reference computes at this site (``timing.outputs``:
    the output, and the input gradients of a training site), else what is wrong. The reference runs
    once per site, when the first candidate is checked."""
    reference = registry(site.op)[SPECS[site.op].reference]
    tolerance = CHECK_TOLERANCE.get(site.get("dtype"), CHECK_TOLERANCE_DEFAULT)
    expected: list = []

    def check(c: Candidate) -> str | None:
        if c is reference:
            return None
        if not expected:
            expected.append(timing.outputs(reference, site))
        got = timing.outputs(c, site)
        for name, out, ref in zip(timing.output_names, got, expected[0]):
            err = relative_error(out, ref)
            if not err <= tolerance:             # NaN fails too
                return f"{name} differs from {reference.name}'s by {err:.3g} (relative; tolerance {tolerance:g})"
        return None
    return check


def _parts(site: Site) -> list[dict]:
    """A per-size winner's parts: each run's segments and its dense decision."""
    return [{"segments": f"{count}x{length}", "impl": current_winner(_attention.part_site(site, count, length))}
            for count, length in site["runs"] if count * length]


def _announce(line: str) -> None:
    if _settings.log is not None:
        _settings.log(line)
    else:
        print(line, file=sys.stderr, flush=True)


def _times_text(timings: dict[str, float]) -> str:
    return ", ".join(f"{name} {ms:.3f}" for name, ms in sorted(timings.items(), key=lambda kv: kv[1])) + " ms"


def _fallback(site: Site, why: str) -> Decision:
    """A site that cannot be measured now: the nearest measured site's winner (same op, mode and
    fields but for the rounded sizes) when it runs here, else the fasttips policy's choice."""
    near = _nearest(site)
    cands = registry(site.op)
    if near is not None and _inadmissible(cands[near.winner], site, None) is None:
        winner, source = near.winner, f"the decision of {near.site.shape_text()}"
    else:
        winner, source = _fasttips_policy(site, "").winner, "the fasttips policy"
    _backend.warn_once(f"fasttips dispatch: {site.text()} was not decided before it ran ({why}); it runs "
                       f"{winner} ({source}) untimed. Decide sites before compiling or capturing: "
                       f"run one step inside fasttips.kernels.dispatch.deciding()")
    return Decision(site, winner, f"fallback: {why}; {source}")


def _nearest(site: Site) -> Decision | None:
    def rest(s: Site):
        return (s.op, s.mode, tuple((k, v) for k, v in s.fields if k not in SIZE_FIELDS))

    def distance(s: Site) -> float:
        return sum(abs(math.log2(max(int(s.get(k, 1) or 1), 1)) - math.log2(max(int(site.get(k, 1) or 1), 1)))
                   for k in SIZE_FIELDS)

    same = [d for s, d in _table.items() if rest(s) == rest(site)]
    return min(same, key=lambda d: distance(d.site)) if same else None


# --------------------------------------------------------------------------------------------------
# the cache file
# --------------------------------------------------------------------------------------------------
def _environment(site: Site) -> dict:
    return _cache.environment(site["device"])


def _cache_key(site: Site) -> str:
    return site.key() + ("|deterministic" if _settings.deterministic else "")


def _entries(site: Site) -> dict[str, dict]:
    env = _environment(site)
    key = _cache.environment_key(env)
    if key not in _cache_entries:
        _cache_entries[key] = _cache.load(_cache.resolve_path(_settings.cache), env)
    return _cache_entries[key]


def _from_cache(site: Site) -> Decision | None:
    """The cached decision when it still holds: every candidate admissible now was considered then;
    its winner is re-picked from the cached times when the old one is not admissible now (memory)."""
    entry = _entries(site).get(_cache_key(site))
    if entry is None:
        return None
    now = admissible(site)
    if not set(now) <= set(entry.get("considered", [])):
        return None
    timings = {name: float(ms) for name, ms in entry["timings"].items() if name in now}
    winner = select(timings, list(registry(site.op)))
    if winner is None:
        return None
    reason = "cached" if winner == entry["winner"] else f"cached ({entry['winner']} is not admissible now)"
    return Decision(site, winner, reason, timings, dict(entry.get("dropped", {})),
                    list(entry.get("parts", [])) if winner == entry["winner"] else [])


def _save(site: Site, decision: Decision) -> None:
    if os.environ.get("LOCAL_RANK", "0") != "0":      # one writer per machine (the decisions agree)
        return
    entry = _cache.entry(decision, admissible(site))
    _entries(site)[_cache_key(site)] = entry
    try:
        _cache.save(_cache.resolve_path(_settings.cache), _environment(site), {_cache_key(site): entry})
    except OSError as exc:
        _backend.warn_once(f"fasttips dispatch: cannot write the decision cache ({exc}); decisions are "
                           f"kept for this process only")


# --------------------------------------------------------------------------------------------------
# ranks
# --------------------------------------------------------------------------------------------------
def _distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _agree(site: Site, local: Decision) -> Decision:
    """Every rank's timings for this call, gathered; the winner is the fastest by rank 0's times among
    the candidates that ran on every rank (all ranks compute the same answer from the same data)."""
    import torch.distributed as dist
    mine = {"timings": local.timings, "winner": local.winner, "parts": local.parts, "site": site.key()}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    first = gathered[0]
    ran_everywhere = set.intersection(*(set(g["timings"]) for g in gathered))
    timings = {name: ms for name, ms in first["timings"].items() if name in ran_everywhere}
    winner = select(timings, list(registry(site.op))) or SPECS[site.op].reference
    dropped = dict(local.dropped)
    for name in set(first["timings"]) - ran_everywhere:
        dropped[name] = "did not run on every rank"
    parts = first["parts"] if winner == first["winner"] else []
    return Decision(site, winner, "agreed: rank 0's timings" + (" (measured)" if local.reason == "measured"
                                                               else f" ({local.reason} here)"),
                    dict(first["timings"]), dropped, parts, local.seconds, local.budget_s, local.samples)


# --------------------------------------------------------------------------------------------------
# deciding ahead, and reporting
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def deciding():
    """Run the code inside (e.g. one training step) eagerly, deciding every op call it makes: new sites
    are timed now, and in a distributed run every rank takes part in every decision so that all run
    the same implementation. torch.compile'd code runs eagerly here (its graphs are traced afterwards,
    with the decisions fixed in them)."""
    previous = _phase["deciding"]
    _phase["deciding"] = True
    _phase["agreed"] = set() if not previous else _phase["agreed"]
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        _phase["deciding"] = previous


def decide(op: Callable, *args, **kwargs) -> list[Decision]:
    """Decide the call ``op(*args, **kwargs)`` of a ``fasttips.kernels`` op now (timing it if new), e.g.
    before ``torch.compile``; returns the decisions the call made (a varlen call also decides its
    per-size parts). The op runs once; ``ema_update_`` runs with momentum 1, which changes nothing."""
    name = getattr(op, "__name__", None)
    if name not in SPECS:
        raise ValueError(f"dispatch.decide: {op!r} is not a fasttips.kernels op; pass one of "
                         f"{['fasttips.kernels.' + n for n in SPECS]}")
    if name == "ema_update_":
        args = tuple(args[:2]) + (1.0,) + tuple(args[3:])
        kwargs.pop("momentum", None)
    before = dict(_seen)
    with deciding():
        op(*args, **kwargs)
    return [d for s, d in _seen.items() if before.get(s) is not d]


def decisions() -> list[Decision]:
    """The latest decision of every site this process has run, in first-use order."""
    return list(_seen.values())


def report_records() -> list[dict]:
    return [d.record() for d in decisions()]


def report_lines() -> list[str]:
    """One line per site: the implementation and why (``measured ...`` with the times)."""
    lines = []
    for d in decisions():
        why = d.reason
        if d.timings:
            why += ": " + _times_text(d.timings)
        if d.seconds is not None and d.reason == "measured":
            why += f"; {d.seconds:.1f} s of the {d.budget_s:g} s budget"
        lines.append(f"kernels: {d.site.op} {d.site.mode} [{d.site.shape_text()}] → {d.winner_text()} ({why})")
    return lines


def describe(device_type: str = "cuda") -> str:
    """The start-up line: the policy, and where the decisions come from."""
    s = _settings
    path = _cache.resolve_path(s.cache)
    where = f"cached in {path}" if path else "not cached (kernels.cache=off)"
    det = "; deterministic backward only" if s.deterministic else ""
    if s.policy != "measured":
        return f"kernels: dispatch={s.policy} (nothing timed){det}"
    if device_type != "cuda" and s.timer is None:
        return ("kernels: dispatch=measured; on the CPU every op runs its PyTorch reference and nothing "
                "is timed")
    return (f"kernels: dispatch=measured: each op's implementations are timed at the first call of each "
            f"shape on this device (at most {s.budget_s:g} s per op and shape) and the fastest runs; "
            f"CPU tensors run the PyTorch references, untimed{det}; decisions {where}")


__all__ = ["CHECK_TOLERANCE", "POLICIES", "Settings", "relative_error", "candidate", "choose", "configure", "decide", "deciding", "decisions",
           "describe", "registry", "report_lines", "report_records", "reset", "settings", "composed_name"]
