"""Triton kernels of the fused prototype-layer + teacher-softmax cross-entropy (host side: triton.py).

Logits live only in registers, in base-2 units (s₂ = s·log₂e) so the exponentials are exp2; the per-row
statistics stay fp32. Every program walks the prototypes (or the rows) in the same order from 0, so the
tiles that the programs running side by side read are shared through L2.

Kernels
- ``forward_kernel``   token-major: for a block of student rows and their paired teacher rows, stream
  W_s and W_t in K-blocks with an online log-sum-exp for the student and the teacher, and an online
  Σ_k p_k·s_k rescaled with the teacher's running max (flash-attention style, no PV GEMM).
  Writes per row its running statistics; the host merges them into ℓ_i, LSE(s_i), LSE(u_i).
- ``grad_z_kernel``    token-major: recompute s, u per K-block, ds = coef·(softmax(s) − p), dz += ds·W_s.
  Both token-major kernels split K into slices when there are too few row blocks to fill the GPU
  (DINO's few CLS rows); with many rows there is one slice and every program walks all of K.
- ``grad_w_kernel``    prototype-major: one K-block per program, stream all rows, dW += dsᵀ·z_s.
  Each program owns its rows of dW, so no atomics and the result is deterministic.
- ``token_lse_kernel`` / ``prototype_lse_kernel``: LSE over prototypes (per row) and over rows (per
  prototype) of z W_tᵀ·scale + bias, the two reductions of Sinkhorn-Knopp in factorised form.
- ``grad_s_kernel``    the opt-in "slab" backward: 2-D grid of (rows block × K_TILES prototype blocks),
  recomputes s, u once and writes ds = coef·(softmax(s) − p) into a [chunk × K] slab in the features'
  dtype; the host then runs dz = dS·W_s and dW += dSᵀ·z_s with torch.matmul, chunk by chunk.
- ``row_ce_kernel``    the "chunked" path (chunked.py): one program per ROWS rows of a [C × K] chunk of
  logits that cuBLAS computed (each bias block read once per ROWS rows); LSEs, Σ p·s and the row loss,
  then dS written in place over the student logits. No tl.dot: the products are all torch.matmul.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..triton_utils import LN2_C, LOG2E_C


@triton.jit
def forward_kernel(zs_ptr, zt_ptr, pairs_ptr, ws_ptr, wt_ptr, bias_ptr, part_ptr,
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
def grad_z_kernel(zs_ptr, zt_ptr, pairs_ptr, ws_ptr, wt_ptr, bias_ptr, lse_s_ptr, lse_t_ptr, coef_ptr,
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
def grad_w_kernel(zs_ptr, zt_ptr, pairs_ptr, ws_ptr, wt_ptr, bias_ptr, lse_s_ptr, lse_t_ptr, coef_ptr,
                   dw_ptr, S, K, D, stride_zs, stride_zt, stride_ws, stride_wt, stride_dw, s_scale, t_scale,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Program i: dW of prototype block i, streaming all rows in blocks of BLOCK_M.

    The logit tiles are token-major [BM, BK] (rows are the products' M side, as in ``grad_z_kernel``)
    and dsᵀ goes through shared memory into the dW product. The prototype-major form (s as W·zᵀ,
    [BK, BM]) made ptxas serialise every wgmma (C7515) and, with 64 rows, duplicated the logit tiles
    over both warpgroups and spilled; this one compiles clean at 128×64 (NOTES.md)."""
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
        coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)     # 0 on padding rows: their ds is 0
        s2 = tl.dot(zs, tl.trans(ws), input_precision=PRECISION) * s_scale                       # [BM, BK]
        u2 = tl.dot(zt, tl.trans(wt), input_precision=PRECISION) * t_scale + bias[None, :]
        q = tl.exp2(s2 - lse_s[:, None])               # softmax(s)
        p = tl.exp2(u2 - lse_t[:, None])               # teacher target
        ds = coef[:, None] * (q - p)
        dw += tl.dot(tl.trans(ds.to(zs.dtype)), zs, input_precision=PRECISION)
    tl.store(dw_ptr + ks[:, None] * stride_dw + dims[None, :], dw, mask=w_mask)


@triton.jit
def grad_s_kernel(zs_ptr, zt_ptr, pairs_ptr, ws_ptr, wt_ptr, bias_ptr, lse_s_ptr, lse_t_ptr, coef_ptr,
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
def token_lse_kernel(z_ptr, w_ptr, bias_ptr, out_ptr, N, K, D, stride_z, stride_w, scale,
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
def prototype_lse_kernel(z_ptr, w_ptr, row_bias_ptr, out_ptr, N, K, D, stride_z, stride_w, scale,
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


@triton.jit
def row_ce_kernel(s_ptr, u_ptr, bias_ptr, coef_ptr, loss_ptr, R, K, stride_s, stride_u, s_scale, t_scale,
                  ROWS: tl.constexpr, BLOCK_K: tl.constexpr, WRITE_GRAD: tl.constexpr, EVEN_K: tl.constexpr):
    """The chunked path's row kernel, program i = rows [i·ROWS, (i+1)·ROWS) of one chunk of R rows. s and u
    are that chunk's raw logits z_s W_sᵀ and z_t W_tᵀ ([R × K], from cuBLAS). The rows of a program walk
    K together in [ROWS, BLOCK_K] tiles, so each bias block is read once per ROWS rows. Pass 1 streams
    the rows once: online LSE of s·s_scale, of the teacher's u·t_scale + bias (base 2), and Σ p·s, giving
    ℓ_i = LSE(s) − Σ p·s (natural units) into loss[i]. Pass 2 (WRITE_GRAD) rereads them and overwrites s
    with dS = coef_i·(softmax(s/τ_s) − p) in s's dtype, the gradient wrt the raw logits (coef_i = w_i/τ_s)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < R
    s_rows = s_ptr + rows.to(tl.int64)[:, None] * stride_s          # [ROWS, 1] row starts
    u_rows = u_ptr + rows.to(tl.int64)[:, None] * stride_u
    m_s = tl.full([ROWS], float("-inf"), tl.float32)   # student running max / sum of exp2
    l_s = tl.zeros([ROWS], tl.float32)
    m_t = tl.full([ROWS], float("-inf"), tl.float32)   # teacher running max / sum of exp2
    l_t = tl.zeros([ROWS], tl.float32)
    ps = tl.zeros([ROWS], tl.float32)                  # Σ_k exp2(u₂ − m_t)·s₂, rescaled as m_t moves
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            mask = row_ok[:, None]
            bias = tl.load(bias_ptr + ks) * LOG2E_C
        else:      # prototypes past K: −inf logits weigh nothing; s₂ = 0 there keeps 0·s₂ finite
            k_ok = ks < K
            mask = row_ok[:, None] & k_ok[None, :]
            bias = tl.load(bias_ptr + ks, mask=k_ok, other=0.0) * LOG2E_C
        # rows past R read zeros: finite statistics that are never stored
        s2 = tl.load(s_rows + ks[None, :], mask=mask, other=0.0).to(tl.float32) * s_scale
        u2 = tl.load(u_rows + ks[None, :], mask=mask, other=0.0).to(tl.float32) * t_scale + bias[None, :]
        if EVEN_K:
            s2_max = tl.max(s2, axis=1)
        else:
            u2 = tl.where(k_ok[None, :], u2, float("-inf"))
            s2_max = tl.max(tl.where(k_ok[None, :], s2, float("-inf")), axis=1)
        m_s_new = tl.maximum(m_s, s2_max)
        e_s = tl.exp2(s2 - m_s_new[:, None])
        if not EVEN_K:
            e_s = tl.where(k_ok[None, :], e_s, 0.0)
        l_s = l_s * tl.exp2(m_s - m_s_new) + tl.sum(e_s, axis=1)
        m_s = m_s_new
        m_t_new = tl.maximum(m_t, tl.max(u2, axis=1))
        alpha = tl.exp2(m_t - m_t_new)
        e_t = tl.exp2(u2 - m_t_new[:, None])
        l_t = l_t * alpha + tl.sum(e_t, axis=1)
        ps = ps * alpha + tl.sum(e_t * s2, axis=1)
        m_t = m_t_new
    lse_s = m_s + tl.log2(l_s)
    lse_t = m_t + tl.log2(l_t)
    tl.store(loss_ptr + rows, (lse_s - ps / l_t) * LN2_C, mask=row_ok)
    if WRITE_GRAD:
        # w_i/τ_s; 0 on zero-weight rows, so their dS is exactly 0
        coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                mask = row_ok[:, None]
                bias = tl.load(bias_ptr + ks) * LOG2E_C
            else:
                k_ok = ks < K
                mask = row_ok[:, None] & k_ok[None, :]
                bias = tl.load(bias_ptr + ks, mask=k_ok, other=0.0) * LOG2E_C
            s2 = tl.load(s_rows + ks[None, :], mask=mask, other=0.0).to(tl.float32) * s_scale
            u2 = tl.load(u_rows + ks[None, :], mask=mask, other=0.0).to(tl.float32) * t_scale + bias[None, :]
            ds = coef[:, None] * (tl.exp2(s2 - lse_s[:, None]) - tl.exp2(u2 - lse_t[:, None]))
            tl.store(s_rows + ks[None, :], ds.to(s_ptr.dtype.element_ty), mask=mask)
