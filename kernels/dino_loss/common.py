"""Pieces shared by the chunked reference and the Triton path of ``prototype_cross_entropy``.

- ``check_arguments``: one place that rejects bad input with a message naming the argument;
  ``check_backward`` and ``unsupported_on_gpu`` say which backward variants exist and which inputs the
  compiled kernels take (the dispatch in ``fasttips.kernels`` reads the latter).
- ``teacher_bias``: the per-prototype bias b that turns either teacher rule into one softmax,
  ``p_j = softmax(l_j/τ_t + b)``:
    softmax centering:  b = −c/τ_t
    Sinkhorn-Knopp:     b = log r, the row scaling after the last row update (factorised form,
                        docs/loss_math.md). The final column normalisation of SK *is* this
                        softmax, so SK differs from centering only in how b is found.
- ``accumulate_dw_``: dW += dSᵀ·z into an fp32 accumulator (the slab and chunked paths' weight gradient).
- ``sinkhorn_log_scaling``: the SK iterations in log domain, given two streaming reductions over the
  teacher logits (one per prototype, one per token), with the per-prototype sums all-reduced over
  ranks. Neither reduction ever holds [rows × K].
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.distributed as dist

from fasttips.config import CENTERINGS

BACKWARDS = ("fused", "slab", "chunked")   # the Triton path's variants (triton.py; chunked.py)
MAX_GPU_BOTTLENECK = 256        # the launch configurations are sized for d ≤ 256 (row tiles stay in shared memory)


def check_backward(backward) -> None:
    if backward not in BACKWARDS:
        raise ValueError(f"prototype_cross_entropy: backward={backward!r} is not allowed; choose one of "
                         f"{list(BACKWARDS)}")


def unsupported_on_gpu(student_z, interpreting: bool) -> str | None:
    """Why the compiled kernels cannot take these inputs, or None. The interpreter takes anything."""
    if interpreting:
        return None
    if student_z.dtype not in (torch.bfloat16, torch.float16):
        # fp32 tiles double shared memory and the fp32 products spill at every tile that fits.
        return f"the Triton kernels take bf16/fp16 features on GPU, got {student_z.dtype}"
    if student_z.shape[1] > MAX_GPU_BOTTLENECK:
        return f"bottleneck d={student_z.shape[1]} > {MAX_GPU_BOTTLENECK} has no launch configuration"
    return None


def check_arguments(student_z, student_v, student_g, teacher_z, teacher_v, teacher_g, pairs, weights,
                    center, student_temp, teacher_temp, centering, sk_iterations) -> None:
    def need(cond, msg):
        if not cond:   # a callable message is formatted only on failure (a temperature under torch.compile)
            raise ValueError(f"prototype_cross_entropy: {msg() if callable(msg) else msg}")

    need(student_z.dim() == 2, f"student_z must be [S, d], got shape {tuple(student_z.shape)}")
    need(teacher_z.dim() == 2, f"teacher_z must be [T, d], got shape {tuple(teacher_z.shape)}")
    d = student_z.shape[1]
    need(teacher_z.shape[1] == d, f"teacher_z has d={teacher_z.shape[1]} but student_z has d={d}")
    for name, v in (("student_v", student_v), ("teacher_v", teacher_v)):
        need(v.dim() == 2 and v.shape[1] == d, f"{name} must be [K, {d}], got shape {tuple(v.shape)}")
    K = student_v.shape[0]
    need(teacher_v.shape[0] == K, f"teacher_v has K={teacher_v.shape[0]} but student_v has K={K}")
    for name, g in (("student_g", student_g), ("teacher_g", teacher_g)):
        need(g.numel() == K and (g.dim() == 1 or (g.dim() == 2 and g.shape[1] == 1)),
             f"{name} must be [K] or [K, 1] with K={K}, got shape {tuple(g.shape)}")
    S = student_z.shape[0]
    need(not pairs.is_floating_point() and not pairs.is_complex() and pairs.dtype != torch.bool,
         f"pairs must be an integer tensor, got {pairs.dtype}")
    need(pairs.shape == (S,), f"pairs must be [S] = [{S}] (one teacher row per student row), "
                              f"got shape {tuple(pairs.shape)}")
    need(weights.shape == (S,), f"weights must be [S] = [{S}], got shape {tuple(weights.shape)}")
    if S and teacher_z.shape[0]:
        check_pair_range(pairs, teacher_z.shape[0])
    elif S:
        need(False, "pairs point into teacher_z, which has no rows")
    need(centering in CENTERINGS, f"centering={centering!r} is not allowed; choose one of {list(CENTERINGS)}")
    if center is not None:
        need(center.numel() == K, f"center must have K={K} elements, got shape {tuple(center.shape)}")
    need(student_temp > 0, lambda: f"student_temp must be > 0, got {student_temp}")
    need(teacher_temp > 0, lambda: f"teacher_temp must be > 0, got {teacher_temp}")
    if centering == "sinkhorn_knopp":
        need(int(sk_iterations) >= 1, f"sk_iterations must be ≥ 1, got {sk_iterations}")


def check_pair_range(pairs: torch.Tensor, n_teacher: int) -> None:
    """Every pair index in [0, n_teacher), checked on the device: no host read on the hot path.

    An out-of-range index would read garbage inside a kernel. ``torch._assert_async`` queues the check
    with the work: on a GPU a bad index stops the process at the next synchronisation (a device-side
    assert); on the CPU it raises at once, and only then are the values read back for the message.
    """
    ok = ((pairs >= 0) & (pairs < n_teacher)).all()
    if pairs.device.type != "cpu":
        torch._assert_async(ok, f"prototype_cross_entropy: pairs must index teacher rows in [0, {n_teacher})")
        return
    try:
        torch._assert_async(ok)
    except RuntimeError:
        lo, hi = torch.stack(torch.aminmax(pairs)).tolist()   # the error path only
        raise ValueError(f"prototype_cross_entropy: pairs must index teacher rows in [0, {n_teacher}), "
                         f"got values in [{lo}, {hi}]") from None


def weight_normed(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """W_k = g_k · v_k/‖v_k‖ (fp32, differentiable)."""
    v = v.float()
    return g.float().reshape(-1, 1) * v / v.norm(dim=1, keepdim=True)


def accumulate_dw_(dw: torch.Tensor, ds: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """dw += dsᵀ·z into the fp32 accumulator ``dw`` [K × d], for ds [C × K] and z [C × d].

    On CUDA with 16-bit operands, cuBLAS adds the fp32-accumulated product straight into dw
    (``addmm`` with ``out_dtype``, aten::addmm.dtype_out, which has no CPU kernel): no [K × d] product
    in the operands' dtype, no fp32 copy of it, no separate add, and no rounding of the chunk's
    product to 16 bits. Elsewhere (CPU, the interpreter): the product, cast to fp32, then added."""
    global _ADDMM_OUT_DTYPE
    if _ADDMM_OUT_DTYPE and dw.is_cuda and ds.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.addmm(dw, ds.t(), z, out_dtype=torch.float32, out=dw)
        except (RuntimeError, TypeError) as exc:   # an older torch: no such overload, or no fp32 addend
            _ADDMM_OUT_DTYPE = False                # (it checks its arguments before writing anything)
            warnings.warn(f"prototype CE: torch.addmm(out_dtype=float32) into an fp32 accumulator is not "
                          f"available in torch {torch.__version__} ({str(exc).splitlines()[0]}); dW is "
                          f"accumulated by product, cast and add instead")
    return dw.add_((ds.t() @ z).float())


_ADDMM_OUT_DTYPE = True     # until a call shows that this torch cannot do it


def center_statistic(teacher_z: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """mean_rows(z_t W_tᵀ) [K] in fp32 (linear in z_t, so the rows are averaged first, never [T × K]).

    Zeros when there is no teacher row (a mean over nothing would be NaN). Such a batch must not move
    a softmax center: the losses hand ``None`` to ``Centering.update`` for it, not these zeros.
    """
    if teacher_z.shape[0] == 0:
        return torch.zeros(w_t.shape[0], dtype=torch.float32, device=w_t.device)
    return teacher_z.float().mean(dim=0) @ w_t.float().t()


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_(t: torch.Tensor, op=None, group=None) -> torch.Tensor:
    if distributed():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return t


def global_logsumexp_(local_lse: torch.Tensor, group=None) -> torch.Tensor:
    """log Σ_ranks exp(local_lse), elementwise, stable: all-reduce the max, then the shifted sums."""
    if not distributed():
        return local_lse
    peak = all_reduce_(local_lse.clone(), dist.ReduceOp.MAX, group)
    shift = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = all_reduce_(torch.exp(local_lse - shift), dist.ReduceOp.SUM, group)
    return shift + torch.log(total)


def sinkhorn_log_scaling(row_lse: Callable[[torch.Tensor], torch.Tensor],
                         col_lse: Callable[[torch.Tensor], torch.Tensor],
                         n_rows: int, K: int, n_iterations: int, device, group=None) -> torch.Tensor:
    """log r [K] of DINOv2's Sinkhorn-Knopp, Q_kj = exp(l_jk/τ)·r_k·c_j (docs/loss_math.md).

    ``row_lse(log_c)`` returns, for every prototype k, LSE_j(l_jk/τ + log_c_j) over this rank's rows;
    ``col_lse(log_r)`` returns, for every row j, LSE_k(l_jk/τ + log_r_k). The global normalisation
    Q/ΣQ is a uniform column scale, and a uniform scale of c only rescales r, which the final column
    normalisation cancels, so it is left out (log c starts at 0).
    """
    # the global row count stays on the device: log B_tot is only ever subtracted (no host sync)
    n_total = all_reduce_(torch.full((1,), float(n_rows), dtype=torch.float64, device=device), group=group)
    log_k, log_b = math.log(K), n_total.clamp_min(1.0).log().to(torch.float32)
    log_c = torch.zeros(n_rows, dtype=torch.float32, device=device)
    log_r = None
    for it in range(n_iterations):
        log_r = -global_logsumexp_(row_lse(log_c), group) - log_k   # rows: Σ over all ranks' tokens
        if it + 1 < n_iterations:   # the last column update is the softmax applied by the loss itself
            log_c = -col_lse(log_r) - log_b                          # columns: local per token
    return log_r


def teacher_bias(center, teacher_temp: float, centering: str, K: int, device,
                 sinkhorn: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """The fp32 bias b [K] with teacher targets p_j = softmax(l_j/τ_t + b)."""
    if centering == "softmax":
        if center is None:
            return torch.zeros(K, dtype=torch.float32, device=device)
        return -center.detach().float().reshape(K) / teacher_temp
    return sinkhorn()
