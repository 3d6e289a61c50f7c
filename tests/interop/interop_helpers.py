"""Tiny fasttips models, tokenizers and runs for the interop tests (nothing is downloaded)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from fasttips import config
from fasttips.data.tokenizer import Tokenizer
from fasttips.distributed.checkpoint import CheckpointManager
from fasttips.models import build_model

CAPTIONS = ["a red bus on a street", "two dogs play in the snow", "a bowl of fruit on a table",
            "the sea at sunset with a boat", "a cat sleeping on a sofa", "people walking in a park",
            "a mountain lake under clouds", "a plate of pasta with basil", "an old bridge over a river",
            "a child riding a bicycle"]

TINY = {"vision.width": 64, "vision.heads": 2, "vision.mlp_hidden": 128, "vision.depth": 2,
        "vision.pos_grid": 4, "vision.layerscale": 1.0, "text.depth": 2, "text.vocab_size": 72,
        "text.max_len": 16, "text.ln_eps": 1e-5, "heads.hidden": 32, "heads.bottleneck": 16,
        "heads.prototypes": 24, "data.batch_size": 4, "data.global_size": 56, "data.local_size": 28,
        "data.n_local": 2, "loss.max_logit_scale": 300.0}


def tiny_cfg(**over):
    items = {**TINY, **{k.replace("__", "."): v for k, v in over.items()}}
    return config.load(None, [f"{k}={v}" for k, v in items.items()])


def tokenizer(vocab: int = 64) -> Tokenizer:
    return Tokenizer.train(CAPTIONS * 3, vocab, max_len=16)


@torch.no_grad()
def randomize_(model, seed: int = 0, scale=(5.3, 4.1)):
    """Every tower weight random (LayerNorms and LayerScales too, so no mapping hides behind a 1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "norm" in name or "gamma" in name else 0.08)
                + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    model.logit_scale.copy_(torch.tensor(scale))
    return model


def tiny_model(cfg, seed: int = 0):
    return randomize_(build_model(cfg, device="cpu"), seed).eval()


def save_run(run_dir: Path, cfg, model, tok: Tokenizer) -> Path:
    """A fasttips run dir holding one complete checkpoint of ``model`` (as the trainer writes it)."""
    ctx = SimpleNamespace(rank=0, world_size=1, is_main=True, barrier=lambda: None)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(cfg, run_dir / "config.yaml")
    files = {"config.yaml": (run_dir / "config.yaml").read_bytes(), "tokenizer.model": tok.serialized()}
    return CheckpointManager(run_dir / "checkpoints", 1, ctx).save(
        7, {"model": model.state_dict()}, {}, files, {"nonfinite_total": 0})


def images(n: int, size, seed: int = 1) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))
