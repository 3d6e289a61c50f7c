"""``fasttips train --dry-run``: what a run will be, without training it.

    print(describe_plan(cfg, world_size=64))

It reports the device mesh (``dist.shard_size``), the batch per rank and the global batch, an
estimate of the memory each rank needs, and the checkpoint plan; a layout that cannot be built is
the same one-line ConfigError a real start would give. The model is built on the meta device (no
memory is allocated), so the parameter counts are exact. The memory figures are an **estimate**
from the config, per rank:

- parameters, gradients, AdamW moments and teacher: fp32, divided by the ranks of a shard group
  (FSDP2 shards them inside a group; HSDP replicates them across groups);
- gathered: the parameters a sharded step holds unsharded in the compute dtype: the student and
  teacher heads (held for the whole step), the towers' own parameters (embeddings) and two blocks
  in flight (the one computing and the one being prefetched);
- activations: the tensors autograd keeps for the backward, counted from the token counts of the
  FLOP model (``flops.py``): per token and block, the block input, the LayerNorm outputs, q, k, v,
  the attention output and the MLP's hidden activations (``8·D + 2·H`` values; ``8·D + 4·H`` for
  SwiGLU); a block that ``train.activation_checkpointing`` recomputes whole (``full``, every k-th
  under ``every_k``) keeps only its input (``D``), one such block being recomputed at a time; under
  ``selective`` every block keeps its input and its matmul and attention outputs (``7·D + H``;
  ``7·D + 2·H`` for SwiGLU); the heads' MLP activations per row. The prototype logits are not kept (the
  fused cross-entropy), nor are temporaries, the CUDA context or allocator slack, so the real peak
  is higher: read ``peak_mem_gb`` in metrics.jsonl after a few steps.

The checkpoint size is exact up to metadata: fp32 model, AdamW moments, teacher and loss centers.
An asynchronous write (``train.async_checkpoint``) first copies the rank's shards to host memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fasttips.distributed.fsdp import mesh_shape, mesh_text, resolve_param_dtype
from fasttips.flops import flop_model
from fasttips.models.text import text_mlp_hidden

GIB = 2 ** 30


@dataclass(frozen=True)
class ParamCounts:
    total: int          # student parameters
    vision: int
    text: int
    heads: int          # student heads (one when heads.shared)
    teacher: int        # EMA teacher parameters (heads; the vision tower too under full_ema)
    block: int          # the largest transformer block (an FSDP unit)
    in_blocks: int      # all transformer blocks together

    @property
    def towers_own(self) -> int:
        """Parameters outside blocks and heads (embeddings, norms, logit scales): gathered with their tower."""
        return self.total - self.heads - self.in_blocks


def count_parameters(cfg) -> ParamCounts:
    """Exact counts from a model built on the meta device (nothing is allocated)."""
    from fasttips.distributed.fsdp import block_lists, head_modules
    from fasttips.models import build_model
    from fasttips.models.tips import param_count
    from fasttips.teacher import Teacher
    model = build_model(cfg, device="meta")
    teacher = Teacher(model, cfg)
    blocks = [b for blocks in block_lists(model) for b in blocks]
    return ParamCounts(total=param_count(model), vision=param_count(model.vision), text=param_count(model.text),
                       heads=sum(param_count(h) for h in head_modules(model)), teacher=param_count(teacher),
                       block=max((param_count(b) for b in blocks), default=0),
                       in_blocks=sum(param_count(b) for b in blocks))


def _block_values_per_token(width: int, hidden: int, ffn: str) -> int:
    """Values autograd keeps per token of one block (module docstring)."""
    return 8 * width + (4 if ffn == "swiglu" else 2) * hidden


def _selective_values_per_token(width: int, hidden: int, ffn: str) -> int:
    """Values one block keeps per token under ``selective``: its input and the outputs of its matmuls
    and attention (q, k, v, attention, projection, the MLP's first and second layers)."""
    return 7 * width + (2 if ffn == "swiglu" else 1) * hidden


def _tower_values_per_token(depth: int, width: int, hidden: int, ffn: str, cfg) -> int:
    """Values a tower keeps per token under ``train.activation_checkpointing`` (module docstring): a
    checkpointed block keeps its input (``selective``: also its matmul outputs), the others everything,
    plus one checkpointed block recomputed at a time."""
    from fasttips.recompute import checkpointed_blocks
    policy = cfg.train.activation_checkpointing
    whole = _block_values_per_token(width, hidden, ffn)
    if policy == "selective":
        return depth * _selective_values_per_token(width, hidden, ffn) + whole - width
    wrapped = len(checkpointed_blocks(depth, policy, cfg.train.ac_every))
    return wrapped * width + (depth - wrapped) * whole + (whole if wrapped else 0)


def activation_values_per_image(cfg) -> int:
    """Values (not bytes) kept for the backward per training image (module docstring)."""
    v, t, d, h = cfg.vision, cfg.text, cfg.data, cfg.heads
    grid_g, grid_l = d.global_size // v.patch_size, d.local_size // v.patch_size
    vision_tokens = 2 * d.n_global * (grid_g ** 2 + v.n_cls) + d.n_local * (grid_l ** 2 + v.n_cls)
    text_tokens = 2 * t.max_len                                 # alt-text and synthetic caption
    vision = vision_tokens * _tower_values_per_token(v.depth, v.width, v.mlp_hidden, v.ffn, cfg)
    text = text_tokens * _tower_values_per_token(t.depth, v.width, text_mlp_hidden(cfg), "relu", cfg)
    patches = grid_g ** 2
    if cfg.loss.ibot_tokens == "masked":
        patches = math.ceil(patches * d.mask_probability * sum(d.mask_ratio) / 2)
    rows = d.n_local + (d.n_global if d.n_global > 1 else 0) + d.n_global * patches
    per_row = v.width + 2 * h.hidden * (h.nlayers - 1) + 2 * h.bottleneck
    return vision + text + rows * per_row


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank (module docstring)."""
    params: int
    grads: int
    optimizer: int
    teacher: int
    gathered: int
    activations_per_image: int
    images: int

    @property
    def activations(self) -> int:
        return self.activations_per_image * self.images

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.teacher + self.gathered + self.activations


def memory_estimate(cfg, counts: ParamCounts, shard_ranks: int, sharded: bool,
                    compute_dtype: torch.dtype) -> MemoryEstimate:
    """Per-rank bytes with the fp32 state split over ``shard_ranks`` (1 when unsharded)."""
    fp32 = 4 / shard_ranks
    compute = torch.finfo(compute_dtype).bits // 8
    gathered = 0
    if sharded:
        gathered = compute * (counts.heads + counts.teacher + counts.towers_own + 2 * counts.block)
    return MemoryEstimate(params=int(fp32 * counts.total), grads=int(fp32 * counts.total),
                          optimizer=int(2 * fp32 * counts.total), teacher=int(fp32 * counts.teacher),
                          gathered=gathered, activations_per_image=compute * activation_values_per_image(cfg),
                          images=cfg.data.batch_size)


def checkpoint_bytes(cfg, counts: ParamCounts) -> dict[str, int]:
    """What one checkpoint holds (fp32): model, AdamW moments, teacher, loss centers."""
    return {"model": 4 * counts.total, "AdamW": 8 * counts.total, "teacher": 4 * counts.teacher,
            "centers": 2 * 4 * cfg.heads.prototypes}


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.1f} MiB"


def _millions(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _device_type(cfg) -> str:
    if cfg.train.device != "auto":
        return cfg.train.device                  # planned for, even on a machine without it
    return "cuda" if torch.cuda.is_available() else "cpu"


def _async_text(cfg, staged: float) -> str:
    """How checkpoints are written; ``staged``: bytes of this rank's shards (what an asynchronous
    write copies to host memory before the steps go on)."""
    value = getattr(cfg.train, "async_checkpoint", None)    # (absent in a config of an older fasttips)
    if not value:
        return "written synchronously: the step loop waits for each write" + (
            " (train.async_checkpoint=false)" if value is not None else "")
    return (f"written in the background while the steps go on (train.async_checkpoint), after a copy of "
            f"this rank's shards to host memory (about {_size(staged)}); the last one and a stop's are "
            f"waited for")


def describe_plan(cfg, world_size: int, resume: str | None = None) -> str:
    """The dry run's report for ``world_size`` ranks (ConfigError for a layout that cannot be built)."""
    replicas, shard = mesh_shape(world_size, cfg.dist.shard_size)
    device = _device_type(cfg)
    dtype = resolve_param_dtype(cfg.train.precision, torch.device(device))
    sharded = world_size > 1 or dtype != torch.float32
    shard_ranks = shard if sharded else 1
    counts = count_parameters(cfg)
    d, o = cfg.data, cfg.optim
    global_batch = d.batch_size * o.accum_steps * world_size
    peak_lr = o.lr * math.sqrt(global_batch / 1024)
    dtype_name = str(dtype).replace("torch.", "")
    lines = ["fasttips train --dry-run: the plan of this run (nothing is trained or written)",
             f"  config       preset {cfg.preset}, train.steps {cfg.train.steps}, run dir {cfg.train.run_dir}"]
    mesh = mesh_text(world_size, replicas) if sharded else "one process, unsharded"
    lines.append(f"  mesh         {mesh}; {device}, {dtype_name} compute, fp32 master weights")
    if replicas > 1:
        groups = ", ".join(f"{r * shard}–{(r + 1) * shard - 1}" for r in range(min(replicas, 3)))
        lines.append(f"               shard groups: ranks {groups}{', …' if replicas > 3 else ''} (torchrun "
                     f"numbers a node's ranks consecutively: a group is a node when dist.shard_size = "
                     f"--nproc_per_node)")
    lines.append(f"  batch        {d.batch_size} images per rank per micro-batch × {o.accum_steps} micro-batch(es) "
                 f"× {world_size} rank(s) = global batch {global_batch}; peak lr {peak_lr:.3g} "
                 f"(optim.lr × sqrt(global batch / 1024))")
    lines.append(f"  model        {_millions(counts.total)} parameters (vision {_millions(counts.vision)}, text "
                 f"{_millions(counts.text)}, heads {_millions(counts.heads)}); EMA teacher "
                 f"{_millions(counts.teacher)} ({cfg.teacher.mode}); {flop_model(cfg).describe()}")
    mem = memory_estimate(cfg, counts, shard_ranks, sharded, dtype)
    split = f"fp32, 1/{shard_ranks} per rank" if shard_ranks > 1 else "fp32"
    ac = cfg.train.activation_checkpointing + (f" (k = {cfg.train.ac_every})" if cfg.train.activation_checkpointing == "every_k" else "")
    lines += ["  memory per rank (an estimate, not a measurement; see docs/fsdp_and_checkpoints.md):",
              f"    parameters   {_size(mem.params):>11}   {split}",
              f"    gradients    {_size(mem.grads):>11}   {split}",
              f"    optimiser    {_size(mem.optimizer):>11}   AdamW moments, {split}",
              f"    teacher      {_size(mem.teacher):>11}   {split}",
              f"    gathered     {_size(mem.gathered):>11}   {dtype_name} copies held during a step (heads, "
              f"tower embeddings, 2 blocks in flight)" if sharded else
              f"    gathered     {_size(0):>11}   (unsharded: no copies)",
              f"    activations  {_size(mem.activations):>11}   {_size(mem.activations_per_image)} per image × "
              f"{mem.images} images ({dtype_name}; activation checkpointing {ac})",
              f"    total        {_size(mem.total):>11}   plus temporaries, the CUDA context and allocator slack: "
              f"check peak_mem_gb in metrics.jsonl after a few steps"]
    sizes = checkpoint_bytes(cfg, counts)
    total = sum(sizes.values())
    saves = math.ceil(cfg.train.steps / cfg.train.ckpt_every)
    keep = cfg.train.keep_ckpts
    lines += [f"  checkpoints  every {cfg.train.ckpt_every} steps ({saves} in the run), at the end and on "
              f"SIGTERM/SIGINT; the newest {keep} kept",
              f"               each {_size(total)} (" + ", ".join(f"{k} {_size(v)}" for k, v in sizes.items())
              + f"); about {_size(total / world_size)} written per rank (DCP writes each replicated shard once); "
              f"up to {keep + 1} on disk while one is written ({_size((keep + 1) * total)})",
              f"               {_async_text(cfg, (total - sizes['centers']) / shard_ranks)}"]
    if resume:
        lines.append(f"  resume       {resume}")
    return "\n".join(lines)


__all__ = ["describe_plan", "memory_estimate", "checkpoint_bytes", "activation_values_per_image",
           "count_parameters", "MemoryEstimate", "ParamCounts"]
