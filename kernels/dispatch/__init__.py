"""Measured dispatch: every ``fasttips.kernels`` op runs the implementation measured fastest on this
device, for this shape and for this kind of call; docs/kernels.md ("Measured dispatch") has the design.

    from fasttips.kernels import dispatch
    dispatch.configure(policy="measured", deterministic=False, budget_s=30, memory_fraction=0.5, cache="")
    with dispatch.deciding():          # e.g. the first training step: decide (and agree over ranks)
        step()                         # ... before torch.compile traces the model
    dispatch.decide(fasttips.kernels.attention, q, k, v)   # or one call, by hand
    print("\\n".join(dispatch.report_lines()))

Modules: ``site`` (what is decided: Site, Candidate, Decision, and the winner rule ``select``),
``attention`` / ``prototype_ce`` / ``ema`` (each op's candidates, site and timing), ``timing`` (CUDA
events), ``cache`` (the decision file), ``core`` (the rules), ``replay`` (decisions from bench rows).
"""
from .core import (POLICIES, Settings, candidate, choose, configure, decide, deciding, decisions, describe,
                   registry, report_lines, report_records, reset, settings)
from .site import Candidate, Decision, Site, select

__all__ = ["POLICIES", "Candidate", "Decision", "Settings", "Site", "candidate", "choose", "configure", "decide",
           "deciding", "decisions", "describe", "registry", "report_lines", "report_records", "reset", "select",
           "settings"]
