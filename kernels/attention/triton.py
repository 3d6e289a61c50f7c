"""Triton flash attention: the public ops, their autograd, and the torch.library registration.

``attention`` (dense [B, H, N, D] + optional key padding) and ``attention_varlen`` (packed [T, H, D] +
``cu_seqlens``) are the two front doors of one pair of custom ops:

- ``fasttips::flash_attention_fwd(q, k, v, key_padding_mask?, cu_seqlens?, max_seqlen, scale,
  short_bwd_max, interpret_blocks?)`` → (out, lse), with ``register_fake`` shapes and
  ``register_autograd`` pointing at
- ``fasttips::flash_attention_bwd(dout, q, k, v, out, lse, ...)`` → (dq, dk, dv).

``short_bwd_max`` (default SHORT_BWD_MAX) and ``interpret_blocks`` (default INTERPRET_CONFIG) are
explicit arguments so that tests can pick the backward and the interpreter's block shapes per call.

Being opaque custom ops with fake implementations, they let ``torch.compile`` trace a model around
them without graph breaks. The kernels themselves live in ``kernels.py``; block shapes are autotuned
on GPUs (``*_CONFIGS``) and fixed and small under ``TRITON_INTERPRET=1`` (``INTERPRET_CONFIG``).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton

from .._backend import interpreting
from ..triton_utils import LOG2E, autotune_configs, block_d, constexprs_of, launch_config, precision
from . import backward_onepass as B1
from . import forward_tma as FT
from . import kernels as K
from .common import check_max_seqlen, longest_sequence

MAX_HEAD_DIM = 128
SHORT_SEQ = 128  # sequences up to this length use the short-sequence configurations


def _cfg(block_m, block_n, heads, warps, stages, tail_m=16, tail_n=16):
    return launch_config(warps, stages, BLOCK_M=block_m, BLOCK_N=block_n, HEADS_PER_PROG=heads,
                         TAIL_M=tail_m, TAIL_N=tail_n)


# Every entry is compiled for sm_90a by the Hopper gate (tests/tooling/gate_attention.py), which rejects register
# spills, so keep the lists short. TAIL_M / TAIL_N are the widths of the narrow steps over the rows /
# keys left past the last full block: 16 (tl.dot's smallest friendly width) for N = 257 or 1025 (one
# CLS-like extra token); for short sequences one masked block (N = 50 runs as one 64 × 64 tile per
# head). "wide" serves head dims 65..128 (72 runs as 128, and its 144-byte rows do not vectorise):
# smaller tiles, or the kernels spill.
FWD_CONFIGS = {
    "long": [_cfg(128, 64, 1, 4, 3), _cfg(64, 64, 1, 4, 3)],
    "short": [_cfg(64, 64, 2, 4, 1, 64, 64), _cfg(64, 64, 1, 4, 2, 64, 64)],
    "wide": [_cfg(64, 32, 1, 4, 2)],
}
# dQ (backward pass 1): BLOCK_M query rows per program, BLOCK_N keys per inner step.
DQ_CONFIGS = {
    "long": [_cfg(128, 32, 1, 4, 3), _cfg(64, 64, 1, 4, 3)],
    "short": [_cfg(64, 64, 1, 4, 2, 32, 32)],
    "wide": [_cfg(64, 32, 1, 4, 2)],
}
# dK/dV (backward pass 2): BLOCK_N keys per program, BLOCK_M query rows per inner step.
DKDV_CONFIGS = {
    "long": [_cfg(32, 128, 1, 4, 3), _cfg(64, 64, 1, 4, 3)],
    "short": [_cfg(32, 64, 1, 4, 2, 32, 32), _cfg(64, 64, 1, 4, 2, 32, 32)],
    "wide": [_cfg(32, 64, 1, 8, 2)],
}
# One-tile backward for sequences of at most SHORT_BWD_BLOCK tokens and head dims ≤ 64 (the N = 50
# local crops): dQ, dK, dV in one pass. Only warps and heads per program vary.
SHORT_BWD_BLOCK = 64
SHORT_BWD_MAX = SHORT_BWD_BLOCK  # default short_bwd_max; 0 sends short sequences through the two-pass backward
# (At 8 warps the 64 × 64 tile made every thread exponentiate each of its scores twice: dropped.)
SHORT_BWD_CONFIGS = {"short": [_cfg(SHORT_BWD_BLOCK, SHORT_BWD_BLOCK, 1, 4, 1),
                               _cfg(SHORT_BWD_BLOCK, SHORT_BWD_BLOCK, 2, 4, 1)]}

# TMA forward (forward_tma.py), plain and warp-specialised: BLOCK_M rows per program, full BLOCK_N-key
# steps, then TAIL_N-key masked steps. No row tail: TMA zero-fills the rows past the end.
FWD_TMA_CONFIGS = {
    "long": [_cfg(128, 64, 1, 4, 3), _cfg(64, 64, 1, 4, 3)],
    "short": [_cfg(64, 64, 1, 4, 2)],
    "wide": [_cfg(64, 64, 1, 4, 2)],
    "split": [_cfg(128, 64, 1, 4, 2), _cfg(64, 64, 1, 4, 3)],
}
# Warp specialisation is applied at 4 warps only (8 would be silently ignored): a producer warp
# and two consumer warpgroups of 64 rows each at BLOCK_M = 128.
FWD_WS_CONFIGS = {
    "long": [_cfg(128, 64, 1, 4, 2), _cfg(128, 64, 1, 4, 3)],
    "short": [_cfg(128, 64, 1, 4, 2)],
    "wide": [_cfg(128, 64, 1, 4, 2)],
    "split": [_cfg(128, 64, 1, 4, 2)],
}
# Short sequences (≤ SHORT_FWD_BLOCK tokens) on the TMA paths: one tile per head, HEADS_PER_PROG heads
# per program with the head loop pipelined.
SHORT_FWD_BLOCK = 64
SHORT_FWD_CONFIGS = {"short": [_cfg(SHORT_FWD_BLOCK, SHORT_FWD_BLOCK, 4, 4, 2),
                               _cfg(SHORT_FWD_BLOCK, SHORT_FWD_BLOCK, 8, 4, 2)],
                     "wide": [_cfg(SHORT_FWD_BLOCK, SHORT_FWD_BLOCK, 4, 4, 2)],
                     "split": [_cfg(SHORT_FWD_BLOCK, SHORT_FWD_BLOCK, 4, 4, 2)]}
# One-pass backward (backward_onepass.py): BLOCK_N keys per program, BLOCK_M query rows per step; and
# its pre-pass (delta, zeroed dQ buffer) over BLOCK_M-row blocks.
# "wide" (head dims 65..128, run 128 wide): dK and dV of 128 keys over two warpgroups, one stage (at
# 64 keys and 4 warps it spills; at 64 keys and 8 warps each thread exponentiates every score twice).
BWD_ONEPASS_CONFIGS = {
    "long": [_cfg(64, 64, 1, 4, 2), _cfg(64, 128, 1, 8, 2)],
    "short": [_cfg(64, 64, 1, 4, 2)],
    "wide": [_cfg(64, 128, 1, 8, 1)],
    "split": [_cfg(64, 64, 1, 4, 2)],
}
BWD_PREP_CONFIGS = {"long": [_cfg(64, 64, 1, 4, 1)], "short": [_cfg(64, 64, 1, 4, 1)],
                    "wide": [_cfg(32, 32, 1, 4, 1)]}

# The paths a call may take (``forward=`` / ``backward=`` of ``attention`` and ``attention_varlen``).
FORWARDS = ("pointer", "tma", "ws")   # pointer loads (kernels.py); TMA; TMA + warp specialisation
BACKWARDS = ("two_pass", "onepass")   # dQ pass + dK/dV pass (kernels.py); one pass, dQ by atomics
# The default is a guess from the compiler's output (NOTES.md has the figures); measured dispatch
# (the variants below) decides on a GPU. Backward: one pass (5 GEMMs and one exp per score instead of 7
# and 2, no mma.sync tails, 194 registers, 2 blocks per SM). Forward: the plain TMA kernel (2–3 blocks
# per SM, so one block's softmax can overlap another's tensor-core work, as the warp-specialised one
# does inside its single 12-warp block; and a narrow last key step: at N = 257 it executes 320 × 272
# scores at 64-row tiles where the warp-specialised one, whose steps are all full and masked, executes
# 384 × 320).
DEFAULT_FORWARD = "tma"
DEFAULT_BACKWARD = "onepass"
# Every implementation measured dispatch may time: name → keyword arguments of both ``attention``
# and ``attention_varlen``. "fasttips" is the path used before the TMA and one-pass kernels existed.
VARIANTS: dict[str, dict] = {
    "fasttips": dict(forward="pointer", backward="two_pass"),
    "fasttips-onepass": dict(forward="pointer", backward="onepass"),
    "fasttips-tma": dict(forward="tma", backward="onepass"),
    "fasttips-tma-2pass": dict(forward="tma", backward="two_pass"),
    "fasttips-ws": dict(forward="ws", backward="onepass"),
    "fasttips-ws-2pass": dict(forward="ws", backward="two_pass"),
}
# The variants whose backward gives the same bits on every run: the two-pass one (no atomics; the
# one-pass backward adds dQ in fp32 atomics, whose order varies). Sequences of ≤ 64 tokens take the
# one-tile backward on every variant, which is deterministic too.
DETERMINISTIC_VARIANTS = tuple(name for name, kwargs in VARIANTS.items() if kwargs["backward"] == "two_pass")
# Under the interpreter: small blocks so that tests hit full tiles, narrow key and row tails at
# N = 50, and several heads per program. Tests pass others (``interpret_config``).
INTERPRET_CONFIG = _cfg(32, 32, 2, 4, 1)
_INTERPRET_KEYS = ("BLOCK_M", "BLOCK_N", "HEADS_PER_PROG", "TAIL_M", "TAIL_N")   # as the custom ops carry it


def _interpret_blocks(config: dict | None) -> list[int] | None:
    """An interpreter configuration (``_cfg``) as the int list the custom ops' schema can carry."""
    return None if config is None else [int(config[k]) for k in _INTERPRET_KEYS]


def _interpret_config(blocks) -> dict:
    return INTERPRET_CONFIG if blocks is None else dict(INTERPRET_CONFIG, **dict(zip(_INTERPRET_KEYS, blocks)))

# kernel name → (kernel, its configuration lists by family): the one map the launcher, the autotuner
# and the compile gate read
KERNELS = {"fwd": (K.attn_fwd_kernel, FWD_CONFIGS),
           "dq": (K.attn_bwd_dq_kernel, DQ_CONFIGS),
           "dkdv": (K.attn_bwd_dkdv_kernel, DKDV_CONFIGS),
           "bwd_short": (K.attn_bwd_short_kernel, SHORT_BWD_CONFIGS),
           "fwd_tma": (FT.attn_fwd_tma_kernel, FWD_TMA_CONFIGS),
           "fwd_ws": (FT.attn_fwd_tma_kernel, FWD_WS_CONFIGS),
           "fwd_short_tma": (FT.attn_fwd_short_kernel, SHORT_FWD_CONFIGS),
           "bwd_prep": (B1.attn_bwd_prep_kernel, BWD_PREP_CONFIGS),
           "bwd_onepass": (B1.attn_bwd_onepass_kernel, BWD_ONEPASS_CONFIGS)}
# kernels that read and write through TMA descriptors (they need a scratch allocator on a GPU)
TMA_KERNELS = ("fwd_tma", "fwd_ws", "fwd_short_tma", "bwd_onepass")
# what each kernel writes by atomics: the autotuner must restore it after timing a configuration
ACCUMULATES = {"bwd_onepass": ["DQ32"]}


def launch_constexprs(name: str, config: dict) -> dict:
    """The constexprs a configuration sets for kernel ``name`` (each kernel takes only its own): the
    one-tile kernels take the heads per program (their tile is passed with the launch); the TMA
    forward its tiles and whether to warp-specialise."""
    if name in ("bwd_short", "fwd_short_tma"):
        return {"HEADS_PER_PROG": config["HEADS_PER_PROG"]}
    if name in ("fwd_tma", "fwd_ws"):
        return {"BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"], "TAIL_N": config["TAIL_N"],
                "WARP_SPECIALIZE": name == "fwd_ws"}
    if name == "bwd_prep":
        return {"BLOCK": config["BLOCK_M"]}
    if name == "bwd_onepass":
        return {"BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"]}
    return constexprs_of(config)


def row_align(head_dim: int) -> int:
    """The multiple (in elements) that every batch / head / token stride is brought to before a
    launch and that the kernels then declare to the compiler (``ROW_ALIGN``): 8 for head dims like
    72, whose rows are 16-byte multiples in 16-bit types although 72 is not a multiple of 16, so
    that their loads are 16 bytes wide instead of one element. 1 (nothing declared) for multiples
    of 16, which Triton's own launch specialisation already covers, and for head dims that are
    not a multiple of 8."""
    return 8 if head_dim % 16 == 8 else 1


def column_panels(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, SPLIT_D): how the TMA kernels cover a head's columns. Head dims 65..96 run as a
    64-wide panel plus a 16- or 32-wide one (d = 72: 64 + 16 = 80 columns of tensor-core work, not
    128; TMA zero-fills columns 72..79 and drops them on store); others as one power-of-two panel."""
    if 64 < head_dim <= 96:
        return 64, max(16, triton.next_power_of_2(head_dim - 64))
    return block_d(head_dim), 0


def family(max_seqlen: int, head_dim: int, tma: bool = False) -> str:
    """Which configuration list serves this launch ("split": a TMA kernel at a two-panel head dim)."""
    if tma and column_panels(head_dim)[1]:
        return "split"
    if block_d(head_dim) > 64:
        return "wide"
    return "short" if max_seqlen <= SHORT_SEQ else "long"


@functools.lru_cache(maxsize=None)
def _autotuned(name: str, family: str):
    kernel, configs = KERNELS[name]
    tconfigs = autotune_configs(configs[family], lambda c: launch_constexprs(name, c))
    key = ["SEQ_BUCKET", "H", "HEAD_DIM", "HAS_MASK", "VARLEN"]
    return triton.autotune(configs=tconfigs, key=key, restore_value=ACCUMULATES.get(name))(kernel)


@functools.lru_cache(maxsize=None)
def _arg_names(name: str) -> frozenset:
    kernel = KERNELS[name][0]
    return frozenset(getattr(kernel, "arg_names", None) or kernel.fn.arg_names)


def _tma_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_tma_allocator():
    """Descriptors made inside a kernel live in a per-launch global scratch buffer that Triton asks
    an allocator for. Its setting is a context variable, so it is unset in threads that did not set
    it (autograd runs the backward on a thread of its own): set ours where none is."""
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_tma_scratch)


def _launch(name: str, max_seqlen: int, n_seqs: int, H: int, program_axis: str, args: tuple,
            consts: dict, interpret_config: dict = INTERPRET_CONFIG):
    """Launch kernel ``name``: autotuned on a GPU, with ``interpret_config`` under the interpreter."""
    def grid(meta):  # one program per full block plus one for the short remainder (or one tile)
        blocks = 1 if program_axis is None else triton.cdiv(max_seqlen, meta[program_axis])
        return (blocks, triton.cdiv(H, meta.get("HEADS_PER_PROG", 1)), n_seqs)

    tma = name in TMA_KERNELS
    if tma:
        consts = dict(consts, **dict(zip(("BLOCK_D", "SPLIT_D"), column_panels(consts["HEAD_DIM"]))))
    fam = family(max_seqlen, consts["HEAD_DIM"], tma)
    consts = {k: v for k, v in consts.items() if k in _arg_names(name)}
    if interpreting():
        launch = launch_constexprs(name, interpret_config)
        KERNELS[name][0][grid(launch)](*args, **consts, **launch)
    else:
        if tma:
            _ensure_tma_allocator()
        _autotuned(name, fam)[grid](*args, **consts)


def _seq_bucket(max_seqlen: int) -> int:
    return triton.next_power_of_2(max(int(max_seqlen), 16))


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    # dense LSE [B, H, N]; packed LSE [H, T] (the batch offset then comes from cu_seqlens)
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _layout_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides; packed tensors have no batch axis."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _common_consts(q, key_padding_mask, cu_seqlens, max_seqlen):
    D = q.shape[-1]
    return dict(HEAD_DIM=D, BLOCK_D=block_d(D),
                HAS_MASK=key_padding_mask is not None, VARLEN=cu_seqlens is not None,
                DOT_PRECISION=precision(q.dtype), ROW_ALIGN=row_align(D))


MAX_SEQUENCES = 65535  # the sequences ride on the grid's z axis


def _shape_info(q, cu_seqlens, max_seqlen):
    n_seqs, H, N = ((cu_seqlens.numel() - 1, q.shape[1], 0) if cu_seqlens is not None
                    else (q.shape[0], q.shape[1], q.shape[2]))
    if n_seqs > MAX_SEQUENCES:
        raise ValueError(f"{n_seqs} sequences in one call; at most {MAX_SEQUENCES} are supported "
                         "(split the batch)")
    return n_seqs, H, N


def _pad_arg(key_padding_mask, q):
    if key_padding_mask is None:
        return q, 0  # never read (HAS_MASK=False)
    return key_padding_mask.view(torch.uint8), key_padding_mask.stride(0)


def tma_usable(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the TMA kernels can serve this head dim and dtype: a TMA row stride must be a multiple
    of 16 bytes, so a contiguous row of HEAD_DIM elements must be (d = 64, 72, 128 in 16-bit types:
    128, 144, 256 bytes). Other head dims take the pointer kernels whatever the call asks for."""
    return head_dim * torch.empty((), dtype=dtype).element_size() % 16 == 0


def _tma_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` if TMA can address every head of it (base and every stride that is ever multiplied by a
    nonzero index a multiple of 16 bytes, last dim contiguous), else a contiguous copy."""
    elem = t.element_size()
    ok = (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
          and all(stride * elem % 16 == 0 for stride, size in zip(t.stride()[:-1], t.shape[:-1]) if size > 1))
    return t if ok else t.contiguous()


def _check_path(forward: str, backward: str) -> None:
    if forward not in FORWARDS:
        raise ValueError(f"forward={forward!r} is not one of {list(FORWARDS)}")
    if backward not in BACKWARDS:
        raise ValueError(f"backward={backward!r} is not one of {list(BACKWARDS)}")


def resolved_paths(forward: str, backward: str, head_dim: int, dtype: torch.dtype, scale: float):
    """The (forward, backward) a call runs: the TMA kernels need ``tma_usable``; the TMA forward
    keeps its running maximum on scaled scores, which needs scale > 0."""
    if not tma_usable(head_dim, dtype):
        return "pointer", "two_pass"
    return ("pointer" if scale <= 0 else forward), backward


def _forward_impl(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, interpret_blocks=None,
                  forward=DEFAULT_FORWARD):
    forward, _ = resolved_paths(forward, "two_pass", q.shape[-1], q.dtype, scale)
    layout = _kernel_layout if forward == "pointer" else _tma_layout
    q, k, v = layout(q), layout(k), layout(v)
    varlen = cu_seqlens is not None
    if varlen:  # here, in the op's body, so that compiled callers are checked too (no device wait
        # once the layout is known: see common.py)
        check_max_seqlen(max_seqlen, longest_sequence(cu_seqlens))
    n_seqs, H, N = _shape_info(q, cu_seqlens, max_seqlen)
    out = torch.empty_like(q)
    lse_shape = (H, q.shape[0]) if varlen else (q.shape[0], H, q.shape[2])
    lse = torch.empty(lse_shape, device=q.device, dtype=torch.float32)
    if q.numel() == 0 or n_seqs == 0 or max_seqlen == 0:
        return out, lse.fill_(float("inf"))
    if forward != "pointer":
        out = _tma_layout(out)
    pad, stride_pb = _pad_arg(key_padding_mask, q)
    args = (q, k, v, out, lse, pad, cu_seqlens if varlen else q,
            *_layout_strides(q, varlen), *_layout_strides(k, varlen), *_layout_strides(v, varlen),
            *_layout_strides(out, varlen), *_lse_strides(lse, varlen), stride_pb,
            H, N, _seq_bucket(max_seqlen), scale * LOG2E)
    consts = _common_consts(q, key_padding_mask, cu_seqlens, max_seqlen)
    interpret_config = _interpret_config(interpret_blocks)
    if forward == "pointer":
        _launch("fwd", max_seqlen, n_seqs, H, "BLOCK_M", args, consts, interpret_config)
    elif max_seqlen <= SHORT_FWD_BLOCK:  # one tile per head, several heads per program
        _launch("fwd_short_tma", max_seqlen, n_seqs, H, None, args, dict(consts, BLOCK=SHORT_FWD_BLOCK),
                interpret_config)
    else:
        _launch("fwd_ws" if forward == "ws" else "fwd_tma", max_seqlen, n_seqs, H, "BLOCK_M", args, consts,
                interpret_config)
    return out, lse


def _backward_impl(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, scale,
                   short_bwd_max=SHORT_BWD_MAX, interpret_blocks=None, backward=DEFAULT_BACKWARD):
    interpret_config = _interpret_config(interpret_blocks)
    _, backward = resolved_paths("pointer", backward, q.shape[-1], q.dtype, scale)
    varlen = cu_seqlens is not None
    n_seqs, H, N = _shape_info(q, cu_seqlens, max_seqlen)
    short = max_seqlen <= short_bwd_max and q.shape[-1] <= 64
    onepass = backward == "onepass" and not short
    # the pre-pass reads out and dout with pointer loads (ROW_ALIGN strides), the rest is TMA
    dout, q, k, v, out = (_tma_layout(_kernel_layout(t)) if onepass else _kernel_layout(t)
                          for t in (dout, q, k, v, out))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or n_seqs == 0 or max_seqlen == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    pad, stride_pb = _pad_arg(key_padding_mask, q)
    cu = cu_seqlens if varlen else q
    consts = _common_consts(q, key_padding_mask, cu_seqlens, max_seqlen)
    tail = (*_lse_strides(lse, varlen), stride_pb, H, N, _seq_bucket(max_seqlen), scale,
            scale * LOG2E)
    qkv = (*_layout_strides(q, varlen), *_layout_strides(k, varlen), *_layout_strides(v, varlen))
    if short:  # one tile per head: a single pass
        _launch("bwd_short", max_seqlen, n_seqs, H, None,
                (q, k, v, out, dout, lse, pad, dq, dk, dv, cu, *qkv, *_layout_strides(out, varlen),
                 *_layout_strides(dout, varlen), *_layout_strides(dq, varlen),
                 *_layout_strides(dk, varlen), *_layout_strides(dv, varlen), *tail),
                dict(consts, BLOCK=SHORT_BWD_BLOCK), interpret_config)
        return dq, dk, dv
    delta = torch.empty_like(lse)  # written by the dQ pass (or the pre-pass), read by the dK/dV pass
    if onepass:
        dk, dv = _tma_layout(dk), _tma_layout(dv)   # fresh tensors: already TMA-addressable
        dq32 = torch.empty(q.shape, device=q.device, dtype=torch.float32)  # zeroed by the pre-pass
        _launch("bwd_prep", max_seqlen, n_seqs, H, "BLOCK",
                (out, dout, delta, dq32, cu, *_layout_strides(out, varlen), *_layout_strides(dout, varlen),
                 *_layout_strides(dq32, varlen), *_lse_strides(lse, varlen), H, N, _seq_bucket(max_seqlen)),
                consts, interpret_config)
        _launch("bwd_onepass", max_seqlen, n_seqs, H, "BLOCK_N",
                (q, k, v, dout, lse, delta, pad, dq32, dk, dv, cu, *qkv, *_layout_strides(dout, varlen),
                 *_layout_strides(dq32, varlen), *_layout_strides(dk, varlen), *_layout_strides(dv, varlen),
                 *tail), consts, interpret_config)
        return torch.mul(dq32, scale, out=dq), dk, dv   # the cast: one pass, fp32 → q's dtype
    _launch("dq", max_seqlen, n_seqs, H, "BLOCK_M",
            (q, k, v, out, dout, lse, delta, pad, dq, cu, *qkv, *_layout_strides(out, varlen),
             *_layout_strides(dout, varlen), *_layout_strides(dq, varlen), *tail), consts, interpret_config)
    _launch("dkdv", max_seqlen, n_seqs, H, "BLOCK_N",
            (q, k, v, dout, lse, delta, pad, dk, dv, cu, *qkv, *_layout_strides(dout, varlen),
             *_layout_strides(dk, varlen), *_layout_strides(dv, varlen), *tail), consts, interpret_config)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("fasttips::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_padding_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                        max_seqlen: int, scale: float, short_bwd_max: int,
                        interpret_blocks: Optional[list[int]], forward: str, backward: str
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    # short_bwd_max and backward are the backward's (they reach it through the autograd context)
    return _forward_impl(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, interpret_blocks,
                         forward)


@flash_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, short_bwd_max, interpret_blocks, forward,
      backward):
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens is not None else q.shape[:3]
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("fasttips::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                        cu_seqlens: Optional[torch.Tensor], max_seqlen: int, scale: float,
                        short_bwd_max: int, interpret_blocks: Optional[list[int]], backward: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, scale,
                          short_bwd_max, interpret_blocks, backward)


@flash_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, scale, short_bwd_max, interpret_blocks,
      backward):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    (q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, short_bwd_max, interpret_blocks, _forward,
     backward) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale
    ctx.short_bwd_max, ctx.interpret_blocks, ctx.backward = short_bwd_max, interpret_blocks, backward
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_padding_mask, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = flash_attention_bwd(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens,
                                     ctx.max_seqlen, ctx.scale, ctx.short_bwd_max, ctx.interpret_blocks,
                                     ctx.backward)
    return dq, dk, dv, None, None, None, None, None, None, None, None


flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# public ops (argument checks, then the custom op)
# --------------------------------------------------------------------------------------------------
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` if the kernels can index it as it is, else a contiguous copy: the last dim must be
    contiguous, and the other strides multiples of ``row_align`` (the kernels assume it; strides
    of size-1 dims are never multiplied by a nonzero index, so they may be anything). Copies only
    unusual layouts: a contiguous tensor, or a slice of a fused qkv projection, passes as it is."""
    align = row_align(t.shape[-1])
    strides_ok = all(stride % align == 0 for stride, size in zip(t.stride()[:-1], t.shape[:-1])
                     if size > 1)
    return t if t.stride(-1) == 1 and strides_ok else t.contiguous()


def _check_qkv(q, k, v, rank: int, layout: str):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != rank:
            raise ValueError(f"{name} must be a {rank}-D tensor {layout}; got "
                             f"{getattr(t, 'shape', type(t))}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}.dtype={t.dtype} is not supported; use one of {list(_DTYPES)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same shape {layout}; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={q.shape[-1]} is not supported; the Triton kernel allows "
                         f"D ≤ {MAX_HEAD_DIM}")
    return _kernel_layout(q), _kernel_layout(k), _kernel_layout(v)


def _default_scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def attention(q, k, v, key_padding_mask=None, scale=None, *, short_bwd_max=SHORT_BWD_MAX,
              interpret_config=None, forward=DEFAULT_FORWARD, backward=DEFAULT_BACKWARD):
    """softmax(q kᵀ·scale) v for q, k, v [B, H, N, D]; key_padding_mask [B, N] bool (True = pad).

    ``short_bwd_max``: sequences up to this length (and head dims ≤ 64) take the one-tile backward,
    longer ones ``backward`` (0: never the one-tile one). ``forward`` (one of FORWARDS) and
    ``backward`` (one of BACKWARDS) pick the kernels; VARIANTS names the combinations worth timing.
    Head dims the TMA kernels cannot address (``tma_usable``) take "pointer" / "two_pass" whatever
    is asked. ``interpret_config``: block shapes under the interpreter (a ``_cfg``; default
    INTERPRET_CONFIG). The defaults are what training runs."""
    _check_path(forward, backward)
    q, k, v = _check_qkv(q, k, v, 4, "[B, H, N, D]")
    B, _, N, _ = q.shape
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, N):
            raise ValueError(f"key_padding_mask must be a bool tensor of shape [B, N] = [{B}, {N}]; "
                             f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
        key_padding_mask = key_padding_mask.contiguous()
    out, _ = flash_attention_fwd(q, k, v, key_padding_mask, None, N, _default_scale(q, scale),
                                 int(short_bwd_max), _interpret_blocks(interpret_config), forward, backward)
    return out


def attention_varlen(q, k, v, cu_seqlens, max_seqlen=None, scale=None, *, short_bwd_max=SHORT_BWD_MAX,
                     interpret_config=None, forward=DEFAULT_FORWARD, backward=DEFAULT_BACKWARD):
    """Packed attention: q, k, v [T, H, D]; sequence i is rows cu_seqlens[i]:cu_seqlens[i+1].

    ``max_seqlen`` must be at least the longest sequence (it sizes the launch); a smaller value is a
    ValueError. None derives it. Either way the longest sequence is read from the host record of
    ``cu_seqlens_from_lengths``, or computed once per offsets tensor (one host read, see common.py).
    Pass it under ``torch.compile``. ``short_bwd_max``, ``interpret_config``, ``forward`` and
    ``backward`` as in ``attention``.
    """
    _check_path(forward, backward)
    q, k, v = _check_qkv(q, k, v, 3, "[T, H, D]")
    if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1
            or cu_seqlens.dtype not in (torch.int32, torch.int64)):
        raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor [0, n0, n0+n1, ..., T]; got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens))} "
                         f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    cu_seqlens = cu_seqlens.contiguous()
    if max_seqlen is None:  # the op's body checks a given value (compiled callers included)
        max_seqlen = check_max_seqlen(None, longest_sequence(cu_seqlens))
    out, _ = flash_attention_fwd(q, k, v, None, cu_seqlens, int(max_seqlen), _default_scale(q, scale),
                                 int(short_bwd_max), _interpret_blocks(interpret_config), forward, backward)
    return out
