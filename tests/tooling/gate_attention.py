"""The Hopper compile gate for the attention kernels: every kernel × every autotune configuration,
compiled ahead of time for sm_90a (no GPU needed), checked by ``hopper.py``.

Each configuration is compiled in bf16 and in fp16, at the head dims its list serves (64 for "long"
and "short"; 72 and 128 for "wide"), with key padding and varlen on so that every optional path is in
the code. Pointers, and strides where the head dim makes them so, are declared multiples of 16 as a
real launch specialises them. At head dim 72 Triton specialises no stride (72 is not a multiple of 16);
the kernels are compiled with the ROW_ALIGN = 8 that every launch passes there (the wrapper copies
tensors whose strides are not multiples of 8), which is what lets those loads be 16 bytes wide.
``compile_all`` spreads the compiles over processes (seconds each, mostly ptxas and Python).
"""
from __future__ import annotations

import inspect

from fasttips.kernels.attention import triton as T

KERNELS = T.KERNELS
SIGNATURES = {"long": (("bf16", 64), ("fp16", 64)), "short": (("bf16", 64), ("fp16", 64)),
              "wide": (("bf16", 72), ("fp16", 128))}


def cases() -> list[tuple[str, str, int, str, int]]:
    """(kernel, family, config index, dtype, head dim) for every compile the gate makes."""
    return [(name, family, i, dtype, head_dim)
            for name, (_, configs) in KERNELS.items() for family in configs
            for i in range(len(configs[family])) for dtype, head_dim in SIGNATURES[family]]


def signature(kernel, dtype: str) -> dict:
    fn = getattr(kernel, "fn", kernel)
    types = {}
    for arg in inspect.signature(fn).parameters:
        if arg in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            types[arg] = f"*{dtype}"
        elif arg in ("LSE", "DELTA"):
            types[arg] = "*fp32"
        elif arg == "PAD":
            types[arg] = "*u8"
        elif arg == "CU_SEQLENS":
            types[arg] = "*i32"
        elif arg in ("scale", "qk_scale"):
            types[arg] = "fp32"
        elif arg in ("H", "N") or not arg.isupper():
            types[arg] = "i32"
        else:
            types[arg] = "constexpr"
    return types


def compile_case(case):
    from .hopper import compile_for_hopper

    name, family, index, dtype, head_dim = case
    kernel, configs = KERNELS[name]
    cfg = configs[family][index]
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=T.block_d(head_dim), HAS_MASK=True, VARLEN=True,
                      DOT_PRECISION="tf32", ROW_ALIGN=T.row_align(head_dim),
                      **{k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")})
    if name == "bwd_short":  # one tile per head: no block / tail shapes beyond BLOCK
        constexprs = {k: v for k, v in constexprs.items() if not k.startswith(("BLOCK_", "TAIL_"))}
        constexprs.update(BLOCK=T.SHORT_BWD_BLOCK, BLOCK_D=T.block_d(head_dim))
    types = signature(kernel, dtype)
    # LSE / padding strides (multiples of N) are left unaligned: N = 257 is not a multiple of 16
    aligned = [a for a, t in types.items() if t.startswith("*") or (
        a.startswith("stride_") and a not in ("stride_lb", "stride_lh", "stride_pb")
        and head_dim % 16 == 0)]
    return compile_for_hopper(kernel, types, constexprs, num_warps=cfg["num_warps"],
                              num_stages=cfg["num_stages"], divisible_by_16=tuple(aligned),
                              name=f"{name}/{family}/{cfg}/{dtype}/d{head_dim}")


def compile_all(workers: int | None = None) -> dict:
    """{case: HopperReport or the exception raised while compiling it}, compiled in spawned workers."""
    from .hopper import compile_in_workers

    return compile_in_workers(compile_case, cases(), workers)
