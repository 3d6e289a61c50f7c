"""Fused head EMA (kernels/ema/triton.py) against the reference, one ``torch._foreach_lerp_``.

The Triton kernel runs here under TRITON_INTERPRET=1 on CPU tensors: the same kernel source, the
same chunk table of relative offsets and the same striding loop as on the GPU (with a grid capped
at 3 programs, so each program takes several chunks). What the interpreter cannot show (16-byte vectorised loads, resources) is checked by
the Hopper compile gate below; speed is bench/bench_ema.py's job.

Run as a script (``torchrun --nproc_per_node 2 tests/kernels/test_ema.py``) this file is the worker of
the 2-rank FSDP2/gloo test.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch

from fasttips.kernels import ema_update_
from fasttips.kernels.ema import reference, triton as ema_triton
from tooling import gate_ema as hopper_gate
from tooling.numerics import assert_close

SMALL_BLOCK = 256  # many chunks per tensor at interpreter-friendly sizes


def _pairs(sizes, student_dtype, gen_shape=lambda n: (n,)):
    teacher = [torch.randn(gen_shape(n)) for n in sizes]
    student = [torch.randn(gen_shape(n)).to(student_dtype) for n in sizes]
    return teacher, student


def _expected(teacher, student, momentum):
    expected = [t.clone() for t in teacher]
    reference.ema_update_(expected, student, momentum)
    return expected


def _check(teacher, expected):
    for i, (t, e) in enumerate(zip(teacher, expected)):
        assert_close(t, e, msg=f"tensor {i} of shape {tuple(t.shape)}")


@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("momentum", [0.996, 0.9, 0.5, 0.2, 0.0, 1.0])
def test_parity_mixed_sizes(seed, student_dtype, momentum):
    B = SMALL_BLOCK
    sizes = [0, 1, 1000, B - 1, B, B + 1, 3 * B + 7, 0, 5, 2 * B]
    teacher, student = _pairs(sizes, student_dtype)
    student_before = [s.clone() for s in student]
    teacher_before = [t.clone() for t in teacher]
    expected = _expected(teacher, student, momentum)
    ema_triton.ema_update_(teacher, student, momentum, block=B)
    _check(teacher, expected)
    if momentum in (0.0, 1.0):  # lerp's two-sided form is exact at both ends
        ends = [s.float() for s in student] if momentum == 0.0 else teacher_before
        assert all(torch.equal(t, e) for t, e in zip(teacher, ends))
    for s, s0 in zip(student, student_before):
        assert torch.equal(s, s0), "the student must not be written"


def test_default_block_and_matrix_shapes(seed):
    shapes = [(37, 129), (1,), (0, 5), (4097,), (3, 2, 1000)]
    teacher = [torch.randn(s) for s in shapes]
    student = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    expected = _expected(teacher, student, 0.99)
    ema_update_(teacher, student, 0.99, backend="triton")  # the public op, dispatched to the kernel
    _check(teacher, expected)


@pytest.mark.parametrize("momentum_dtype", [torch.float32, torch.float64])
def test_momentum_schedule_on_device_reuses_the_plan(seed, momentum_dtype):
    teacher, student = _pairs([700, 3, 2 * SMALL_BLOCK + 1], torch.float32)
    momentum = torch.empty((), dtype=momentum_dtype)
    ema_triton.clear_cache()
    for m in (0.9, 0.95, 0.999):
        momentum.fill_(m)  # a schedule writes the device scalar in place: nothing to recompile
        expected = _expected(teacher, student, momentum)
        # fresh view objects each step, as ``DTensor.to_local()`` returns: same addresses, same plan
        ema_triton.ema_update_([t.view(t.shape) for t in teacher], student, momentum, block=SMALL_BLOCK)
        _check(teacher, expected)
    assert len(ema_triton._plans) == 1


def test_unaligned_views_and_mixed_student_dtypes(seed):
    # views at odd element offsets are not 16-byte aligned: the kernel must drop its vector hints
    t_flat, s_flat = torch.randn(3000), torch.randn(3000)
    teacher = [t_flat[1:1000], t_flat[1001:1600], torch.randn(300), torch.randn(17)]
    student = [s_flat[3:1002], s_flat[1003:1602].to(torch.bfloat16), torch.randn(300).to(torch.bfloat16),
               torch.randn(17)]
    untouched = [t_flat[0].clone(), t_flat[1000].clone(), t_flat[1600:].clone()]
    expected = _expected(teacher, student, 0.7)
    ema_triton.ema_update_(teacher, student, torch.tensor([0.7]), block=SMALL_BLOCK)
    _check(teacher, expected)
    assert torch.equal(t_flat[0], untouched[0]) and torch.equal(t_flat[1000], untouched[1])
    assert torch.equal(t_flat[1600:], untouched[2]), "no write outside the tensors"
    plan = next(reversed(ema_triton._plans.values()))
    assert len(plan.launches) == 2  # one launch per student dtype
    assert any(table.teacher_vec == 1 for _, table in plan.launches)


def test_empty_lists_and_all_empty_tensors():
    ema_triton.ema_update_([], [], 0.9)
    t = [torch.empty(0), torch.empty(0, 3)]
    ema_triton.ema_update_(t, [torch.empty(0), torch.empty(0, 3)], 0.9)


# One contract for both paths (kernels/ema/common.py): the same inputs are accepted or refused,
# with the same message, whichever backend a run dispatches to.
BACKENDS = {"triton": lambda *a: ema_triton.ema_update_(*a), "reference": lambda *a: reference.ema_update_(*a)}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("teacher, student, momentum, error, words", [
    ([torch.zeros(3, dtype=torch.bfloat16)], [torch.zeros(3)], 0.9, TypeError, "teacher[0]"),
    ([torch.zeros(3, dtype=torch.float64)], [torch.zeros(3, dtype=torch.float64)], 0.9, TypeError, "teacher[0]"),
    ([torch.zeros(3)], [torch.zeros(3, dtype=torch.float16)], 0.9, TypeError, "student[0]"),
    ([torch.zeros(3), torch.zeros(3)], [torch.zeros(3), torch.zeros(4)], 0.9, ValueError, "student[1] shape"),
    ([torch.zeros(4, 4).t()], [torch.zeros(4, 4)], 0.9, ValueError, "contiguous"),
    ([torch.zeros(4, 4)], [torch.zeros(4, 4).t()], 0.9, ValueError, "contiguous"),
    ([torch.zeros(3)], [torch.zeros(3), torch.zeros(3)], 0.9, ValueError, "1 teacher tensors vs 2"),
    ([torch.zeros(3)], [torch.zeros(3)], torch.zeros(2), ValueError, "momentum"),
    ([torch.zeros(3)], [torch.zeros(3)], 1.5, ValueError, r"momentum must be in [0, 1], got 1.5"),
    ([torch.zeros(3)], [torch.zeros(3)], -0.1, ValueError, "momentum must be in [0, 1]"),
    ([torch.zeros(3)], [torch.zeros(3)], float("nan"), ValueError, "momentum must be in [0, 1]"),
    ([torch.zeros(3)], [torch.zeros(3)], torch.tensor(2.0), ValueError, "momentum must be in [0, 1]"),
    ([], [], 1.5, ValueError, "momentum must be in [0, 1]"),
])
def test_bad_input_is_named_by_both_backends(backend, teacher, student, momentum, error, words):
    before = [t.clone() for t in teacher]
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        BACKENDS[backend](teacher, student, momentum)
    assert all(torch.equal(t, b) for t, b in zip(teacher, before)), "a refused call must not write"


def test_bad_block_is_named():
    with pytest.raises(ValueError, match="block"):
        ema_triton.ema_update_([torch.zeros(3)], [torch.zeros(3)], 0.9, block=100)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_both_backends_accept_the_same_inputs(backend, seed):
    """fp32 teachers with fp32 or bf16 students, empty tensors, float / CPU-tensor momenta at both ends."""
    for momentum in (0.0, 1.0, torch.tensor(0.25, dtype=torch.float64), torch.tensor([0.5])):
        teacher = [torch.randn(5, 3), torch.randn(0), torch.randn(7)]
        student = [torch.randn(5, 3).to(torch.bfloat16), torch.randn(0), torch.randn(7)]
        expected = [torch.lerp(t, s.float(), 1 - float(momentum)) for t, s in zip(teacher, student)]
        BACKENDS[backend](teacher, student, momentum)
        _check(teacher, expected)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_cached_plan_does_not_skip_the_checks(backend, seed):
    """Same addresses, sizes and dtypes as a cached plan, but other shapes or strides: the call is
    checked as a fresh one (before the fix the Triton path accepted the transposed teacher and
    updated the wrong elements)."""
    ema_triton.clear_cache()
    T, S = torch.randn(4, 6), torch.randn(4, 6)
    BACKENDS[backend]([T], [S], 0.5)
    before = T.clone()
    with pytest.raises(ValueError, match="contiguous"):
        BACKENDS[backend]([T.t()], [S.view(6, 4)], 0.5)
    with pytest.raises(ValueError, match="shape"):
        BACKENDS[backend]([T], [S.view(6, 4)], 0.5)
    assert torch.equal(T, before)
    # a new contiguous view of the same memory is a valid call: element for element the same update
    BACKENDS[backend]([T.view(6, 4)], [S.view(6, 4)], 0.5)
    _check([T], [torch.lerp(before, S, 0.5)])


@pytest.mark.parametrize("momentum", [0.9, torch.tensor(0.95)], ids=["float", "tensor"])
def test_custom_op_passes_opcheck(seed, momentum):
    """fasttips::ema_update_ declares that it writes the teacher list (and nothing else) and has a fake:
    torch.library.opcheck, the kernel in the interpreter."""
    teacher, student = _pairs([300, 35], torch.bfloat16)
    on_device = torch.is_tensor(momentum)
    torch.library.opcheck(ema_triton.ema_update_op, (teacher, student, momentum if on_device else None,
                                                     0.0 if on_device else momentum, SMALL_BLOCK, 4))


@pytest.mark.parametrize("momentum", [0.9, torch.tensor(0.95)], ids=["float", "tensor"])
def test_torch_compile_fullgraph_matches_eager(seed, momentum):
    """The public op under torch.compile(fullgraph=True) with the Triton path (interpreter): one graph
    around the mutating custom op (before, Dynamo traced into the launch and failed), the same update."""
    teacher, student = _pairs([300, 1000, 7], torch.bfloat16)
    expected = _expected(teacher, student, momentum)

    def update(t, s, m):
        ema_update_(t, s, m, backend="triton")

    torch._dynamo.reset()
    torch.compile(update, backend="aot_eager", fullgraph=True)(teacher, student, momentum)
    _check(teacher, expected)


@pytest.fixture(scope="module")
def hopper_reports():
    return hopper_gate.compile_all()  # in spawned workers with TRITON_INTERPRET=0, like the other ops


@pytest.mark.parametrize("case", hopper_gate.cases(), ids=lambda c: f"{c[0][1:]}-{'device' if c[1] else 'value'}")
def test_hopper_compile_gate(case, hopper_reports):
    report = hopper_reports[case]
    if isinstance(report, Exception):
        raise report
    print(report.summary())   # registers, shared memory, CTAs/SM, HGMMA: shown with -s or on failure
    report.check(matmul=False)


# ------------------------------------------------------------------------------------------------
# CUDA (run with TRITON_INTERPRET=0 on a GPU machine; skipped elsewhere)
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16])
def test_cuda_parity_head_sizes(seed, student_dtype):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("compiled-kernel test: run with TRITON_INTERPRET=0")
    B = ema_triton.BLOCK
    sizes = [0, 1, 1000, B - 1, B, B + 1, 3 * B + 7, 2048 * 1536, 65536 * 256 + 3, 65536]
    buf_t, buf_s = torch.randn(sum(sizes) + 64, device="cuda"), torch.randn(sum(sizes) + 64, device="cuda")
    # two lists: separate allocations (aligned) and views packed at odd offsets (unaligned)
    separate = [torch.randn(n, device="cuda") for n in sizes], \
        [torch.randn(n, device="cuda").to(student_dtype) for n in sizes]
    offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
    packed = [buf_t[o:o + n] for o, n in zip(offsets, sizes)], \
        [buf_s[o:o + n].to(student_dtype) for o, n in zip(offsets, sizes)]
    outside = buf_t[0].clone(), buf_t[offsets[-1] + sizes[-1]:].clone()
    for teacher, student in (separate, packed):
        for momentum in (0.996, torch.tensor(0.9, device="cuda"), 0.3):
            expected = _expected(teacher, student, momentum)
            ema_update_(teacher, student, momentum)  # auto dispatch: CUDA tensors take the kernel
            _check(teacher, expected)
    assert torch.equal(buf_t[0], outside[0]) and torch.equal(buf_t[offsets[-1] + sizes[-1]:], outside[1])


@pytest.mark.gpu
def test_cuda_graph_replays_a_momentum_schedule(seed):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("compiled-kernel test: run with TRITON_INTERPRET=0")
    teacher, student = _pairs([5000, 1, 70000], torch.float32)
    teacher, student = [t.cuda() for t in teacher], [s.cuda() for s in student]
    momentum = torch.tensor(0.5, device="cuda")
    ema_update_(teacher, student, momentum)  # compile and build the plan outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ema_update_(teacher, student, momentum)
    for m in (0.9, 0.99, 0.999):
        momentum.fill_(m)
        expected = _expected(teacher, student, m)
        graph.replay()
        _check(teacher, expected)


# ------------------------------------------------------------------------------------------------
# 2 ranks, FSDP2 on CPU with gloo: EMA on the local shards of sharded heads
# ------------------------------------------------------------------------------------------------
@pytest.mark.dist
@pytest.mark.timeout(180)
def test_fsdp2_sharded_heads_two_ranks(tmp_path):
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # so the workers import tooling
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.abspath(__file__)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert out.count("EMA-FSDP2-OK") == 2, out[-6000:]


class _Head(torch.nn.Module):
    """A DINO-style head in miniature: MLP → L2-normalised bottleneck → weight-normed prototypes.

    The prototype layer keeps its parametrisation (direction ``proto_v`` [K, d] and gain ``proto_g``
    [K]) as parameters, so the EMA acts on g and v separately (docs/loss_math.md). K is odd so the
    shards are uneven, and ``scale`` has one element so rank 1 owns an empty shard.
    """

    def __init__(self, dim=24, hidden=40, bottleneck=16, prototypes=37):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, bottleneck))
        self.proto_v = torch.nn.Parameter(torch.randn(prototypes, bottleneck))
        self.proto_g = torch.nn.Parameter(torch.rand(prototypes) + 0.5)
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        z = torch.nn.functional.normalize(self.mlp(x), dim=-1)
        w = self.proto_g[:, None] * torch.nn.functional.normalize(self.proto_v, dim=-1)
        return self.scale * z @ w.t()


def _fsdp_worker():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    student = _Head()
    teacher = copy.deepcopy(student).requires_grad_(False)  # copied before sharding: same layout
    fully_shard(student, mesh=mesh)
    fully_shard(teacher, mesh=mesh)
    names = [n for n, _ in student.named_parameters()]
    assert "proto_v" in names and "proto_g" in names
    local_sizes = {n: p.to_local().numel() for n, p in student.named_parameters()}
    if rank == 1:
        assert local_sizes["scale"] == 0, local_sizes  # the empty shard case

    torch.manual_seed(100 + rank)  # each rank moves its own shard of the student, as an optimiser would
    with torch.no_grad():
        for p in student.parameters():
            p.to_local().add_(torch.randn_like(p.to_local()))

    momentum = torch.empty(())
    for step, m in enumerate((0.9, 0.99, 0.5)):
        full_student = {n: p.full_tensor() for n, p in student.named_parameters()}
        expected = {n: torch.lerp(p.full_tensor(), full_student[n], 1 - m) for n, p in teacher.named_parameters()}
        momentum.fill_(m)
        if step == 0:   # the public op with the DTensors themselves
            ema_update_(list(teacher.parameters()), list(student.parameters()), momentum, backend="triton")
        else:           # the training-step form: local shards
            ema_update_([p.to_local() for p in teacher.parameters()],
                        [p.to_local() for p in student.parameters()], m if step == 1 else momentum,
                        backend="triton")
        for n, p in teacher.named_parameters():
            torch.testing.assert_close(p.full_tensor(), expected[n], atol=1e-6, rtol=1e-5,
                                       msg=lambda s, n=n: f"rank {rank} step {step} {n}: {s}")
    # the EMA of (g, v) is not the EMA of W = g·v/|v|: the teacher keeps the parametrisation
    assert isinstance(teacher.proto_g.to_local(), torch.Tensor)
    dist.barrier()
    print(f"EMA-FSDP2-OK rank {rank}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    _fsdp_worker()


@pytest.mark.gpu
def test_cuda_compiled_update_matches_eager(seed):
    """The custom op under torch.compile(fullgraph=True) with inductor on a GPU: the mutation of the
    teacher list reaches the caller's tensors (momentum on the device, as training passes it)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("compiled-kernel test: run with TRITON_INTERPRET=0")
    teacher = [torch.randn(n, device="cuda") for n in (5000, 1, 70000)]
    student = [torch.randn(n, device="cuda").bfloat16() for n in (5000, 1, 70000)]
    momentum = torch.tensor(0.99, device="cuda")
    expected = _expected(teacher, student, momentum)

    def update(t, s, m):
        ema_update_(t, s, m)

    torch._dynamo.reset()
    torch.compile(update, fullgraph=True)(teacher, student, momentum)
    _check(teacher, expected)

