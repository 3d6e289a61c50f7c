"""Every attention path that measured dispatch may pick (``VARIANTS``) against the PyTorch reference.

The paths: the pointer kernels (forward; dQ + dK/dV backward), the TMA forward (plain and
warp-specialised), the short-sequence TMA forward (N ≤ 64), and the one-pass backward (dQ by fp32
atomics). Under TRITON_INTERPRET=1 each runs in fp32 and fp16, values and all three gradients, at
N = 50, 64, 65, 130, 257 (1025 for the TMA paths), with key padding and with packed sequences of odd
lengths. fp32 is held to tight tolerances; fp16 to flash-attn's 2× rule against torch's own fp16
computation. (The interpreter gets bf16 wrong, triton-lang/triton#11584: bf16 runs under ``-m gpu``.)
The custom ops pass ``torch.library.opcheck`` on every path, and a block compiled with
``fullgraph=True`` gives eager's gradients on every path.
"""
from __future__ import annotations

import pytest
import torch

from fasttips.kernels import _backend
from fasttips.kernels.attention import reference as R
from fasttips.kernels.attention import triton as T
from tooling.numerics import assert_within_2x

interpreter = pytest.mark.skipif(not _backend.interpreting(), reason="needs TRITON_INTERPRET=1")

# Between them these three run every kernel: pointer / TMA / warp-specialised forward, two-pass and
# one-pass backward. The other variants are combinations of the same kernels (checked once each).
MAIN = ("fasttips", "fasttips-tma", "fasttips-ws")
DTYPES = (torch.float32, torch.float16)
BLOCKS_32 = T._cfg(32, 32, 2, 4, 1)      # N = 50: a full block and two narrow key steps; N = 130: four + one
BLOCKS_64 = T._cfg(64, 64, 1, 4, 1)      # quicker at N = 257 (one narrow key step past 256)


def _lowp_attention(q, k, v, key_padding_mask=None):
    """torch attention in the inputs' precision (matmuls in it, softmax in fp32): the 2× rule's yardstick."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype), v)


def _lowp_varlen(q, k, v, bounds):
    return torch.cat([_lowp_attention(*[t[a:b].transpose(0, 1)[None] for t in (q, k, v)])[0].transpose(0, 1)
                      for a, b in zip(bounds[:-1], bounds[1:])])


def _check(fn, ref_fn, lowp_fn, inputs, seed, what):
    """fn's output and gradients against the fp32 reference: tight in fp32, the 2× rule in fp16."""
    out = fn(*inputs)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs]
    out32 = ref_fn(*inputs32)
    grads32 = torch.autograd.grad(out32, inputs32, dout.float())
    lowp = None
    if inputs[0].dtype != torch.float32:
        out_lp = lowp_fn(*inputs)
        lowp = (out_lp, *torch.autograd.grad(out_lp, inputs, dout))
    for i, (name, a, ref) in enumerate(zip(("out", "dq", "dk", "dv"), (out, *grads), (out32, *grads32))):
        label = f"{what} {name} (seed {seed})"
        assert torch.isfinite(a).all(), f"{label}: non-finite values"
        if lowp is None:
            torch.testing.assert_close(a, ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{label}: {m}")
        else:
            assert_within_2x(a, lowp[i], ref, name=label, floor=1e-4)
    return out, grads


def _dense(variant, N, dtype, seed, B=1, H=None, D=64, mask=None, blocks=None, short_bwd_max=0):
    H = H or (2 if N <= 64 else 1)        # two heads where one program takes several (N ≤ 64)
    q, k, v = [torch.randn(B, H, N, D, dtype=dtype, requires_grad=True) for _ in range(3)]
    blocks = blocks or (BLOCKS_64 if N > 200 else BLOCKS_32)
    options = dict(T.VARIANTS[variant], interpret_config=blocks, short_bwd_max=short_bwd_max)
    return _check(lambda q, k, v: T.attention(q, k, v, key_padding_mask=mask, **options),
                  lambda q, k, v: R.attention(q, k, v, key_padding_mask=mask),
                  lambda q, k, v: _lowp_attention(q, k, v, key_padding_mask=mask), [q, k, v], seed,
                  f"{variant} N={N} {dtype}")


# ------------------------------------------------------------------------------------------------
# interpreter parity
# ------------------------------------------------------------------------------------------------
@interpreter
@pytest.mark.parametrize("N", [50, 64, 65, 130, 257])
@pytest.mark.parametrize("variant", MAIN)
def test_dense_path_matches_reference(variant, N, seed):
    # short_bwd_max=0: N ≤ 64 runs the variant's own backward too, not the one-tile one
    _dense(variant, N, torch.float32, seed)


@interpreter
@pytest.mark.parametrize("N", [50, 257])
@pytest.mark.parametrize("variant", MAIN)
def test_dense_path_fp16(variant, N, seed):
    _dense(variant, N, torch.float16, seed)


@interpreter
def test_dense_path_at_1025(seed):
    """The warp-specialised forward's single masked loop and the one-pass backward at N = 1025."""
    _dense("fasttips-ws", 1025, torch.float32, seed, H=1, blocks=T._cfg(64, 128, 1, 4, 1))


@interpreter
@pytest.mark.parametrize("variant", sorted(set(T.VARIANTS) - set(MAIN)))
def test_every_other_variant_matches_reference(variant, seed):
    _dense(variant, 65, torch.float32, seed)


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("variant", MAIN)
def test_key_padding_path(variant, dtype, seed):
    B, N = 3, 77
    mask = torch.rand(B, N) < 0.4
    mask[0] = True          # all padding: rows come out 0, not NaN, and get no gradient
    mask[1] = False
    mask[2, 0] = False
    out, grads = _dense(variant, N, dtype, seed, B=B, mask=mask)
    assert out[0].abs().max() == 0 and all(g[0].abs().max() == 0 for g in grads)
    assert grads[1][2][:, mask[2]].abs().max() == 0          # padded keys get no dK


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("variant", MAIN)
def test_varlen_path_odd_lengths(variant, dtype, seed):
    """Packed sequences of odd lengths (one empty, one of 1 token) in one launch: per-segment bounds."""
    lengths, H, D = [37, 1, 0, 65, 50, 13], 1, 64
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    cu = torch.tensor(bounds, dtype=torch.int32)
    q, k, v = [torch.randn(bounds[-1], H, D, dtype=dtype, requires_grad=True) for _ in range(3)]
    options = dict(T.VARIANTS[variant], interpret_config=BLOCKS_32, short_bwd_max=0)
    _check(lambda q, k, v: T.attention_varlen(q, k, v, cu, **options),
           lambda q, k, v: R.attention_varlen(q, k, v, cu),
           lambda q, k, v: _lowp_varlen(q, k, v, bounds), [q, k, v], seed, f"{variant} varlen {dtype}")


@interpreter
@pytest.mark.parametrize("variant,D,N", [("fasttips-tma", 72, 65), ("fasttips-ws", 72, 130),
                                         ("fasttips-ws", 128, 50)])
def test_wide_head_dims(variant, D, N, seed):
    """d = 72 runs 128 wide (TMA zero-fills columns 72..127 and clips them on store); d = 128 as is."""
    _dense(variant, N, torch.float16, seed, D=D)


@interpreter
@pytest.mark.parametrize("variant", ["fasttips-tma", "fasttips-ws"])
def test_short_sequences_with_the_one_tile_backward(variant, seed):
    """The short-sequence TMA forward (several heads per program) with the one-tile backward, as
    training runs N = 50 crops; a fused-qkv view (head stride 64, token stride 3·H·64) as input."""
    B, N, H, D = 2, 50, 5, 64
    qkv = torch.randn(B, N, 3, H, D, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = T.attention(q, k, v, **T.VARIANTS[variant])
    dout = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, dout)
    ref = R.attention(q, k, v)
    (g_ref,) = torch.autograd.grad(ref, qkv, dout)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"seed {seed}: {m}")


def test_paths_fall_back_where_tma_cannot_address_the_rows():
    """A TMA row stride must be a multiple of 16 bytes: d = 17 (fp32: 68 bytes) takes the pointer
    kernels whatever is asked; a non-positive scale keeps the forward off the folded-scale kernels."""
    assert T.resolved_paths("ws", "onepass", 64, torch.bfloat16, 0.125) == ("ws", "onepass")
    assert T.resolved_paths("ws", "onepass", 72, torch.bfloat16, 0.125) == ("ws", "onepass")
    assert T.resolved_paths("tma", "onepass", 17, torch.float32, 0.125) == ("pointer", "two_pass")
    assert T.resolved_paths("ws", "onepass", 64, torch.float16, -1.0) == ("pointer", "onepass")


@interpreter
def test_fallbacks_still_match_reference(seed):
    _dense("fasttips-ws", 40, torch.float32, seed, D=17)          # d = 17: the pointer kernels
    q, k, v = [torch.randn(1, 2, 40, 64, requires_grad=True) for _ in range(3)]
    _check(lambda q, k, v: T.attention(q, k, v, scale=-0.2, **T.VARIANTS["fasttips-ws"]),
           lambda q, k, v: R.attention(q, k, v, scale=-0.2), None, [q, k, v], seed, "negative scale")


def test_unknown_paths_are_named():
    q = torch.randn(1, 1, 4, 64)
    with pytest.raises(ValueError, match=r"forward='fast' is not one of \['pointer', 'tma', 'ws'\]"):
        T.attention(q, q, q, forward="fast")
    with pytest.raises(ValueError, match=r"backward='x' is not one of"):
        T.attention_varlen(q[0].transpose(0, 1), q[0].transpose(0, 1), q[0].transpose(0, 1),
                           torch.tensor([0, 4]), backward="x")


def test_variants_are_keyword_arguments_of_both_entry_points():
    """The contract with measured dispatch: every VARIANTS entry is accepted by both functions, and
    "fasttips" names the path used before the TMA and one-pass kernels."""
    import inspect
    assert T.VARIANTS["fasttips"] == dict(forward="pointer", backward="two_pass")
    for fn in (T.attention, T.attention_varlen):
        params = inspect.signature(fn).parameters
        for name, kwargs in T.VARIANTS.items():
            assert set(kwargs) <= set(params), (fn.__name__, name)
            assert kwargs["forward"] in T.FORWARDS and kwargs["backward"] in T.BACKWARDS


# ------------------------------------------------------------------------------------------------
# custom ops: opcheck and torch.compile on every path
# ------------------------------------------------------------------------------------------------
@interpreter
@pytest.mark.parametrize("variant", MAIN)
def test_opcheck_every_path(variant):
    """torch.library.opcheck: schema, fake (meta) shapes, autograd registration, on each path (the
    forward and backward op at N = 40, dense with padding, and packed)."""
    paths = T.VARIANTS[variant]
    B, H, N, D = 2, 1, 36, 64
    q, k, v = [torch.randn(B, H, N, D, requires_grad=True) for _ in range(3)]
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1, 30:] = True
    fwd_args = (q, k, v, mask, None, N, 0.125, 0, None, paths["forward"], paths["backward"])
    torch.library.opcheck(T.flash_attention_fwd, fwd_args)
    # the backward op has no derivative of its own (no double backward): checked on plain tensors
    out, lse = (t.detach() for t in T.flash_attention_fwd(*fwd_args))
    q, k, v = (t.detach() for t in (q, k, v))
    torch.library.opcheck(T.flash_attention_bwd, (torch.randn_like(out), q, k, v, out, lse, mask, None, N,
                                                  0.125, 0, None, paths["backward"]))
    cu = torch.tensor([0, 29, 36], dtype=torch.int32)
    qp, kp, vp = [t[0].transpose(0, 1).contiguous().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(T.flash_attention_fwd, (qp, kp, vp, None, cu, 29, 0.125, 0, None,
                                                  paths["forward"], paths["backward"]))


@interpreter
@pytest.mark.parametrize("variant", MAIN)
def test_compiled_block_matches_eager_on_every_path(variant, seed):
    """A block (projection, attention, sum) compiled with fullgraph=True and aot_eager: no graph
    break, and the gradient equals eager's."""
    torch._dynamo.reset()
    paths = T.VARIANTS[variant]

    def block(x, w):
        q = k = v = (x @ w).unflatten(-1, (2, 64)).transpose(1, 2)  # [B, H, N, D]
        return T.attention(q, k, v, short_bwd_max=0, **paths).sum()

    x, w = torch.randn(2, 70, 128), torch.randn(128, 128, requires_grad=True)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    (g,) = torch.autograd.grad(compiled(x, w), w)
    (g_ref,) = torch.autograd.grad(block(x, w), w)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"seed {seed}: {m}")


# ------------------------------------------------------------------------------------------------
# GPU: every variant in bf16 at the training shapes, 2× rule
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("B,H,N,D", [(64, 24, 257, 64), (16, 24, 1025, 64), (256, 24, 50, 64),
                                     (4, 16, 300, 72), (4, 8, 200, 128)])
@pytest.mark.parametrize("variant", sorted(T.VARIANTS))
def test_gpu_variant_bf16(variant, B, H, N, D, seed):
    q, k, v = [torch.randn(B, H, N, D, dtype=torch.bfloat16, device="cuda", requires_grad=True)
               for _ in range(3)]
    _check(lambda q, k, v: T.attention(q, k, v, **T.VARIANTS[variant]), R.attention, _lowp_attention,
           [q, k, v], seed, f"{variant} N={N} D={D}")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(T.VARIANTS))
def test_gpu_variant_padding_and_multicrop_bf16(variant, seed):
    """Key padding (N = 77) and the multi-crop layer (2 × 257 + 8 × 50 tokens per image, packed)."""
    B, H, N, D = 32, 16, 77, 64
    q, k, v = [torch.randn(B, H, N, D, dtype=torch.bfloat16, device="cuda", requires_grad=True)
               for _ in range(3)]
    mask = torch.arange(N, device="cuda")[None] >= torch.randint(1, N + 1, (B, 1), device="cuda")
    _check(lambda q, k, v: T.attention(q, k, v, key_padding_mask=mask, **T.VARIANTS[variant]),
           lambda q, k, v: R.attention(q, k, v, key_padding_mask=mask),
           lambda q, k, v: _lowp_attention(q, k, v, key_padding_mask=mask), [q, k, v], seed, f"{variant} padding")
    lengths = [257] * 16 + [50] * 64
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    q, k, v = [torch.randn(bounds[-1], 24, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
               for _ in range(3)]
    _check(lambda q, k, v: T.attention_varlen(q, k, v, cu, max_seqlen=257, **T.VARIANTS[variant]),
           lambda q, k, v: R.attention_varlen(q, k, v, cu), lambda q, k, v: _lowp_varlen(q, k, v, bounds),
           [q, k, v], seed, f"{variant} multicrop")
