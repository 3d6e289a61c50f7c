"""One-pass attention backward: 5 GEMMs and one exp per score (the two-pass backward does 7 and 2).

The two-pass backward (kernels.py) recomputes S = QKᵀ and P in its dQ pass and again in its dK/dV
pass. Here one program per block of keys does it once and hands its share of dQ to the other query
rows' owners by fp32 atomics:

1. ``attn_bwd_prep_kernel`` (pre-pass): delta_i = Σ_d out·dout per row, and zeros for the fp32 dQ
   buffer (one pass over out and dout; the buffer is written here instead of by a separate memset).
2. ``attn_bwd_onepass_kernel``: per key block, K and V stay in registers / shared memory while the
   loop walks every query block: Sᵀ = K Qᵀ, Pᵀ = exp2(Sᵀ·qk_scale − LSE₂), dV += Pᵀ dO, dPᵀ = V dOᵀ,
   dSᵀ = Pᵀ∘(dPᵀ − delta), dK += dSᵀ Q, and dQ[rows] += dS K by ``tl.atomic_add`` (relaxed, fp32).
3. The launcher casts the buffer: dq = dq32 · scale in the input dtype (one elementwise pass).

Q, dO, K and V are read, and dK, dV written, through per-head TMA descriptors (see forward_tma.py):
rows past the sequence load as zeros. Query rows past the end then need no mask (their LSE loads as
+inf, so P = 0); keys past the end (zero rows: their dK, dV are never stored) and padded keys get
P = 0 from a per-key select. Without it a zero key row would give exp2(0 − LSE₂), harmless to dQ
(its K row is zero) unless a very negative LSE made it inf·0 = NaN. (A second copy of the loop
without the select, for blocks with neither, was merged back into one loop by the compiler.)

Atomic traffic grows with the sequence: each key block adds a whole [N, D] fp32 dQ, (N / BLOCK_N)·N·D·4
bytes per head, so long sequences may do better with the two-pass kernels; measured dispatch chooses.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..triton_utils import LOG2E_C
from .forward_tma import _head_desc
from .kernels import _aligned_strides, _load_rows, _sequence


@triton.jit
def attn_bwd_prep_kernel(O, DO, DELTA, DQ32, CU_SEQLENS,
                         stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
                         stride_qb, stride_qh, stride_qn, stride_lb, stride_lh, H, N, SEQ_BUCKET,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
                         VARLEN: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """Grid: (cdiv(max_seqlen, BLOCK), H, number of sequences). ``stride_q*`` are the dQ buffer's."""
    stride_ob, stride_oh, stride_on = _aligned_strides(stride_ob, stride_oh, stride_on, ROW_ALIGN)
    stride_dob, stride_doh, stride_don = _aligned_strides(stride_dob, stride_doh, stride_don, ROW_ALIGN)
    stride_qb, stride_qh, stride_qn = _aligned_strides(stride_qb, stride_qh, stride_qn, ROW_ALIGN)
    h = tl.program_id(1)
    b = tl.program_id(2)
    seq_start, seq_len = _sequence(CU_SEQLENS, b, N, VARLEN)
    row_start = tl.program_id(0) * BLOCK
    if row_start < seq_len:
        b64 = b.to(tl.int64)
        t0 = seq_start.to(tl.int64)
        rows = row_start + tl.arange(0, BLOCK)
        dims = tl.arange(0, BLOCK_D)
        o = _load_rows(O + b64 * stride_ob + h * stride_oh + t0 * stride_on, rows, seq_len, stride_on,
                       dims, HEAD_DIM, BLOCK_D, True)
        do = _load_rows(DO + b64 * stride_dob + h * stride_doh + t0 * stride_don, rows, seq_len,
                        stride_don, dims, HEAD_DIM, BLOCK_D, True)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + b64 * stride_lb + h * stride_lh + seq_start + rows, delta, mask=rows < seq_len)
        dq_ptrs = (DQ32 + b64 * stride_qb + h * stride_qh + t0 * stride_qn
                   + rows[:, None] * stride_qn + dims[None, :])
        tl.store(dq_ptrs, tl.zeros([BLOCK, BLOCK_D], tl.float32),
                 mask=(rows[:, None] < seq_len) & (dims[None, :] < HEAD_DIM))


@triton.jit
def _onepass_loop(k, v, k2, v2, dk, dv, dk2, dv2, key_ok, q_desc, do_desc, q2_desc, do2_desc, lse_base,
                  delta_base, dq_base, seq_len, stride_dqn, qk_scale, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """dK, dV of one key block over every query block, adding each query block's dQ share. With
    SPLIT_D the columns past BLOCK_D are a second panel (k2, v2, dk2, dv2, q2, dO2; placeholders,
    never read, without it)."""
    dims = tl.arange(0, BLOCK_D)
    dims2 = BLOCK_D + tl.arange(0, SPLIT_D if SPLIT_D else 16)
    for start_m in tl.range(0, seq_len, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = q_desc.load([start_m, 0])
        do = do_desc.load([start_m, 0])
        in_seq = rows < seq_len  # rows past the end: LSE = +inf gives P = 0, delta = 0 gives dS = 0
        lse2 = tl.load(lse_base + rows, mask=in_seq, other=float("inf")) * LOG2E_C
        delta = tl.load(delta_base + rows, mask=in_seq, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)               # GEMM 1
        if SPLIT_D:
            q2 = q2_desc.load([start_m, BLOCK_D])
            do2 = do2_desc.load([start_m, BLOCK_D])
            s_t = tl.dot(k2, tl.trans(q2), s_t, input_precision=DOT_PRECISION)
        p_t = tl.where(key_ok[:, None], tl.math.exp2(s_t * qk_scale - lse2[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)         # GEMM 2
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)             # GEMM 3
        if SPLIT_D:
            dv2 += tl.dot(p_t.to(do.dtype), do2, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v2, tl.trans(do2), dp_t, input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION)                      # GEMM 4
        dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)             # GEMM 5
        tl.atomic_add(dq_base + rows[:, None] * stride_dqn + dims[None, :], dq, sem="relaxed",
                      mask=in_seq[:, None] & (dims[None, :] < HEAD_DIM))
        if SPLIT_D:
            dk2 += tl.dot(ds_t, q2, input_precision=DOT_PRECISION)
            dq2 = tl.dot(tl.trans(ds_t), k2, input_precision=DOT_PRECISION)
            tl.atomic_add(dq_base + rows[:, None] * stride_dqn + dims2[None, :], dq2, sem="relaxed",
                          mask=in_seq[:, None] & (dims2[None, :] < HEAD_DIM))
    return dk, dv, dk2, dv2


@triton.jit
def attn_bwd_onepass_kernel(Q, K, V, DO, LSE, DELTA, PAD, DQ32, DK, DV, CU_SEQLENS,
                            stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                            stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                            stride_dqb, stride_dqh, stride_dqn, stride_dkb, stride_dkh, stride_dkn,
                            stride_dvb, stride_dvh, stride_dvn,
                            stride_lb, stride_lh, stride_pb, H, N, SEQ_BUCKET, scale, qk_scale,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
                            VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """Grid: (cdiv(max_seqlen, BLOCK_N), H, number of sequences). ``stride_dq*`` are the fp32 dQ
    buffer's (a contiguous tensor of q's shape). SPLIT_D > 0: the columns past BLOCK_D are a second
    panel SPLIT_D wide (d = 72 as 64 + 16)."""
    stride_dqb, stride_dqh, stride_dqn = _aligned_strides(stride_dqb, stride_dqh, stride_dqn, ROW_ALIGN)
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    seq_start, seq_len = _sequence(CU_SEQLENS, b, N, VARLEN)
    col_start = pid_n * BLOCK_N
    if col_start < seq_len:
        b64 = b.to(tl.int64)
        t0 = seq_start.to(tl.int64)
        q_base = Q + b64 * stride_qb + h * stride_qh + t0 * stride_qn
        do_base = DO + b64 * stride_dob + h * stride_doh + t0 * stride_don
        k_base = K + b64 * stride_kb + h * stride_kh + t0 * stride_kn
        v_base = V + b64 * stride_vb + h * stride_vh + t0 * stride_vn
        dk_base = DK + b64 * stride_dkb + h * stride_dkh + t0 * stride_dkn
        dv_base = DV + b64 * stride_dvb + h * stride_dvh + t0 * stride_dvn
        q_desc = _head_desc(q_base, seq_len, stride_qn, HEAD_DIM, BLOCK_M, BLOCK_D)
        do_desc = _head_desc(do_base, seq_len, stride_don, HEAD_DIM, BLOCK_M, BLOCK_D)
        k = _head_desc(k_base, seq_len, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D).load([col_start, 0])
        v = _head_desc(v_base, seq_len, stride_vn, HEAD_DIM, BLOCK_N, BLOCK_D).load([col_start, 0])
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        # the second column panel (placeholders without SPLIT_D: never loaded, never changed)
        q2_desc, do2_desc, k2, v2, dk2, dv2 = q_desc, do_desc, k, v, dk, dv
        if SPLIT_D:
            q2_desc = _head_desc(q_base, seq_len, stride_qn, HEAD_DIM, BLOCK_M, SPLIT_D)
            do2_desc = _head_desc(do_base, seq_len, stride_don, HEAD_DIM, BLOCK_M, SPLIT_D)
            k2 = _head_desc(k_base, seq_len, stride_kn, HEAD_DIM, BLOCK_N, SPLIT_D).load([col_start, BLOCK_D])
            v2 = _head_desc(v_base, seq_len, stride_vn, HEAD_DIM, BLOCK_N, SPLIT_D).load([col_start, BLOCK_D])
            dk2 = tl.zeros([BLOCK_N, SPLIT_D], tl.float32)
            dv2 = tl.zeros([BLOCK_N, SPLIT_D], tl.float32)
        cols = col_start + tl.arange(0, BLOCK_N)
        key_ok = cols < seq_len
        if HAS_MASK:
            key_ok = key_ok & (tl.load(PAD + b64 * stride_pb + cols, mask=cols < seq_len, other=1) == 0)
        lse_base = LSE + b64 * stride_lb + h * stride_lh + seq_start
        delta_base = DELTA + b64 * stride_lb + h * stride_lh + seq_start
        dq_base = DQ32 + b64 * stride_dqb + h * stride_dqh + t0 * stride_dqn
        dk, dv, dk2, dv2 = _onepass_loop(k, v, k2, v2, dk, dv, dk2, dv2, key_ok, q_desc, do_desc, q2_desc,
                                         do2_desc, lse_base, delta_base, dq_base, seq_len, stride_dqn, qk_scale,
                                         HEAD_DIM, BLOCK_D, SPLIT_D, BLOCK_M, DOT_PRECISION)
        _head_desc(dk_base, seq_len, stride_dkn, HEAD_DIM, BLOCK_N, BLOCK_D).store(
            [col_start, 0], (dk * scale).to(DK.dtype.element_ty))
        _head_desc(dv_base, seq_len, stride_dvn, HEAD_DIM, BLOCK_N, BLOCK_D).store(
            [col_start, 0], dv.to(DV.dtype.element_ty))
        if SPLIT_D:
            _head_desc(dk_base, seq_len, stride_dkn, HEAD_DIM, BLOCK_N, SPLIT_D).store(
                [col_start, BLOCK_D], (dk2 * scale).to(DK.dtype.element_ty))
            _head_desc(dv_base, seq_len, stride_dvn, HEAD_DIM, BLOCK_N, SPLIT_D).store(
                [col_start, BLOCK_D], dv2.to(DV.dtype.element_ty))
