"""Every candidate measured dispatch may choose passes its op's parity test, values and gradients,
against the op's PyTorch reference (kernels/dispatch/: attention, attention_varlen,
prototype_cross_entropy, ema_update_).

CPU: each candidate that runs here (the references, SDPA's math and CPU flash backends, and the
fasttips kernels under TRITON_INTERPRET=1), fp32, odd shapes. GPU (``-m gpu``): every candidate that runs
on the device (cuDNN / flash / efficient SDPA, flash-attn, xformers, torch varlen, the Triton paths,
the compiled reference) in bf16 against the fp32 reference, with flash-attn's 2×-error rule.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fasttips.kernels as ops
from fasttips.kernels import dispatch
from fasttips.kernels.dispatch import attention as attn_dispatch
from fasttips.kernels.dispatch import ema as ema_dispatch
from fasttips.kernels.dispatch import prototype_ce as ce_dispatch
from fasttips.kernels.dispatch.site import Site, dtype_name
from tooling.numerics import assert_within_2x, tolerances

OPS = ("attention", "attention_varlen", "prototype_cross_entropy", "ema_update_")
CUDA = torch.cuda.is_available()


def names(op):
    return list(dispatch.registry(op))


def runnable(op: str, name: str, site: Site):
    c = dispatch.registry(op)[name]
    why = c.unavailable() or c.supports(site)
    if why:
        pytest.skip(f"{op} {name}: {why}")
    return c


def close(actual, expected, dtype, what):
    atol, rtol = tolerances(dtype)
    assert torch.isfinite(actual).all(), f"{what}: non-finite"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * 10, rtol=rtol * 10,
                               msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------------
# attention (dense, with and without key padding) and varlen
# ------------------------------------------------------------------------------------------------
def _dense_inputs(B, H, N, D, dtype, device, mask: bool, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = [torch.randn(B, H, N, D, generator=g, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3)]
    pad = None
    if mask:   # every sequence keeps at least one key (a fully padded one has no defined output)
        lengths = torch.randint(1, N + 1, (B,), generator=g, device=device)
        pad = torch.arange(N, device=device)[None] >= lengths[:, None]
    return q, k, v, pad


def _check_dense(c, q, k, v, pad, lowp: bool):
    out = c.run(q, k, v, pad, None)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = ops.attention(*ref_in, key_padding_mask=pad, backend="reference")
    ref_grads = torch.autograd.grad(ref, ref_in, dout.float())
    if not lowp:
        for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
            close(a, b, q.dtype, name)
        return
    same = dispatch.registry("attention")["reference"].run(q, k, v, pad, None)   # bf16 in, fp32 softmax
    same_grads = torch.autograd.grad(same, (q, k, v), dout)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (same, *same_grads), (ref, *ref_grads)):
        assert_within_2x(a, b, r, name=name, floor=1e-3)


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("name", names("attention"))
def test_dense_candidate_matches_the_reference(name, mask, seed):
    q, k, v, pad = _dense_inputs(2, 3, 50, 64, torch.float32, "cpu", mask, seed)
    c = runnable("attention", name, attn_dispatch.dense_site(q, k, v, pad))
    _check_dense(c, q, k, v, pad, lowp=False)


def _varlen_inputs(lengths, H, D, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = [torch.randn(sum(lengths), H, D, generator=g, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3)]
    cu = ops.cu_seqlens_from_lengths(lengths, device)
    return q, k, v, cu, attn_dispatch.runs_of(lengths)


def _check_varlen(c, q, k, v, cu, runs, lowp: bool):
    max_seqlen = max(n for _, n in runs)
    out = c.run(q, k, v, cu, max_seqlen, None, runs, ops.attention)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = ops.attention_varlen(*ref_in, cu, backend="reference")
    ref_grads = torch.autograd.grad(ref, ref_in, dout.float())
    if not lowp:
        for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
            close(a, b, q.dtype, name)
        return
    same = ops.attention_varlen(q, k, v, cu, backend="reference")
    same_grads = torch.autograd.grad(same, (q, k, v), dout)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (same, *same_grads), (ref, *ref_grads)):
        assert_within_2x(a, b, r, name=name, floor=1e-3)


@pytest.mark.parametrize("name", names("attention_varlen"))
def test_varlen_candidate_matches_the_reference(name, seed):
    q, k, v, cu, runs = _varlen_inputs([33, 33, 9, 9, 9, 1], 2, 64, torch.float32, "cpu", seed)
    c = runnable("attention_varlen", name, attn_dispatch.varlen_site(q, k, v, cu, 33, runs))
    _check_varlen(c, q, k, v, cu, runs, lowp=False)


# ------------------------------------------------------------------------------------------------
# prototype cross-entropy and the EMA
# ------------------------------------------------------------------------------------------------
def _ce_inputs(S, K, d, dtype, device, centering, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    z = F.normalize(torch.randn(S, d, generator=g, device=device), dim=1).to(dtype).requires_grad_()
    v = torch.randn(K, d, generator=g, device=device, requires_grad=True)
    gain = (torch.rand(K, generator=g, device=device) + 0.5).requires_grad_()
    zt = F.normalize(torch.randn(S, d, generator=g, device=device), dim=1).to(dtype)
    args = (z, v, gain, zt, torch.randn(K, d, generator=g, device=device), torch.rand(K, generator=g, device=device) + 0.5,
            torch.randperm(S, generator=g, device=device), torch.rand(S, generator=g, device=device) / S)
    options = dict(center=0.01 * torch.randn(K, generator=g, device=device), student_temp=0.1, teacher_temp=0.04,
                   centering=centering, sk_iterations=3, group=None)
    return args, options


def _check_ce(c, args, options, lowp: bool):
    loss, stat = c.run(*args, **options)
    grads = torch.autograd.grad(loss, args[:3])
    ref_args = [a.detach().float().requires_grad_() if i < 3 else (a.float() if a.is_floating_point() else a)
                for i, a in enumerate(args)]
    ref_loss, ref_stat = ops.prototype_cross_entropy(*ref_args, **options, backend="reference")
    ref_grads = torch.autograd.grad(ref_loss, ref_args[:3])
    dtype = torch.float32 if not lowp else torch.bfloat16
    for name, a, b in zip(("loss", "center_stat", "dz", "dv", "dg"), (loss, stat, *grads),
                          (ref_loss, ref_stat, *ref_grads)):
        close(a, b, dtype, name)


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
@pytest.mark.parametrize("name", names("prototype_cross_entropy"))
def test_prototype_ce_candidate_matches_the_reference(name, centering, seed):
    args, options = _ce_inputs(24, 200, 16, torch.float32, "cpu", centering, seed)
    c = runnable("prototype_cross_entropy", name,
                 ce_dispatch.site(args[0], args[1], args[3], centering, None))
    _check_ce(c, args, options, lowp=False)


def _check_ema(c, sizes, device, student_dtype):
    g = torch.Generator(device=device).manual_seed(0)
    teacher = [torch.randn(n, generator=g, device=device) for n in sizes]
    student = [torch.randn(n, generator=g, device=device).to(student_dtype) for n in sizes]
    expected = [torch.lerp(t, s.float(), 1 - 0.9) for t, s in zip(teacher, student)]
    c.run(teacher, student, 0.9)
    for i, (t, e) in enumerate(zip(teacher, expected)):
        torch.testing.assert_close(t, e, atol=1e-6, rtol=1e-5, msg=lambda m, i=i: f"teacher[{i}]: {m}")
    before = [t.clone() for t in teacher]
    c.run(teacher, student, 1.0)             # what timing runs: changes nothing
    assert all(torch.equal(a, b) for a, b in zip(teacher, before))


@pytest.mark.parametrize("name", names("ema_update_"))
def test_ema_candidate_matches_the_reference(name):
    sizes = [7, 4096 + 3, 1]
    teacher = [torch.zeros(n) for n in sizes]
    c = runnable("ema_update_", name, ema_dispatch.site(teacher, teacher))
    _check_ema(c, sizes, "cpu", torch.float32)


# ------------------------------------------------------------------------------------------------
# GPU: every candidate that runs on the device, bf16, real shapes
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("B,H,N", [(8, 24, 257), (32, 24, 50), (2, 16, 1025)])
@pytest.mark.parametrize("name", names("attention"))
def test_gpu_dense_candidate_within_2x(name, B, H, N, seed):
    q, k, v, pad = _dense_inputs(B, H, N, 64, torch.bfloat16, "cuda", False, seed)
    _check_dense(runnable("attention", name, attn_dispatch.dense_site(q, k, v, pad)), q, k, v, pad, lowp=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", names("attention"))
def test_gpu_dense_candidate_with_key_padding_within_2x(name, seed):
    q, k, v, pad = _dense_inputs(16, 8, 77, 64, torch.bfloat16, "cuda", True, seed)
    _check_dense(runnable("attention", name, attn_dispatch.dense_site(q, k, v, pad)), q, k, v, pad, lowp=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", names("attention_varlen"))
def test_gpu_varlen_candidate_within_2x(name, seed):
    q, k, v, cu, runs = _varlen_inputs([257] * 8 + [50] * 32, 24, 64, torch.bfloat16, "cuda", seed)
    c = runnable("attention_varlen", name, attn_dispatch.varlen_site(q, k, v, cu, 257, runs))
    _check_varlen(c, q, k, v, cu, runs, lowp=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", names("prototype_cross_entropy"))
def test_gpu_prototype_ce_candidate_matches_the_reference(name, seed):
    args, options = _ce_inputs(1024, 4096, 256, torch.bfloat16, "cuda", "softmax", seed)
    site = ce_dispatch.site(args[0], args[1], args[3], "softmax", None)
    assert site["dtype"] == dtype_name(torch.bfloat16)
    _check_ce(runnable("prototype_cross_entropy", name, site), args, options, lowp=True)


@pytest.mark.gpu
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", names("ema_update_"))
def test_gpu_ema_candidate_matches_the_reference(name, student_dtype):
    sizes = [2048 * 1536, 2048, 65536 * 256 // 8 + 5]
    teacher = [torch.zeros(n, device="cuda") for n in sizes]
    student = [t.to(student_dtype) for t in teacher]
    _check_ema(runnable("ema_update_", name, ema_dispatch.site(teacher, student)), sizes, "cuda", student_dtype)


@pytest.mark.gpu
def test_gpu_measured_dispatch_decides_every_op_on_the_device(tmp_path):
    """Live: each op at a small shape is timed on this GPU (CUDA events), and the winner runs."""
    dispatch.reset()
    dispatch.configure(cache=str(tmp_path / "cache.json"), budget_s=20)
    try:
        q, k, v, _ = _dense_inputs(8, 8, 257, 64, torch.bfloat16, "cuda", False)
        with dispatch.deciding():
            ops.attention(q, k, v).sum().backward()
        d = [x for x in dispatch.decisions() if x.site.op == "attention"][0]
        assert d.reason == "measured" and d.winner in d.timings and len(d.timings) >= 2, d
        assert (tmp_path / "cache.json").is_file()
    finally:
        dispatch.reset()


def test_every_op_has_candidates_and_a_reference():
    for op in OPS:
        spec = dispatch.registry(op)
        assert len(spec) >= 2
        from fasttips.kernels.dispatch.core import SPECS
        assert SPECS[op].reference in spec and SPECS[op].fasttips in spec and SPECS[op].pytorch in spec
