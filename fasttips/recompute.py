"""Activation recomputation (``train.activation_checkpointing``): which transformer blocks are
checkpointed, and with the selective policy which of their ops are kept rather than run again.

- ``off``: every activation autograd needs is kept.
- ``full``: every block of both towers keeps only its input; its forward runs again in the
  backward, up to the last tensor the backward needs (torch stops there), so about one more forward
  of the blocks for the most memory saved.
- ``every_k``: blocks k, 2k, 3k, ... of each tower (counted from 1, ``train.ac_every`` = k) are
  checkpointed as in ``full``; the others keep everything. A knob between off and full.
- ``selective``: every block, through PyTorch's selective activation checkpointing: the outputs of
  the matmuls and of attention are kept (they cost the FLOPs), everything else (LayerNorm, GELU/SiLU,
  softmax, the elementwise ops) is recomputed from them in the backward. No matmul runs twice, so
  the hardware FLOPs equal the model FLOPs; the memory saved is the cheap ops' outputs.

Blocks are wrapped with ``checkpoint_wrapper`` (non-reentrant ``torch.utils.checkpoint``), which
composes with per-block ``torch.compile`` and FSDP2's ``fully_shard`` applied after it. The FLOP
model (``fasttips.flops``) asks ``checkpointed_blocks`` and ``recomputes_matmuls`` how much forward
work the backward repeats.
"""
from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from fasttips.config import AC_POLICIES

# Ops whose outputs the selective policy keeps, by schema name (the overload does not matter). These
# are what the blocks' matmuls and attention reach below autograd: ``nn.Linear`` on [T, D] tokens is
# addmm (mm without bias), the reference attention's two products are bmm, SDPA is one of its fused
# ops per backend, and on a GPU the attention is fasttips' own custom op (registered only where
# Triton imports, so it is named here rather than looked up).
SAVED_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
    "fasttips::flash_attention_fwd",
})


def checkpointed_blocks(depth: int, policy: str, every: int = 1) -> list[int]:
    """Indices (from 0) of the checkpointed blocks of a tower with ``depth`` blocks."""
    if policy == "off":
        return []
    if policy == "every_k":
        return [i for i in range(depth) if (i + 1) % every == 0]
    if policy in ("full", "selective"):
        return list(range(depth))
    raise ValueError(f"activation checkpointing policy {policy!r}; choose one of {list(AC_POLICIES)}")


def recomputes_matmuls(policy: str) -> bool:
    """Whether a checkpointed block's matmuls run again in the backward (not under ``selective``)."""
    return policy in ("full", "every_k")


@functools.lru_cache(maxsize=None)
def _is_saved(op) -> bool:
    schema = getattr(op, "_schema", None)       # higher-order ops (compiled regions) have none
    return schema is not None and schema.name in SAVED_OPS


def selective_policy(ctx, op, *args, **kwargs):
    """The ``create_selective_checkpoint_contexts`` policy: keep matmul and attention outputs."""
    # MUST_SAVE so torch.compile's partitioner keeps them too; PREFER_RECOMPUTE leaves it free to
    # keep a cheap op's output after all when that is better for its fused kernels.
    return CheckpointPolicy.MUST_SAVE if _is_saved(op) else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(selective_policy)


def wrap_block(block: nn.Module, policy: str) -> nn.Module:
    """``block`` checkpointed under ``policy`` (``full``/``every_k``: plain, ``selective``: SAC)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from fasttips.kernels._backend import triton_available
    # torch.compile traces a checkpointed block as one higher-order op, inside which it cannot
    # follow a write to a global: the kernels' first "is Triton importable?" check caches its answer
    # in one, and would make dynamo give up on the block (run it uncompiled) on the first call. So
    # the answer is cached here, before any compiled forward.
    triton_available()
    if policy == "selective":
        return checkpoint_wrapper(block, context_fn=_selective_contexts)
    return checkpoint_wrapper(block)


__all__ = ["SAVED_OPS", "checkpointed_blocks", "recomputes_matmuls", "selective_policy", "wrap_block"]
