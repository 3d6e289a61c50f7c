"""Process groups and FSDP2 layout: PyTorch's own engine, applied in the order AC → compile → shard.

One process (``python -m fasttips.train``) on CPU trains a plain module: nothing to shard and no
process group. Under ``torchrun`` (or on a GPU, where the bf16 ``MixedPrecisionPolicy`` lives in
FSDP2) every transformer block, every head and the root are ``fully_shard``-ed over the device mesh,
and the EMA teacher heads are sharded with the same mesh and policy so that their local shards line up
element for element with the student's (the head EMA then runs on local tensors in one op call).

The mesh is 1-D (``"fsdp"``: every rank holds 1/world of each parameter) or, with ``dist.shard_size``
below the number of ranks, 2-D (``"replicate"`` × ``"shard"``): HSDP, where FSDP2 shards inside each
group of ``shard_size`` consecutive ranks (torchrun numbers the ranks of a node consecutively, so a
group is a node when ``shard_size`` = GPUs per node) and all-reduces gradients across the groups.
Only parameters are laid out on the mesh; the data and the loss statistics (contrastive all-gather,
DINO/iBOT centers, Sinkhorn-Knopp sums) stay global over every rank, whatever its shape.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fasttips.config import ConfigError


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: object | None                 # DeviceMesh when sharding, else None
    param_dtype: torch.dtype            # dtype of the compute copy of the parameters
    owns_group: bool = False            # this context created the process group (and ends it)
    replicas: int = 1                   # HSDP: groups holding a full copy of the parameters (1 = FSDP)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard_size(self) -> int:
        """Ranks that share one copy of the parameters (all of them under plain FSDP)."""
        return self.world_size // self.replicas

    def describe_mesh(self) -> str:
        return mesh_text(self.world_size, self.replicas) if self.sharded else "one process, unsharded"

    @property
    def sharded(self) -> bool:
        return self.mesh is not None

    def barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def all_max(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise max over ranks (flags every rank must agree on: stop, skip)."""
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return values


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but torch sees no CUDA device; use train.device=cpu or auto")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def resolve_param_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def mesh_shape(world_size: int, shard_size: int) -> tuple[int, int]:
    """(replicas, ranks per shard group) of ``dist.shard_size`` on ``world_size`` ranks (0 = all ranks).

    A layout that cannot be built is a ConfigError of one line. Every rank computes the same answer
    from the same environment before any process group exists, so every rank stops alike, at once."""
    if shard_size < 0:
        raise ConfigError(f"dist.shard_size: must be >= 0, got {shard_size}")
    shard = shard_size or world_size
    if shard > world_size or world_size % shard:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        why = (f"is larger than the {world_size} rank(s) of this run" if shard > world_size
               else f"does not divide the {world_size} ranks of this run")
        raise ConfigError(f"dist.shard_size: {shard_size} {why}; choose one of {divisors} "
                          f"(ranks per shard group) or 0 (all ranks)")
    return world_size // shard, shard


def mesh_text(world_size: int, replicas: int) -> str:
    """The layout in words, e.g. ``HSDP 2 replicas × 4-rank shard groups`` (start-up line, dry run)."""
    if replicas == 1:
        return f"FSDP2 over {world_size} rank(s) (1-D mesh)"
    return (f"HSDP {replicas} replicas × {world_size // replicas}-rank shard groups "
            f"(2-D mesh replicate × shard)")


def build_mesh(device_type: str, replicas: int, shard: int):
    """The device mesh: 1-D ``("fsdp",)`` for plain FSDP, 2-D ``("replicate", "shard")`` for HSDP
    (``fully_shard`` on a 2-D mesh replicates over dim 0 and shards over dim 1)."""
    from torch.distributed.device_mesh import init_device_mesh
    if replicas == 1:
        return init_device_mesh(device_type, (shard,), mesh_dim_names=("fsdp",))
    return init_device_mesh(device_type, (replicas, shard), mesh_dim_names=("replicate", "shard"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg) -> DistContext:
    """Join the torchrun job (env:// rendezvous) or stay a single process.

    Sharding is used when there are several ranks or when bf16 compute is wanted (FSDP2's
    MixedPrecisionPolicy keeps fp32 masters and fp32 gradient reduction); a single fp32 process
    runs the plain module.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    replicas, shard = mesh_shape(world_size, cfg.dist.shard_size)   # a bad layout stops here, on every rank
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    param_dtype = resolve_param_dtype(cfg.train.precision, device)
    want_shard = world_size > 1 or param_dtype != torch.float32
    if not want_shard:
        return DistContext(0, 1, 0, device, None, param_dtype)
    owns_group = not dist.is_initialized()
    if owns_group:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        else:   # a lone process that still wants FSDP2 (bf16 on one GPU)
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
    mesh = build_mesh(device.type, replicas, shard)
    return DistContext(rank, world_size, local_rank, device, mesh, param_dtype, owns_group, replicas)


def shutdown(ctx: DistContext | None = None) -> None:
    """End the process group if ``ctx`` created it (a caller's own group is left alone)."""
    if ctx is not None and not ctx.owns_group:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Wrapping
# ----------------------------------------------------------------------------------------------
def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The transformer block lists of the two towers (the units of AC, compile and sharding)."""
    lists = []
    for tower in ("vision", "text"):
        blocks = getattr(getattr(model, tower, None), "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            lists.append(blocks)
    return lists


def head_modules(model: nn.Module) -> list[nn.Module]:
    heads, seen = [], set()
    for name in ("dino_head", "ibot_head"):
        head = getattr(model, name, None)
        if head is not None and id(head) not in seen:   # heads.shared: one module, shard once
            heads.append(head)
            seen.add(id(head))
    return heads


def apply_activation_checkpointing(model: nn.Module, policy: str = "full", every: int = 1) -> None:
    """Wrap the blocks that ``policy`` checkpoints (``train.activation_checkpointing``; every_k:
    blocks ``every``, 2·``every``, ... of each tower); fasttips/recompute.py says what each keeps."""
    from fasttips.recompute import checkpointed_blocks, wrap_block
    for blocks in block_lists(model):
        for i in checkpointed_blocks(len(blocks), policy, every):
            blocks[i] = wrap_block(blocks[i], policy)


# Keyword arguments of every torch.compile call here (tests set backend="aot_eager": inductor's CPU
# code generation takes minutes on a small machine).
COMPILE_OPTIONS: dict = {}


def apply_compile(model: nn.Module) -> None:
    """``train.compile=blocks``: compile each block in place (keeps parameter names; one graph reused by
    every block)."""
    for blocks in block_lists(model):
        for block in blocks:
            block.compile(**COMPILE_OPTIONS)


def compile_step(root: nn.Module) -> None:
    """``train.compile=step``: compile the loss forward in place, the whole student forward of a
    micro-batch (towers, heads, teacher targets, losses) and, through AOTAutograd, its backward. The
    kernels are custom ops and the packed ViT traces into one graph, so the step is one graph apart
    from what Dynamo cannot trace (it then splits the graph rather than fail). Refused under a torch
    that compiles it wrongly (``config.step_compile_problem``)."""
    from fasttips.config import ConfigError, step_compile_problem
    problem = step_compile_problem(torch.__version__)
    if problem:
        raise ConfigError(problem)
    root.compile(**COMPILE_OPTIONS)


def mixed_precision_policy(ctx: DistContext):
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if ctx.param_dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=ctx.param_dtype, reduce_dtype=torch.float32)


class LossForward(nn.Module):
    """The FSDP2 root: its forward is the loss computation, so one call per micro-batch triggers
    the root's all-gather (parameters held directly by the model, e.g. ``logit_scale``) and, in
    backward, its reduce-scatter. Parameter names stay the model's (this wrapper has none)."""

    def __init__(self, model: nn.Module, compute_losses):
        super().__init__()
        self.model = model
        self._compute_losses = compute_losses

    def forward(self, teacher, state, batch, step_values, cfg):
        return self._compute_losses(self.model, teacher, state, batch, step_values, cfg)


def shard(model: nn.Module, teacher_modules: list[nn.Module], ctx: DistContext, root: nn.Module) -> None:
    """fully_shard per block, per tower, per head and at the root; teacher modules on the same mesh.

    The losses call the heads through ``head.bottleneck(x)`` and read the prototype parameters
    ``v``/``g`` directly, so ``bottleneck`` is registered as an FSDP forward method and the heads
    keep their parameters gathered until backward (``reshard_after_forward=False``).
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    policy = mixed_precision_policy(ctx)
    for param_name, param in model.named_parameters():
        if param.ndim == 0:
            raise ValueError(f"model parameter {param_name!r} is 0-d; FSDP2 needs shape [1] (DESIGN.md)")
    for blocks in block_lists(model):
        for block in blocks:
            fully_shard(block, mesh=ctx.mesh, mp_policy=policy)
    for tower in ("vision", "text"):
        if isinstance(getattr(model, tower, None), nn.Module):
            fully_shard(getattr(model, tower), mesh=ctx.mesh, mp_policy=policy)
    for head in head_modules(model):
        fully_shard(head, mesh=ctx.mesh, mp_policy=policy, reshard_after_forward=False)
        if hasattr(head, "bottleneck"):
            register_fsdp_forward_method(head, "bottleneck")
    fully_shard(root, mesh=ctx.mesh, mp_policy=policy, reshard_after_forward=False)
    for module in teacher_modules:
        for block in getattr(module, "blocks", None) or []:    # a full-EMA backbone: per block too
            fully_shard(block, mesh=ctx.mesh, mp_policy=policy)
        # Each teacher module is its own FSDP root, which by default stays gathered after forward;
        # the EMA update needs it back in shards.
        fully_shard(module, mesh=ctx.mesh, mp_policy=policy, reshard_after_forward=True)


def needs_gathering(module: nn.Module) -> bool:
    """Teacher modules the losses use outside ``forward`` (heads: ``bottleneck``, prototypes), as
    opposed to a full-EMA backbone, which is only called and gathers block by block itself."""
    return not isinstance(getattr(module, "blocks", None), nn.ModuleList)


@contextmanager
def gathered(modules: list[nn.Module]):
    """Hold FSDP modules unsharded for a no-grad block (the teacher heads, whose methods and
    prototype parameters the losses use directly), then shard them again for the EMA update."""
    from torch.distributed.fsdp import FSDPModule
    fsdp_modules = [m for m in modules if isinstance(m, FSDPModule)]
    for module in fsdp_modules:
        module.unshard()
    try:
        yield
    finally:
        for module in fsdp_modules:
            module.reshard()


def parallelize(model: nn.Module, teacher_modules: list[nn.Module], ctx: DistContext, cfg,
                compute_losses) -> LossForward:
    """The fixed order: activation checkpointing → per-block compile → FSDP2 → whole-step compile (one
    of the two compiles, ``train.compile``). Returns the module to call for the losses:
    ``loss_forward(teacher, state, batch, teacher_temp, cfg)``."""
    if cfg.train.activation_checkpointing != "off":
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing, cfg.train.ac_every)
    if cfg.train.compile == "blocks":
        apply_compile(model)
    root = LossForward(model, compute_losses)
    if ctx.sharded:
        shard(model, teacher_modules, ctx, root)
    if cfg.train.compile == "step":
        compile_step(root)
    return root


__all__ = ["DistContext", "init_distributed", "mesh_shape", "mesh_text", "build_mesh", "shutdown",
           "parallelize", "shard", "LossForward", "gathered", "needs_gathering", "block_lists",
           "head_modules", "apply_activation_checkpointing", "apply_compile", "compile_step", "COMPILE_OPTIONS",
           "mixed_precision_policy",
           "resolve_device", "resolve_param_dtype"]
