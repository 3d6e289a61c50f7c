"""Triton flash-attention kernels (non-causal).

Forward: one kernel. Backward: a dQ pass (which also computes delta = rowsum(O∘dO)) then a dK/dV
pass; sequences of at most 64 tokens instead take one fused pass (``attn_bwd_short_kernel``).

Both layouts share one set of kernels. A program works on one (sequence b, group of heads) pair:
- dense:  q[b, h, n, :] at ``b·stride_b + h·stride_h + n·stride_n``; every sequence has length N.
- varlen: q[t, h, :] with t = cu_seqlens[b] + n, so ``stride_b = 0`` and the sequence start and length
  come from ``cu_seqlens``.
LSE (natural log) and delta are fp32, [B, H, N] dense or [H, T] varlen.

Short-sequence tricks (docs/kernels.md):
- keys: the loop runs over full BLOCK_N tiles without bounds checks, then the 1..BLOCK_N-1 leftover
  keys take narrow TAIL_N-wide masked steps (N = 257 executes 272 key columns, not 320 or 384);
- queries: the rows past the last full block get a program of their own that walks them in
  TAIL_M-row sub-blocks (N = 257 executes 272 query rows);
- several heads per program (HEADS_PER_PROG) for short sequences, to amortise the prologue.
Scores are kept in base 2: ``qk_scale = scale·log2(e)`` is folded in once and exp2 does the softmax.
Rows whose keys are all padding get output 0 and LSE = +inf (so the backward's exp2(s − LSE) = 0).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..triton_utils import LN2_C, LOG2E_C


@triton.jit
def _sequence(cu_seqlens, b, N, VARLEN: tl.constexpr):
    """(start token, length) of sequence b."""
    if VARLEN:
        start = tl.load(cu_seqlens + b).to(tl.int32)
        length = tl.load(cu_seqlens + b + 1).to(tl.int32) - start
    else:  # b * 0 keeps both int32 tensors (N may arrive specialised as a constant)
        start = b * 0
        length = b * 0 + N
    return start, length


@triton.jit
def _aligned_strides(stride_b, stride_h, stride_n, ROW_ALIGN: tl.constexpr):
    """One tensor's (batch, head, token) strides, written so that the compiler sees they are
    multiples of ROW_ALIGN. Triton learns divisibility only from its launch specialisation, which
    knows 16 and nothing smaller: at head dim 72 the strides are multiples of 8, not 16, and without
    this every row element is loaded on its own (one 64-bit address each; the dK/dV kernel spilled).
    The launch guarantees the multiple (triton.py ``_kernel_layout``), so x // a * a == x (except on
    dims of size 1, whose only index is 0); ROW_ALIGN = 1 leaves the code as it was."""
    if ROW_ALIGN > 1:
        stride_b = stride_b // ROW_ALIGN * ROW_ALIGN
        stride_h = stride_h // ROW_ALIGN * ROW_ALIGN
        stride_n = stride_n // ROW_ALIGN * ROW_ALIGN
    return stride_b, stride_h, stride_n


@triton.jit
def _load_rows(base, rows, row_limit, stride_n, dims, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               ROW_BOUNDS: tl.constexpr):
    """A [rows, BLOCK_D] tile; rows past row_limit and dims past HEAD_DIM read as 0."""
    ptrs = base + rows[:, None] * stride_n + dims[None, :]
    if ROW_BOUNDS:
        if BLOCK_D != HEAD_DIM:
            return tl.load(ptrs, mask=(rows[:, None] < row_limit) & (dims[None, :] < HEAD_DIM), other=0.0)
        return tl.load(ptrs, mask=rows[:, None] < row_limit, other=0.0)
    if BLOCK_D != HEAD_DIM:
        return tl.load(ptrs, mask=dims[None, :] < HEAD_DIM, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _store_rows(base, tile, rows, row_limit, stride_n, dims, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr):
    ptrs = base + rows[:, None] * stride_n + dims[None, :]
    tl.store(ptrs, tile.to(base.dtype.element_ty),
             mask=(rows[:, None] < row_limit) & (dims[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_step(q, m_i, l_i, acc, k_base, v_base, pad_base, cols, seq_len, stride_kn, stride_vn, dims,
              qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, KEY_BOUNDS: tl.constexpr,
              HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over the keys ``cols``."""
    k = _load_rows(k_base, cols, seq_len, stride_kn, dims, HEAD_DIM, BLOCK_D, KEY_BOUNDS)
    v = _load_rows(v_base, cols, seq_len, stride_vn, dims, HEAD_DIM, BLOCK_D, KEY_BOUNDS)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if KEY_BOUNDS:
        s = tl.where(cols[None, :] < seq_len, s, float("-inf"))
    if HAS_MASK:
        pad = tl.load(pad_base + cols, mask=cols < seq_len, other=1) != 0
        s = tl.where(pad[None, :], float("-inf"), s)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = m_new
    if HAS_MASK:  # a row may have seen only padding so far: keep exp2 away from (-inf) - (-inf)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _fwd_rows(q_base, k_base, v_base, o_base, lse_base, pad_base, row_start, seq_len,
              stride_qn, stride_kn, stride_vn, stride_on, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
              TAIL_N: tl.constexpr, ROW_BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """Attention output for query rows [row_start, row_start + ROWS) of one head."""
    rows = row_start + tl.arange(0, ROWS)
    dims = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base, rows, seq_len, stride_qn, dims, HEAD_DIM, BLOCK_D, ROW_BOUNDS)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    full_end = (seq_len // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _fwd_step(q, m_i, l_i, acc, k_base, v_base, pad_base, cols, seq_len,
                                  stride_kn, stride_vn, dims, qk_scale, HEAD_DIM, BLOCK_D,
                                  False, HAS_MASK, DOT_PRECISION)
    for start_n in range(full_end, seq_len, TAIL_N):  # leftover keys: narrow masked steps
        cols = start_n + tl.arange(0, TAIL_N)
        m_i, l_i, acc = _fwd_step(q, m_i, l_i, acc, k_base, v_base, pad_base, cols, seq_len,
                                  stride_kn, stride_vn, dims, qk_scale, HEAD_DIM, BLOCK_D,
                                  True, HAS_MASK, DOT_PRECISION)
    empty = l_i == 0.0  # only possible when every key of the row is padding
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2_C)
    _store_rows(o_base, out, rows, seq_len, stride_on, dims, HEAD_DIM, BLOCK_D)
    tl.store(lse_base + rows, lse, mask=rows < seq_len)


@triton.jit
def attn_fwd_kernel(Q, K, V, O, LSE, PAD, CU_SEQLENS,
                    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                    stride_lb, stride_lh, stride_pb, H, N, SEQ_BUCKET, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
                    HEADS_PER_PROG: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """Grid: (cdiv(max_seqlen, BLOCK_M), cdiv(H, HEADS_PER_PROG), number of sequences).

    Program m < N // BLOCK_M owns the full row block m; program N // BLOCK_M takes the short
    remainder in TAIL_M-row sub-blocks. (Giving the remainder to the last full program instead was
    measured 1.4× slower at N = 257 on an H100: these programs are latency-bound, so a separate
    program runs the remainder in parallel.)
    """
    # strides the launch guarantees to be multiples of ROW_ALIGN (see _aligned_strides)
    stride_qb, stride_qh, stride_qn = _aligned_strides(stride_qb, stride_qh, stride_qn, ROW_ALIGN)
    stride_kb, stride_kh, stride_kn = _aligned_strides(stride_kb, stride_kh, stride_kn, ROW_ALIGN)
    stride_vb, stride_vh, stride_vn = _aligned_strides(stride_vb, stride_vh, stride_vn, ROW_ALIGN)
    stride_ob, stride_oh, stride_on = _aligned_strides(stride_ob, stride_oh, stride_on, ROW_ALIGN)
    pid_m = tl.program_id(0)
    b = tl.program_id(2)
    seq_start, seq_len = _sequence(CU_SEQLENS, b, N, VARLEN)
    n_full = seq_len // BLOCK_M
    owns_tail = pid_m == n_full  # the short remainder, if any, is a program of its own
    if pid_m <= n_full:
        for i in range(HEADS_PER_PROG):
            h = tl.program_id(1) * HEADS_PER_PROG + i
            if h < H:
                b64 = b.to(tl.int64)
                t0 = seq_start.to(tl.int64)
                q_base = Q + b64 * stride_qb + h * stride_qh + t0 * stride_qn
                k_base = K + b64 * stride_kb + h * stride_kh + t0 * stride_kn
                v_base = V + b64 * stride_vb + h * stride_vh + t0 * stride_vn
                o_base = O + b64 * stride_ob + h * stride_oh + t0 * stride_on
                lse_base = LSE + b64 * stride_lb + h * stride_lh + seq_start
                pad_base = PAD + b64 * stride_pb
                if pid_m < n_full:
                    _fwd_rows(q_base, k_base, v_base, o_base, lse_base, pad_base, pid_m * BLOCK_M,
                              seq_len, stride_qn, stride_kn, stride_vn, stride_on, qk_scale, HEAD_DIM,
                              BLOCK_D, BLOCK_M, BLOCK_N, TAIL_N, False, HAS_MASK, DOT_PRECISION)
                if owns_tail:  # the remainder in TAIL_M-row sub-blocks (short configs: one block)
                    tail_start = n_full * BLOCK_M
                    for sub_start in range(tail_start, seq_len, TAIL_M):
                        _fwd_rows(q_base, k_base, v_base, o_base, lse_base, pad_base, sub_start,
                                  seq_len, stride_qn, stride_kn, stride_vn, stride_on, qk_scale,
                                  HEAD_DIM, BLOCK_D, TAIL_M, BLOCK_N, TAIL_N, True, HAS_MASK,
                                  DOT_PRECISION)


# --------------------------------------------------------------------------------------------------
# backward, pass 1: dQ for a block of query rows, looping over all keys. It also computes and stores
# delta_i = Σ_d out·dout (= Σ_j p_ij dp_ij, the softmax-backward row term) for pass 2, so no
# separate preprocessing pass reads out and dout.
# --------------------------------------------------------------------------------------------------
@triton.jit
def _dq_step(q, do, dq, lse2, delta, k_base, v_base, pad_base, cols, seq_len, stride_kn, stride_vn,
             dims, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, KEY_BOUNDS: tl.constexpr,
             HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    k = _load_rows(k_base, cols, seq_len, stride_kn, dims, HEAD_DIM, BLOCK_D, KEY_BOUNDS)
    v = _load_rows(v_base, cols, seq_len, stride_vn, dims, HEAD_DIM, BLOCK_D, KEY_BOUNDS)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    if KEY_BOUNDS:
        p = tl.where(cols[None, :] < seq_len, p, 0.0)
    if HAS_MASK:
        pad = tl.load(pad_base + cols, mask=cols < seq_len, other=1) != 0
        p = tl.where(pad[None, :], 0.0, p)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_rows(q_base, k_base, v_base, o_base, do_base, lse_base, delta_base, pad_base, dq_base,
             row_start, seq_len, stride_qn, stride_kn, stride_vn, stride_on, stride_don, stride_dqn,
             scale, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
             BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, ROW_BOUNDS: tl.constexpr,
             HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    rows = row_start + tl.arange(0, ROWS)
    dims = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base, rows, seq_len, stride_qn, dims, HEAD_DIM, BLOCK_D, ROW_BOUNDS)
    do = _load_rows(do_base, rows, seq_len, stride_don, dims, HEAD_DIM, BLOCK_D, ROW_BOUNDS)
    o = _load_rows(o_base, rows, seq_len, stride_on, dims, HEAD_DIM, BLOCK_D, ROW_BOUNDS)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if ROW_BOUNDS:  # rows past the end: LSE = +inf makes p = 0
        lse2 = tl.load(lse_base + rows, mask=rows < seq_len, other=float("inf")) * LOG2E_C
        tl.store(delta_base + rows, delta, mask=rows < seq_len)
    else:
        lse2 = tl.load(lse_base + rows) * LOG2E_C
        tl.store(delta_base + rows, delta)
    dq = tl.zeros([ROWS, BLOCK_D], tl.float32)
    full_end = (seq_len // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        dq = _dq_step(q, do, dq, lse2, delta, k_base, v_base, pad_base, cols, seq_len, stride_kn,
                      stride_vn, dims, qk_scale, HEAD_DIM, BLOCK_D, False, HAS_MASK, DOT_PRECISION)
    for start_n in range(full_end, seq_len, TAIL_N):
        cols = start_n + tl.arange(0, TAIL_N)
        dq = _dq_step(q, do, dq, lse2, delta, k_base, v_base, pad_base, cols, seq_len, stride_kn,
                      stride_vn, dims, qk_scale, HEAD_DIM, BLOCK_D, True, HAS_MASK, DOT_PRECISION)
    _store_rows(dq_base, dq * scale, rows, seq_len, stride_dqn, dims, HEAD_DIM, BLOCK_D)


@triton.jit
def attn_bwd_dq_kernel(Q, K, V, O, DO, LSE, DELTA, PAD, DQ, CU_SEQLENS,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                       stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                       stride_lb, stride_lh, stride_pb, H, N, SEQ_BUCKET, scale, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
                       HEADS_PER_PROG: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """Grid: (cdiv(max_seqlen, BLOCK_M), cdiv(H, HEADS_PER_PROG), number of sequences)."""
    # strides the launch guarantees to be multiples of ROW_ALIGN (see _aligned_strides)
    stride_qb, stride_qh, stride_qn = _aligned_strides(stride_qb, stride_qh, stride_qn, ROW_ALIGN)
    stride_kb, stride_kh, stride_kn = _aligned_strides(stride_kb, stride_kh, stride_kn, ROW_ALIGN)
    stride_vb, stride_vh, stride_vn = _aligned_strides(stride_vb, stride_vh, stride_vn, ROW_ALIGN)
    stride_ob, stride_oh, stride_on = _aligned_strides(stride_ob, stride_oh, stride_on, ROW_ALIGN)
    stride_dob, stride_doh, stride_don = _aligned_strides(stride_dob, stride_doh, stride_don, ROW_ALIGN)
    stride_dqb, stride_dqh, stride_dqn = _aligned_strides(stride_dqb, stride_dqh, stride_dqn, ROW_ALIGN)
    pid_m = tl.program_id(0)
    b = tl.program_id(2)
    seq_start, seq_len = _sequence(CU_SEQLENS, b, N, VARLEN)
    n_full = seq_len // BLOCK_M
    owns_tail = pid_m == n_full  # the short remainder, if any, is a program of its own
    if pid_m <= n_full:
        for i in range(HEADS_PER_PROG):
            h = tl.program_id(1) * HEADS_PER_PROG + i
            if h < H:
                b64 = b.to(tl.int64)
                t0 = seq_start.to(tl.int64)
                q_base = Q + b64 * stride_qb + h * stride_qh + t0 * stride_qn
                k_base = K + b64 * stride_kb + h * stride_kh + t0 * stride_kn
                v_base = V + b64 * stride_vb + h * stride_vh + t0 * stride_vn
                o_base = O + b64 * stride_ob + h * stride_oh + t0 * stride_on
                do_base = DO + b64 * stride_dob + h * stride_doh + t0 * stride_don
                dq_base = DQ + b64 * stride_dqb + h * stride_dqh + t0 * stride_dqn
                lse_base = LSE + b64 * stride_lb + h * stride_lh + seq_start
                delta_base = DELTA + b64 * stride_lb + h * stride_lh + seq_start
                pad_base = PAD + b64 * stride_pb
                if pid_m < n_full:
                    _dq_rows(q_base, k_base, v_base, o_base, do_base, lse_base, delta_base, pad_base,
                             dq_base, pid_m * BLOCK_M, seq_len, stride_qn, stride_kn, stride_vn,
                             stride_on, stride_don, stride_dqn, scale, qk_scale, HEAD_DIM, BLOCK_D,
                             BLOCK_M, BLOCK_N, TAIL_N, False, HAS_MASK, DOT_PRECISION)
                if owns_tail:
                    tail_start = n_full * BLOCK_M
                    for sub_start in range(tail_start, seq_len, TAIL_M):
                        _dq_rows(q_base, k_base, v_base, o_base, do_base, lse_base, delta_base,
                                 pad_base, dq_base, sub_start, seq_len, stride_qn, stride_kn,
                                 stride_vn, stride_on, stride_don, stride_dqn, scale, qk_scale,
                                 HEAD_DIM, BLOCK_D, TAIL_M, BLOCK_N, TAIL_N, True, HAS_MASK,
                                 DOT_PRECISION)


# --------------------------------------------------------------------------------------------------
# backward, pass 2: dK and dV for a block of keys, looping over all query rows (uses pass 1's delta)
# --------------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_step(k, v, dk, dv, q_base, do_base, lse_base, delta_base, rows, seq_len, stride_qn,
               stride_don, dims, qk_scale, key_pad, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               ROW_BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Work transposed ([keys, rows]) so every product is a plain tl.dot on loaded tiles.
    q = _load_rows(q_base, rows, seq_len, stride_qn, dims, HEAD_DIM, BLOCK_D, ROW_BOUNDS)
    do = _load_rows(do_base, rows, seq_len, stride_don, dims, HEAD_DIM, BLOCK_D, ROW_BOUNDS)
    if ROW_BOUNDS:  # rows past the end: LSE = +inf gives p = 0, delta = 0 gives ds = 0
        lse2 = tl.load(lse_base + rows, mask=rows < seq_len, other=float("inf")) * LOG2E_C
        delta = tl.load(delta_base + rows, mask=rows < seq_len, other=0.0)
    else:
        lse2 = tl.load(lse_base + rows) * LOG2E_C
        delta = tl.load(delta_base + rows)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
    p_t = tl.math.exp2(s_t - lse2[None, :])
    if HAS_MASK:
        p_t = tl.where(key_pad[:, None], 0.0, p_t)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_cols(q_base, k_base, v_base, do_base, lse_base, delta_base, pad_base, dk_base, dv_base,
               col_start, seq_len, stride_qn, stride_kn, stride_vn, stride_don, stride_dkn,
               stride_dvn, scale, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               COLS: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr,
               COL_BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    cols = col_start + tl.arange(0, COLS)
    dims = tl.arange(0, BLOCK_D)
    # Keys past the end load as 0; their dK/dV rows are computed but never stored.
    k = _load_rows(k_base, cols, seq_len, stride_kn, dims, HEAD_DIM, BLOCK_D, COL_BOUNDS)
    v = _load_rows(v_base, cols, seq_len, stride_vn, dims, HEAD_DIM, BLOCK_D, COL_BOUNDS)
    key_pad = cols < 0
    if HAS_MASK:
        key_pad = tl.load(pad_base + cols, mask=cols < seq_len, other=1) != 0
    dk = tl.zeros([COLS, BLOCK_D], tl.float32)
    dv = tl.zeros([COLS, BLOCK_D], tl.float32)
    full_end = (seq_len // BLOCK_M) * BLOCK_M
    for start_m in range(0, full_end, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        dk, dv = _dkdv_step(k, v, dk, dv, q_base, do_base, lse_base, delta_base, rows, seq_len,
                            stride_qn, stride_don, dims, qk_scale, key_pad, HEAD_DIM, BLOCK_D,
                            False, HAS_MASK, DOT_PRECISION)
    for start_m in range(full_end, seq_len, TAIL_M):
        rows = start_m + tl.arange(0, TAIL_M)
        dk, dv = _dkdv_step(k, v, dk, dv, q_base, do_base, lse_base, delta_base, rows, seq_len,
                            stride_qn, stride_don, dims, qk_scale, key_pad, HEAD_DIM, BLOCK_D,
                            True, HAS_MASK, DOT_PRECISION)
    _store_rows(dk_base, dk * scale, cols, seq_len, stride_dkn, dims, HEAD_DIM, BLOCK_D)
    _store_rows(dv_base, dv, cols, seq_len, stride_dvn, dims, HEAD_DIM, BLOCK_D)


@triton.jit
def attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, PAD, DK, DV, CU_SEQLENS,
                         stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                         stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                         stride_lb, stride_lh, stride_pb, H, N, SEQ_BUCKET, scale, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
                         HEADS_PER_PROG: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """Grid: (cdiv(max_seqlen, BLOCK_N), cdiv(H, HEADS_PER_PROG), number of sequences)."""
    # strides the launch guarantees to be multiples of ROW_ALIGN (see _aligned_strides)
    stride_qb, stride_qh, stride_qn = _aligned_strides(stride_qb, stride_qh, stride_qn, ROW_ALIGN)
    stride_kb, stride_kh, stride_kn = _aligned_strides(stride_kb, stride_kh, stride_kn, ROW_ALIGN)
    stride_vb, stride_vh, stride_vn = _aligned_strides(stride_vb, stride_vh, stride_vn, ROW_ALIGN)
    stride_dob, stride_doh, stride_don = _aligned_strides(stride_dob, stride_doh, stride_don, ROW_ALIGN)
    stride_dkb, stride_dkh, stride_dkn = _aligned_strides(stride_dkb, stride_dkh, stride_dkn, ROW_ALIGN)
    stride_dvb, stride_dvh, stride_dvn = _aligned_strides(stride_dvb, stride_dvh, stride_dvn, ROW_ALIGN)
    pid_n = tl.program_id(0)
    b = tl.program_id(2)
    seq_start, seq_len = _sequence(CU_SEQLENS, b, N, VARLEN)
    n_full = seq_len // BLOCK_N
    owns_tail = pid_n == n_full  # the short remainder, if any, is a program of its own
    if pid_n <= n_full:
        for i in range(HEADS_PER_PROG):
            h = tl.program_id(1) * HEADS_PER_PROG + i
            if h < H:
                b64 = b.to(tl.int64)
                t0 = seq_start.to(tl.int64)
                q_base = Q + b64 * stride_qb + h * stride_qh + t0 * stride_qn
                k_base = K + b64 * stride_kb + h * stride_kh + t0 * stride_kn
                v_base = V + b64 * stride_vb + h * stride_vh + t0 * stride_vn
                do_base = DO + b64 * stride_dob + h * stride_doh + t0 * stride_don
                dk_base = DK + b64 * stride_dkb + h * stride_dkh + t0 * stride_dkn
                dv_base = DV + b64 * stride_dvb + h * stride_dvh + t0 * stride_dvn
                lse_base = LSE + b64 * stride_lb + h * stride_lh + seq_start
                delta_base = DELTA + b64 * stride_lb + h * stride_lh + seq_start
                pad_base = PAD + b64 * stride_pb
                if pid_n < n_full:
                    _dkdv_cols(q_base, k_base, v_base, do_base, lse_base, delta_base, pad_base,
                               dk_base, dv_base, pid_n * BLOCK_N, seq_len, stride_qn, stride_kn,
                               stride_vn, stride_don, stride_dkn, stride_dvn, scale, qk_scale,
                               HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_M, TAIL_M, False, HAS_MASK,
                               DOT_PRECISION)
                if owns_tail:
                    tail_start = n_full * BLOCK_N
                    for sub_start in range(tail_start, seq_len, TAIL_N):
                        _dkdv_cols(q_base, k_base, v_base, do_base, lse_base, delta_base,
                                   pad_base, dk_base, dv_base, sub_start, seq_len, stride_qn,
                                   stride_kn, stride_vn, stride_don, stride_dkn, stride_dvn,
                                   scale, qk_scale, HEAD_DIM, BLOCK_D, TAIL_N, BLOCK_M, TAIL_M,
                                   True, HAS_MASK, DOT_PRECISION)


# --------------------------------------------------------------------------------------------------
# backward for short sequences (N ≤ BLOCK, e.g. the N = 50 local crops): one tile per head, so dQ,
# dK and dV come out of one pass: S and P are computed once instead of once per backward pass.
# --------------------------------------------------------------------------------------------------
@triton.jit
def attn_bwd_short_kernel(Q, K, V, O, DO, LSE, PAD, DQ, DK, DV, CU_SEQLENS,
                          stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                          stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                          stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                          stride_lb, stride_lh, stride_pb, H, N, SEQ_BUCKET, scale, qk_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
                          HEADS_PER_PROG: tl.constexpr, HAS_MASK: tl.constexpr,
                          VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          ROW_ALIGN: tl.constexpr):
    """Grid: (1, cdiv(H, HEADS_PER_PROG), number of sequences); every sequence has ≤ BLOCK tokens."""
    # strides the launch guarantees to be multiples of ROW_ALIGN (see _aligned_strides)
    stride_qb, stride_qh, stride_qn = _aligned_strides(stride_qb, stride_qh, stride_qn, ROW_ALIGN)
    stride_kb, stride_kh, stride_kn = _aligned_strides(stride_kb, stride_kh, stride_kn, ROW_ALIGN)
    stride_vb, stride_vh, stride_vn = _aligned_strides(stride_vb, stride_vh, stride_vn, ROW_ALIGN)
    stride_ob, stride_oh, stride_on = _aligned_strides(stride_ob, stride_oh, stride_on, ROW_ALIGN)
    stride_dob, stride_doh, stride_don = _aligned_strides(stride_dob, stride_doh, stride_don, ROW_ALIGN)
    stride_dqb, stride_dqh, stride_dqn = _aligned_strides(stride_dqb, stride_dqh, stride_dqn, ROW_ALIGN)
    stride_dkb, stride_dkh, stride_dkn = _aligned_strides(stride_dkb, stride_dkh, stride_dkn, ROW_ALIGN)
    stride_dvb, stride_dvh, stride_dvn = _aligned_strides(stride_dvb, stride_dvh, stride_dvn, ROW_ALIGN)
    b = tl.program_id(2)
    seq_start, seq_len = _sequence(CU_SEQLENS, b, N, VARLEN)
    idx = tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    t0 = seq_start.to(tl.int64)
    key_ok = idx < seq_len
    if HAS_MASK:
        key_ok = key_ok & (tl.load(PAD + b64 * stride_pb + idx, mask=idx < seq_len, other=1) == 0)
    for i in range(HEADS_PER_PROG):
        h = tl.program_id(1) * HEADS_PER_PROG + i
        if h < H:
            q = _load_rows(Q + b64 * stride_qb + h * stride_qh + t0 * stride_qn, idx, seq_len,
                           stride_qn, dims, HEAD_DIM, BLOCK_D, True)
            k = _load_rows(K + b64 * stride_kb + h * stride_kh + t0 * stride_kn, idx, seq_len,
                           stride_kn, dims, HEAD_DIM, BLOCK_D, True)
            v = _load_rows(V + b64 * stride_vb + h * stride_vh + t0 * stride_vn, idx, seq_len,
                           stride_vn, dims, HEAD_DIM, BLOCK_D, True)
            o = _load_rows(O + b64 * stride_ob + h * stride_oh + t0 * stride_on, idx, seq_len,
                           stride_on, dims, HEAD_DIM, BLOCK_D, True)
            do = _load_rows(DO + b64 * stride_dob + h * stride_doh + t0 * stride_don, idx, seq_len,
                            stride_don, dims, HEAD_DIM, BLOCK_D, True)
            lse_base = LSE + b64 * stride_lb + h * stride_lh + seq_start
            lse2 = tl.load(lse_base + idx, mask=idx < seq_len, other=float("inf")) * LOG2E_C
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            p = tl.where(key_ok[None, :], tl.math.exp2(s - lse2[:, None]), 0.0)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = (p * (dp - delta[:, None])).to(q.dtype)
            dq = tl.dot(ds, k, input_precision=DOT_PRECISION) * scale
            dk = tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION) * scale
            _store_rows(DQ + b64 * stride_dqb + h * stride_dqh + t0 * stride_dqn, dq, idx, seq_len,
                        stride_dqn, dims, HEAD_DIM, BLOCK_D)
            _store_rows(DK + b64 * stride_dkb + h * stride_dkh + t0 * stride_dkn, dk, idx, seq_len,
                        stride_dkn, dims, HEAD_DIM, BLOCK_D)
            _store_rows(DV + b64 * stride_dvb + h * stride_dvh + t0 * stride_dvn, dv, idx, seq_len,
                        stride_dvn, dims, HEAD_DIM, BLOCK_D)
