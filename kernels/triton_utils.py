"""Small pieces every op's Triton path shares: log constants, launch configurations, padded widths.

Kernels keep scores in base 2 (``exp2`` is the fast exponential): a natural-log quantity is multiplied
by ``LOG2E`` on the way in and a base-2 one by ``LN2`` on the way out. Host code uses the floats;
``@triton.jit`` code the ``*_C`` constexprs (Triton reads module globals only when they are constexprs).
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634   # log2(e)
LN2 = 0.6931471805599453     # ln(2) = 1 / log2(e)
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)

LAUNCH_OPTIONS = ("num_warps", "num_stages")


def launch_config(num_warps: int, num_stages: int, **constexprs) -> dict:
    """One launch configuration: the kernel's block-shape constexprs plus warps and pipeline stages."""
    return dict(constexprs, num_warps=num_warps, num_stages=num_stages)


def constexprs_of(config: dict) -> dict:
    """The constexprs of a launch configuration (everything but num_warps / num_stages)."""
    return {k: v for k, v in config.items() if k not in LAUNCH_OPTIONS}


def autotune_configs(configs, constexprs=constexprs_of) -> list:
    """``triton.Config`` objects for ``triton.autotune`` from launch configurations."""
    return [triton.Config(constexprs(c), num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in configs]


def block_d(width: int) -> int:
    """A feature width padded (masked) to a power of two ≥ 16, tl.dot's smallest friendly width:
    head dim 72 runs as 128, a bottleneck of 256 as itself."""
    return max(16, triton.next_power_of_2(width))


def precision(dtype) -> str:
    """tl.dot input precision: exact products for fp32 inputs (which reach the kernels only under the
    interpreter, in tests), tensor-core products for 16-bit ones."""
    import torch
    return "ieee" if dtype == torch.float32 else "tf32"
