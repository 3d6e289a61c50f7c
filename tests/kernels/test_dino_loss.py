"""prototype_cross_entropy: the Triton kernels (interpreter) and the chunked reference against naive.py.

Every check compares the loss, the center statistic and the gradients for student_z, student_v and
student_g with the full-materialisation truth, on fresh random inputs with awkward shapes: K not a
multiple of the K-block, odd row counts, zero-weight rows, several student rows per teacher row.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from fasttips.kernels import prototype_cross_entropy
from fasttips.kernels.dino_loss import naive, reference
from tooling import gate_dino_loss as hopper_gate
from tooling.numerics import TOLERANCES, assert_within_2x

CENTERINGS = ["softmax", "sinkhorn_knopp"]


def make_problem(S=45, T=15, K=1000, d=24, pairing="many_to_one", device="cpu", dtype=torch.float32,
                 zero_weights=3):
    """Random L2-normalised features, weight-norm parameters, a pairing and weights (some zero)."""
    if pairing == "one_to_one":                   # iBOT++: every patch row has its own teacher row
        T = S
        pairs = torch.randperm(S)
    else:                                         # DINO: several student views per teacher row
        pairs = torch.randint(0, T, (S,))
    weights = torch.rand(S) / S
    weights[torch.randperm(S)[:zero_weights]] = 0.0
    p = dict(
        student_z=F.normalize(torch.randn(S, d), dim=1),
        student_v=torch.randn(K, d),
        student_g=torch.rand(K) + 0.5,
        teacher_z=F.normalize(torch.randn(T, d), dim=1),
        teacher_v=torch.randn(K, d),
        teacher_g=torch.rand(K) + 0.5,
        pairs=pairs,
        weights=weights,
        center=0.1 * torch.randn(K),
    )
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in p.items()}


def run(fn, problem, **kwargs):
    """(loss, center_stat, d student_z, d student_v, d student_g) of one call."""
    leaves = {k: problem[k].detach().clone().requires_grad_() for k in ("student_z", "student_v", "student_g")}
    args = dict(problem, **leaves)
    loss, center_stat = fn(**args, **kwargs)
    loss.backward()
    return (loss.detach(), center_stat, leaves["student_z"].grad, leaves["student_v"].grad,
            leaves["student_g"].grad)


def assert_matches(actual, expected, dtype=torch.float32):
    atol, rtol = TOLERANCES[dtype]
    for name, a, e in zip(("loss", "center_stat", "grad student_z", "grad student_v", "grad student_g"),
                          actual, expected):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        # atol relative to the tensor's scale: each entry is a sum over ~K or ~S products.
        scale = e.abs().amax().clamp(min=1.0).item() if e.numel() else 1.0
        torch.testing.assert_close(a.float(), e.float(), atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------
# Parity on CPU (fp32): the interpreter runs the Triton kernels; "reference" is the chunked PyTorch
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("centering", CENTERINGS)
@pytest.mark.parametrize("pairing", ["many_to_one", "one_to_one"])
def test_parity_with_naive(seed, backend, centering, pairing):
    problem = make_problem(pairing=pairing, S=45 if pairing == "many_to_one" else 37)
    kwargs = dict(student_temp=0.1, teacher_temp=0.04, centering=centering)
    expected = run(naive.prototype_cross_entropy, problem, **kwargs)
    actual = run(prototype_cross_entropy, problem, backend=backend, **kwargs)
    assert_matches(actual, expected)


def test_triton_k_multiple_of_the_block(seed):
    """K a multiple of every K-block: the kernels drop their per-element K masks (EVEN_K)."""
    problem = make_problem(S=21, T=8, K=256, d=32)
    expected = run(naive.prototype_cross_entropy, problem)
    assert_matches(run(prototype_cross_entropy, problem, backend="triton"), expected)


@pytest.mark.parametrize("K", [1000, 1024])
def test_triton_split_k_slices_merge_exactly(seed, K):
    """Few rows: the prototypes are split into slices (3 here) whose statistics the host merges."""
    from fasttips.kernels.dino_loss import triton as dino_triton
    problem = make_problem(S=19, T=6, K=K, d=16)
    for centering in CENTERINGS:
        expected = run(naive.prototype_cross_entropy, problem, centering=centering)
        assert_matches(run(dino_triton.prototype_cross_entropy, problem, centering=centering, k_splits=3),
                       expected)


# ------------------------------------------------------------------------------------------------
# The opt-in dS slab backward (backward="slab"): same numbers as the fused backward
# ------------------------------------------------------------------------------------------------
def run_triton_with_backward(mode, problem, **kwargs):
    from fasttips.kernels.dino_loss import triton as dino_triton
    return run(dino_triton.prototype_cross_entropy, problem, backward=mode, **kwargs)


@pytest.mark.parametrize("centering", CENTERINGS)
@pytest.mark.parametrize("pairing", ["many_to_one", "one_to_one"])
def test_slab_backward_matches_fused_and_naive(seed, centering, pairing):
    """K = 1000 (a partial K-block), odd row counts, zero-weight rows, and a slab budget of one row
    block so that the chunk loop runs twice (45 / 37 rows in chunks of 32)."""
    from fasttips.kernels.dino_loss import triton as dino_triton
    problem = make_problem(pairing=pairing, S=45 if pairing == "many_to_one" else 37, K=1000)
    assert dino_triton.slab_rows(1000, 4, slab_bytes=1) < problem["student_z"].shape[0]
    kwargs = dict(student_temp=0.1, teacher_temp=0.04, centering=centering)
    expected = run(naive.prototype_cross_entropy, problem, **kwargs)
    slab = run_triton_with_backward("slab", problem, slab_bytes=1, **kwargs)
    fused = run_triton_with_backward("fused", problem, slab_bytes=1, **kwargs)
    assert_matches(slab, expected)
    assert_matches(slab, fused)
    zero_rows = problem["weights"] == 0
    assert torch.count_nonzero(slab[2][zero_rows]) == 0


@pytest.mark.parametrize("k_tiles", [1, 3])
@pytest.mark.parametrize("K", [1024, 1000])
def test_slab_kernel_tiles_per_program(seed, k_tiles, K):
    """One tile per program and a loop of 3 (whose last program runs past K); K a multiple of the
    block (EVEN_K, unmasked loads and stores) or not; chunk = 2 row blocks, so a partial last chunk."""
    problem = make_problem(S=71, T=20, K=K, d=16)
    expected = run(naive.prototype_cross_entropy, problem, centering="softmax")
    assert_matches(run_triton_with_backward("slab", problem, centering="softmax", slab_bytes=64 * K * 4,
                                            interpret_k_tiles=k_tiles), expected)


def test_slab_chunks_are_sized_by_bytes():
    from fasttips.kernels.dino_loss import triton as dino_triton
    align = dino_triton.INTERPRET_CONFIG["BLOCK_M"]      # the interpreter's row block (128 on GPU)
    K, budget = 65536, dino_triton.SLAB_BYTES
    rows = dino_triton.slab_rows(K, 2)
    assert rows % align == 0 and rows * K * 2 <= budget < (rows + align) * K * 2
    assert dino_triton.slab_rows(10**9, 2) == align      # at least one row block, whatever the budget


# ------------------------------------------------------------------------------------------------
# The chunked path (backward="chunked"): cuBLAS products on row chunks + one Triton row kernel
# ------------------------------------------------------------------------------------------------
def with_features(problem, dtype):
    """The same problem with student and teacher features in ``dtype`` (the head stays fp32, as in
    training); the naive truth runs on the fp32 features."""
    return dict(problem, student_z=problem["student_z"].to(dtype), teacher_z=problem["teacher_z"].to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("centering", CENTERINGS)
@pytest.mark.parametrize("pairing", ["many_to_one", "one_to_one"])
def test_chunked_path_matches_naive(seed, centering, pairing, dtype):
    """T = 50 / 37 student rows (odd), K = 1000 (not a multiple of the interpreter's 256-wide block),
    zero-weight rows, and a budget of 16 rows per chunk: 4 / 3 chunks, the last one partial, and the
    row kernel's last group of 4 rows partial (2 / 1 rows). fp16: the slabs and dS are fp16 (as bf16 on
    a GPU; the interpreter gets bf16 wrong), so the tolerance is fp16's."""
    from fasttips.kernels.dino_loss import chunked
    S = 50 if pairing == "many_to_one" else 37
    problem = make_problem(pairing=pairing, S=S, T=15, K=1000)
    itemsize = torch.finfo(dtype).bits // 8
    budget = 16 * 2 * 1000 * itemsize
    assert chunked.chunk_rows(1000, itemsize, budget) == 16 < S
    assert S % 16 % chunked.INTERPRET_CONFIG["ROWS"]
    kwargs = dict(student_temp=0.1, teacher_temp=0.04, centering=centering)
    expected = run(naive.prototype_cross_entropy, problem, **kwargs)
    problem = with_features(problem, dtype)
    teacher = {k: problem[k].clone() for k in ("teacher_z", "teacher_v", "teacher_g", "center")}
    actual = run_triton_with_backward("chunked", problem, chunked_bytes=budget, **kwargs)
    assert actual[2].dtype == dtype
    assert_matches(actual, expected, dtype)
    zero_rows = problem["weights"] == 0
    assert torch.count_nonzero(actual[2][zero_rows]) == 0
    for k, v in teacher.items():                  # the teacher's inputs are read, never written
        assert torch.equal(problem[k], v), k


@pytest.mark.parametrize("K", [1024, 77])
def test_chunked_path_block_edges_and_chunk_sizes(seed, K):
    """K a multiple of the block (EVEN_K, unmasked loads/stores) or smaller than one block; one-row
    chunks and one chunk for everything give the same numbers."""
    problem = make_problem(S=9, T=4, K=K, d=16)
    expected = run(naive.prototype_cross_entropy, problem, centering="sinkhorn_knopp")
    for budget in (1, 1 << 30):
        assert_matches(run_triton_with_backward("chunked", problem, centering="sinkhorn_knopp",
                                                chunked_bytes=budget), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_chunked_path_without_grad_skips_the_gradient(seed, dtype):
    """No input needs a gradient (evaluation): the same loss, a loss without grad_fn, no dS pass
    (the student logits are left as computed: nothing is written over them)."""
    from fasttips.kernels.dino_loss import triton as dino_triton
    problem = make_problem(S=13, T=5, K=300, d=16)
    expected = naive.prototype_cross_entropy(**problem)[0]
    with torch.no_grad():
        loss, _ = dino_triton.prototype_cross_entropy(**with_features(problem, dtype), backward="chunked",
                                                      chunked_bytes=4 * 2 * 300 * 4)
    assert loss.grad_fn is None
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(loss, expected, atol=atol * expected.abs().item(), rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dw_accumulation_off_cuda(seed, dtype):
    """The slab and chunked paths' dW += dSᵀ·z into fp32, on the CPU (the CUDA addmm is a -m gpu test)."""
    from fasttips.kernels.dino_loss.common import accumulate_dw_
    dw, ds, z = torch.randn(70, 24), torch.randn(33, 70).to(dtype), torch.randn(33, 24).to(dtype)
    expected = dw + ds.double().t().mm(z.double()).float()
    out = accumulate_dw_(dw, ds, z)
    assert out is dw and dw.dtype == torch.float32
    torch.testing.assert_close(dw, expected, atol=1e-2 if dtype == torch.float16 else 1e-5, rtol=1e-3)


def test_chunked_path_scales_its_stored_gradient_by_grad_output(seed):
    """The gradient is formed in the forward; backward multiplies it by grad_output (here 2.5)."""
    problem = make_problem(S=11, T=4, K=200, d=16)
    once = run_triton_with_backward("chunked", problem)
    leaves = {k: problem[k].detach().clone().requires_grad_() for k in ("student_z", "student_v", "student_g")}
    from fasttips.kernels.dino_loss import triton as dino_triton
    loss, _ = dino_triton.prototype_cross_entropy(**dict(problem, **leaves), backward="chunked")
    (2.5 * loss).backward()
    for name, a, e in zip(("student_z", "student_v", "student_g"), (leaves[k].grad for k in leaves), once[2:]):
        torch.testing.assert_close(a, 2.5 * e, msg=lambda m: f"{name}: {m}")


def test_chunked_rows_are_sized_by_bytes():
    from fasttips.kernels.dino_loss import chunked
    assert chunked.chunk_rows(1000, 4, 10 * 2 * 1000 * 4 + 1) == 10
    assert chunked.chunk_rows(10**9, 2) >= 1
    with pytest.raises(ValueError, match="chunk_bytes must be > 0"):
        chunked.chunk_rows(100, 2, 0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_backward_argument_rejects_unknown_values(backend):
    problem = make_problem(S=5, T=3, K=70, d=8)
    with pytest.raises(ValueError, match=r"backward='fast' is not allowed.*\['fused', 'slab', 'chunked'\]"):
        run(prototype_cross_entropy, problem, backend=backend, backward="fast")


def test_the_dispatch_sends_inputs_the_compiled_kernels_cannot_take_to_the_reference():
    """One place decides (fasttips.kernels._backend.use_triton): fp32 features or d > 256 on a GPU run
    the reference with a warning, even when Triton is asked for; the interpreter takes anything."""
    import warnings

    from fasttips.kernels import _backend
    from fasttips.kernels.dino_loss import common

    fp32, bf16_wide = torch.zeros(2, 8), torch.zeros(2, 512, dtype=torch.bfloat16)
    assert "bf16/fp16" in common.unsupported_on_gpu(fp32, interpreting=False)
    assert "d=512 > 256" in common.unsupported_on_gpu(bf16_wide, interpreting=False)
    assert common.unsupported_on_gpu(torch.zeros(2, 8, dtype=torch.bfloat16), interpreting=False) is None
    assert common.unsupported_on_gpu(fp32, interpreting=True) is None
    if _backend.interpreting():
        reason = "a reason only this test gives"
        with pytest.warns(UserWarning, match=f"op_x: {reason}; running the chunked PyTorch reference"):
            assert not _backend.use_triton(fp32, backend="triton", op="op_x", unsupported=lambda i: reason)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _backend.use_triton(fp32, backend="triton", op="op_x", unsupported=lambda i: None)


def test_reference_chunks_are_invisible(seed):
    """One-row chunks, odd chunks and one big chunk give the same numbers (chunks are sized by bytes)."""
    problem = make_problem(S=23, T=9, K=300, d=16)
    expected = run(naive.prototype_cross_entropy, problem, centering="sinkhorn_knopp")
    for chunk_bytes in (1, 7 * 5 * 4 * 300, 1 << 30):
        actual = run(reference.prototype_cross_entropy, problem, centering="sinkhorn_knopp",
                     chunk_bytes=chunk_bytes)
        assert_matches(actual, expected)
    assert reference.rows_per_chunk(65536, 256 * 2**20) == 256 * 2**20 // (5 * 4 * 65536)


def test_zero_weight_rows_get_zero_gradient(seed):
    problem = make_problem(S=20, T=7, K=200, d=16, zero_weights=0)
    problem["weights"][:5] = 0.0
    _, _, grad_z, _, _ = run(prototype_cross_entropy, problem, backend="triton")
    assert torch.count_nonzero(grad_z[:5]) == 0
    assert torch.count_nonzero(grad_z[5:]) > 0


def test_center_is_ignored_by_sinkhorn_and_used_by_softmax(seed):
    problem = make_problem(S=12, T=5, K=130, d=16)
    shifted = dict(problem, center=problem["center"] + torch.randn_like(problem["center"]))
    for backend in ("triton", "reference"):
        same = [prototype_cross_entropy(**p, centering="sinkhorn_knopp", backend=backend)[0]
                for p in (problem, shifted)]
        torch.testing.assert_close(same[0], same[1])
        moved = [prototype_cross_entropy(**p, centering="softmax", backend=backend)[0] for p in (problem, shifted)]
        assert not torch.allclose(moved[0], moved[1])


def without_rows(problem):
    """The same prototypes with no student and no teacher row (masked-only iBOT, no masked patch)."""
    return dict(problem, **{k: problem[k][:0] for k in ("student_z", "teacher_z", "pairs", "weights")})


@pytest.mark.parametrize("centering", CENTERINGS)
@pytest.mark.parametrize("backend", ["triton", "reference", "naive"])
def test_no_rows_give_a_zero_loss_and_a_zero_center_stat(seed, backend, centering):
    """A mean over zero teacher rows is NaN; the op returns zeros instead (and a zero loss whose
    gradient is zero), so a rank without rows can still run it."""
    problem = without_rows(make_problem(S=6, T=4, K=130, d=16))
    fn = naive.prototype_cross_entropy if backend == "naive" else prototype_cross_entropy
    kwargs = {} if backend == "naive" else dict(backend=backend)
    loss, stat, grad_z, grad_v, grad_g = run(fn, problem, centering=centering, **kwargs)
    assert loss.item() == 0.0 and grad_z.shape == (0, 16)
    assert stat.shape == (130,) and stat.dtype == torch.float32 and torch.count_nonzero(stat) == 0
    assert torch.count_nonzero(grad_v) == 0 and torch.count_nonzero(grad_g) == 0


@pytest.mark.parametrize("bad, message", [
    (dict(pairs=torch.tensor([0, 1, 99])), "pairs must index teacher rows"),
    (dict(pairs=torch.tensor([0.0, 1.0, 2.0])), "pairs must be an integer tensor"),
    (dict(weights=torch.ones(4)), "weights must be [S]"),
    (dict(centering="sinkhorn"), "centering='sinkhorn' is not allowed"),
    (dict(teacher_temp=0.0), "teacher_temp must be > 0"),
    (dict(student_v=torch.randn(10, 5)), "student_v must be [K, 8]"),
    (dict(center=torch.zeros(3)), "center must have K=10 elements"),
    (dict(centering="sinkhorn_knopp", sk_iterations=0), "sk_iterations must be ≥ 1"),
])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bad_arguments_are_named(bad, message, backend):
    args = dict(student_z=torch.randn(3, 8), student_v=torch.randn(10, 8), student_g=torch.ones(10),
                teacher_z=torch.randn(4, 8), teacher_v=torch.randn(10, 8), teacher_g=torch.ones(10),
                pairs=torch.tensor([0, 1, 3]), weights=torch.ones(3))
    args.update(bad)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        prototype_cross_entropy(**args, backend=backend)


# ------------------------------------------------------------------------------------------------
# Distributed Sinkhorn-Knopp: 2 gloo ranks, each with its own teacher rows
# ------------------------------------------------------------------------------------------------
def _sk_rank(rank, world, init_file, problems, expected_total, backends):
    import torch.distributed as dist
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        problem = problems[rank]
        local_naive = run(naive.prototype_cross_entropy, problem, centering="sinkhorn_knopp")
        for backend in backends:
            actual = run(prototype_cross_entropy, problem, centering="sinkhorn_knopp", backend=backend)
            assert_matches(actual, local_naive)
            total = actual[0].clone()
            dist.all_reduce(total)                  # Σ over ranks of the local losses
            torch.testing.assert_close(total, expected_total, atol=1e-5 * expected_total.abs().item(), rtol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rank1_rows", [True, False], ids=["both_ranks_have_rows", "rank1_has_none"])
def test_sinkhorn_row_sums_across_two_gloo_ranks(seed, tmp_path, rank1_rows):
    """SK over 2 ranks' teacher rows equals SK over all rows in one process, for both backends. A rank
    without rows still joins every all-reduce (else the other rank hangs) and adds nothing to the
    normalisation: rank 0 then gets the single-process SK over its own rows."""
    problems = [make_problem(S=10 + r, T=6 + r, K=150, d=16) for r in range(2)]
    if not rank1_rows:
        problems[1] = without_rows(problems[1])
    # One process holding both ranks' rows: same loss as the sum of the two distributed ones.
    whole = dict(problems[0])
    for key in ("student_z", "teacher_z", "weights"):
        whole[key] = torch.cat([p[key] for p in problems])
    whole["pairs"] = torch.cat([problems[0]["pairs"], problems[1]["pairs"] + problems[0]["teacher_z"].shape[0]])
    expected_total = naive.prototype_cross_entropy(**whole, centering="sinkhorn_knopp")[0]
    for p in problems[1:]:   # the head is replicated: every rank holds the same prototypes
        for key in ("student_v", "student_g", "teacher_v", "teacher_g", "center"):
            p[key] = problems[0][key]
    torch.multiprocessing.spawn(_sk_rank, args=(2, str(tmp_path / "pg"), problems, expected_total,
                                                ("reference", "triton")), nprocs=2, join=True)


# ------------------------------------------------------------------------------------------------
# The custom ops (torch.library) and torch.compile
# ------------------------------------------------------------------------------------------------
def op_inputs(seed_problem, grad=True):
    """The custom ops' inputs for a small problem: features and head as the Triton path passes them."""
    from fasttips.kernels.dino_loss.common import weight_normed
    p = seed_problem
    z_s = p["student_z"].clone().requires_grad_(grad)
    w_s = weight_normed(p["student_v"], p["student_g"]).detach().contiguous().requires_grad_(grad)
    w_t = (weight_normed(p["teacher_v"], p["teacher_g"]) / 0.04).contiguous()    # τ_t = 0.04 folded in
    bias = (-p["center"] / 0.04).contiguous()
    return (z_s, w_s, p["teacher_z"], w_t, bias, p["pairs"], p["weights"], 0.1)


def _op_cases():
    from fasttips.kernels.dino_loss import chunked as C, triton as T
    budget = 4 * 2 * 70 * 4        # 4 rows per chunk: 3 chunks for 9 rows
    return {
        "fused": lambda p: (T.prototype_ce_fused, op_inputs(p) + ("fused", T.SLAB_BYTES, None, 2)),
        "slab": lambda p: (T.prototype_ce_fused, op_inputs(p) + ("slab", 1, None, 2)),
        "fused_backward": lambda p: (T.prototype_ce_fused_backward, _fused_backward_inputs(p)),
        "chunked": lambda p: (C.prototype_ce_chunked, op_inputs(p) + (budget, True, True)),
        "chunked_no_grad": lambda p: (C.prototype_ce_chunked, op_inputs(p, grad=False) + (budget, False, False)),
        "prototype_lse": lambda p: (T.prototype_lse, (p["teacher_z"], op_inputs(p)[3], torch.randn(4), 1.0)),
        "token_lse": lambda p: (T.token_lse, (p["teacher_z"], op_inputs(p)[3], torch.randn(70), 1.0)),
    }


def _fused_backward_inputs(p):
    from fasttips.kernels.dino_loss import triton as T
    inputs = tuple(x.detach() if torch.is_tensor(x) else x for x in op_inputs(p))
    _, lse_s, lse_t = T.prototype_ce_fused(*inputs, "fused", T.SLAB_BYTES, None, 2)
    return (torch.tensor(1.5),) + inputs[:7] + (lse_s, lse_t) + inputs[7:] + ("fused", T.SLAB_BYTES, None, 2)


@pytest.mark.parametrize("case", ["fused", "slab", "fused_backward", "chunked", "chunked_no_grad", "prototype_lse",
                                  "token_lse"])
def test_custom_ops_pass_opcheck(seed, case):
    """Schema, fake (shapes under FakeTensor and dynamic shapes), autograd registration and the AOT
    dispatch of every prototype-CE custom op (the kernels run in the interpreter): K = 70, 9 rows."""
    op, args = _op_cases()[case](make_problem(S=9, T=4, K=70, d=16))
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backward, centering", [("fused", "softmax"), ("fused", "sinkhorn_knopp"),
                                                 ("slab", "softmax"), ("chunked", "sinkhorn_knopp")])
def test_torch_compile_fullgraph_matches_eager(seed, backward, centering):
    """The whole loss under torch.compile(fullgraph=True) with the Triton path (interpreter): one graph
    around the custom ops (before they existed Dynamo traced into the kernel launch and failed), the
    same loss, center statistic and gradients as eager."""
    problem = make_problem(S=9, T=4, K=70, d=16)

    def loss_fn(**kwargs):
        return prototype_cross_entropy(**kwargs, backend="triton", backward=backward, centering=centering)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    for a, e in zip(run(compiled, problem), run(loss_fn, problem)):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_changing_teacher_temperature_does_not_recompile(seed, backend):
    """The teacher temperature changes every step of its warm-up. Compiled, the loss takes it as a graph
    input (one recompile, from the first value to a symbolic one), not as a constant baked into a new
    graph per value (which, past torch._dynamo's recompile limit, would silently run eager). The
    Triton path's custom ops never take it: it is folded into the teacher's prototypes."""
    from torch._dynamo.utils import counters
    problem = make_problem(S=9, T=4, K=70, d=16)

    def loss_fn(teacher_temp):
        return prototype_cross_entropy(**problem, teacher_temp=teacher_temp, backend=backend,
                                       centering="sinkhorn_knopp")[0]

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    for temp in (0.04, 0.045, 0.05, 0.055):
        torch.testing.assert_close(compiled(temp), loss_fn(temp), atol=1e-6, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2


# ------------------------------------------------------------------------------------------------
# Hopper compile gate: every kernel at every launch configuration, bf16, bottleneck 256
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hopper_reports():
    pytest.importorskip("triton")
    return hopper_gate.compile_all()      # all compiles at once, in worker processes


@pytest.mark.parametrize("case", hopper_gate.cases(), ids=lambda c: f"{c[0].strip('_')}-{c[1]}")
def test_hopper_compile_gate(case, hopper_reports):
    report = hopper_reports[case]
    if isinstance(report, Exception):
        raise report
    print(report.summary())   # registers, shared memory, CTAs/SM, HGMMA: shown with -s or on failure
    matmul = case[0] not in hopper_gate.NO_MATMUL      # the row kernel has no tl.dot: no HGMMA to require
    report.check(matmul=matmul)      # grad_w included: no serialised wgmma in any kernel (NOTES.md)


# ------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backward", ["fused", "slab", "chunked"])
@pytest.mark.parametrize("centering", CENTERINGS)
@pytest.mark.parametrize("pairing", ["many_to_one", "one_to_one"])
def test_cuda_bf16_within_2x_of_torch(seed, backward, centering, pairing):
    """bf16 features, fp32 head parameters: kernel error ≤ 2 × (bf16-autocast torch error) vs fp32.
    The slab backward and the chunked path run in 256-row chunks, so dW sums several bf16-rounded chunk
    products."""
    from fasttips.kernels.dino_loss import triton as dino_triton
    problem = make_problem(S=1000 if pairing == "one_to_one" else 700, T=100, K=4097, d=256, pairing=pairing,
                           device="cuda")
    kwargs = dict(centering=centering, teacher_temp=0.04, student_temp=0.1)
    ref32 = run(naive.prototype_cross_entropy, problem, **kwargs)
    low = dict(problem, student_z=problem["student_z"].bfloat16(), teacher_z=problem["teacher_z"].bfloat16())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch_bf16 = run(naive.prototype_cross_entropy, low, **kwargs)
    kernel = run(dino_triton.prototype_cross_entropy, low, backward=backward, slab_bytes=256 * 4097 * 2,
                 chunked_bytes=2 * 256 * 4097 * 2, **kwargs)
    names = ("loss", "center_stat", "grad student_z", "grad student_v", "grad student_g")
    for name, k, t, r in zip(names, kernel, torch_bf16, ref32):
        assert torch.isfinite(k).all(), name
        assert_within_2x(k, t, r, name=name, floor=1e-5 * r.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_dw_accumulates_in_fp32_without_a_product_tensor(seed, dtype):
    """On CUDA, dW += dSᵀ·z is one addmm into the fp32 accumulator (out_dtype=float32): exact to an
    fp32-accumulated product (no 16-bit rounding of the chunk's product), and no [K × d] temporary."""
    from fasttips.kernels.dino_loss.common import accumulate_dw_
    K, d, C = 8192, 256, 1024
    dw = torch.randn(K, d, device="cuda")
    ds, z = torch.randn(C, K, device="cuda").to(dtype), torch.randn(C, d, device="cuda").to(dtype)
    expected = dw + ds.float().t() @ z.float()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    accumulate_dw_(dw, ds, z)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < K * d * 2, f"{extra} B allocated: a [K × d] product tensor was made"
    # fp32 accumulation of 1024 products: far tighter than one bf16 rounding of the sum (~4e-3 relative)
    torch.testing.assert_close(dw, expected, atol=1e-3 * expected.abs().max().item(), rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backward", ["fused", "chunked"])
def test_cuda_compiled_loss_matches_eager(seed, backward):
    """The custom ops under torch.compile(fullgraph=True) with inductor and the compiled kernels: the
    same loss and gradients as eager (bf16 features; inductor may fuse the weight norm differently)."""
    problem = make_problem(S=700, T=100, K=4097, d=256, device="cuda")
    low = dict(problem, student_z=problem["student_z"].bfloat16(), teacher_z=problem["teacher_z"].bfloat16())

    def loss_fn(**kwargs):
        return prototype_cross_entropy(**kwargs, backend="triton", backward=backward, centering="sinkhorn_knopp")

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    for a, e in zip(run(compiled, low), run(loss_fn, low)):
        torch.testing.assert_close(a.float(), e.float(), atol=2e-2 * e.abs().max().clamp(min=1e-3).item(),
                                   rtol=2e-2)


@pytest.mark.gpu
def test_cuda_fp32_takes_the_reference_exactly(seed):
    problem = make_problem(S=300, T=50, K=2000, d=256, device="cuda")
    expected = run(naive.prototype_cross_entropy, problem, centering="sinkhorn_knopp")
    with pytest.warns(UserWarning, match="bf16/fp16"):
        actual = run(prototype_cross_entropy, problem, backend="triton", centering="sinkhorn_knopp")
    assert_matches(actual, expected)
