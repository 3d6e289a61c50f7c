"""bench/profile_step.py: the name rules on recorded kernel and op names, and the trace analysis
(scopes by time nesting, kernels by External id, host gaps) on a small hand-made chrome trace."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import profile_step as ps  # noqa: E402

# (name, enclosing scopes innermost first, expected category): names as torch.profiler records them,
# CUDA kernel names from H100 traces of this step's kind, and CPU op names from a tiny-preset profile.
RECORDED = [
    # GEMMs: cuBLAS/cuBLASLt/CUTLASS kernels and the CPU aten ops
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas",
     ["aten::mm", "aten::linear"], "GEMMs"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT", ["aten::addmm"], "GEMMs"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>",
     ["aten::mm", "autograd::engine::evaluate_function: AddmmBackward0"], "GEMMs"),
    ("aten::addmm", ["aten::linear"], "GEMMs"),
    ("aten::mm", ["autograd::engine::evaluate_function: MmBackward0"], "GEMMs"),
    ("aten::convolution", ["aten::conv2d"], "GEMMs"),
    # attention: fasttips' Triton kernels, SDPA's backends, and anything inside the fasttips scope
    ("attn_fwd_kernel", ["fasttips::flash_attention_fwd", "fasttips.attention"], "attention"),
    ("attn_bwd_dq_kernel", ["fasttips::flash_attention_bwd"], "attention"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::bfloat16_t>>",
     ["aten::_flash_attention_forward"], "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", ["aten::_efficient_attention_backward"], "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0", [], "attention"),
    ("aten::_softmax", ["aten::softmax", "fasttips.attention"], "attention"),
    ("aten::bmm", ["aten::matmul", "fasttips.attention"], "attention"),
    # prototype cross-entropy: the fused kernels, the reference's ops inside the scope, its backward
    ("_forward_kernel", ["fasttips.prototype_ce"], "prototype CE"),
    ("_grad_w_kernel", ["fasttips::prototype_ce_fused_backward", "autograd::engine::evaluate_function: "
                        "GeneratedBackwardFor_fasttips_prototype_ce_fused_defaultBackward"], "prototype CE"),
    ("aten::mul", ["autograd::engine::evaluate_function: "
                   "GeneratedBackwardFor_fasttips_prototype_ce_chunked_defaultBackward"], "prototype CE"),
    ("_row_ce_kernel", ["fasttips::prototype_ce_chunked"], "prototype CE"),
    ("aten::mm", ["fasttips::prototype_ce_chunked"], "prototype CE"),
    ("_prototype_lse_kernel", ["fasttips::prototype_lse"], "prototype CE"),
    ("_token_lse_kernel", [], "prototype CE"),
    ("aten::mm", ["_ChunkedPrototypeCE", "fasttips.prototype_ce"], "prototype CE"),
    ("aten::index", ["fasttips.prototype_ce"], "prototype CE"),
    # optimiser: fused/foreach AdamW, clipping norms
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, "
     "(at::native::ADAM_MODE)1, false>>", ["aten::_fused_adamw_"], "optimiser"),
    ("aten::lerp_", ["aten::_foreach_lerp_", "Optimizer.step#AdamW.step"], "optimiser"),
    ("aten::sqrt", ["Optimizer.step#AdamW.step"], "optimiser"),
    ("aten::_foreach_norm", ["aten::linalg_vector_norm"], "optimiser"),
    # EMA
    ("_ema_chunks_kernel", ["fasttips.ema"], "EMA"),
    ("aten::_foreach_mul_", ["fasttips.ema"], "EMA"),
    # communication
    ("ncclDevKernel_AllGather_RING_LL(ncclDevComm*, unsigned long, ncclWork*)", [], "communication"),
    ("ncclKernel_ReduceScatter_RING_LL_Sum_float", ["FSDP::post_backward_reduce"], "communication"),
    ("record_param_comms", [], "communication"),
    # everything else
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>",
     ["aten::native_layer_norm"], "norms+elementwise"),
    ("triton_poi_fused_add_gelu_0", [], "norms+elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", [], "norms+elementwise"),
    ("Memcpy DtoD (Device -> Device)", [], "norms+elementwise"),
    ("aten::native_layer_norm_backward", ["autograd::engine::evaluate_function: NativeLayerNormBackward0"],
     "norms+elementwise"),
    ("aten::mul_", [], "norms+elementwise"),
]


@pytest.mark.parametrize("name,scopes,category", RECORDED, ids=[f"{c}:{n[:30]}" for n, _, c in RECORDED])
def test_classify_recorded_names(name, scopes, category):
    assert ps.classify(name, scopes) == category


def test_every_category_but_gaps_has_a_recorded_example():
    assert {c for _, _, c in RECORDED} == set(ps.CATEGORIES) - {ps.GAPS}


def _x(name, ts, dur, cat="cpu_op", tid=1, **args):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "pid": 0, "tid": tid, "args": args}


def test_analyse_a_cuda_trace():
    """Kernels take their scopes from the CPU op with the same External id; gaps = wall − union."""
    trace = {"traceEvents": [
        _x("fasttips.train_step", 0, 1000, cat="user_annotation"),
        _x("fasttips.prototype_ce", 100, 200, cat="user_annotation"),
        _x("aten::mm", 120, 10, **{"External id": 7}),
        _x("aten::mm", 400, 10, **{"External id": 8}),
        _x("Optimizer.step#AdamW.step", 600, 100, cat="user_annotation"),
        _x("aten::_fused_adamw_", 610, 20, **{"External id": 9}),
        _x("sm90_xmma_gemm_bf16", 150, 100, cat="kernel", tid=7, **{"External id": 7}),   # in the loss
        _x("sm90_xmma_gemm_bf16", 300, 200, cat="kernel", tid=7, **{"External id": 8}),   # a GEMM
        _x("multi_tensor_apply_kernel", 450, 100, cat="kernel", tid=7, **{"External id": 9}),  # overlaps
        _x("ncclDevKernel_AllGather", 5000, 50, cat="kernel", tid=8),                      # outside
        # a Triton launch without External id: found through its runtime call's correlation
        _x("fasttips.ema", 800, 50, cat="user_annotation"),
        _x("cuLaunchKernelEx", 810, 5, cat="cuda_runtime", correlation=42),
        _x("_ema_chunks_kernel", 900, 50, cat="kernel", tid=7, correlation=42),
    ]}
    out = ps.analyse_trace(trace)
    assert out["device"] and out["step_ms"] == 1.0
    cats = out["categories"]
    assert cats["prototype CE"] == pytest.approx(0.1) and cats["GEMMs"] == pytest.approx(0.2)
    assert cats["optimiser"] == pytest.approx(0.1) and cats["communication"] == 0
    assert cats["EMA"] == pytest.approx(0.05)
    assert cats["host gaps"] == pytest.approx(1.0 - 0.4)        # union: [150, 250) ∪ [300, 550) ∪ [900, 950)


def test_analyse_a_cpu_trace():
    """Without kernels: each op's self time by its name and scopes; gaps = wall − op self times."""
    trace = {"traceEvents": [
        _x("fasttips.train_step", 0, 1000, cat="user_annotation"),
        _x("aten::linear", 10, 300),
        _x("aten::addmm", 20, 250),                  # self 250, and linear's own 50: GEMMs
        _x("fasttips.attention", 400, 200, cat="user_annotation"),
        _x("aten::bmm", 410, 100),                   # attention by scope
        _x("aten::layer_norm", 700, 100),
        _x("aten::add", 100, 50, tid=2),             # another thread, outside the linear: still counted
    ]}
    out = ps.analyse_trace(trace)
    assert not out["device"]
    cats = out["categories"]
    assert cats["GEMMs"] == pytest.approx(0.3) and cats["attention"] == pytest.approx(0.1)
    assert cats["norms+elementwise"] == pytest.approx(0.1 + 0.05)
    assert cats["host gaps"] == pytest.approx(1.0 - 0.55)
    with pytest.raises(ValueError, match="fasttips.train_step"):
        ps.analyse_trace({"traceEvents": [_x("aten::mm", 0, 1)]})
