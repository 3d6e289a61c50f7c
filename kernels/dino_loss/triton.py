"""Fused prototype-layer + teacher-softmax cross-entropy in Triton: no [tokens × K] tensor is ever written.

Same math as reference.py. Logits live only in registers, in base-2 units (s₂ = s·log₂e) so the
exponentials are exp2; the per-row statistics stay fp32 and are converted back to natural units at
the end. Every program walks the prototypes (or the rows) in the same order from 0, so the tiles that
the programs running side by side read are shared through L2.

Kernels
- ``_forward_kernel``   token-major: for a block of student rows and their paired teacher rows, stream
  W_s and W_t in K-blocks with an online log-sum-exp for the student and the teacher, and an online
  Σ_k p_k·s_k rescaled with the teacher's running max (flash-attention style, no PV GEMM).
  Writes per row its running statistics; the host merges them into ℓ_i, LSE(s_i), LSE(u_i).
- ``_grad_z_kernel``    token-major: recompute s, u per K-block, ds = coef·(softmax(s) − p), dz += ds·W_s.
  Both token-major kernels split K into slices when there are too few row blocks to fill the GPU
  (DINO's few CLS rows); with many rows there is one slice and every program walks all of K.
- ``_grad_w_kernel``    prototype-major: one K-block per program, stream all rows, dW += dsᵀ·z_s.
  Each program owns its rows of dW, so no atomics and the result is deterministic.
- ``_token_lse_kernel`` / ``_prototype_lse_kernel``: LSE over prototypes (per row) and over rows (per
  prototype) of z W_tᵀ·scale + bias, the two reductions of Sinkhorn-Knopp in factorised form.
- ``_grad_s_kernel``    the opt-in "slab" backward: 2-D grid of (rows block × K_TILES prototype blocks),
  recomputes s, u once and writes ds = coef·(softmax(s) − p) into a [chunk × K] slab in the features'
  dtype; the host then runs dz = dS·W_s and dW += dSᵀ·z_s with torch.matmul, chunk by chunk.

Backward selection: ``FASTTIPS_DINO_BACKWARD=fused|slab``, read each time the backward runs. ``fused``
(default) is the measured path: ``_grad_z_kernel`` + ``_grad_w_kernel``, 6 GEMM-equivalents. ``slab``
does 2 recompute GEMMs in Triton + 2 cuBLAS GEMMs, with a slab of at most SLAB_BYTES (256 MiB: 2048
rows at K = 65536 in bf16). The slab path is checked by the interpreter and the compile gate only:
**unmeasured on a GPU** (NOTES.md says how to measure it).

On GPU the kernels take bf16/fp16 features with d ≤ 256; fp32 features or a wider bottleneck go to the
chunked reference with a warning (see ``_unsupported_on_gpu``). Measurements: NOTES.md.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .._backend import interpreting, warn_once
from ..triton_utils import LN2, LN2_C, LOG2E, LOG2E_C, autotune_configs, block_d, constexprs_of, launch_config, precision
from .common import check_arguments, center_statistic, sinkhorn_log_scaling, teacher_bias, weight_normed



# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _forward_kernel(zs_ptr, zt_ptr, pairs_ptr, ws_ptr, wt_ptr, bias_ptr, part_ptr,
                    S, K, D, K_SPLIT, stride_zs, stride_zt, stride_ws, stride_wt, s_scale, t_scale,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr, EVEN_K: tl.constexpr):
    """Program (i, j): rows block i against prototypes [j·K_SPLIT, (j+1)·K_SPLIT). Writes the partial
    statistics (m_s, l_s, m_t, l_t, ps) of its slice to part[stat, j, row]; the host merges slices."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < S
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    t_rows = tl.load(pairs_ptr + rows, mask=row_ok, other=0)
    zs = tl.load(zs_ptr + rows[:, None] * stride_zs + dims[None, :],
                 mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    zt = tl.load(zt_ptr + t_rows[:, None] * stride_zt + dims[None, :],
                 mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)   # student running max / sum of exp2
    l_s = tl.zeros([BLOCK_M], tl.float32)
    m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)   # teacher running max / sum of exp2
    l_t = tl.zeros([BLOCK_M], tl.float32)
    ps = tl.zeros([BLOCK_M], tl.float32)                  # Σ_k exp2(u − m_t)·s₂, rescaled as m_t moves
    k_begin = tl.program_id(1) * K_SPLIT
    for k0 in range(k_begin, tl.minimum(k_begin + K_SPLIT, K), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w_mask = dim_ok[:, None] & k_ok[None, :]
        ws = tl.load(ws_ptr + ks[None, :] * stride_ws + dims[:, None], mask=w_mask, other=0.0)   # [D, BK]
        wt = tl.load(wt_ptr + ks[None, :] * stride_wt + dims[:, None], mask=w_mask, other=0.0)
        bias = tl.load(bias_ptr + ks, mask=k_ok, other=0.0) * LOG2E_C
        s2 = tl.dot(zs, ws, input_precision=PRECISION) * s_scale
        u2 = tl.dot(zt, wt, input_precision=PRECISION) * t_scale + bias[None, :]
        if not EVEN_K:   # prototypes past K: −inf logits, so they weigh nothing in any sum
            s2 = tl.where(k_ok[None, :], s2, float("-inf"))
            u2 = tl.where(k_ok[None, :], u2, float("-inf"))

        m_s_new = tl.maximum(m_s, tl.max(s2, axis=1))
        l_s = l_s * tl.exp2(m_s - m_s_new) + tl.sum(tl.exp2(s2 - m_s_new[:, None]), axis=1)
        m_s = m_s_new

        m_t_new = tl.maximum(m_t, tl.max(u2, axis=1))
        alpha = tl.exp2(m_t - m_t_new)
        e_t = tl.exp2(u2 - m_t_new[:, None])
        l_t = l_t * alpha + tl.sum(e_t, axis=1)
        if EVEN_K:
            ps = ps * alpha + tl.sum(e_t * s2, axis=1)
        else:            # 0·(−inf) would be NaN
            ps = ps * alpha + tl.sum(e_t * tl.where(k_ok[None, :], s2, 0.0), axis=1)
        m_t = m_t_new

    out = part_ptr + tl.program_id(1) * S + rows
    stat = tl.num_programs(1) * S
    tl.store(out, m_s, mask=row_ok)
    tl.store(out + stat, l_s, mask=row_ok)
    tl.store(out + 2 * stat, m_t, mask=row_ok)
    tl.store(out + 3 * stat, l_t, mask=row_ok)
    tl.store(out + 4 * stat, ps, mask=row_ok)


@triton.jit
def _grad_z_kernel(zs_ptr, zt_ptr, pairs_ptr, ws_ptr, wt_ptr, bias_ptr, lse_s_ptr, lse_t_ptr, coef_ptr,
                   dz_ptr, S, K, D, K_SPLIT, stride_zs, stride_zt, stride_ws, stride_wt, stride_dz_split,
                   stride_dz, s_scale, t_scale,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr, EVEN_K: tl.constexpr):
    """Program (i, j): dz of rows block i from prototypes [j·K_SPLIT, (j+1)·K_SPLIT) into dz[j]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < S
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    t_rows = tl.load(pairs_ptr + rows, mask=row_ok, other=0)
    lse_s = tl.load(lse_s_ptr + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=row_ok, other=0.0)
    zs = tl.load(zs_ptr + rows[:, None] * stride_zs + dims[None, :],
                 mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    zt = tl.load(zt_ptr + t_rows[:, None] * stride_zt + dims[None, :],
                 mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)     # w_i·grad/τ_s; 0 on padding rows

    dz = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_begin = tl.program_id(1) * K_SPLIT
    for k0 in range(k_begin, tl.minimum(k_begin + K_SPLIT, K), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w_mask = k_ok[:, None] & dim_ok[None, :]
        ws = tl.load(ws_ptr + ks[:, None] * stride_ws + dims[None, :], mask=w_mask, other=0.0)   # [BK, D]
        wt = tl.load(wt_ptr + ks[:, None] * stride_wt + dims[None, :], mask=w_mask, other=0.0)
        bias = tl.load(bias_ptr + ks, mask=k_ok, other=0.0) * LOG2E_C
        s2 = tl.dot(zs, tl.trans(ws), input_precision=PRECISION) * s_scale
        u2 = tl.dot(zt, tl.trans(wt), input_precision=PRECISION) * t_scale + bias[None, :]
        q = tl.exp2(s2 - lse_s[:, None])               # softmax(s)
        p = tl.exp2(u2 - lse_t[:, None])               # teacher target
        ds = coef[:, None] * (q - p)
        if not EVEN_K:   # zero-padded W gives finite s, u past K: drop those columns
            ds = tl.where(k_ok[None, :], ds, 0.0)
        dz += tl.dot(ds.to(ws.dtype), ws, input_precision=PRECISION)
    dz_ptr += tl.program_id(1) * stride_dz_split
    tl.store(dz_ptr + rows[:, None] * stride_dz + dims[None, :], dz, mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _grad_w_kernel(zs_ptr, zt_ptr, pairs_ptr, ws_ptr, wt_ptr, bias_ptr, lse_s_ptr, lse_t_ptr, coef_ptr,
                   dw_ptr, S, K, D, stride_zs, stride_zt, stride_ws, stride_wt, stride_dw, s_scale, t_scale,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr):
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    w_mask = k_ok[:, None] & dim_ok[None, :]
    ws = tl.load(ws_ptr + ks[:, None] * stride_ws + dims[None, :], mask=w_mask, other=0.0)       # [BK, D]
    wt = tl.load(wt_ptr + ks[:, None] * stride_wt + dims[None, :], mask=w_mask, other=0.0)
    bias = tl.load(bias_ptr + ks, mask=k_ok, other=0.0) * LOG2E_C

    dw = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for r0 in range(0, S, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < S
        t_rows = tl.load(pairs_ptr + rows, mask=row_ok, other=0)
        zs = tl.load(zs_ptr + rows[:, None] * stride_zs + dims[None, :],
                     mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        zt = tl.load(zt_ptr + t_rows[:, None] * stride_zt + dims[None, :],
                     mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        lse_s = tl.load(lse_s_ptr + rows, mask=row_ok, other=0.0)
        lse_t = tl.load(lse_t_ptr + rows, mask=row_ok, other=0.0)
        coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
        # Transposed tiles [BK, BM], so dsᵀ feeds the dW product without a register transpose.
        s2 = tl.dot(ws, tl.trans(zs), input_precision=PRECISION) * s_scale
        u2 = tl.dot(wt, tl.trans(zt), input_precision=PRECISION) * t_scale + bias[:, None]
        q = tl.exp2(s2 - lse_s[None, :])
        p = tl.exp2(u2 - lse_t[None, :])
        ds = coef[None, :] * (q - p)
        dw += tl.dot(ds.to(zs.dtype), zs, input_precision=PRECISION)
    tl.store(dw_ptr + ks[:, None] * stride_dw + dims[None, :], dw, mask=w_mask)


@triton.jit
def _grad_s_kernel(zs_ptr, zt_ptr, pairs_ptr, ws_ptr, wt_ptr, bias_ptr, lse_s_ptr, lse_t_ptr, coef_ptr,
                   ds_ptr, S, K, D, stride_zs, stride_zt, stride_ws, stride_wt, stride_ds, s_scale, t_scale,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, K_TILES: tl.constexpr,
                   PRECISION: tl.constexpr, EVEN_K: tl.constexpr):
    """Program (i, j): the dS slab tiles of rows block i × prototype blocks [j·K_TILES, (j+1)·K_TILES),
    ds = coef·(softmax(s) − p) recomputed as in ``_grad_z_kernel`` and stored in the slab's dtype.

    K_TILES = 1 is one tile per program (no loop, most programs); a few tiles per program keep the row
    tiles in shared memory while W streams through, for fewer bytes read per product."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < S
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    t_rows = tl.load(pairs_ptr + rows, mask=row_ok, other=0)
    lse_s = tl.load(lse_s_ptr + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)     # w_i·grad/τ_s
    zs = tl.load(zs_ptr + rows[:, None] * stride_zs + dims[None, :],
                 mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    zt = tl.load(zt_ptr + t_rows[:, None] * stride_zt + dims[None, :],
                 mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    k_begin = tl.program_id(1) * (K_TILES * BLOCK_K)
    for k0 in range(k_begin, tl.minimum(k_begin + K_TILES * BLOCK_K, K), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        if EVEN_K:   # every prototype of the block exists: masks along K would only cost
            w_mask = dim_ok[None, :]
            bias = tl.load(bias_ptr + ks) * LOG2E_C
        else:
            w_mask = k_ok[:, None] & dim_ok[None, :]
            bias = tl.load(bias_ptr + ks, mask=k_ok, other=0.0) * LOG2E_C
        ws = tl.load(ws_ptr + ks[:, None] * stride_ws + dims[None, :], mask=w_mask, other=0.0)   # [BK, D]
        wt = tl.load(wt_ptr + ks[:, None] * stride_wt + dims[None, :], mask=w_mask, other=0.0)
        s2 = tl.dot(zs, tl.trans(ws), input_precision=PRECISION) * s_scale
        u2 = tl.dot(zt, tl.trans(wt), input_precision=PRECISION) * t_scale + bias[None, :]
        q = tl.exp2(s2 - lse_s[:, None])               # softmax(s)
        p = tl.exp2(u2 - lse_t[:, None])               # teacher target
        ds = (coef[:, None] * (q - p)).to(ds_ptr.dtype.element_ty)
        out = ds_ptr + rows[:, None] * stride_ds + ks[None, :]
        if EVEN_K:
            tl.store(out, ds, mask=row_ok[:, None])
        else:        # the slab has no columns past K
            tl.store(out, ds, mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def _token_lse_kernel(z_ptr, w_ptr, bias_ptr, out_ptr, N, K, D, stride_z, stride_w, scale,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                      PRECISION: tl.constexpr):
    """out_j = LSE_k(z_j·w_k·scale + bias_k), natural units; scale and bias in natural units."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    z = tl.load(z_ptr + rows[:, None] * stride_z + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w = tl.load(w_ptr + ks[None, :] * stride_w + dims[:, None], mask=dim_ok[:, None] & k_ok[None, :],
                    other=0.0)
        bias = tl.load(bias_ptr + ks, mask=k_ok, other=0.0)
        x2 = (tl.dot(z, w, input_precision=PRECISION) * scale + bias[None, :]) * LOG2E_C
        x2 = tl.where(k_ok[None, :], x2, float("-inf"))
        m_new = tl.maximum(m, tl.max(x2, axis=1))
        acc = acc * tl.exp2(m - m_new) + tl.sum(tl.exp2(x2 - m_new[:, None]), axis=1)
        m = m_new
    tl.store(out_ptr + rows, (m + tl.log2(acc)) * LN2_C, mask=row_ok)


@triton.jit
def _prototype_lse_kernel(z_ptr, w_ptr, row_bias_ptr, out_ptr, N, K, D, stride_z, stride_w, scale,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                          PRECISION: tl.constexpr):
    """out_k = LSE_j(z_j·w_k·scale + row_bias_j) over this rank's rows, natural units."""
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    w = tl.load(w_ptr + ks[:, None] * stride_w + dims[None, :], mask=k_ok[:, None] & dim_ok[None, :],
                other=0.0)
    m = tl.full([BLOCK_K], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_K], tl.float32)
    for r0 in range(0, N, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        z = tl.load(z_ptr + rows[None, :] * stride_z + dims[:, None], mask=dim_ok[:, None] & row_ok[None, :],
                    other=0.0)                                                             # [D, BM]
        row_bias = tl.load(row_bias_ptr + rows, mask=row_ok, other=0.0)
        x2 = (tl.dot(w, z, input_precision=PRECISION) * scale + row_bias[None, :]) * LOG2E_C
        x2 = tl.where(row_ok[None, :], x2, float("-inf"))
        m_new = tl.maximum(m, tl.max(x2, axis=1))
        # A block that adds nothing keeps m at −inf; guard the −inf − (−inf) rescale.
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp2(m - safe) + tl.sum(tl.exp2(x2 - safe[:, None]), axis=1)
        m = m_new
    tl.store(out_ptr + ks, (m + tl.log2(acc)) * LN2_C, mask=k_ok)


# ------------------------------------------------------------------------------------------------
# Launch configurations: one list per kernel. The Hopper compile gate (tests/tooling/gate_dino_loss.py) compiles every
# entry; on CUDA the autotuner picks among them; the interpreter uses INTERPRET_CONFIG.
# ------------------------------------------------------------------------------------------------
def _cfg(block_m, block_k, warps, stages, **constexprs):
    return launch_config(warps, stages, BLOCK_M=block_m, BLOCK_K=block_k, **constexprs)


CONFIGS = {   # chosen so that each compiles for sm_90a with HGMMA, no spills and ≤ 227 KB shared memory
    "_forward_kernel": [_cfg(128, 32, 8, 2), _cfg(64, 64, 8, 2)],
    "_grad_z_kernel": [_cfg(64, 64, 8, 2), _cfg(64, 32, 8, 3)],
    "_grad_w_kernel": [_cfg(32, 64, 8, 3), _cfg(32, 128, 8, 2)],
    # one tile per program (K_TILES=1), or 16 tiles with W streamed past resident row tiles
    "_grad_s_kernel": [_cfg(128, 64, 8, 1, K_TILES=1), _cfg(64, 128, 8, 1, K_TILES=1),
                       _cfg(64, 64, 8, 2, K_TILES=16), _cfg(128, 32, 8, 2, K_TILES=16)],
    "_token_lse_kernel": [_cfg(128, 128, 8, 2)],
    "_prototype_lse_kernel": [_cfg(128, 128, 8, 2)],
}
INTERPRET_CONFIG = _cfg(32, 64, 4, 1)
INTERPRET_EXTRA = {"_grad_s_kernel": dict(K_TILES=2)}   # a loop of 2 tiles, the last one past K when K is odd
KERNELS = {"_forward_kernel": _forward_kernel, "_grad_z_kernel": _grad_z_kernel,
           "_grad_w_kernel": _grad_w_kernel, "_grad_s_kernel": _grad_s_kernel, "_token_lse_kernel": _token_lse_kernel,
           "_prototype_lse_kernel": _prototype_lse_kernel}


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
            k_tiles: int = 0):
    """Grid over row blocks (token-major kernels) or prototype blocks (prototype-major kernels), times
    ``splits`` K-slices for the split-K kernels, or (slab kernel) times the groups of K_TILES BLOCK_K-blocks
    that cover ``k_tiles`` prototypes."""
    def grid(meta):
        second = triton.cdiv(k_tiles, meta["BLOCK_K"] * meta.get("K_TILES", 1)) if k_tiles else splits
        return triton.cdiv(rows, meta["BLOCK_M" if row_major else "BLOCK_K"]), second

    if interpreting():
        c = dict(INTERPRET_CONFIG, **INTERPRET_EXTRA.get(name, {}))
        extra = {k: v for k, v in constexprs_of(c).items() if k not in ("BLOCK_M", "BLOCK_K")}
        if name in EVEN_K_KERNELS:
            extra["EVEN_K"] = args[KERNELS[name].arg_names.index("K")] % c["BLOCK_K"] == 0
        KERNELS[name][grid(c)](*args, BLOCK_M=c["BLOCK_M"], BLOCK_K=c["BLOCK_K"], BLOCK_D=BLOCK_D,
                               PRECISION=PRECISION, **extra)
        return
    _tuned(name)[grid](*args, BLOCK_D=BLOCK_D, PRECISION=PRECISION)


K_SPLIT_ALIGN = 128         # a multiple of every BLOCK_K, so no K-block straddles two slices
FORCE_K_SPLITS = None       # tests set this to exercise the split path under the interpreter


def _k_split(S: int, K: int, device) -> tuple[int, int]:
    """(prototypes per slice, number of slices) for the token-major kernels.

    With few rows (DINO's CLS rows, small batches) there are fewer row blocks than SMs, so the
    prototypes are split too (flash-decoding style) and the host merges the slices' statistics.
    """
    if FORCE_K_SPLITS is not None:
        wanted = FORCE_K_SPLITS
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
# Autograd
# ------------------------------------------------------------------------------------------------
class _FusedPrototypeCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_z, w_s, teacher_z, w_t, bias, pairs, weights, student_temp, teacher_temp):
        S, D = student_z.shape
        K = w_s.shape[0]
        dev = student_z.device
        s_scale, t_scale = LOG2E / student_temp, LOG2E / teacher_temp
        opts = dict(BLOCK_D=block_d(D), PRECISION=precision(student_z.dtype))
        k_split, splits = _k_split(S, K, dev)
        part = torch.empty(5, splits, S, dtype=torch.float32, device=dev)
        if S:
            _launch("_forward_kernel", S, True, student_z, teacher_z, pairs, w_s, w_t, bias, part,
                    S, K, D, k_split, student_z.stride(0), teacher_z.stride(0), w_s.stride(0), w_t.stride(0),
                    s_scale, t_scale, splits=splits, **opts)
        row_loss, lse_s, lse_t = _merge_slices(part)
        loss = (weights.float() * row_loss).sum()
        ctx.save_for_backward(student_z, w_s, teacher_z, w_t, bias, pairs, weights, lse_s, lse_t)
        ctx.scales = (s_scale, t_scale, student_temp)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        student_z, w_s, teacher_z, w_t, bias, pairs, weights, lse_s, lse_t = ctx.saved_tensors
        s_scale, t_scale, student_temp = ctx.scales
        S, D = student_z.shape
        K = w_s.shape[0]
        mode = backward_mode()
        coef = (grad_loss.float() * weights.float() / student_temp).contiguous()
        common = (student_z, teacher_z, pairs, w_s, w_t, bias, lse_s, lse_t, coef)
        if not S:
            dz = torch.zeros(S, D, dtype=torch.float32, device=student_z.device)
            dw = torch.zeros(K, D, dtype=torch.float32, device=w_s.device)
        elif mode == "slab":
            dz, dw = _slab_backward(common, s_scale, t_scale)
        else:
            dz, dw = _fused_backward(common, s_scale, t_scale)
        return (dz.to(student_z.dtype), dw.to(w_s.dtype)) + (None,) * 7


def _fused_backward(common, s_scale, t_scale):
    """dz and dW (fp32) by the two fused kernels, each recomputing s and u: 6 GEMM-equivalents."""
    student_z, teacher_z, pairs, w_s, w_t = common[:5]
    S, D = student_z.shape
    K = w_s.shape[0]
    opts = dict(BLOCK_D=block_d(D), PRECISION=precision(student_z.dtype))
    k_split, splits = _k_split(S, K, student_z.device)
    dz_slices = torch.empty(splits, S, D, dtype=torch.float32, device=student_z.device)
    dw = torch.empty(K, D, dtype=torch.float32, device=w_s.device)
    _launch("_grad_z_kernel", S, True, *common, dz_slices, S, K, D, k_split, student_z.stride(0),
            teacher_z.stride(0), w_s.stride(0), w_t.stride(0), dz_slices.stride(0), dz_slices.stride(1),
            s_scale, t_scale, splits=splits, **opts)
    _launch("_grad_w_kernel", K, False, *common, dw, S, K, D, student_z.stride(0),
            teacher_z.stride(0), w_s.stride(0), w_t.stride(0), dw.stride(0), s_scale, t_scale, **opts)
    dz = dz_slices[0] if splits == 1 else dz_slices.sum(dim=0)
    return dz, dw


def _slab_backward(common, s_scale, t_scale):
    """dz and dW through a [chunk × K] dS slab per chunk of rows: the slab kernel recomputes s and u
    once (2 GEMM-equivalents), then dz = dS·W_s and dW += dSᵀ·z_s run in cuBLAS (2 GEMMs).

    The slab has the features' dtype, like the bf16 ds operand of the fused kernels' products. dz gets
    one rounding to that dtype (the fused path rounds its fp32 dz once too); dW is summed over chunks
    in an fp32 accumulator, so each chunk adds one rounding of its partial product.
    """
    student_z, teacher_z, pairs, w_s, w_t, bias, lse_s, lse_t, coef = common
    S, D = student_z.shape
    K = w_s.shape[0]
    opts = dict(BLOCK_D=block_d(D), PRECISION=precision(student_z.dtype))
    rows = min(S, slab_rows(K, student_z.element_size()))
    slab = torch.empty(rows, K, dtype=student_z.dtype, device=student_z.device)
    dz = torch.empty(S, D, dtype=student_z.dtype, device=student_z.device)
    dw = None
    for a in range(0, S, rows):
        b = min(S, a + rows)
        ds, zs = slab[: b - a], student_z[a:b]
        _launch("_grad_s_kernel", b - a, True, zs, teacher_z, pairs[a:b], w_s, w_t, bias, lse_s[a:b],
                lse_t[a:b], coef[a:b], ds, b - a, K, D, zs.stride(0), teacher_z.stride(0), w_s.stride(0),
                w_t.stride(0), ds.stride(0), s_scale, t_scale, k_tiles=K, **opts)
        torch.matmul(ds, w_s, out=dz[a:b])
        part = (ds.t() @ zs).float()
        dw = part if dw is None else dw.add_(part)
    return dz, dw


BACKWARD_VARIABLE = "FASTTIPS_DINO_BACKWARD"
BACKWARDS = ("fused", "slab")
SLAB_BYTES = 256 * 2**20    # dS slab budget: 2048 rows at K = 65536 in bf16. Tests shrink it.
SLAB_ROW_ALIGN = 128        # a multiple of every BLOCK_M: chunks start on row-block (and 16-byte) boundaries


def backward_mode() -> str:
    """FASTTIPS_DINO_BACKWARD, read at each backward: ``fused`` (default) or ``slab``."""
    value = os.environ.get(BACKWARD_VARIABLE, "fused").strip().lower() or "fused"
    if value not in BACKWARDS:
        raise ValueError(f"{BACKWARD_VARIABLE}={value!r} is not allowed; choose one of {list(BACKWARDS)}")
    return value


def slab_rows(K: int, itemsize: int) -> int:
    """Rows per dS chunk: as many as SLAB_BYTES holds, in whole row blocks, at least one block."""
    align = INTERPRET_CONFIG["BLOCK_M"] if interpreting() else SLAB_ROW_ALIGN
    return max(align, SLAB_BYTES // (max(K, 1) * itemsize) // align * align)


# ------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp reductions and the op
# ------------------------------------------------------------------------------------------------
def _sinkhorn_bias(teacher_z, w_t, teacher_temp, n_iterations, group):
    N, D = teacher_z.shape
    K = w_t.shape[0]
    opts = dict(BLOCK_D=block_d(D), PRECISION=precision(teacher_z.dtype))
    scale = 1.0 / teacher_temp

    def row_lse(log_c):            # per prototype: LSE over this rank's rows
        out = torch.full((K,), float("-inf"), dtype=torch.float32, device=w_t.device)
        if N:
            _launch("_prototype_lse_kernel", K, False, teacher_z, w_t, log_c.contiguous(), out, N, K, D,
                    teacher_z.stride(0), w_t.stride(0), scale, **opts)
        return out

    def col_lse(log_r):            # per row: LSE over prototypes
        out = torch.empty(N, dtype=torch.float32, device=w_t.device)
        if N:
            _launch("_token_lse_kernel", N, True, teacher_z, w_t, log_r.contiguous(), out, N, K, D,
                    teacher_z.stride(0), w_t.stride(0), scale, **opts)
        return out

    return sinkhorn_log_scaling(row_lse, col_lse, N, K, n_iterations, teacher_z.device, group)


MAX_GPU_BOTTLENECK = 256   # the launch configurations are sized for d ≤ 256 (row tiles stay in shared memory)


def _unsupported_on_gpu(student_z) -> str | None:
    """Why the compiled kernels cannot take these inputs, or None. The interpreter takes anything."""
    if interpreting():
        return None
    if student_z.dtype not in (torch.bfloat16, torch.float16):
        # fp32 tiles double shared memory and the fp32 products spill at every tile that fits.
        return f"the Triton kernels take bf16/fp16 features on GPU, got {student_z.dtype}"
    if student_z.shape[1] > MAX_GPU_BOTTLENECK:
        return f"bottleneck d={student_z.shape[1]} > {MAX_GPU_BOTTLENECK} has no launch configuration"
    return None


def prototype_cross_entropy(student_z, student_v, student_g, teacher_z, teacher_v, teacher_g,
                            pairs, weights, center=None, student_temp=0.1, teacher_temp=0.04,
                            centering="softmax", sk_iterations=3, group=None):
    """Same contract as ``fasttips.kernels.prototype_cross_entropy``. Products run in student_z's dtype
    (bf16 on the fast path) with fp32 accumulation; the loss and every statistic are fp32."""
    check_arguments(student_z, student_v, student_g, teacher_z, teacher_v, teacher_g, pairs, weights,
                    center, student_temp, teacher_temp, centering, sk_iterations)
    reason = _unsupported_on_gpu(student_z)
    if reason:
        warn_once(f"prototype_cross_entropy: {reason}; running the chunked PyTorch reference instead")
        from . import reference
        return reference.prototype_cross_entropy(
            student_z, student_v, student_g, teacher_z, teacher_v, teacher_g, pairs, weights, center=center,
            student_temp=student_temp, teacher_temp=teacher_temp, centering=centering,
            sk_iterations=sk_iterations, group=group)
    dtype = student_z.dtype
    K = student_v.shape[0]
    w_s = weight_normed(student_v, student_g).to(dtype).contiguous()   # autograd: dW_s → v, g
    with torch.no_grad():
        w_t32 = weight_normed(teacher_v.detach(), teacher_g.detach())
        center_stat = center_statistic(teacher_z.detach(), w_t32)   # mean_rows(z_t W_tᵀ); zeros for no rows
        w_t = w_t32.to(dtype).contiguous()
        z_t = teacher_z.detach().to(dtype).contiguous()
        bias = teacher_bias(center, teacher_temp, centering, K, student_z.device,
                            sinkhorn=lambda: _sinkhorn_bias(z_t, w_t, teacher_temp, int(sk_iterations), group))
        bias = bias.contiguous()
    loss = _FusedPrototypeCE.apply(student_z.contiguous(), w_s, z_t, w_t, bias, pairs.contiguous(),
                                   weights.detach().contiguous(), float(student_temp), float(teacher_temp))
    return loss, center_stat
