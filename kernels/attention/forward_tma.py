"""Forward kernels that load and store through TMA descriptors (Hopper's tensor memory accelerator).

A descriptor made in the kernel (``tl.make_tensor_descriptor``) for one head of one sequence,
[seq_len, HEAD_DIM] at the head's base address, does the bounds work the pointer kernels do by hand:
rows past the sequence (and columns past HEAD_DIM) load as zeros and stores past them are dropped.
So one kernel serves dense, key-padded and packed (varlen) layouts, there are no separate row-tail
programs (the old row tail compiled to mma.sync, not wgmma), and a program owns rows
[pid·BLOCK_M, pid·BLOCK_M + BLOCK_M) whether or not they are all real. A 2-D descriptor per head also
takes any batch / head strides (a slice of a fused qkv projection), which one 3-D [B·H, N, D]
descriptor cannot, and needs no reshape (the warp-specialisation pass rejects a reshaped 3-D load).

- ``attn_fwd_tma_kernel``: one program per (row block, head, sequence). The loop over full key blocks
  is unmasked; the keys left past the last full block take one masked step: TAIL_N wide (through a
  second, narrow pair of descriptors) when they fit in it, else BLOCK_N wide. ``WARP_SPECIALIZE`` asks Triton to split the main loop into a
  TMA producer warp and two consumer warpgroups (``tl.range(..., warp_specialize=True)``), so one
  warpgroup's softmax overlaps the other's wgmma. Triton applies it only at num_warps = 4 and drops
  it silently otherwise: the compile gate checks the SASS for ``USETMAXREG``, not this flag.
- ``attn_fwd_short_kernel``: sequences of at most BLOCK tokens (the local crops, N = 50): one program
  per (sequence, group of heads), one tile per head, the head loop software-pipelined so that the
  next head's TMA loads fly while this head is computed. The descriptor is 3-D [H, seq_len, D] (head,
  token, feature), one per program, so any head stride works.

The softmax scale is folded into the exponent: the running maximum is kept on the scaled scores, and
``p = exp2(qk·qk_scale − m)`` is one FFMA per score (qk_scale = scale·log2 e > 0; the launcher sends a
non-positive scale to the pointer kernels, where the order of max and scale does not matter).
Outputs match the pointer kernels: LSE in natural log, +inf (and output 0) for a row whose keys are
all padding.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..triton_utils import LN2_C
from .kernels import _sequence


@triton.jit
def _head_desc(base, seq_len, stride_n, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """[seq_len, HEAD_DIM] rows of one head, read and written ROWS × BLOCK_D at a time."""
    return tl.make_tensor_descriptor(base, shape=[seq_len, HEAD_DIM], strides=[stride_n, 1],
                                     block_shape=[ROWS, BLOCK_D])


@triton.jit
def _online_softmax_step(q, q2, k_desc, v_desc, k2_desc, v2_desc, start_n, m_i, l_i, acc, acc2, seq_len,
                         pad_base, qk_scale, KEYS: tl.constexpr, BLOCK_D: tl.constexpr,
                         SPLIT_D: tl.constexpr, KEY_BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """One online-softmax step over the KEYS keys from ``start_n`` (scores scaled inside the
    exponent). With SPLIT_D the head's columns come in two panels, [0, BLOCK_D) and
    [BLOCK_D, BLOCK_D + SPLIT_D) (q2, k2, v2, acc2): d = 72 runs as 64 + 16, not 128. Without it the
    second-panel arguments are placeholders, never read (acc2 comes back unchanged)."""
    cols = start_n + tl.arange(0, KEYS)
    k = k_desc.load([start_n, 0])
    v = v_desc.load([start_n, 0])
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if SPLIT_D:
        qk = tl.dot(q2, tl.trans(k2_desc.load([start_n, BLOCK_D])), qk, input_precision=DOT_PRECISION)
    if KEY_BOUNDS:  # keys past the sequence loaded as zeros: give them no weight
        qk = tl.where(cols[None, :] < seq_len, qk, float("-inf"))
    if HAS_MASK:
        pad = tl.load(pad_base + cols, mask=cols < seq_len, other=1) != 0
        qk = tl.where(pad[None, :], float("-inf"), qk)
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_use = m_new
    if HAS_MASK:  # a row may have seen only padding so far: keep exp2 away from (-inf) - (-inf)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v.dtype)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    if SPLIT_D:
        acc2 = acc2 * alpha[:, None] + tl.dot(p, v2_desc.load([start_n, BLOCK_D]), input_precision=DOT_PRECISION)
    return m_new, l_i, acc, acc2


@triton.jit
def _finish_rows(acc, m_i, l_i):
    """(output, natural-log LSE) of a row block; rows that saw only padding give 0 and +inf."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2_C)
    return out, lse


@triton.jit
def attn_fwd_tma_kernel(Q, K, V, O, LSE, PAD, CU_SEQLENS,
                        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                        stride_lb, stride_lh, stride_pb, H, N, SEQ_BUCKET, qk_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
                        HAS_MASK: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        WARP_SPECIALIZE: tl.constexpr):
    """Grid: (cdiv(max_seqlen, BLOCK_M), H, number of sequences). SPLIT_D > 0: the columns past
    BLOCK_D are a second panel SPLIT_D wide (see _online_softmax_step)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    seq_start, seq_len = _sequence(CU_SEQLENS, b, N, VARLEN)
    row_start = pid_m * BLOCK_M
    if row_start < seq_len:  # varlen: programs past a short sequence's end have nothing to do
        b64 = b.to(tl.int64)
        t0 = seq_start.to(tl.int64)
        q_base = Q + b64 * stride_qb + h * stride_qh + t0 * stride_qn
        k_base = K + b64 * stride_kb + h * stride_kh + t0 * stride_kn
        v_base = V + b64 * stride_vb + h * stride_vh + t0 * stride_vn
        o_base = O + b64 * stride_ob + h * stride_oh + t0 * stride_on
        k_desc = _head_desc(k_base, seq_len, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D)
        v_desc = _head_desc(v_base, seq_len, stride_vn, HEAD_DIM, BLOCK_N, BLOCK_D)
        pad_base = PAD + b64 * stride_pb
        q = _head_desc(q_base, seq_len, stride_qn, HEAD_DIM, BLOCK_M, BLOCK_D).load([row_start, 0])
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # the second column panel (placeholders without SPLIT_D: never loaded, acc2 never changed)
        q2, acc2, k2_desc, v2_desc = q, acc, k_desc, v_desc
        if SPLIT_D:
            q2 = _head_desc(q_base, seq_len, stride_qn, HEAD_DIM, BLOCK_M, SPLIT_D).load([row_start, BLOCK_D])
            acc2 = tl.zeros([BLOCK_M, SPLIT_D], tl.float32)
            k2_desc = _head_desc(k_base, seq_len, stride_kn, HEAD_DIM, BLOCK_N, SPLIT_D)
            v2_desc = _head_desc(v_base, seq_len, stride_vn, HEAD_DIM, BLOCK_N, SPLIT_D)
        if WARP_SPECIALIZE:
            # One loop, every step masked: the pass that splits the loop into producer and consumers
            # leaves the kernel alone (silently) if a second loop, a step outside the loop or a branch
            # inside it does tensor-core work; a select per score is cheap next to the exp.
            for start_n in tl.range(0, seq_len, BLOCK_N, warp_specialize=True):
                m_i, l_i, acc, acc2 = _online_softmax_step(
                    q, q2, k_desc, v_desc, k2_desc, v2_desc, start_n, m_i, l_i, acc, acc2, seq_len, pad_base,
                    qk_scale, BLOCK_N, BLOCK_D, SPLIT_D, True, HAS_MASK, DOT_PRECISION)
        else:
            full_end = (seq_len // BLOCK_N) * BLOCK_N
            for start_n in tl.range(0, full_end, BLOCK_N):
                m_i, l_i, acc, acc2 = _online_softmax_step(
                    q, q2, k_desc, v_desc, k2_desc, v2_desc, start_n, m_i, l_i, acc, acc2, seq_len, pad_base,
                    qk_scale, BLOCK_N, BLOCK_D, SPLIT_D, False, HAS_MASK, DOT_PRECISION)
            if full_end < seq_len:  # the 1..BLOCK_N-1 leftover keys: one masked step
                if seq_len - full_end <= TAIL_N:   # a narrow one (N = 257: one key, 16 columns, not 64)
                    kt_desc = _head_desc(k_base, seq_len, stride_kn, HEAD_DIM, TAIL_N, BLOCK_D)
                    vt_desc = _head_desc(v_base, seq_len, stride_vn, HEAD_DIM, TAIL_N, BLOCK_D)
                    kt2_desc, vt2_desc = kt_desc, vt_desc
                    if SPLIT_D:
                        kt2_desc = _head_desc(k_base, seq_len, stride_kn, HEAD_DIM, TAIL_N, SPLIT_D)
                        vt2_desc = _head_desc(v_base, seq_len, stride_vn, HEAD_DIM, TAIL_N, SPLIT_D)
                    m_i, l_i, acc, acc2 = _online_softmax_step(
                        q, q2, kt_desc, vt_desc, kt2_desc, vt2_desc, full_end, m_i, l_i, acc, acc2, seq_len,
                        pad_base, qk_scale, TAIL_N, BLOCK_D, SPLIT_D, True, HAS_MASK, DOT_PRECISION)
                else:   # a full-width one (a 50-token crop in a packed batch: one step, not four narrow)
                    m_i, l_i, acc, acc2 = _online_softmax_step(
                        q, q2, k_desc, v_desc, k2_desc, v2_desc, full_end, m_i, l_i, acc, acc2, seq_len,
                        pad_base, qk_scale, BLOCK_N, BLOCK_D, SPLIT_D, True, HAS_MASK, DOT_PRECISION)
        out, lse = _finish_rows(acc, m_i, l_i)
        _head_desc(o_base, seq_len, stride_on, HEAD_DIM, BLOCK_M, BLOCK_D).store(
            [row_start, 0], out.to(O.dtype.element_ty))
        if SPLIT_D:
            out2, _ = _finish_rows(acc2, m_i, l_i)
            _head_desc(o_base, seq_len, stride_on, HEAD_DIM, BLOCK_M, SPLIT_D).store(
                [row_start, BLOCK_D], out2.to(O.dtype.element_ty))
        rows = row_start + tl.arange(0, BLOCK_M)
        tl.store(LSE + b64 * stride_lb + h * stride_lh + seq_start + rows, lse, mask=rows < seq_len)


@triton.jit
def _heads_desc(base, H, seq_len, stride_h, stride_n, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                WIDTH: tl.constexpr):
    """[H, seq_len, HEAD_DIM]: every head of one sequence, a [1, BLOCK, WIDTH] tile at a time."""
    return tl.make_tensor_descriptor(base, shape=[H, seq_len, HEAD_DIM], strides=[stride_h, stride_n, 1],
                                     block_shape=[1, BLOCK, WIDTH])


@triton.jit
def attn_fwd_short_kernel(Q, K, V, O, LSE, PAD, CU_SEQLENS,
                          stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                          stride_lb, stride_lh, stride_pb, H, N, SEQ_BUCKET, qk_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr,
                          BLOCK: tl.constexpr, HEADS_PER_PROG: tl.constexpr, HAS_MASK: tl.constexpr,
                          VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid: (1, cdiv(H, HEADS_PER_PROG), number of sequences); every sequence has ≤ BLOCK tokens."""
    b = tl.program_id(2)
    seq_start, seq_len = _sequence(CU_SEQLENS, b, N, VARLEN)
    if seq_len > 0:
        b64 = b.to(tl.int64)
        t0 = seq_start.to(tl.int64)
        q_base = Q + b64 * stride_qb + t0 * stride_qn
        k_base = K + b64 * stride_kb + t0 * stride_kn
        v_base = V + b64 * stride_vb + t0 * stride_vn
        o_base = O + b64 * stride_ob + t0 * stride_on
        q_desc = _heads_desc(q_base, H, seq_len, stride_qh, stride_qn, HEAD_DIM, BLOCK, BLOCK_D)
        k_desc = _heads_desc(k_base, H, seq_len, stride_kh, stride_kn, HEAD_DIM, BLOCK, BLOCK_D)
        v_desc = _heads_desc(v_base, H, seq_len, stride_vh, stride_vn, HEAD_DIM, BLOCK, BLOCK_D)
        o_desc = _heads_desc(o_base, H, seq_len, stride_oh, stride_on, HEAD_DIM, BLOCK, BLOCK_D)
        q2_desc, k2_desc, v2_desc, o2_desc = q_desc, k_desc, v_desc, o_desc   # the second column panel
        if SPLIT_D:
            q2_desc = _heads_desc(q_base, H, seq_len, stride_qh, stride_qn, HEAD_DIM, BLOCK, SPLIT_D)
            k2_desc = _heads_desc(k_base, H, seq_len, stride_kh, stride_kn, HEAD_DIM, BLOCK, SPLIT_D)
            v2_desc = _heads_desc(v_base, H, seq_len, stride_vh, stride_vn, HEAD_DIM, BLOCK, SPLIT_D)
            o2_desc = _heads_desc(o_base, H, seq_len, stride_oh, stride_on, HEAD_DIM, BLOCK, SPLIT_D)
        idx = tl.arange(0, BLOCK)
        key_ok = idx < seq_len
        if HAS_MASK:
            key_ok = key_ok & (tl.load(PAD + b64 * stride_pb + idx, mask=idx < seq_len, other=1) == 0)
        lse_base = LSE + b64 * stride_lb + seq_start
        h0 = tl.program_id(1) * HEADS_PER_PROG
        # the next head's loads overlap this head's math (no branch in the loop: it would stop that)
        for h in tl.range(h0, tl.minimum(h0 + HEADS_PER_PROG, H), num_stages=2):
            q = q_desc.load([h, 0, 0]).reshape(BLOCK, BLOCK_D)
            k = k_desc.load([h, 0, 0]).reshape(BLOCK, BLOCK_D)
            v = v_desc.load([h, 0, 0]).reshape(BLOCK, BLOCK_D)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            if SPLIT_D:
                qk = tl.dot(q2_desc.load([h, 0, BLOCK_D]).reshape(BLOCK, SPLIT_D),
                            tl.trans(k2_desc.load([h, 0, BLOCK_D]).reshape(BLOCK, SPLIT_D)), qk,
                            input_precision=DOT_PRECISION)
            qk = tl.where(key_ok[None, :], qk, float("-inf"))
            m = tl.max(qk, 1) * qk_scale
            if HAS_MASK:  # a row of padding only: keep exp2 away from (-inf) - (-inf)
                m = tl.where(m == float("-inf"), 0.0, m)
            p = tl.math.exp2(qk * qk_scale - m[:, None])
            l_i = tl.sum(p, 1)
            p = p.to(v.dtype)
            out, lse = _finish_rows(tl.dot(p, v, input_precision=DOT_PRECISION), m, l_i)
            o_desc.store([h, 0, 0], out.to(O.dtype.element_ty).reshape(1, BLOCK, BLOCK_D))
            if SPLIT_D:
                v2 = v2_desc.load([h, 0, BLOCK_D]).reshape(BLOCK, SPLIT_D)
                out2, _ = _finish_rows(tl.dot(p, v2, input_precision=DOT_PRECISION), m, l_i)
                o2_desc.store([h, 0, BLOCK_D], out2.to(O.dtype.element_ty).reshape(1, BLOCK, SPLIT_D))
            tl.store(lse_base + h * stride_lh + idx, lse, mask=idx < seq_len)
