"""Flash attention (kernels/attention/triton.py) against the PyTorch reference.

CPU: the Triton kernels run under TRITON_INTERPRET=1 in fp32 (forward and all three gradients), with
small interpreter block sizes so that full tiles, the narrow key tail, the short-row tail and several
heads per program are all exercised. Then the Hopper gate compiles every kernel at every autotune
configuration for sm_90a. GPU tests (marked) run the ViT-g shapes in bf16 with the 2×-error rule.
"""
from __future__ import annotations

import pytest
import torch

import fasttips.kernels as ops
from fasttips.kernels import _backend
from fasttips.kernels.attention import reference as R
from fasttips.kernels.attention import triton as T
from tooling import gate_attention as hopper_gate
from tooling.numerics import assert_within_2x, tolerances

interpreter = pytest.mark.skipif(not _backend.interpreting(), reason="needs TRITON_INTERPRET=1")


def _qkv(*shape, dtype=torch.float32, device="cpu"):
    return [torch.randn(*shape, dtype=dtype, device=device, requires_grad=True) for _ in range(3)]


def _assert_matches(actual, expected, what, seed):
    atol, rtol = tolerances(torch.float32)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (seed {seed})"
    torch.testing.assert_close(actual, expected, atol=atol * 10, rtol=rtol * 10,
                               msg=lambda m: f"{what} (seed {seed}): {m}")


def _check_fwd_bwd(fn, ref_fn, inputs, seed):
    out = fn(*inputs)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    out_ref = ref_fn(*inputs)
    grads_ref = torch.autograd.grad(out_ref, inputs, dout)
    _assert_matches(out, out_ref, "out", seed)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        _assert_matches(g, g_ref, name, seed)
    return out, grads


# ------------------------------------------------------------------------------------------------
# interpreter parity (fp32)
# ------------------------------------------------------------------------------------------------
@interpreter
@pytest.mark.parametrize("B,H,N,D,two_pass", [
    (2, 3, 1, 64, False), (1, 3, 17, 72, False), (1, 5, 50, 64, False), (1, 5, 50, 64, True),
    (1, 2, 100, 64, False), (1, 1, 257, 64, False), (1, 3, 33, 128, False)])
def test_dense_matches_reference(B, H, N, D, two_pass, seed):
    # N ≤ 64 at D ≤ 64 takes the one-tile backward; two_pass sends it through dQ + dK/dV instead
    options = dict(short_bwd_max=0) if two_pass else {}
    # 64-blocks for N ≥ 100: quicker at N = 257 (narrow tails: 1 row, 1 key past 256)
    if N == 100:  # tails as wide as a block, as the short-sequence configurations run them
        options["interpret_config"] = T._cfg(64, 64, 1, 4, 1, 64, 64)
    if N == 257:
        options["interpret_config"] = T._cfg(64, 64, 1, 4, 1)
    q, k, v = _qkv(B, H, N, D)
    scale = 0.3 if D == 72 else None  # an explicit scale once
    _check_fwd_bwd(lambda q, k, v: T.attention(q, k, v, scale=scale, **options),
                   lambda q, k, v: R.attention(q, k, v, scale=scale), [q, k, v], seed)


@interpreter
@pytest.mark.parametrize("N,D", [(17, 64), (50, 72)])
def test_key_padding(N, D, seed):
    B, H = 3, 3
    q, k, v = _qkv(B, H, N, D)
    mask = torch.rand(B, N) < 0.4
    mask[0] = True          # a sequence that is all padding: its rows must come out 0, not NaN
    mask[1, :] = False      # and one with no padding at all
    mask[2, 0] = False      # keep at least one real key in the random one
    fn = lambda q, k, v: ops.attention(q, k, v, key_padding_mask=mask, backend="triton")  # noqa: E731
    ref = lambda q, k, v: R.attention(q, k, v, key_padding_mask=mask)  # noqa: E731
    out, grads = _check_fwd_bwd(fn, ref, [q, k, v], seed)
    assert out[0].abs().max() == 0
    for g in grads:
        assert g[0].abs().max() == 0
    # padded keys receive no gradient
    assert grads[1][2][:, mask[2]].abs().max() == 0 if mask[2].any() else True


@interpreter
@pytest.mark.parametrize("lengths,D", [([50, 1, 17, 33], 64), ([9, 40, 0, 26], 72)])
def test_varlen_matches_reference(lengths, D, seed):
    H = 3
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v = _qkv(int(cu[-1]), H, D)
    _check_fwd_bwd(lambda q, k, v: ops.attention_varlen(q, k, v, cu, backend="triton"),
                   lambda q, k, v: R.attention_varlen(q, k, v, cu), [q, k, v], seed)


@interpreter
def test_varlen_equals_dense_per_sequence(seed):
    """One packed launch gives what separate dense launches give, crop by crop."""
    H, D = 2, 64
    crops = [torch.randn(2, H, 40, D), torch.randn(3, H, 17, D)]  # [B, H, N, D] per crop size
    packed = torch.cat([c.permute(0, 2, 1, 3).reshape(-1, H, D) for c in crops])
    lengths = [40, 40, 17, 17, 17]
    cu = torch.tensor([0] + lengths).cumsum(0)
    out = ops.attention_varlen(packed, packed, packed, cu, max_seqlen=40, backend="triton")
    dense = torch.cat([ops.attention(c, c, c, backend="triton").permute(0, 2, 1, 3).reshape(-1, H, D)
                       for c in crops])
    torch.testing.assert_close(out, dense, atol=1e-6, rtol=1e-6, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=interpreter), "reference"])
def test_varlen_max_seqlen_below_the_longest_sequence_is_an_error(backend, seed):
    """max_seqlen sizes the launch: 40 for lengths [3, 100, 5] left rows of the output unwritten
    (NaN). Both backends refuse it, whether the offsets come from host lengths or from a tensor."""
    H, D = 2, 16
    q, k, v = _qkv(108, H, D)
    for cu in (ops.cu_seqlens_from_lengths([3, 100, 5], "cpu"), torch.tensor([0, 3, 103, 108])):
        with pytest.raises(ValueError, match=r"max_seqlen=40 is below the longest sequence .*\(100 tokens\)"):
            ops.attention_varlen(q, k, v, cu, max_seqlen=40, backend=backend)
        out = ops.attention_varlen(q, k, v, cu, max_seqlen=100, backend=backend)   # exact bound: fine
        assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="max_seqlen must be an int >= 0"):
        ops.attention_varlen(q, k, v, cu, max_seqlen=-1, backend=backend)


def test_longest_sequence_is_recorded_per_offsets_tensor_and_follows_in_place_changes():
    from fasttips.kernels.attention import common as C

    cu = ops.cu_seqlens_from_lengths([3, 100, 5], "cpu")
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 103, 108]
    assert C._LONGEST[id(cu)][2] == 100           # known from the host lengths: nothing to read
    assert C.longest_sequence(cu) == 100
    cu[1:] += 200                                  # an in-place change (version bump) is seen
    assert C.longest_sequence(cu) == 203
    assert C.check_max_seqlen(None, C.longest_sequence(cu)) == 203
    other = torch.tensor([0, 7, 9])
    assert C.longest_sequence(other) == 7 and C._LONGEST[id(other)][2] == 7   # computed once, kept
    key = id(other)
    del other                                      # the record goes with the tensor
    assert key not in C._LONGEST


@interpreter
def test_non_contiguous_inputs(seed):
    """q, k, v as views of one [B, N, 3, H, D] projection (the usual ViT layout)."""
    B, N, H, D = 2, 19, 3, 64
    qkv = torch.randn(B, N, 3, H, D, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = ops.attention(q, k, v, backend="triton")
    ref = R.attention(q, k, v)
    _assert_matches(out, ref, "out", seed)
    dout = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, dout)
    (g_ref,) = torch.autograd.grad(ref, qkv, dout)
    _assert_matches(g, g_ref, "dqkv", seed)


@interpreter
def test_head_dim_72_strides_that_are_not_multiples_of_8(seed):
    """At D = 72 the kernels take every stride to be a multiple of 8 (ROW_ALIGN, so that rows load
    16 bytes at a time). Rows padded to 76 elements break that, in the inputs and in the output
    gradient: such tensors must be copied first, or the kernels read the wrong rows."""
    B, H, N, D = 2, 3, 21, 72
    q, k, v = [torch.randn(B, H, N, 76)[..., :D].requires_grad_() for _ in range(3)]
    dout = torch.randn(B, H, N, 76)[..., :D]
    out = ops.attention(q, k, v, backend="triton")
    grads = torch.autograd.grad(out, [q, k, v], dout)
    out_ref = R.attention(q, k, v)
    grads_ref = torch.autograd.grad(out_ref, [q, k, v], dout)
    _assert_matches(out, out_ref, "out", seed)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        _assert_matches(g, g_ref, name, seed)


def test_kernel_layout_copies_only_what_the_kernels_cannot_index():
    fused = torch.randn(2, 5, 3, 4, 72)            # [B, N, 3, H, D]: strides multiples of 72
    q = fused.permute(2, 0, 3, 1, 4)[0]
    assert T._kernel_layout(q) is q
    padded_rows = torch.randn(2, 4, 5, 76)[..., :72]
    assert T._kernel_layout(padded_rows).is_contiguous()
    odd_batch_stride = torch.randn(1, 4, 5, 72).as_strided((1, 4, 5, 72), (3, 360, 72, 1))
    assert T._kernel_layout(odd_batch_stride) is odd_batch_stride  # size-1 dim: never indexed
    at_64 = torch.randn(2, 4, 5, 68)[..., :64]      # multiples of 16 need nothing (row_align = 1)
    assert T._kernel_layout(at_64) is at_64
    assert T._kernel_layout(q.transpose(-1, -2).contiguous().transpose(-1, -2)).stride(-1) == 1


@interpreter
def test_torch_compile_traces_through(seed):
    """The custom ops have fake kernels and autograd: a compiled model has no graph break."""
    torch._dynamo.reset()

    def block(x, w):
        q = k = v = (x @ w).unflatten(-1, (2, 64)).transpose(1, 2)  # [B, H, N, D]
        return ops.attention(q, k, v, backend="triton").sum()

    x, w = torch.randn(2, 9, 128), torch.randn(128, 128, requires_grad=True)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    (g,) = torch.autograd.grad(compiled(x, w), w)
    (g_ref,) = torch.autograd.grad(block(x, w), w)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_named():
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match="same shape"):
        T.attention(q, q[:, :, :4], q)
    with pytest.raises(ValueError, match="key_padding_mask"):
        T.attention(q, q, q, key_padding_mask=torch.zeros(1, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="head dim"):
        T.attention(*[torch.randn(1, 1, 4, 160)] * 3)
    with pytest.raises(TypeError, match="dtype"):
        T.attention(*[torch.zeros(1, 1, 4, 64, dtype=torch.int32)] * 3)
    with pytest.raises(ValueError, match="cu_seqlens"):
        T.attention_varlen(*[torch.randn(8, 2, 64)] * 3, cu_seqlens=torch.tensor([0.0, 8.0]))
    with pytest.raises(ValueError, match=r"\[T, H, D\]"):
        T.attention_varlen(q, q, q, cu_seqlens=torch.tensor([0, 8]))


# ------------------------------------------------------------------------------------------------
# Hopper compile gate: every kernel × every autotune configuration, sm_90a, bf16 and fp16
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hopper_reports():
    return hopper_gate.compile_all()  # all compiles at once, spread over the CPU cores


GATE_PARAMS = [pytest.param(c, id="-".join(map(str, c))) for c in hopper_gate.cases()]


@pytest.mark.parametrize("case", GATE_PARAMS)
def test_hopper_compile_gate(case, hopper_reports):
    report = hopper_reports[case]
    if isinstance(report, Exception):
        raise report
    print(report.summary())   # registers, shared memory, CTAs/SM, GEMMs/EX2 per step: shown with -s or on failure
    report.check(matmul=case[0] not in hopper_gate.NO_MATMUL)
    report.check_expected(hopper_gate.expected(case))


# ------------------------------------------------------------------------------------------------
# GPU: real shapes, bf16, 2× rule
# ------------------------------------------------------------------------------------------------
def _lowp_attention(q, k, v, key_padding_mask=None):
    """Plain torch attention in the inputs' precision (bf16 matmuls, softmax in fp32): the yardstick
    of the 2× rule, as flash-attn's tests use it."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    return torch.matmul(probs, v)


def _lowp_varlen(q, k, v, cu):
    bounds = cu.tolist()
    return torch.cat([_lowp_attention(*[t[a:b].transpose(0, 1)[None] for t in (q, k, v)])[0]
                      .transpose(0, 1) for a, b in zip(bounds[:-1], bounds[1:])])


def _within_2x(fn, ref_fn, lowp_fn, inputs, names=("out", "dq", "dk", "dv")):
    """kernel (bf16) vs the fp32 reference, against torch's own bf16 computation of the same."""
    out = fn(*inputs)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs]
    out32 = ref_fn(*inputs32)
    grads32 = torch.autograd.grad(out32, inputs32, dout.float())
    out_bf = lowp_fn(*inputs)
    grads_bf = torch.autograd.grad(out_bf, inputs, dout)
    for name, a, b, c in zip(names, (out, *grads), (out_bf, *grads_bf), (out32, *grads32)):
        assert torch.isfinite(a).all(), name
        assert_within_2x(a, b, c, name=name, floor=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,N,D", [(64, 24, 257, 64), (16, 24, 1025, 64), (256, 24, 50, 64),
                                     (4, 16, 300, 72)])
def test_gpu_dense_bf16(B, H, N, D, seed):
    q, k, v = _qkv(B, H, N, D, dtype=torch.bfloat16, device="cuda")
    _within_2x(lambda q, k, v: ops.attention(q, k, v, backend="triton"), R.attention,
               _lowp_attention, [q, k, v])


@pytest.mark.gpu
def test_gpu_key_padding_bf16(seed):
    B, H, N, D = 32, 16, 77, 64
    q, k, v = _qkv(B, H, N, D, dtype=torch.bfloat16, device="cuda")
    lengths = torch.randint(1, N + 1, (B,), device="cuda")
    mask = torch.arange(N, device="cuda")[None] >= lengths[:, None]
    _within_2x(lambda q, k, v: ops.attention(q, k, v, key_padding_mask=mask, backend="triton"),
               lambda q, k, v: R.attention(q, k, v, key_padding_mask=mask),
               lambda q, k, v: _lowp_attention(q, k, v, key_padding_mask=mask), [q, k, v])


@pytest.mark.gpu
def test_gpu_varlen_multicrop_bf16(seed):
    """2 global crops (257 tokens) and 8 local crops (50 tokens) of 8 images, one launch."""
    H, D = 24, 64
    lengths = [257] * 16 + [50] * 64
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    q, k, v = _qkv(int(cu[-1]), H, D, dtype=torch.bfloat16, device="cuda")
    _within_2x(lambda q, k, v: ops.attention_varlen(q, k, v, cu, max_seqlen=257, backend="triton"),
               lambda q, k, v: R.attention_varlen(q, k, v, cu),
               lambda q, k, v: _lowp_varlen(q, k, v, cu), [q, k, v])
