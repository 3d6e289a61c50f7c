"""Fused prototype-layer + teacher-softmax cross-entropy in Triton: no [tokens × K] tensor is ever written.

Same math as reference.py. Logits live only in registers, in base-2 units (s₂ = s·log₂e) so the
exponentials are exp2; the per-row statistics stay fp32 and are converted back to natural units at
the end. Every program walks the prototypes (or the rows) in the same order from 0, so the tiles that
the programs running side by side read are shared through L2.

Kernels (kernels.py): ``forward_kernel``, ``grad_z_kernel`` / ``grad_w_kernel`` (the fused backward),
``grad_s_kernel`` (the slab backward), ``token_lse_kernel`` / ``prototype_lse_kernel`` (Sinkhorn-Knopp).

Backward selection: the ``backward`` argument, ``"fused"``, ``"slab"`` or ``"chunked"`` (the last
replaces the forward too: cuBLAS products on row chunks + one Triton row kernel, chunked.py; unmeasured
on a GPU). ``fused``
(default) is the measured path: ``grad_z_kernel`` + ``grad_w_kernel``, 6 GEMM-equivalents. ``slab``
does 2 recompute GEMMs in Triton + 2 cuBLAS GEMMs, with a slab of at most ``slab_bytes`` (default
SLAB_BYTES, 256 MiB: 2048 rows at K = 65536 in bf16). The slab path is checked by the interpreter and the compile gate only:
**unmeasured on a GPU** (NOTES.md says how to measure it).

On GPU the kernels take bf16/fp16 features with d ≤ 256; the dispatch (``fasttips.kernels``) sends fp32
features or a wider bottleneck to the chunked reference with a warning (``common.unsupported_on_gpu``).

torch.compile: every path is a torch.library custom op with a fake (``fasttips::prototype_ce_fused`` and
its ``_backward``, ``fasttips::prototype_ce_chunked``, ``fasttips::prototype_lse`` / ``token_lse``), so
Dynamo treats each as one opaque call. The teacher temperature is folded into the teacher's prototypes
(fp32, before their cast) and is no op's argument: as one it would be a constant of a compiled graph,
recompiled at every step of its warm-up. Measurements: NOTES.md.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from .._backend import interpreting
from ..triton_utils import LN2, LOG2E, autotune_configs, block_d, constexprs_of, launch_config, precision
from . import chunked as _chunked
from . import kernels as K
from .common import (accumulate_dw_, check_arguments, check_backward, center_statistic, sinkhorn_log_scaling,
                     teacher_bias,
                     unsupported_on_gpu, weight_normed)


# ------------------------------------------------------------------------------------------------
# Launch configurations: one list per kernel. The Hopper compile gate (tests/tooling/gate_dino_loss.py)
# compiles every entry; on CUDA the autotuner picks among them; the interpreter uses INTERPRET_CONFIG.
# ------------------------------------------------------------------------------------------------
def _cfg(block_m, block_k, warps, stages, **constexprs):
    return launch_config(warps, stages, BLOCK_M=block_m, BLOCK_K=block_k, **constexprs)


CONFIGS = {   # chosen so that each compiles for sm_90a with HGMMA, no spills and ≤ 227 KB shared memory
    "_forward_kernel": [_cfg(128, 32, 8, 2), _cfg(64, 64, 8, 2)],
    # grad_z 64×32 at 3 stages was dropped: ptxas serialises its wgmma (C7515, the gate's lint), and
    # the autotuner chose 64×64 on the H100 anyway (NOTES.md)
    "_grad_z_kernel": [_cfg(64, 64, 8, 2)],
    # grad_w: 128 rows × 64 prototypes, one stage (two stages of 128-row tiles exceed shared memory;
    # 64-row tiles spill). The former 32×64 / 32×128 were serialised by ptxas (C7515; NOTES.md).
    "_grad_w_kernel": [_cfg(128, 64, 8, 1)],
    # one tile per program (K_TILES=1), or 16 tiles with W streamed past resident row tiles
    "_grad_s_kernel": [_cfg(128, 64, 8, 1, K_TILES=1), _cfg(64, 128, 8, 1, K_TILES=1),
                       _cfg(64, 64, 8, 2, K_TILES=16), _cfg(128, 32, 8, 2, K_TILES=16)],
    "_token_lse_kernel": [_cfg(128, 128, 8, 2)],
    "_prototype_lse_kernel": [_cfg(128, 128, 8, 2)],
}
INTERPRET_CONFIG = _cfg(32, 64, 4, 1)
INTERPRET_K_TILES = 2   # the slab kernel's tiles per program under the interpreter: a loop of 2, the last past K
                        # when K is odd
KERNELS = {"_forward_kernel": K.forward_kernel, "_grad_z_kernel": K.grad_z_kernel,
           "_grad_w_kernel": K.grad_w_kernel, "_grad_s_kernel": K.grad_s_kernel,
           "_token_lse_kernel": K.token_lse_kernel, "_prototype_lse_kernel": K.prototype_lse_kernel}


EVEN_K_KERNELS = ("_forward_kernel", "_grad_z_kernel", "_grad_s_kernel")   # take EVEN_K: skip per-element K masks


def _even_k(meta) -> bool:   # K_SPLIT is a multiple of every BLOCK_K (see _k_split)
    return meta["K"] % meta["BLOCK_K"] == 0


@functools.lru_cache(maxsize=None)
def _tuned(name: str):
    configs = autotune_configs(CONFIGS[name])
    kernel = KERNELS[name]
    if name in EVEN_K_KERNELS:
        kernel = triton.heuristics({"EVEN_K": _even_k})(kernel)
    return triton.autotune(configs, key=["K", "D"])(kernel)


def _launch(name: str, rows: int, row_major: bool, *args, BLOCK_D: int, PRECISION: str, splits: int = 1,
            k_tiles: int = 0, interpret_k_tiles: int = INTERPRET_K_TILES):
    """Grid over row blocks (token-major kernels) or prototype blocks (prototype-major kernels), times
    ``splits`` K-slices for the split-K kernels, or (slab kernel) times the groups of K_TILES BLOCK_K-blocks
    that cover ``k_tiles`` prototypes."""
    def grid(meta):
        second = triton.cdiv(k_tiles, meta["BLOCK_K"] * meta.get("K_TILES", 1)) if k_tiles else splits
        return triton.cdiv(rows, meta["BLOCK_M" if row_major else "BLOCK_K"]), second

    if interpreting():
        c = dict(INTERPRET_CONFIG, **({"K_TILES": interpret_k_tiles} if name == "_grad_s_kernel" else {}))
        extra = {k: v for k, v in constexprs_of(c).items() if k not in ("BLOCK_M", "BLOCK_K")}
        if name in EVEN_K_KERNELS:
            extra["EVEN_K"] = args[KERNELS[name].arg_names.index("K")] % c["BLOCK_K"] == 0
        KERNELS[name][grid(c)](*args, BLOCK_M=c["BLOCK_M"], BLOCK_K=c["BLOCK_K"], BLOCK_D=BLOCK_D,
                               PRECISION=PRECISION, **extra)
        return
    _tuned(name)[grid](*args, BLOCK_D=BLOCK_D, PRECISION=PRECISION)


K_SPLIT_ALIGN = 128         # a multiple of every BLOCK_K, so no K-block straddles two slices


def _k_split(S: int, K: int, device, k_splits: int | None = None) -> tuple[int, int]:
    """(prototypes per slice, number of slices) for the token-major kernels.

    With few rows (DINO's CLS rows, small batches) there are fewer row blocks than SMs, so the
    prototypes are split too (flash-decoding style) and the host merges the slices' statistics.
    ``k_splits`` asks for that many slices (tests use it to run the split path in the interpreter).
    """
    if k_splits is not None:
        wanted = k_splits
    elif interpreting() or device.type != "cuda":
        wanted = 1
    else:
        programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        wanted = max(1, min(programs // triton.cdiv(S, 64), K // 2048))
    per_slice = triton.cdiv(triton.cdiv(K, wanted), K_SPLIT_ALIGN) * K_SPLIT_ALIGN
    return per_slice, triton.cdiv(K, per_slice)


def _merge_slices(part: torch.Tensor):
    """Row loss and base-2 LSEs from the per-slice (m_s, l_s, m_t, l_t, ps) [5, slices, S]."""
    m_s, l_s, m_t, l_t, ps = part.unbind(0)
    top_s, top_t = m_s.amax(dim=0), m_t.amax(dim=0)
    lse_s = top_s + torch.log2((l_s * torch.exp2(m_s - top_s)).sum(dim=0))
    rescale_t = torch.exp2(m_t - top_t)
    l_t = (l_t * rescale_t).sum(dim=0)
    lse_t = top_t + torch.log2(l_t)
    row_loss = (lse_s - (ps * rescale_t).sum(dim=0) / l_t) * LN2
    return row_loss, lse_s.contiguous(), lse_t.contiguous()




# ------------------------------------------------------------------------------------------------
# The fused and slab paths: custom ops with autograd
# ------------------------------------------------------------------------------------------------
SLAB_BYTES = 256 * 2**20    # dS slab budget: 2048 rows at K = 65536 in bf16
SLAB_ROW_ALIGN = 128        # a multiple of every BLOCK_M: chunks start on row-block (and 16-byte) boundaries


@dataclass(frozen=True)
class Options:
    """How the Triton path runs; the defaults are what training uses. Tests and benchmarks pass others
    through ``prototype_cross_entropy``'s keyword arguments."""
    backward: str = "fused"                 # "fused" or "slab" (BACKWARDS)
    slab_bytes: int = SLAB_BYTES            # the slab backward's dS budget per row chunk
    k_splits: int | None = None             # K-slices of the token-major kernels; None: from the SM count
    interpret_k_tiles: int = INTERPRET_K_TILES


# The fused and slab paths as torch.library custom ops: opaque to torch.compile (Dynamo would otherwise
# trace into the kernel launches, and under the interpreter into the interpreter itself), with fake
# implementations for shapes and an autograd formula. Options travel as plain arguments.
@torch.library.custom_op("fasttips::prototype_ce_fused", mutates_args=())
def prototype_ce_fused(student_z: torch.Tensor, w_s: torch.Tensor, teacher_z: torch.Tensor, w_t: torch.Tensor,
                       bias: torch.Tensor, pairs: torch.Tensor, weights: torch.Tensor, student_temp: float,
                       backward: str, slab_bytes: int, k_splits: Optional[int], interpret_k_tiles: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse_s, lse_t): the forward kernel; the per-row base-2 LSEs are kept for the backward.
    ``w_t`` comes divided by the teacher temperature (``prototype_cross_entropy``)."""
    S, D = student_z.shape
    K = w_s.shape[0]
    dev = student_z.device
    opts = dict(BLOCK_D=block_d(D), PRECISION=precision(student_z.dtype))
    k_split, splits = _k_split(S, K, dev, k_splits)
    part = torch.empty(5, splits, S, dtype=torch.float32, device=dev)
    if S:
        _launch("_forward_kernel", S, True, student_z, teacher_z, pairs, w_s, w_t, bias, part,
                S, K, D, k_split, student_z.stride(0), teacher_z.stride(0), w_s.stride(0), w_t.stride(0),
                LOG2E / student_temp, LOG2E, splits=splits, **opts)
    row_loss, lse_s, lse_t = _merge_slices(part)
    return (weights.float() * row_loss).sum(), lse_s, lse_t


@prototype_ce_fused.register_fake
def _(student_z, w_s, teacher_z, w_t, bias, pairs, weights, student_temp, backward, slab_bytes, k_splits,
      interpret_k_tiles):
    S = student_z.shape[0]
    stat = dict(dtype=torch.float32)
    return student_z.new_empty((), **stat), student_z.new_empty((S,), **stat), student_z.new_empty((S,), **stat)


@torch.library.custom_op("fasttips::prototype_ce_fused_backward", mutates_args=())
def prototype_ce_fused_backward(grad_loss: torch.Tensor, student_z: torch.Tensor, w_s: torch.Tensor,
                                teacher_z: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor, pairs: torch.Tensor,
                                weights: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor,
                                student_temp: float, backward: str, slab_bytes: int, k_splits: Optional[int],
                                interpret_k_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d student_z, d w_s) in their dtypes, by the fused kernels or the slab backward (``backward``)."""
    options = Options(backward, slab_bytes, k_splits, interpret_k_tiles)
    S, D = student_z.shape
    K = w_s.shape[0]
    coef = (grad_loss.float() * weights.float() / student_temp).contiguous()
    common = (student_z, teacher_z, pairs, w_s, w_t, bias, lse_s, lse_t, coef)
    scales = (LOG2E / student_temp, LOG2E)          # w_t is already divided by the teacher temperature
    if not S:
        dz = torch.zeros(S, D, dtype=torch.float32, device=student_z.device)
        dw = torch.zeros(K, D, dtype=torch.float32, device=w_s.device)
    elif backward == "slab":
        dz, dw = _slab_backward(common, *scales, options)
    else:
        dz, dw = _fused_backward(common, *scales, options)
    return dz.to(student_z.dtype), dw.to(w_s.dtype)


@prototype_ce_fused_backward.register_fake
def _(grad_loss, student_z, w_s, *rest):
    return torch.empty_like(student_z), torch.empty_like(w_s)


def _fused_setup_context(ctx, inputs, output):
    student_z, w_s, teacher_z, w_t, bias, pairs, weights = inputs[:7]
    _, lse_s, lse_t = output
    ctx.save_for_backward(student_z, w_s, teacher_z, w_t, bias, pairs, weights, lse_s, lse_t)
    ctx.arguments = inputs[7:]          # the student temperature and the options
    ctx.mark_non_differentiable(lse_s, lse_t)


def _fused_autograd(ctx, grad_loss, _grad_lse_s, _grad_lse_t):
    dz, dw = prototype_ce_fused_backward(grad_loss, *ctx.saved_tensors, *ctx.arguments)
    want_z, want_w = ctx.needs_input_grad[:2]
    return (dz if want_z else None, dw if want_w else None) + (None,) * 10


prototype_ce_fused.register_autograd(_fused_autograd, setup_context=_fused_setup_context)


def _fused_backward(common, s_scale, t_scale, options: Options):
    """dz and dW (fp32) by the two fused kernels, each recomputing s and u: 6 GEMM-equivalents."""
    student_z, teacher_z, pairs, w_s, w_t = common[:5]
    S, D = student_z.shape
    K = w_s.shape[0]
    opts = dict(BLOCK_D=block_d(D), PRECISION=precision(student_z.dtype))
    k_split, splits = _k_split(S, K, student_z.device, options.k_splits)
    dz_slices = torch.empty(splits, S, D, dtype=torch.float32, device=student_z.device)
    dw = torch.empty(K, D, dtype=torch.float32, device=w_s.device)
    _launch("_grad_z_kernel", S, True, *common, dz_slices, S, K, D, k_split, student_z.stride(0),
            teacher_z.stride(0), w_s.stride(0), w_t.stride(0), dz_slices.stride(0), dz_slices.stride(1),
            s_scale, t_scale, splits=splits, **opts)
    _launch("_grad_w_kernel", K, False, *common, dw, S, K, D, student_z.stride(0),
            teacher_z.stride(0), w_s.stride(0), w_t.stride(0), dw.stride(0), s_scale, t_scale, **opts)
    dz = dz_slices[0] if splits == 1 else dz_slices.sum(dim=0)
    return dz, dw


def _slab_backward(common, s_scale, t_scale, options: Options):
    """dz and dW through a [chunk × K] dS slab per chunk of rows: the slab kernel recomputes s and u
    once (2 GEMM-equivalents), then dz = dS·W_s and dW += dSᵀ·z_s run in cuBLAS (2 GEMMs).

    The slab has the features' dtype, like the bf16 ds operand of the fused kernels' products. dz gets
    one rounding to that dtype (the fused path rounds its fp32 dz once too); dW is summed over chunks
    in an fp32 accumulator (``accumulate_dw_``: on CUDA the chunk's product is not rounded to 16 bits).
    """
    student_z, teacher_z, pairs, w_s, w_t, bias, lse_s, lse_t, coef = common
    S, D = student_z.shape
    K = w_s.shape[0]
    opts = dict(BLOCK_D=block_d(D), PRECISION=precision(student_z.dtype))
    rows = min(S, slab_rows(K, student_z.element_size(), options.slab_bytes))
    slab = torch.empty(rows, K, dtype=student_z.dtype, device=student_z.device)
    dz = torch.empty(S, D, dtype=student_z.dtype, device=student_z.device)
    dw = torch.zeros(K, D, dtype=torch.float32, device=w_s.device)
    for a in range(0, S, rows):
        b = min(S, a + rows)
        ds, zs = slab[: b - a], student_z[a:b]
        _launch("_grad_s_kernel", b - a, True, zs, teacher_z, pairs[a:b], w_s, w_t, bias, lse_s[a:b],
                lse_t[a:b], coef[a:b], ds, b - a, K, D, zs.stride(0), teacher_z.stride(0), w_s.stride(0),
                w_t.stride(0), ds.stride(0), s_scale, t_scale, k_tiles=K,
                interpret_k_tiles=options.interpret_k_tiles, **opts)
        torch.matmul(ds, w_s, out=dz[a:b])
        accumulate_dw_(dw, ds, zs)
    return dz, dw


def slab_rows(K: int, itemsize: int, slab_bytes: int = SLAB_BYTES) -> int:
    """Rows per dS chunk: as many as ``slab_bytes`` holds, in whole row blocks, at least one block."""
    align = INTERPRET_CONFIG["BLOCK_M"] if interpreting() else SLAB_ROW_ALIGN
    return max(align, slab_bytes // (max(K, 1) * itemsize) // align * align)


# ------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp reductions and the op
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("fasttips::prototype_lse", mutates_args=())
def prototype_lse(z: torch.Tensor, w: torch.Tensor, row_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Per prototype k: LSE_j(z_j·w_k·scale + row_bias_j) over the rows of z (−inf without rows)."""
    (N, D), K = z.shape, w.shape[0]
    out = torch.full((K,), float("-inf"), dtype=torch.float32, device=w.device)
    if N:
        _launch("_prototype_lse_kernel", K, False, z, w, row_bias, out, N, K, D, z.stride(0), w.stride(0),
                scale, BLOCK_D=block_d(D), PRECISION=precision(z.dtype))
    return out


@prototype_lse.register_fake
def _(z, w, row_bias, scale):
    return w.new_empty((w.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fasttips::token_lse", mutates_args=())
def token_lse(z: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Per row j of z: LSE_k(z_j·w_k·scale + bias_k) over the prototypes."""
    (N, D), K = z.shape, w.shape[0]
    out = torch.empty(N, dtype=torch.float32, device=w.device)
    if N:
        _launch("_token_lse_kernel", N, True, z, w, bias, out, N, K, D, z.stride(0), w.stride(0),
                scale, BLOCK_D=block_d(D), PRECISION=precision(z.dtype))
    return out


@token_lse.register_fake
def _(z, w, bias, scale):
    return z.new_empty((z.shape[0],), dtype=torch.float32)


def _sinkhorn_bias(teacher_z, w_t, n_iterations, group):
    scale = 1.0                    # w_t comes divided by the teacher temperature

    def row_lse(log_c):            # per prototype: LSE over this rank's rows
        return prototype_lse(teacher_z, w_t, log_c.contiguous(), scale)

    def col_lse(log_r):            # per row: LSE over prototypes
        return token_lse(teacher_z, w_t, log_r.contiguous(), scale)

    return sinkhorn_log_scaling(row_lse, col_lse, teacher_z.shape[0], w_t.shape[0], n_iterations,
                                teacher_z.device, group)


def prototype_cross_entropy(student_z, student_v, student_g, teacher_z, teacher_v, teacher_g,
                            pairs, weights, center=None, student_temp=0.1, teacher_temp=0.04,
                            centering="softmax", sk_iterations=3, group=None, *, backward="fused",
                            slab_bytes=SLAB_BYTES, k_splits=None, interpret_k_tiles=INTERPRET_K_TILES,
                            chunked_bytes=_chunked.CHUNK_BYTES):
    """Same contract as ``fasttips.kernels.prototype_cross_entropy``. Products run in student_z's dtype
    (bf16 on the fast path) with fp32 accumulation; the loss and every statistic are fp32.

    ``backward``: ``"fused"`` (default), ``"slab"`` or ``"chunked"`` (cuBLAS on row chunks + one row
    kernel, forward included: chunked.py); ``chunked_bytes`` bounds that path's two [C × K] slabs. ``slab_bytes``,
    ``k_splits`` and ``interpret_k_tiles`` size the slab chunks, the K-slices and the slab kernel's
    tiles under the interpreter (tests); the defaults are what training runs. Inputs the compiled
    kernels cannot take (``common.unsupported_on_gpu``) are refused: the dispatch sends them to the
    reference.
    """
    check_arguments(student_z, student_v, student_g, teacher_z, teacher_v, teacher_g, pairs, weights,
                    center, student_temp, teacher_temp, centering, sk_iterations)
    check_backward(backward)
    reason = unsupported_on_gpu(student_z, interpreting())
    if reason:
        raise ValueError(f"prototype_cross_entropy: {reason} (fasttips.kernels.prototype_cross_entropy "
                         "runs the reference for such inputs)")
    dtype = student_z.dtype
    K = student_v.shape[0]
    w_s = weight_normed(student_v, student_g).to(dtype).contiguous()   # autograd: dW_s → v, g
    with torch.no_grad():
        w_t32 = weight_normed(teacher_v.detach(), teacher_g.detach())
        center_stat = center_statistic(teacher_z.detach(), w_t32)   # mean_rows(z_t W_tᵀ); zeros for no rows
        # The teacher temperature folded into the teacher's prototypes (in fp32, before their one cast to
        # the features' dtype): the kernels and custom ops never take it. It changes every step of its
        # warm-up, and as an op argument torch.compile would bake each value into a new graph.
        w_t = (w_t32 / teacher_temp).to(dtype).contiguous()
        z_t = teacher_z.detach().to(dtype).contiguous()
        bias = teacher_bias(center, teacher_temp, centering, K, student_z.device,
                            sinkhorn=lambda: _sinkhorn_bias(z_t, w_t, int(sk_iterations), group))
        bias = bias.contiguous()
    inputs = (student_z.contiguous(), w_s, z_t, w_t, bias, pairs.contiguous(), weights.detach().contiguous(),
              float(student_temp))
    if backward == "chunked":
        # the gradients are formed in the forward: ask for them only where autograd will want them
        grads = torch.is_grad_enabled()
        loss, _, _ = _chunked.prototype_ce_chunked(*inputs, int(chunked_bytes), grads and student_z.requires_grad,
                                                   grads and w_s.requires_grad)
        return loss, center_stat
    loss, _, _ = prototype_ce_fused(*inputs, backward, int(slab_bytes), None if k_splits is None else int(k_splits),
                                    int(interpret_k_tiles))
    return loss, center_stat
