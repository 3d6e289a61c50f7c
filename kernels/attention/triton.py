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
SHORT_BWD_CONFIGS = {"short": [_cfg(SHORT_BWD_BLOCK, SHORT_BWD_BLOCK, 1, 4, 1),
                               _cfg(SHORT_BWD_BLOCK, SHORT_BWD_BLOCK, 1, 8, 1),
                               _cfg(SHORT_BWD_BLOCK, SHORT_BWD_BLOCK, 4, 8, 1)]}
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
           "bwd_short": (K.attn_bwd_short_kernel, SHORT_BWD_CONFIGS)}


def launch_constexprs(name: str, config: dict) -> dict:
    """The constexprs a configuration sets for kernel ``name``: the one-tile backward takes only
    the heads per program (its tile is SHORT_BWD_BLOCK, passed with the launch)."""
    if name == "bwd_short":
        return {"HEADS_PER_PROG": config["HEADS_PER_PROG"]}
    return constexprs_of(config)


def row_align(head_dim: int) -> int:
    """The multiple (in elements) that every batch / head / token stride is brought to before a
    launch and that the kernels then declare to the compiler (``ROW_ALIGN``): 8 for head dims like
    72, whose rows are 16-byte multiples in 16-bit types although 72 is not a multiple of 16, so
    that their loads are 16 bytes wide instead of one element. 1 (nothing declared) for multiples
    of 16, which Triton's own launch specialisation already covers, and for head dims that are
    not a multiple of 8."""
    return 8 if head_dim % 16 == 8 else 1


def family(max_seqlen: int, head_dim: int) -> str:
    """Which configuration list serves this launch."""
    if block_d(head_dim) > 64:
        return "wide"
    return "short" if max_seqlen <= SHORT_SEQ else "long"


@functools.lru_cache(maxsize=None)
def _autotuned(name: str, family: str):
    kernel, configs = KERNELS[name]
    tconfigs = autotune_configs(configs[family], lambda c: launch_constexprs(name, c))
    key = ["SEQ_BUCKET", "H", "HEAD_DIM", "HAS_MASK", "VARLEN"]
    return triton.autotune(configs=tconfigs, key=key)(kernel)


def _launch(name: str, max_seqlen: int, n_seqs: int, H: int, program_axis: str, args: tuple,
            consts: dict, interpret_config: dict = INTERPRET_CONFIG):
    """Launch kernel ``name``: autotuned on a GPU, with ``interpret_config`` under the interpreter."""
    def grid(meta):  # one program per full block plus one for the short remainder (or one tile)
        blocks = 1 if program_axis is None else triton.cdiv(max_seqlen, meta[program_axis])
        return (blocks, triton.cdiv(H, meta["HEADS_PER_PROG"]), n_seqs)

    if interpreting():
        launch = launch_constexprs(name, interpret_config)
        KERNELS[name][0][grid(launch)](*args, **consts, **launch)
    else:
        _autotuned(name, family(max_seqlen, consts["HEAD_DIM"]))[grid](*args, **consts)


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


def _forward_impl(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, interpret_blocks=None):
    q, k, v = _kernel_layout(q), _kernel_layout(k), _kernel_layout(v)
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
    pad, stride_pb = _pad_arg(key_padding_mask, q)
    args = (q, k, v, out, lse, pad, cu_seqlens if varlen else q,
            *_layout_strides(q, varlen), *_layout_strides(k, varlen), *_layout_strides(v, varlen),
            *_layout_strides(out, varlen), *_lse_strides(lse, varlen), stride_pb,
            H, N, _seq_bucket(max_seqlen), scale * LOG2E)
    _launch("fwd", max_seqlen, n_seqs, H, "BLOCK_M", args,
            _common_consts(q, key_padding_mask, cu_seqlens, max_seqlen), _interpret_config(interpret_blocks))
    return out, lse


def _backward_impl(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, scale,
                   short_bwd_max=SHORT_BWD_MAX, interpret_blocks=None):
    interpret_config = _interpret_config(interpret_blocks)
    varlen = cu_seqlens is not None
    n_seqs, H, N = _shape_info(q, cu_seqlens, max_seqlen)
    dout, q, k, v, out = (_kernel_layout(t) for t in (dout, q, k, v, out))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or n_seqs == 0 or max_seqlen == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    pad, stride_pb = _pad_arg(key_padding_mask, q)
    cu = cu_seqlens if varlen else q
    consts = _common_consts(q, key_padding_mask, cu_seqlens, max_seqlen)
    tail = (*_lse_strides(lse, varlen), stride_pb, H, N, _seq_bucket(max_seqlen), scale,
            scale * LOG2E)
    qkv = (*_layout_strides(q, varlen), *_layout_strides(k, varlen), *_layout_strides(v, varlen))
    if max_seqlen <= short_bwd_max and q.shape[-1] <= 64:  # one tile per head: a single pass
        _launch("bwd_short", max_seqlen, n_seqs, H, None,
                (q, k, v, out, dout, lse, pad, dq, dk, dv, cu, *qkv, *_layout_strides(out, varlen),
                 *_layout_strides(dout, varlen), *_layout_strides(dq, varlen),
                 *_layout_strides(dk, varlen), *_layout_strides(dv, varlen), *tail),
                dict(consts, BLOCK=SHORT_BWD_BLOCK), interpret_config)
        return dq, dk, dv
    delta = torch.empty_like(lse)  # written by the dQ pass, read by the dK/dV pass
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
                        interpret_blocks: Optional[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    # short_bwd_max is the backward's (it reaches it through the autograd context)
    return _forward_impl(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, interpret_blocks)


@flash_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, short_bwd_max, interpret_blocks):
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens is not None else q.shape[:3]
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("fasttips::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                        cu_seqlens: Optional[torch.Tensor], max_seqlen: int, scale: float,
                        short_bwd_max: int, interpret_blocks: Optional[list[int]]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, scale,
                          short_bwd_max, interpret_blocks)


@flash_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, scale, short_bwd_max, interpret_blocks):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, short_bwd_max, interpret_blocks = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale
    ctx.short_bwd_max, ctx.interpret_blocks = short_bwd_max, interpret_blocks
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_padding_mask, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = flash_attention_bwd(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens,
                                     ctx.max_seqlen, ctx.scale, ctx.short_bwd_max, ctx.interpret_blocks)
    return dq, dk, dv, None, None, None, None, None, None


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
              interpret_config=None):
    """softmax(q kᵀ·scale) v for q, k, v [B, H, N, D]; key_padding_mask [B, N] bool (True = pad).

    ``short_bwd_max``: sequences up to this length (and head dims ≤ 64) take the one-tile backward,
    longer ones the two-pass backward (0: always two passes). ``interpret_config``: block shapes under
    the interpreter (a ``_cfg``; default INTERPRET_CONFIG). The defaults are what training runs."""
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
                                 int(short_bwd_max), _interpret_blocks(interpret_config))
    return out


def attention_varlen(q, k, v, cu_seqlens, max_seqlen=None, scale=None, *, short_bwd_max=SHORT_BWD_MAX,
                     interpret_config=None):
    """Packed attention: q, k, v [T, H, D]; sequence i is rows cu_seqlens[i]:cu_seqlens[i+1].

    ``max_seqlen`` must be at least the longest sequence (it sizes the launch); a smaller value is a
    ValueError. None derives it. Either way the longest sequence is read from the host record of
    ``cu_seqlens_from_lengths``, or computed once per offsets tensor (one host read, see common.py).
    Pass it under ``torch.compile``. ``short_bwd_max`` and ``interpret_config`` as in ``attention``.
    """
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
                                 int(short_bwd_max), _interpret_blocks(interpret_config))
    return out
