"""Linear probes on frozen features: what the probe suites (``linear``, ``ade20k-linear``, ``voc-linear``,
``nyu-depth``, ``nyu-normals``) share. Protocols and their sources: docs/eval_suites.md, "Linear probes".

The encoder runs once over the training split; its features go into a ``Store`` (RAM, or a memory-mapped
file under ``--probe-cache``). Then a small optimiser loop trains one linear layer per learning rate of
the grid, all on the same batches (as DINOv2's linear evaluation trains its grid side by side). The
learning rate is chosen on a held-out tenth of the training split, never on the split that is scored;
with one learning rate nothing is held out. A task object says what the layer predicts and how it is
scored:

    task.d_in, task.d_out             width of the layer's input and output
    task.batch(idx) -> (x, y)         inputs [..., d_in] and targets of training items idx (on the device)
    task.forward(linear, x) -> pred   the prediction from the layer's output (e.g. upsampled, binned)
    task.loss(pred, y) -> scalar      what the optimiser minimises
    task.error(pred, y) -> (sum, n)   what picks the learning rate (lower is better)
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

# DINOv2's linear-evaluation grid (dinov2/eval/linear.py), for a batch of 256.
DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
HELDOUT_EVERY = 10           # every 10th training item picks the learning rate


@dataclass(frozen=True)
class Recipe:
    """How a probe is trained: optimiser, learning-rate grid, epochs over the cached training features,
    batch (images), weight decay, and the warm-up fraction of a cosine schedule."""
    optimizer: str                 # "sgd" (momentum 0.9) or "adamw"
    lrs: tuple[float, ...]
    epochs: int
    batch_size: int
    weight_decay: float = 0.0
    warmup: float = 0.0


# ImageNet classification: DINOv2's linear evaluation (SGD, momentum 0.9, no weight decay, cosine,
# 10 epochs, its 13-value grid at batch 256).
CLASSIFICATION = Recipe("sgd", DINOV2_LRS, epochs=10, batch_size=256)
# Dense probes (segmentation, depth, normals): AdamW with a short warm-up, as DINOv2's segmentation and
# depth heads and Probe3D's probes are trained; 10 epochs as Probe3D.
DENSE = Recipe("adamw", (1e-4, 3e-4, 1e-3, 3e-3), epochs=10, batch_size=16, weight_decay=1e-4, warmup=0.1)


def recipe_for(ctx, base: Recipe) -> Recipe:
    """``base`` with the run's ``--probe-epochs`` / ``--probe-lrs`` / ``--probe-batch-size`` when given."""
    changes = {}
    if ctx.probe_epochs is not None:
        changes["epochs"] = ctx.probe_epochs
    if ctx.probe_lrs:
        changes["lrs"] = tuple(ctx.probe_lrs)
    if ctx.probe_batch_size is not None:
        changes["batch_size"] = ctx.probe_batch_size
    return replace(base, **changes)


class Store:
    """``n`` rows of one shape and dtype, filled once and read in random batches: a numpy array in RAM,
    or with ``cache_dir`` a memory-mapped ``.npy`` file there (deleted by ``close``)."""

    def __init__(self, n: int, shape: tuple[int, ...], dtype, cache_dir: str | Path | None = None,
                 name: str = "features"):
        self._tmp = None
        if cache_dir is None:
            self.array = np.zeros((n, *shape), dtype=dtype)
        else:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            self._tmp = tempfile.TemporaryDirectory(dir=cache_dir, prefix="fasttips-probe-")
            self.array = np.lib.format.open_memmap(Path(self._tmp.name) / f"{name}.npy", mode="w+",
                                                   dtype=dtype, shape=(n, *shape))

    @staticmethod
    def nbytes(n: int, shape: tuple[int, ...], dtype) -> int:
        return n * math.prod(shape) * np.dtype(dtype).itemsize

    def __setitem__(self, i: int, value) -> None:
        self.array[i] = value.numpy() if torch.is_tensor(value) else value

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` as a torch tensor (float32 for floating stores)."""
        rows = torch.from_numpy(np.ascontiguousarray(self.array[np.sort(idx.numpy())]))
        # sorted reads are kind to a memory map; put the rows back in the order asked for
        order = torch.argsort(torch.argsort(idx))
        rows = rows[order]
        return rows.float() if rows.is_floating_point() else rows

    def close(self) -> None:
        if self._tmp is not None:
            del self.array
            self._tmp.cleanup()
            self._tmp = None


def split_heldout(items: torch.Tensor, n_lrs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) item indices: every ``HELDOUT_EVERY``-th item is held out when there is a grid
    to choose from and at least ``HELDOUT_EVERY`` items; otherwise nothing is held out and the grid is
    judged on the training items themselves."""
    if n_lrs == 1 or len(items) < HELDOUT_EVERY:
        return items, items[:0]
    held = torch.arange(len(items)) % HELDOUT_EVERY == HELDOUT_EVERY - 1
    return items[~held], items[held]


class Heads(torch.nn.Module):
    """One linear layer ``d_in → d_out`` per learning rate. Initialised as DINOv2's linear classifier:
    weights N(0, 0.01²), zero bias."""

    def __init__(self, n: int, d_in: int, d_out: int, generator: torch.Generator):
        super().__init__()
        self.weight = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(d_in, d_out, generator=generator) * 0.01) for _ in range(n)])
        self.bias = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(d_out)) for _ in range(n)])

    def linear(self, k: int):
        w, b = self.weight[k], self.bias[k]
        return lambda x: x @ w + b


@dataclass
class Probe:
    """The chosen layer and how it was chosen."""
    heads: Heads
    index: int
    record: dict

    def linear(self):
        return self.heads.linear(self.index)


def _schedule(total: int, warmup: float):
    """Linear warm-up over ``warmup`` of the steps, then cosine to 0."""
    n_warm = int(round(total * warmup))

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        t = (step - n_warm) / max(total - n_warm, 1)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return factor


def fit(task, items: torch.Tensor, recipe: Recipe, ctx, label: str, seed: int = 0) -> Probe:
    """Train one linear layer per learning rate of ``recipe`` on ``items`` (training item indices) and
    keep the one with the lowest held-out ``task.error``. Deterministic for a given ``seed``."""
    if len(items) == 0:
        raise ValueError(f"{label}: no training item could be read")
    gen = torch.Generator().manual_seed(seed)
    train, held = split_heldout(items, len(recipe.lrs))
    device = ctx.device
    heads = Heads(len(recipe.lrs), task.d_in, task.d_out, gen).to(device)
    groups = [{"params": [heads.weight[k], heads.bias[k]], "lr": lr} for k, lr in enumerate(recipe.lrs)]
    if recipe.optimizer == "sgd":
        opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, recipe.warmup))
    ctx.say(f"[{label}] probe: {len(train)} training items, {len(held)} held out, {recipe.optimizer} lrs "
            f"{list(recipe.lrs)}, {recipe.epochs} epochs x {steps_per_epoch} steps of {recipe.batch_size}")
    for epoch in range(recipe.epochs):
        perm = train[torch.randperm(len(train), generator=gen)]
        losses = torch.zeros(len(recipe.lrs))
        for start in range(0, len(perm), recipe.batch_size):
            x, y = task.batch(perm[start:start + recipe.batch_size])
            per_head = torch.stack([task.loss(task.forward(heads.linear(k), x), y)
                                    for k in range(len(recipe.lrs))])
            opt.zero_grad(set_to_none=True)
            per_head.sum().backward()          # heads share no parameter: each gets its own gradient
            opt.step()
            sched.step()
            losses += per_head.detach().float().cpu()
        if ctx.progress_every:
            mean = losses / steps_per_epoch
            best = int(torch.nan_to_num(mean, nan=math.inf).argmin())
            ctx.say(f"[{label}] epoch {epoch + 1}/{recipe.epochs}  lowest loss {mean[best]:.4f} "
                    f"(lr {recipe.lrs[best]:g})")
    judge = held if len(held) else train
    errors = _errors(task, heads, judge, recipe)
    best = int(torch.nan_to_num(errors, nan=math.inf).argmin())
    record = {"optimizer": recipe.optimizer, "epochs": recipe.epochs, "batch_size": recipe.batch_size,
              "weight_decay": recipe.weight_decay, "lr": recipe.lrs[best], "lrs": list(recipe.lrs),
              "n_train": len(train), "n_heldout": len(held),
              "selection": "held-out tenth of the training split" if len(held) else "training items",
              "selection_error": {f"{lr:g}": (None if not math.isfinite(e) else round(float(e), 6))
                                  for lr, e in zip(recipe.lrs, errors.tolist())}}
    return Probe(heads.eval().requires_grad_(False), best, record)


@torch.no_grad()
def _errors(task, heads: Heads, items: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    sums = torch.zeros(len(recipe.lrs), dtype=torch.float64)
    count = torch.zeros(len(recipe.lrs), dtype=torch.float64)
    for start in range(0, len(items), recipe.batch_size):
        x, y = task.batch(items[start:start + recipe.batch_size])
        for k in range(len(recipe.lrs)):
            s, n = task.error(task.forward(heads.linear(k), x), y)
            sums[k] += float(s)
            count[k] += float(n)
    return sums / count.clamp_min(1)


def standardizer(store: Store, items: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (last axis) of the stored rows ``items``, in float64 running sums: the
    training-set statistics that replace the batch statistics of DINOv2's BatchNorm before its linear
    segmentation layer."""
    total = sq = None
    n = 0
    for start in range(0, len(items), chunk):
        x = store.take(items[start:start + chunk]).double()
        x = x.reshape(-1, x.shape[-1])
        total = x.sum(0) if total is None else total + x.sum(0)
        sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
        n += x.shape[0]
    mean = total / n
    std = (sq / n - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float().clamp_min(1e-6)
