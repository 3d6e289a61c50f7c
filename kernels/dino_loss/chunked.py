"""The "chunked" path of the Triton prototype cross-entropy: cuBLAS products on row chunks + one Triton
row kernel (issue 17). Same math as reference.py; selected with ``backward="chunked"``.

Per chunk of C student rows (C from a byte budget, ``chunk_rows``):
  1. s = z_s W_sᵀ and u = z_t[pairs] W_tᵀ by torch.matmul into two [C × K] tensors in the features'
     dtype (bf16 on GPU: cuBLAS, fp32 accumulation);
  2. ``row_ce_kernel`` (kernels.py): per row the base-2 LSE of s/τ_s, the teacher softmax of
     u/τ_t + b (b from ``common.teacher_bias``: −c/τ_t, or Sinkhorn-Knopp's log r from the existing
     distributed reductions), Σ p·s and ℓ_i = LSE − Σ p·s; when a gradient is needed it then
     overwrites s with dS = (w_i/τ_s)·(softmax(s/τ_s) − p);
  3. when a gradient is needed, dz[chunk] = dS W_s by torch.matmul and dW += dSᵀ z_s into an fp32
     accumulator (``accumulate_dw_``: one cuBLAS addmm with an fp32 output on CUDA).
The gradient is complete after the forward; backward only multiplies dz and dW by grad_output.
Without a gradient (teacher-only or eval calls) steps 3 and the dS pass are skipped. The whole is one
torch.library custom op (``fasttips::prototype_ce_chunked``) with a fake and an autograd formula, so
torch.compile treats it as one opaque call.

Extra memory: the two [C × K] slabs (``CHUNK_BYTES`` together), dz [S × d] and dW [K × d] in fp32
kept from forward to backward (plus, off CUDA, one chunk's dW product). **Unmeasured on a GPU** (NOTES.md).
"""
from __future__ import annotations

import functools

import torch
import triton

from .._backend import interpreting
from ..triton_utils import LOG2E, autotune_configs, launch_config
from . import kernels as K
from .common import accumulate_dw_

# Both [C × K] slabs together: 256 MiB is 1024 rows at K = 65536 in bf16, 1.6 % of the 16.2 GiB that
# eager materialises at T = 16384 (the ≤ 5 % memory rule leaves room for dz, dW and one dW product).
CHUNK_BYTES = 256 * 2**20
CHUNK_ROW_ALIGN = 64      # whole 64-row groups: cuBLAS tiles and 16-byte aligned row starts

ROW_KERNEL = "_row_ce_kernel"
# ROWS rows per program share each bias block (one read per ROWS rows instead of one per row); all
# compile clean for sm_90a without spills (the compile gate).
CONFIGS = [launch_config(4, 1, ROWS=4, BLOCK_K=512), launch_config(8, 1, ROWS=4, BLOCK_K=1024),
           launch_config(8, 1, ROWS=8, BLOCK_K=512), launch_config(8, 2, ROWS=2, BLOCK_K=2048)]
INTERPRET_CONFIG = launch_config(4, 1, ROWS=4, BLOCK_K=256)


def chunk_rows(K: int, itemsize: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk: as many as two [rows × K] slabs in ``chunk_bytes`` hold, in whole 64-row groups
    on a GPU (any count under the interpreter, so tests can force several small chunks), at least 1."""
    if chunk_bytes <= 0:
        raise ValueError(f"prototype_cross_entropy: chunk_bytes must be > 0, got {chunk_bytes}")
    rows = chunk_bytes // (2 * max(K, 1) * itemsize)
    if not interpreting():
        rows = rows // CHUNK_ROW_ALIGN * CHUNK_ROW_ALIGN
    return max(1 if interpreting() else CHUNK_ROW_ALIGN, rows)


@functools.lru_cache(maxsize=None)
def _tuned_row_kernel():
    # The kernel writes dS over s in place: every tuning run must start from the same logits.
    kernel = triton.heuristics({"EVEN_K": lambda m: m["K"] % m["BLOCK_K"] == 0})(K.row_ce_kernel)
    return triton.autotune(autotune_configs(CONFIGS), key=["K", "WRITE_GRAD"], restore_value=["s_ptr"])(kernel)


def _row_kernel(s, u, bias, coef, row_loss, s_scale, t_scale, write_grad: bool):
    rows, n_k = s.shape
    args = (s, u, bias, coef, row_loss, rows, n_k, s.stride(0), u.stride(0), s_scale, t_scale)

    def grid(meta):
        return (triton.cdiv(rows, meta["ROWS"]),)

    if interpreting():
        c = INTERPRET_CONFIG
        K.row_ce_kernel[grid(c)](*args, ROWS=c["ROWS"], BLOCK_K=c["BLOCK_K"], WRITE_GRAD=write_grad,
                                 EVEN_K=n_k % c["BLOCK_K"] == 0)
    else:
        _tuned_row_kernel()[grid](*args, WRITE_GRAD=write_grad)



@torch.library.custom_op("fasttips::prototype_ce_chunked", mutates_args=())
def prototype_ce_chunked(student_z: torch.Tensor, w_s: torch.Tensor, teacher_z: torch.Tensor, w_t: torch.Tensor,
                         bias: torch.Tensor, pairs: torch.Tensor, weights: torch.Tensor, student_temp: float,
                         chunk_bytes: int, grad_z: bool, grad_w: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dz, dW): loss = Σ_i w_i [LSE(s_i) − p_{pairs[i]}·s_i] and, when asked for (``grad_z`` /
    ``grad_w``), its gradients for z_s ([S × d], z_s's dtype) and W_s ([K × d], fp32), formed here;
    an empty tensor stands for a gradient not asked for. The autograd formula scales them. ``w_t`` comes
    divided by the teacher temperature (``triton.prototype_cross_entropy``)."""
    S, D = student_z.shape
    n_k = w_s.shape[0]
    dev, dtype = student_z.device, student_z.dtype
    s_scale, t_scale = LOG2E / student_temp, LOG2E
    coef = (weights.float() / student_temp).contiguous()
    row_loss = torch.empty(S, dtype=torch.float32, device=dev)
    dz = torch.empty(S if grad_z else 0, D, dtype=dtype, device=dev)
    dw = torch.zeros(n_k if grad_w else 0, D, dtype=torch.float32, device=dev)
    rows = min(S, chunk_rows(n_k, student_z.element_size(), chunk_bytes)) if S else 0
    if rows:
        s_slab = torch.empty(rows, n_k, dtype=dtype, device=dev)
        u_slab = torch.empty(rows, n_k, dtype=dtype, device=dev)
        w_s_t, w_t_t = w_s.t(), w_t.t()
    for a in range(0, S, rows or 1):
        b = min(S, a + rows)
        zs = student_z[a:b]
        s, u = s_slab[: b - a], u_slab[: b - a]
        torch.matmul(zs, w_s_t, out=s)
        torch.matmul(teacher_z.index_select(0, pairs[a:b]), w_t_t, out=u)
        _row_kernel(s, u, bias, coef[a:b], row_loss[a:b], s_scale, t_scale, grad_z or grad_w)
        if grad_z:
            torch.matmul(s, w_s, out=dz[a:b])                  # s now holds dS
        if grad_w:
            accumulate_dw_(dw, s, zs)
    return (weights.float() * row_loss).sum(), dz, dw


@prototype_ce_chunked.register_fake
def _(student_z, w_s, teacher_z, w_t, bias, pairs, weights, student_temp, chunk_bytes, grad_z, grad_w):
    S, D = student_z.shape
    return (student_z.new_empty((), dtype=torch.float32), student_z.new_empty((S if grad_z else 0, D)),
            student_z.new_empty((w_s.shape[0] if grad_w else 0, D), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    _, dz, dw = output
    ctx.save_for_backward(dz, dw)
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    ctx.mark_non_differentiable(dz, dw)


def _backward(ctx, grad_loss, _grad_dz, _grad_dw):
    """The gradient was formed in the forward; here it is only scaled by grad_output."""
    dz, dw = ctx.saved_tensors
    z_dtype, w_dtype = ctx.dtypes
    grad = grad_loss.float()
    want_z, want_w = ctx.needs_input_grad[:2]
    gz = (dz.float() * grad).to(z_dtype) if want_z else None
    gw = (dw * grad).to(w_dtype) if want_w else None
    return (gz, gw) + (None,) * 9


prototype_ce_chunked.register_autograd(_backward, setup_context=_setup_context)
