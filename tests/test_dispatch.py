"""Measured dispatch (kernels/dispatch/, issue 26) on the CPU: an injected timer stands in for CUDA events.

Covered: the CPU default (nothing timed), winner selection and that the winner is what runs, forward-only
vs training decisions, forced paths and the fixed policies, the deterministic option, the timing budget,
candidate failure, the memory budget rule, the cache file (hit, miss, key change, stale entry, damaged
file), two gloo ranks agreeing when their timers disagree, a compiled model that traces with no graph
break from dispatch, the replay of the committed H100 rows, and what a training run reports.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fasttips.kernels as ops
from fasttips.kernels import _backend, dispatch
from fasttips.kernels.attention import reference as attn_ref
from fasttips.kernels.dispatch import cache as dispatch_cache
from fasttips.kernels.dispatch import core, replay
from fasttips.kernels.dispatch import prototype_ce as ce_dispatch
from fasttips.kernels.dispatch.site import Candidate

ROOT = Path(__file__).resolve().parents[1]
H100_ROWS = sorted((ROOT / "bench" / "results").glob("*-nvidia-h100-80gb-hbm3.jsonl"))


class FakeTimer:
    """``times[name]`` or ``times[(name, mode)]`` ms per candidate (50 when absent); records its calls.
    ``run``: call each candidate's function once (so failures and side effects are real)."""

    def __init__(self, times=None, run=False, clock=None, step_s=0.0):
        self.times, self.run, self.calls = dict(times or {}), run, []
        self.clock, self.step_s = clock, step_s

    def __call__(self, name, fn, give_up_ms, site):
        self.calls.append((site.op, site.mode, name))
        if self.run:
            fn()
        if self.clock is not None:
            self.clock[0] += self.step_s
        return [self.times.get((name, site.mode), self.times.get(name, 50.0))]

    def timed(self, op=None):
        return [c[2] for c in self.calls if op is None or c[0] == op]


@pytest.fixture(autouse=True)
def fresh_dispatch(tmp_path, monkeypatch):
    """Default settings, a private cache file, no one-time warning already spent, and the same
    candidates with or without TRITON_INTERPRET=1 (the fasttips kernels count as CPU-runnable only
    where a test says so; their parity runs in tests/kernels/test_dispatch_candidates.py)."""
    monkeypatch.delenv("FASTTIPS_KERNELS", raising=False)
    monkeypatch.delenv("FASTTIPS_DISPATCH_CACHE", raising=False)
    monkeypatch.setattr(_backend, "interpreting", lambda: False)
    _backend._warn_once.cache_clear()
    dispatch.reset()
    dispatch.configure(cache=str(tmp_path / "dispatch.json"), log=lambda line: None)
    yield
    dispatch.reset()


def qkv(B=2, H=2, N=9, D=8, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g).requires_grad_(grad) for _ in range(3)]


def spy_on(op: str, name: str) -> list:
    """Replace candidate ``name`` of ``op`` by a recording wrapper; returns the list of its calls."""
    calls = []
    found = dispatch.registry(op)[name]

    def run(*args, **kwargs):
        calls.append(1)
        return found.run(*args, **kwargs)
    dispatch.registry(op)[name] = replace(found, run=run)
    return calls


def only_decision(op: str, mode: str):
    found = [d for d in dispatch.decisions() if d.site.op == op and d.site.mode == mode]
    assert len(found) == 1, found
    return found[0]


# ------------------------------------------------------------------------------------------------
# the rules
# ------------------------------------------------------------------------------------------------
def test_measured_dispatch_on_the_cpu_times_nothing_and_runs_the_reference(monkeypatch):
    monkeypatch.setattr(core._timing, "cuda_samples", lambda *a: pytest.fail("timed on the CPU"))
    q, k, v = qkv()
    out = ops.attention(q, k, v)
    torch.testing.assert_close(out, attn_ref.attention(q, k, v), rtol=0, atol=0)
    d = only_decision("attention", "fwd_bwd")
    assert d.winner == "reference" and d.reason.startswith("cpu") and not d.timings
    assert "on the CPU every op runs its PyTorch reference" in dispatch.describe("cpu")


def test_the_fastest_candidate_wins_and_is_what_runs():
    timer = FakeTimer({"sdpa-math": 1.0, "sdpa-flash": 2.0})
    dispatch.configure(timer=timer)
    math_calls = spy_on("attention", "sdpa-math")
    q, k, v = qkv()
    out = ops.attention(q, k, v)
    d = only_decision("attention", "fwd_bwd")
    assert (d.winner, d.reason) == ("sdpa-math", "measured")
    assert d.timings == {"sdpa-flash": 2.0, "sdpa-math": 1.0}
    assert "fasttips" in d.dropped and "sdpa-cudnn" in d.dropped     # not runnable here: said why
    assert timer.timed() == ["sdpa-flash", "sdpa-math"]
    torch.testing.assert_close(out, attn_ref.attention(q, k, v), atol=1e-5, rtol=1e-5)
    ops.attention(q, k, v)                              # decided: the winner runs, nothing is timed again
    assert len(timer.calls) == 2 and len(math_calls) == 2
    timer.times = {"sdpa-math": 3.0, "sdpa-flash": 3.0}     # a tie goes to the candidate listed first
    ops.attention(*qkv(N=10))
    assert dispatch.decisions()[-1].winner == "sdpa-flash"


def test_forward_only_and_training_calls_are_separate_decisions():
    timer = FakeTimer({("sdpa-flash", "fwd"): 1.0, ("sdpa-math", "fwd"): 2.0,
                       ("sdpa-flash", "fwd_bwd"): 4.0, ("sdpa-math", "fwd_bwd"): 3.0})
    dispatch.configure(timer=timer)
    flash, math = spy_on("attention", "sdpa-flash"), spy_on("attention", "sdpa-math")
    q, k, v = qkv()
    with torch.no_grad():
        ops.attention(q, k, v)                          # a teacher / eval call
    assert only_decision("attention", "fwd").winner == "sdpa-flash"
    flash.clear(), math.clear()
    ops.attention(q, k, v).sum().backward()            # a training call, same shapes
    assert only_decision("attention", "fwd_bwd").winner == "sdpa-math"
    assert flash == [] and len(math) == 1
    with torch.no_grad():
        ops.attention(q, k, v)
    assert len(flash) == 1


def test_forced_paths_and_fixed_policies_time_nothing(monkeypatch):
    timer = FakeTimer()
    dispatch.configure(timer=timer)
    q, k, v = qkv(grad=False)
    ops.attention(q, k, v, backend="reference")
    assert dispatch.decisions()[-1].winner == "reference" and "backend='reference'" in dispatch.decisions()[-1].reason
    monkeypatch.setenv("FASTTIPS_KERNELS", "reference")
    ops.attention(*qkv(N=11, grad=False))
    assert dispatch.decisions()[-1].reason == "forced: FASTTIPS_KERNELS=reference"
    monkeypatch.delenv("FASTTIPS_KERNELS")
    dispatch.configure(policy="pytorch")
    ops.attention(*qkv(N=12, grad=False))
    assert dispatch.decisions()[-1].winner == "sdpa-default"
    dispatch.configure(policy="fasttips")                 # today's auto: the reference for CPU tensors
    ops.attention(*qkv(N=13, grad=False))
    assert dispatch.decisions()[-1].winner == "reference"
    with pytest.raises(ValueError, match="kernels.dispatch"):
        dispatch.configure(policy="fastest")
    dispatch.configure(policy="measured")
    # a prototype CE path named by the caller is forced too (on the CPU: the reference, as before)
    assert ce_dispatch.site(torch.zeros(4, 8), torch.zeros(16, 8), torch.zeros(4, 8), "softmax", "slab")["backward"] == "slab"
    z, v = torch.randn(4, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True)
    ops.prototype_cross_entropy(z, v, torch.ones(16), z.detach(), v.detach(), torch.ones(16),
                                torch.arange(4), torch.full((4,), 0.25), backward="slab")
    assert dispatch.decisions()[-1].reason == "forced: backward='slab'"
    assert timer.calls == []


def test_the_deterministic_option_admits_only_deterministic_backward_candidates():
    timer = FakeTimer({"sdpa-flash": 1.0, "sdpa-math": 9.0})
    dispatch.configure(timer=timer, deterministic=True)
    q, k, v = qkv()
    ops.attention(q, k, v)
    d = only_decision("attention", "fwd_bwd")
    assert d.winner == "sdpa-math" and "not deterministic" in d.dropped["sdpa-flash"]
    with torch.no_grad():                               # a forward is deterministic anyway
        ops.attention(q, k, v)
    assert only_decision("attention", "fwd").winner == "sdpa-flash"


def test_first_use_timing_keeps_to_its_budget():
    clock = [0.0]
    timer = FakeTimer({"sdpa-flash": 5.0, "sdpa-math": 1.0}, clock=clock, step_s=40.0)
    dispatch.configure(timer=timer, clock=lambda: clock[0], budget_s=30.0)
    ops.attention(*qkv())
    d = only_decision("attention", "fwd_bwd")
    assert timer.timed() == ["sdpa-flash"] and d.winner == "sdpa-flash"
    assert d.dropped["sdpa-math"] == "not timed: the 30 s budget was spent"
    assert any("30 s budget" in line for line in dispatch.report_lines())


def test_a_failing_candidate_is_dropped_with_one_warning():
    found = dispatch.registry("attention")["sdpa-flash"]

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for you\nsecond line")
    dispatch.registry("attention")["sdpa-flash"] = replace(found, run=broken)
    dispatch.configure(timer=FakeTimer({"sdpa-flash": 0.1, "sdpa-math": 1.0}, run=True))
    with pytest.warns(UserWarning, match="sdpa-flash failed on attention fwd_bwd .* no kernel for you") as caught:
        out = ops.attention(*qkv())
    assert len([w for w in caught if "sdpa-flash" in str(w.message)]) == 1
    d = only_decision("attention", "fwd_bwd")
    assert d.winner == "sdpa-math" and d.dropped["sdpa-flash"] == "failed: RuntimeError: no kernel for you"
    assert torch.isfinite(out).all()



class _DoubledGradQ(torch.autograd.Function):
    """Attention whose forward is right and whose dq is twice the true one (a backward-only bug)."""

    @staticmethod
    def forward(ctx, q, k, v):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = attn_ref.attention(*leaves)
        ctx.save_for_backward(out, *leaves)
        return out.detach()

    @staticmethod
    def backward(ctx, dout):
        out, *leaves = ctx.saved_tensors
        dq, dk, dv = torch.autograd.grad(out, leaves, dout)
        return 2 * dq, dk, dv


@pytest.mark.parametrize("bug", ["output", "dq"])
def test_a_candidate_that_computes_something_else_is_dropped_before_it_is_timed(bug):
    """The check against the reference (on by default when timing for real) keeps a fast but wrong
    kernel (miscompiled for this device or Triton) from ever being chosen, forward or backward."""
    found = dispatch.registry("attention")["sdpa-flash"]
    if bug == "output":
        wrong = lambda q, k, v, mask=None, scale=None: 1.5 * found.run(q, k, v, mask, scale)   # noqa: E731
    else:
        wrong = lambda q, k, v, mask=None, scale=None: _DoubledGradQ.apply(q, k, v)            # noqa: E731
    dispatch.registry("attention")["sdpa-flash"] = replace(found, run=wrong)
    timer = FakeTimer({"sdpa-flash": 0.1, "sdpa-math": 1.0})
    dispatch.configure(timer=timer, verify=True)
    with pytest.warns(UserWarning, match=f"sdpa-flash gives wrong results on attention fwd_bwd .* {bug} differs"):
        ops.attention(*qkv())
    d = only_decision("attention", "fwd_bwd")
    assert d.winner == "sdpa-math" and d.dropped["sdpa-flash"].startswith(f"wrong: {bug} differs from reference's")
    assert timer.timed() == ["sdpa-math"]                       # never timed
    if bug == "dq":                                              # a forward-only call is right: admitted
        with torch.no_grad():
            ops.attention(*qkv())
        assert only_decision("attention", "fwd").winner == "sdpa-flash"


def test_an_injected_timer_checks_nothing_unless_asked():
    found = dispatch.registry("attention")["sdpa-flash"]
    dispatch.registry("attention")["sdpa-flash"] = replace(found, run=lambda *a: 2 * found.run(*a))
    dispatch.configure(timer=FakeTimer({"sdpa-flash": 0.1, "sdpa-math": 1.0}))     # verify=None
    ops.attention(*qkv())
    assert only_decision("attention", "fwd_bwd").winner == "sdpa-flash"

def _ce_call(S=8, K=40, d=16, grad=True):
    g = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(S, d, generator=g), dim=1).requires_grad_(grad)
    v = torch.randn(K, d, generator=g).requires_grad_(grad)
    args = (z, v, torch.ones(K), z.detach(), v.detach(), torch.ones(K), torch.arange(S), torch.full((S,), 1 / S))
    return args, dict(center=None, student_temp=0.1, teacher_temp=0.04, centering="softmax", sk_iterations=3,
                      group=None)


def _ce_choice(args, options):
    site = ce_dispatch.site(args[0], args[1], args[3], options["centering"], None)
    return site, dispatch.choose(site, None, lambda: ce_dispatch.Timing(args, options))


def test_the_memory_budget_rule_never_times_or_chooses_what_does_not_fit(monkeypatch):
    # the Triton paths count as runnable here (the timer never calls them), so all four CE candidates
    # are in play; their working sets: fused = a few KiB here, the others add a 256 MiB row slab
    monkeypatch.setattr(_backend, "interpreting", lambda: True)
    timer = FakeTimer({"fasttips": 10.0, "fasttips-slab": 1.0, "fasttips-chunked": 2.0, "reference": 3.0})
    free = [100 * 2**20]
    dispatch.configure(timer=timer, free_memory=lambda site: free[0], memory_fraction=0.5)
    args, options = _ce_call()
    site, name = _ce_choice(args, options)
    assert name == "fasttips" and timer.timed() == ["fasttips"]          # the slower one that fits
    d = dispatch.decisions()[-1]
    for other in ("fasttips-slab", "fasttips-chunked", "reference"):
        assert "over the memory budget of 0.05 GiB" in d.dropped[other], d.dropped



def test_a_prototype_ce_candidate_with_a_wrong_gradient_is_dropped():
    def scaled_gradient(*args, **kwargs):       # the loss right, d student_v twice too large
        args = list(args)
        args[1] = _TwiceTheGradient.apply(args[1])
        return ce_dispatch._reference(*args, **kwargs)
    registry = dispatch.registry("prototype_cross_entropy")
    registry["broken"] = Candidate("broken", "pytorch", scaled_gradient)
    dispatch.configure(timer=FakeTimer({"broken": 0.1, "reference": 1.0}), verify=True)
    args, options = _ce_call()
    with pytest.warns(UserWarning, match="broken gives wrong results"):
        site, name = _ce_choice(args, options)
    assert name == "reference"
    assert dispatch.decisions()[-1].dropped["broken"].startswith("wrong: d student_v differs")


class _TwiceTheGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad

def test_a_cached_winner_that_no_longer_fits_is_re_picked_from_the_cached_times(monkeypatch, tmp_path):
    monkeypatch.setattr(_backend, "interpreting", lambda: True)
    timer = FakeTimer({"fasttips": 10.0, "fasttips-slab": 1.0, "fasttips-chunked": 2.0, "reference": 3.0})
    free = [64 * 2**30]
    dispatch.configure(timer=timer, free_memory=lambda site: free[0])
    args, options = _ce_call()
    assert _ce_choice(args, options)[1] == "fasttips-slab"
    assert len(timer.calls) == 4
    dispatch.reset()                                    # a new process: same cache file, less memory
    free[0] = 100 * 2**20
    dispatch.configure(timer=timer, free_memory=lambda site: free[0], cache=str(tmp_path / "dispatch.json"),
                       log=lambda line: None)
    assert _ce_choice(args, options)[1] == "fasttips"
    assert len(timer.calls) == 4                        # nothing timed again
    assert dispatch.decisions()[-1].reason == "cached (fasttips-slab is not admissible now)"


def test_timing_inside_an_activation_checkpointed_block_leaves_its_recomputation_intact():
    """The first call of a site may come inside a checkpointed block (train.activation_checkpointing):
    the timed candidates' own autograd graphs must not count as the block's saved tensors."""
    from torch.utils.checkpoint import checkpoint
    timer = FakeTimer({"sdpa-math": 1.0, "sdpa-flash": 2.0}, run=True)
    dispatch.configure(timer=timer)
    torch.manual_seed(0)
    proj = torch.nn.Linear(8, 24)

    def block(x):
        q, k, v = proj(x).view(2, 9, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        return ops.attention(q, k, v).sum()
    x = torch.randn(2, 9, 8, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # no candidate may fail here
        checkpoint(block, x, use_reentrant=False).backward()
    grad = x.grad.clone()
    x.grad = None
    block(x).backward()
    torch.testing.assert_close(grad, x.grad)
    assert timer.timed() == ["sdpa-flash", "sdpa-math"] and dispatch.decisions()[0].winner == "sdpa-math"


def test_decide_by_hand_decides_without_changing_anything():
    timer = FakeTimer({"sdpa-math": 1.0, "sdpa-flash": 2.0, "fasttips": 0.5, "foreach_lerp": 3.0})
    dispatch.configure(timer=timer)
    q, k, v = qkv()
    (d,) = dispatch.decide(ops.attention, q, k, v)
    assert (d.site.mode, d.winner) == ("fwd_bwd", "sdpa-math") and q.grad is None
    teacher, student = [torch.zeros(5), torch.ones(3)], [torch.ones(5), torch.zeros(3)]
    (e,) = dispatch.decide(ops.ema_update_, teacher, student, 0.5)   # runs with momentum 1: no change
    assert e.site.op == "ema_update_" and e.winner == "foreach_lerp"
    assert torch.equal(teacher[0], torch.zeros(5)) and torch.equal(teacher[1], torch.ones(3))
    with pytest.raises(ValueError, match="not a fasttips.kernels op"):
        dispatch.decide(torch.matmul, q, k)


# ------------------------------------------------------------------------------------------------
# the cache file
# ------------------------------------------------------------------------------------------------
def _new_process(tmp_path, timer):
    dispatch.reset()
    dispatch.configure(timer=timer, cache=str(tmp_path / "dispatch.json"), log=lambda line: None)


def test_cache_hit_miss_and_key_change(tmp_path, monkeypatch):
    timer = FakeTimer({"sdpa-math": 1.0, "sdpa-flash": 2.0})
    _new_process(tmp_path, timer)
    ops.attention(*qkv())
    assert len(timer.calls) == 2
    data = json.loads((tmp_path / "dispatch.json").read_text())
    (section,) = data["environments"].values()
    (entry,) = section["decisions"].values()
    assert entry["winner"] == "sdpa-math" and entry["timings"] == {"sdpa-flash": 2.0, "sdpa-math": 1.0}
    assert set(section["environment"]) >= {"device", "torch", "triton", "fasttips", "kernels"}

    _new_process(tmp_path, timer)                       # hit: the next run times nothing
    ops.attention(*qkv())
    assert len(timer.calls) == 2 and dispatch.decisions()[-1].reason == "cached"
    ops.attention(*qkv(N=17))                           # miss: a new shape is timed
    assert len(timer.calls) == 4

    real = dispatch_cache.environment(device_type="cpu")
    monkeypatch.setattr(core._cache, "environment", lambda device_type, index=None: dict(real, torch="9.9"))
    _new_process(tmp_path, timer)                       # key change (another torch): timed again
    ops.attention(*qkv())
    assert len(timer.calls) == 6 and dispatch.decisions()[-1].reason == "measured"
    assert len(json.loads((tmp_path / "dispatch.json").read_text())["environments"]) == 2


def test_a_cache_entry_that_misses_a_candidate_available_now_is_measured_again(tmp_path):
    timer = FakeTimer({"sdpa-math": 1.0, "sdpa-flash": 2.0})
    _new_process(tmp_path, timer)
    ops.attention(*qkv())
    path = tmp_path / "dispatch.json"
    data = json.loads(path.read_text())
    for section in data["environments"].values():
        for entry in section["decisions"].values():
            entry["considered"] = ["sdpa-math"]           # as if sdpa-flash had been installed since
    path.write_text(json.dumps(data))
    _new_process(tmp_path, timer)
    ops.attention(*qkv())
    assert len(timer.calls) == 4 and dispatch.decisions()[-1].reason == "measured"


def test_a_damaged_cache_is_ignored_with_a_warning_and_rewritten(tmp_path):
    path = tmp_path / "dispatch.json"
    path.write_text('{"format": "fasttips-dispatch-1", "environments": {"x": ')
    timer = FakeTimer({"sdpa-math": 1.0})
    _new_process(tmp_path, timer)
    with pytest.warns(UserWarning, match="ignoring the damaged decision cache"):
        ops.attention(*qkv())
    assert dispatch.decisions()[-1].reason == "measured"
    data = json.loads(path.read_text())                 # replaced whole, valid
    assert data["format"] == "fasttips-dispatch-1" and len(data["environments"]) == 1


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTIPS_DISPATCH_CACHE", "off")
    assert dispatch_cache.resolve_path("") is None and dispatch_cache.resolve_path(None) is None
    assert dispatch_cache.resolve_path(str(tmp_path / "c.json")) == tmp_path / "c.json"
    dispatch.configure(timer=FakeTimer(), cache="off")
    ops.attention(*qkv())
    assert not (tmp_path / "dispatch.json").exists()
    assert "not cached" in dispatch.describe()


# ------------------------------------------------------------------------------------------------
# varlen: the per-size composition
# ------------------------------------------------------------------------------------------------
def test_varlen_per_size_composition_runs_each_run_through_its_dense_decision():
    timer = FakeTimer({"sdpa-math": 1.0, "sdpa-flash": 2.0, "per-size": 0.5}, run=True)
    dispatch.configure(timer=timer)
    lengths = [7, 7, 7, 3, 3]
    cu = ops.cu_seqlens_from_lengths(lengths, "cpu")
    g = torch.Generator().manual_seed(3)
    q, k, v = [torch.randn(sum(lengths), 2, 8, generator=g, requires_grad=True) for _ in range(3)]
    out = ops.attention_varlen(q, k, v, cu)
    d = only_decision("attention_varlen", "fwd_bwd")
    assert d.winner_text() == "per-size(4x7:sdpa-math+2x3:sdpa-math)"
    assert d.site["runs"] == ((4, 7), (2, 3))            # counts rounded up to a power of two
    torch.testing.assert_close(out, attn_ref.attention_varlen(q, k, v, cu), atol=1e-5, rtol=1e-5)
    dense = {d.site["N"]: d.winner for d in dispatch.decisions() if d.site.op == "attention"}
    assert dense == {7: "sdpa-math", 3: "sdpa-math"}
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = torch.autograd.grad(attn_ref.attention_varlen(q, k, v, cu).sum(), (q, k, v))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# torch.compile: decided before tracing, a constant of the graph, no graph break
# ------------------------------------------------------------------------------------------------
class TwoAttentions(torch.nn.Module):
    """A packed multi-crop attention layer (models.layers.Attention) and a dense one."""

    def __init__(self):
        super().__init__()
        from fasttips.models.layers import Attention
        self.packed, self.dense = Attention(32, 2), Attention(32, 2)

    def forward(self, x, packing, uniform):
        return self.packed(x, packing).sum() + self.dense(x[:uniform.num_sequences * uniform.uniform], uniform).sum()


def test_a_compiled_model_traces_with_no_graph_break_and_the_decisions_fixed():
    from fasttips.models.layers import Packing
    timer = FakeTimer({"sdpa-math": 1.0, "sdpa-flash": 2.0, "per-size": 0.5}, run=True)
    dispatch.configure(timer=timer)
    torch.manual_seed(0)
    model = TwoAttentions()
    packing, uniform = Packing.from_lengths([9, 9, 4, 4, 4], "cpu"), Packing.from_lengths([9, 9], "cpu")
    x = torch.randn(30, 32)
    with dispatch.deciding():                             # what the trainer's first step does
        eager = model(x, packing, uniform)
    n_timed = len(timer.calls)
    winners = {(d.site.op, d.site.mode): d.winner for d in dispatch.decisions()}
    assert winners[("attention_varlen", "fwd_bwd")] == "per-size"
    explained = torch._dynamo.explain(model)(x, packing, uniform)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # no fallback warning: everything was decided
        out = compiled(x, packing, uniform)
        torch.testing.assert_close(out, eager)
        out.backward()
        torch.testing.assert_close(compiled(x, packing, uniform), eager)
    assert len(timer.calls) == n_timed                    # nothing timed inside the compiled region


def test_compiling_before_anything_is_decided_warns_and_still_does_not_break():
    """No timing at trace time: the call runs the fasttips policy's choice (on the CPU the dense
    reference), with one warning. (The varlen reference itself reads the offsets on the host, so it
    is no fullgraph citizen on the CPU whatever dispatch does: the dense layer is compiled here.)"""
    from fasttips.models.layers import Attention, Packing
    timer = FakeTimer()
    dispatch.configure(timer=timer)
    layer = Attention(32, 2)
    uniform = Packing.from_lengths([9, 9], "cpu")
    x = torch.randn(18, 32)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with pytest.warns(UserWarning, match="was not decided before it ran \\(torch.compile is tracing\\)"):
        out = compiled(x, uniform)
    assert timer.calls == []                              # the trace timed nothing
    (d,) = dispatch.decisions()
    assert d.winner == "reference" and d.reason == "fallback: torch.compile is tracing; the fasttips policy"
    torch.testing.assert_close(out, layer(x, uniform), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# two ranks (gloo): rank 0's timings decide for every rank
# ------------------------------------------------------------------------------------------------
def _two_rank_worker(rank, world, store, cache_dir, results):
    import torch.distributed as dist
    from datetime import timedelta
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        # the two ranks' timers disagree; rank 1's sdpa-math fails at the second shape
        times = ({"sdpa-math": 1.0, "sdpa-flash": 2.0} if rank == 0 else {"sdpa-math": 2.0, "sdpa-flash": 1.0})
        timer = FakeTimer(times)
        original = timer.__call__

        def timer_fn(name, fn, give_up, site):
            if rank == 1 and name == "sdpa-math" and site["N"] == 10:
                raise RuntimeError("not on this rank")
            return original(name, fn, give_up, site)
        dispatch.reset()
        dispatch.configure(timer=timer_fn, cache=f"{cache_dir}/rank{rank}.json", log=lambda line: None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with dispatch.deciding():
                ops.attention(*qkv(N=9))
                ops.attention(*qkv(N=10))
            ops.attention(*qkv(N=9))                    # decided: used, no collective
            ops.attention(*qkv(B=4, N=9))               # new outside deciding(): the nearest decision
        results[rank] = [(d.site.shape_text(), d.winner, d.reason) for d in dispatch.decisions()]
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_run_rank_zeros_choice_when_their_timers_disagree(tmp_path):
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.spawn(_two_rank_worker, args=(2, str(tmp_path / "store"), str(tmp_path), results), nprocs=2, join=True)
    for rank in (0, 1):
        by_shape = {shape: (winner, reason) for shape, winner, reason in results[rank]}
        assert by_shape["cpu fp32 B=2 H=2 N=9 D=8"][0] == "sdpa-math"     # rank 0's fastest
        assert by_shape["cpu fp32 B=2 H=2 N=9 D=8"][1].startswith("agreed: rank 0's timings")
        assert by_shape["cpu fp32 B=2 H=2 N=10 D=8"][0] == "sdpa-flash"   # sdpa-math did not run on rank 1
        assert by_shape["cpu fp32 B=4 H=2 N=9 D=8"][0] == "sdpa-math"     # untimed: nearest decided site
        assert by_shape["cpu fp32 B=4 H=2 N=9 D=8"][1].startswith("fallback: a distributed run")
    assert results[0] == results[1]


# ------------------------------------------------------------------------------------------------
# replay of bench rows
# ------------------------------------------------------------------------------------------------
def _by(decisions, op, mode, **case):
    found = [d for d in decisions if d["op"] == op and d["mode"] == mode
             and all(d["case"].get(k) == v for k, v in case.items())]
    assert len(found) == 1, (op, mode, case, found)
    return found[0]


def test_replaying_the_committed_h100_rows_gives_the_issues_choices():
    assert H100_ROWS, "the committed H100 rows are missing"
    decisions = replay.replay(replay.read_rows(H100_ROWS))
    assert _by(decisions, "attention", "fwd_bwd", N=257)["winner"] == "sdpa-cudnn"
    assert _by(decisions, "attention", "fwd_bwd", N=1025)["winner"] == "sdpa-cudnn"
    assert _by(decisions, "attention", "fwd_bwd", N=50)["winner"] == "sdpa-efficient"
    multicrop = _by(decisions, "attention_varlen", "fwd_bwd", layer="multicrop")
    assert multicrop["winner"] == "per-size(64x257:sdpa-cudnn+256x50:sdpa-efficient)"
    assert [p["impl"] for p in multicrop["parts"]] == ["sdpa-cudnn", "sdpa-efficient"]
    assert multicrop["times"][multicrop["winner"]] < multicrop["times"]["fasttips"]      # not the packed kernel
    assert "sdpa-cudnn-per-size" in multicrop["ignored"]                                 # nor one backend for both
    # a fasttips forward that is the fastest forward-only time: fasttips for forward-only calls,
    # while forward+backward keeps cuDNN (rows of commit fdd73cc; both runs combined: the same)
    for rows in (replay.read_rows(H100_ROWS), [r for r in replay.read_rows(H100_ROWS)
                                               if str(r.get("git_commit")).startswith("fdd73cc")]):
        decided = replay.replay(rows)
        assert _by(decided, "attention", "fwd", N=257)["winner"] == "fasttips"
        assert _by(decided, "attention", "fwd_bwd", N=257)["winner"] == "sdpa-cudnn"
    # where the fasttips forward is not the fastest (commit 9190b48: 0.187 vs cuDNN 0.169), it is not chosen
    later = replay.replay(replay.read_rows(H100_ROWS), commit="9190b48")
    assert _by(later, "attention", "fwd", N=257)["winner"] == "sdpa-cudnn"
    assert "sdpa-default" in _by(later, "attention", "fwd", N=257)["ignored"]


def test_several_rows_of_one_candidate_combine_as_the_minimum_of_their_medians(tmp_path):
    case = {"B": 4, "H": 2, "N": 33, "D": 64, "dtype": "bf16", "mode": "fwd"}
    rows = [dict(bench="attention", device="NVIDIA X", case=case, impl=impl, ms=ms, git_commit=commit)
            for impl, ms, commit in (("fasttips", 0.30, "a"), ("fasttips", 0.10, "b"), ("sdpa-cudnn", 0.20, "a"),
                                     ("sdpa-cudnn", 0.25, "b"), ("sdpa-default", 0.01, "a"))]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{damaged\n")   # skipped, said on stderr
    (d,) = replay.replay(replay.read_rows([path]))
    assert d["winner"] == "fasttips" and d["times"] == {"fasttips": 0.1, "sdpa-cudnn": 0.2}
    assert d["rows"] == {"fasttips": 2, "sdpa-cudnn": 2} and d["combine"] == "min of the per-run medians"
    assert d["ignored"] == {"sdpa-default": 0.01}                       # not a dispatch candidate
    (only_a,) = replay.replay(replay.read_rows([path]), commit="a")
    assert only_a["winner"] == "sdpa-cudnn"
    # forwards are deterministic: the option changes nothing for forward-only rows
    assert replay.replay(replay.read_rows([path]), deterministic=True)[0]["times"] == d["times"]
    backward = [dict(r, case=dict(case, mode="fwd_bwd")) for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in backward))
    (det,) = replay.replay(replay.read_rows([path]), deterministic=True)
    assert det["winner"] == "fasttips" and "sdpa-cudnn" not in det["times"]


def test_fasttips_bench_dispatch_timings_json(capsys):
    from fasttips.benchcli import main
    assert main(["dispatch", "--timings", *map(str, H100_ROWS), "--json"]) == 0
    decisions = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert decisions and all({"op", "case", "mode", "winner", "times", "combine"} <= set(d) for d in decisions)
    assert _by(decisions, "attention", "fwd_bwd", N=50)["times"]["sdpa-efficient"] == 0.3254
    assert main(["dispatch", "--timings", "/nonexistent.jsonl"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# what a training run reports
# ------------------------------------------------------------------------------------------------
def test_a_training_run_says_which_implementation_each_op_runs(tmp_path, capsys):
    from fasttips.train import main
    run_dir = tmp_path / "run"
    code = main(["data.source=synthetic", "vision.depth=1", "text.depth=1", "data.batch_size=2",
                 "heads.prototypes=64", "train.steps=2", "train.log_every=2", f"train.run_dir={run_dir}",
                 f"kernels.cache={tmp_path / 'cache.json'}", "kernels.budget_s=7", "--no-progress"])
    assert code == 0
    assert dispatch.settings().budget_s == 7 and dispatch.settings().cache == str(tmp_path / "cache.json")
    out = capsys.readouterr().out
    assert "kernels: dispatch=measured; on the CPU every op runs its PyTorch reference" in out
    for op in ("attention_varlen", "attention", "prototype_cross_entropy", "ema_update_"):
        assert f"kernels: {op} " in out, op
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 2                                           # the first row written
    assert {r["op"] for r in first["kernels"]} == {"attention_varlen", "attention", "prototype_cross_entropy",
                                                   "ema_update_"}
    assert all(r["impl"] and r["why"] for r in first["kernels"])
    text = (run_dir / "config.yaml").read_text()
    assert "# kernels: the implementation each op runs" in text and "#   ema_update_ update" in text
    from fasttips import config as config_lib
    assert config_lib.load(run_dir / "config.yaml").kernels.dispatch == "measured"   # still a valid config
