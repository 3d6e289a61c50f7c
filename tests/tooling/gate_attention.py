"""The Hopper compile gate for the attention kernels: every kernel × every autotune configuration,
compiled ahead of time for sm_90a (no GPU needed), checked by ``hopper.py``.

Each configuration is compiled in bf16 at the head dims its list serves (64 for "long" and "short";
72 and, in fp16, 128 for "wide"), with key padding and varlen on so that every optional path is in
the code. Beyond hopper.py's checks each case is held to what its kernel claims (``expected``):
GEMMs and exps per loop step, TMA, warp specialisation, no mma.sync, registers and CTAs per SM. Pointers, and strides where the head dim makes them so, are declared multiples of 16 as a
real launch specialises them. At head dim 72 Triton specialises no stride (72 is not a multiple of 16);
the kernels are compiled with the ROW_ALIGN = 8 that every launch passes there (the wrapper copies
tensors whose strides are not multiples of 8), which is what lets those loads be 16 bytes wide.
``compile_all`` spreads the compiles over processes (seconds each, mostly ptxas and Python).
"""
from __future__ import annotations

import inspect

from fasttips.kernels.attention import triton as T

KERNELS = T.KERNELS
# bf16 at the head dim each family serves; fp16 once, at d = 128 (at d = 64 every kernel and
# configuration compiled to the same registers, shared memory and instruction counts in both types)
# ("split": the TMA kernels at d = 72, as 64 + 16 columns; their "wide" lists then serve d = 128 only.)
SIGNATURES = {"long": (("bf16", 64),), "short": (("bf16", 64),), "wide": (("bf16", 72), ("fp16", 128)),
              "split": (("bf16", 72),)}


def cases() -> list[tuple[str, str, int, str, int]]:
    """(kernel, family, config index, dtype, head dim) for every compile the gate makes; a config
    that another family of the same kernel already lists at the same dtype and head dim is the same
    compile and is made once."""
    seen, out = set(), []
    for name, (_, configs) in KERNELS.items():
        for family in configs:
            for i, cfg in enumerate(configs[family]):
                for dtype, head_dim in SIGNATURES[family]:
                    if family == "wide" and name in T.TMA_KERNELS and T.column_panels(head_dim)[1]:
                        continue                       # served by "split"
                    key = (name, tuple(sorted(cfg.items())), dtype, head_dim)
                    if key not in seen:
                        seen.add(key)
                        out.append((name, family, i, dtype, head_dim))
    return out


def signature(kernel, dtype: str) -> dict:
    fn = getattr(kernel, "fn", kernel)
    types = {}
    for arg in inspect.signature(fn).parameters:
        if arg in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            types[arg] = f"*{dtype}"
        elif arg in ("LSE", "DELTA", "DQ32"):
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


def constexprs(name: str, cfg: dict, head_dim: int) -> dict:
    """What a launch of kernel ``name`` at configuration ``cfg`` passes as constexprs (key padding and
    varlen on, so that every optional path is compiled)."""
    kernel = KERNELS[name][0]
    params = inspect.signature(getattr(kernel, "fn", kernel)).parameters
    values = dict(HEAD_DIM=head_dim, BLOCK_D=T.block_d(head_dim), HAS_MASK=True, VARLEN=True,
                  DOT_PRECISION="tf32", ROW_ALIGN=T.row_align(head_dim),
                  BLOCK={"bwd_short": T.SHORT_BWD_BLOCK, "fwd_short_tma": T.SHORT_FWD_BLOCK}.get(name))
    values.update(T.launch_constexprs(name, cfg))
    if name in T.TMA_KERNELS:
        values.update(zip(("BLOCK_D", "SPLIT_D"), T.column_panels(head_dim)))
    return {k: v for k, v in values.items() if k in params}


def compile_case(case):
    from .hopper import compile_for_hopper

    name, family, index, dtype, head_dim = case
    kernel, configs = KERNELS[name]
    cfg = configs[family][index]
    types = signature(kernel, dtype)
    # LSE / padding strides (multiples of N) are left unaligned: N = 257 is not a multiple of 16
    aligned = [a for a, t in types.items() if t.startswith("*") or (
        a.startswith("stride_") and a not in ("stride_lb", "stride_lh", "stride_pb")
        and head_dim % 16 == 0)]
    return compile_for_hopper(kernel, types, constexprs(name, cfg, head_dim), num_warps=cfg["num_warps"],
                              num_stages=cfg["num_stages"], divisible_by_16=tuple(aligned),
                              name=f"{name}/{family}/{cfg}/{dtype}/d{head_dim}")


# Known, tracked exceptions (the lint fails once one no longer applies: then drop it from here).
# The pointer kernels' 16-row / 16-key tails (TAIL_M, TAIL_N) compile to mma.sync (HMMA), not wgmma;
# the TMA kernels zero-fill their tails instead. (The "short" forward configs take one 64-wide tail.)
KNOWN_MMA_SYNC = {("fwd", "long"), ("fwd", "wide"), ("dq", "long"), ("dq", "short"), ("dq", "wide"),
                  ("dkdv", "long"), ("dkdv", "short"), ("dkdv", "wide")}
# The two-pass dK/dV at head dims 65..128 (8 warps, 32 rows per step): every thread exponentiates each
# of its scores twice (the tile is too small to split over two warpgroups without duplicating).
KNOWN_DUPLICATED_EX2 = {("dkdv", "wide")}
GEMMS_PER_STEP = {"fwd": 2, "fwd_tma": 2, "fwd_ws": 2, "fwd_short_tma": 2,       # QKᵀ, PV
                  "dq": 3, "dkdv": 4,                                            # the two-pass backward: 7
                  "bwd_onepass": 5, "bwd_short": 5}                              # the one-pass backwards
NO_MATMUL = ("bwd_prep",)


def expected(case) -> "Expected":
    """What each kernel and configuration claims, as the compile gate checks it (NOTES.md lists the
    figures): GEMMs per main-loop step (each twice, once per column panel, at a split head dim: the
    wgmma groups are counted); one exp per score (the forward adds one per row it holds, for
    the rescale: two per 64-row slab per thread); TMA and warp specialisation where the kernel uses
    them; registers and CTAs per SM within budget (the short-sequence forward at d ≤ 64: ≤ 128
    registers, ≥ 3 CTAs per SM)."""
    from .hopper import Expected

    name, family, index, _, head_dim = case
    cfg = KERNELS[name][1][family][index]
    if name in NO_MATMUL:
        return Expected()
    # scores per step: the main loop's tile; dQ steps over keys, dK/dV over rows
    rows, cols = cfg["BLOCK_M"], (cfg["TAIL_N"] if name == "fwd" and family == "short" else cfg["BLOCK_N"])
    if name in ("bwd_short", "fwd_short_tma"):
        rows = cols = {"bwd_short": T.SHORT_BWD_BLOCK, "fwd_short_tma": T.SHORT_FWD_BLOCK}[name]
    consumers = 2 if name == "fwd_ws" else cfg["num_warps"] // 4         # warpgroups sharing the tile
    scores = rows * cols // (128 * consumers)
    rescale = 2 * max(1, rows // (64 * consumers)) if name.startswith("fwd") else 0
    duplicated = (name, family) in KNOWN_DUPLICATED_EX2
    # (registers, CTAs per SM); a warp-specialised CTA is 12 warps (one producer and two consumer
    # warpgroups) and fills an SM's registers by itself
    budget = dict(fwd_short_tma=(128, 3), bwd_onepass=(255, 2 if cfg["num_warps"] == 4 else 1),
                  fwd_tma=(255, 2)).get(name, (255, 1))
    split = family == "split"   # a TMA kernel at d = 72: 64 + 16 columns, every GEMM in two panels
    if head_dim > 64 and not split:   # 128 wide: twice the accumulators and shared memory
        budget = (168, 2) if name == "fwd_short_tma" else (255, 1)
    return Expected(gemms_per_step=GEMMS_PER_STEP[name] * (2 if split else 1), scores_per_step=scores,
                    ex2_per_step=scores + rescale, ex2_duplicated=duplicated, tma=name in T.TMA_KERNELS,
                    warp_specialized=name == "fwd_ws", mma_sync_ok=(name, family) in KNOWN_MMA_SYNC,
                    max_registers=budget[0], min_ctas_per_sm=budget[1])


def compile_all(workers: int | None = None) -> dict:
    """{case: HopperReport or the exception raised while compiling it}, compiled in spawned workers."""
    from .hopper import compile_in_workers

    return compile_in_workers(compile_case, cases(), workers)
