"""Parameter groups, per-step hyper-parameters, prototype freezing and per-module clipping."""
from __future__ import annotations

import math

import pytest
import torch

from fasttips import config as config_lib
from fasttips.models import build_model
from fasttips.optim import (build_optimizer, clamp_logit_scale_, clip_gradients, clip_modules, layer_id, lr_mult,
                            param_groups, set_hyperparameters, weight_decay_mult)


@pytest.fixture(scope="module")
def cfg():
    return config_lib.load(None, ["vision.depth=3", "text.depth=2", "heads.prototypes=32", "heads.hidden=32",
                                  "heads.bottleneck=16", "vision.layerscale=1e-5",
                                  "optim.layer_decay=0.5", "optim.patch_embed_lr_mult=0.2"])


@pytest.fixture(scope="module")
def model(cfg):
    return build_model(cfg, device="cpu")


def _group_of(optimizer, param):
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


def test_weight_decay_multipliers(model):
    decays = {name: weight_decay_mult(name, p) for name, p in model.named_parameters()}
    for name, mult in decays.items():
        no_decay = (name.endswith("bias") or "norm" in name or ".ls1." in name or ".ls2." in name
                    or name.startswith("logit_"))
        assert mult == (0.0 if no_decay else 1.0), name
    assert decays["dino_head.prototypes.g"] == 1.0          # DINOv2: the gain keeps weight decay
    assert decays["vision.blocks.0.attn.qkv.weight"] == 1.0
    assert decays["vision.blocks.0.ls1.gamma"] == 0.0


def test_layer_decay_and_patch_embed_multiplier(cfg, model):
    depth, decay = cfg.vision.depth, cfg.optim.layer_decay
    assert layer_id("vision.patch_embed.proj.weight", depth) == 0
    assert layer_id("vision.pos_embed", depth) == 0
    assert layer_id("vision.blocks.2.mlp.fc1.weight", depth) == 3
    assert layer_id("vision.norm.weight", depth) == depth + 1
    assert layer_id("vision.blocks.1._checkpoint_wrapped_module.attn.qkv.weight", depth) == 2
    assert lr_mult("vision.blocks.0.attn.qkv.weight", cfg) == pytest.approx(decay ** depth)
    assert lr_mult("vision.norm.weight", cfg) == 1.0
    assert lr_mult("vision.patch_embed.proj.weight", cfg) == pytest.approx(decay ** (depth + 1) * 0.2)
    assert lr_mult("text.blocks.1.fc1.weight", cfg) == pytest.approx(decay ** (cfg.text.depth - 1))
    assert lr_mult("text.token_embed.weight", cfg) == pytest.approx(decay ** (cfg.text.depth + 1))
    for name in ("dino_head.mlp.0.weight", "ibot_head.prototypes.v", "logit_scale"):
        assert lr_mult(name, cfg) == 1.0


def test_groups_cover_every_trainable_parameter_once(cfg, model):
    groups = param_groups(model, cfg)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len([p for p in model.parameters() if p.requires_grad])
    assert len({(g["lr_mult"], g["wd_mult"], g["prototype"]) for g in groups}) == len(groups)


def test_set_hyperparameters_and_prototype_freeze(cfg, model):
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    set_hyperparameters(opt, lr=1e-3, weight_decay=0.1, freeze_prototypes=True)
    proto = _group_of(opt, model.dino_head.prototypes.v)
    assert proto["lr"] == 0.0 and proto["weight_decay"] == pytest.approx(0.1)
    qkv = _group_of(opt, model.vision.blocks[0].attn.qkv.weight)
    assert qkv["lr"] == pytest.approx(1e-3 * cfg.optim.layer_decay ** cfg.vision.depth)
    assert _group_of(opt, model.vision.blocks[0].attn.qkv.bias)["weight_decay"] == 0.0
    set_hyperparameters(opt, lr=1e-3, weight_decay=0.1, freeze_prototypes=False)
    assert proto["lr"] == pytest.approx(1e-3)


def test_per_module_clipping(seed):
    torch.manual_seed(seed)
    model = torch.nn.ModuleDict({"vision": torch.nn.Linear(7, 5), "dino_head": torch.nn.Linear(3, 2)})
    model.register_parameter("logit_scale", torch.nn.Parameter(torch.zeros(2)))
    units = clip_modules(model)
    assert sorted(units) == ["dino_head", "other", "vision"]
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 10
    before = {k: math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ps)) for k, ps in units.items()}
    norms = clip_gradients(units, max_norm=1.0)
    for key, params in units.items():
        assert float(norms[key]) == pytest.approx(before[key], rel=1e-5)     # the norm before clipping
        after = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params))
        assert after == pytest.approx(min(1.0, before[key]), rel=1e-4)       # each unit clipped alone
    assert clip_gradients(units, max_norm=0)["vision"] == pytest.approx(1.0, rel=1e-4)   # 0: measure only


def test_build_optimizer_rejects_a_frozen_model(cfg):
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, cfg, torch.device("cpu"))


def test_trainer_step_freezes_prototypes_and_accumulates(tmp_path):
    """Through the engine: the first step leaves the prototypes (and their Adam state) untouched,
    the second moves them; each step eats optim.accum_steps batches."""
    from pathlib import Path

    from fasttips.distributed import fsdp
    from fasttips.trainer import Trainer
    cfg = config_lib.load(None, ["data.source=synthetic", "vision.depth=1", "text.depth=1", "text.max_len=8",
                                 "heads.hidden=32", "heads.bottleneck=16", "heads.prototypes=32",
                                 "data.batch_size=2", "data.global_size=28", "data.local_size=14",
                                 "optim.accum_steps=2", "optim.freeze_prototypes_steps=1",
                                 "optim.warmup_steps=0", f"train.run_dir={tmp_path}"])
    trainer = Trainer(cfg, fsdp.init_distributed(cfg), Path(tmp_path), progress=False)
    it = [iter(trainer.loader)]
    training = trainer.training
    proto = training.model.dino_head.prototypes.v
    mlp = training.model.dino_head.mlp[0].weight
    before = proto.detach().clone(), mlp.detach().clone()
    out = training.train_step(trainer.next_batches(it), trainer.schedules(0))
    assert out.images == 4 and not out.skipped
    assert torch.equal(proto, before[0]) and not torch.equal(mlp, before[1])
    assert proto not in training.optimizer.state                    # no Adam moments while frozen
    training.train_step(trainer.next_batches(it), trainer.schedules(1))
    assert not torch.equal(proto, before[0])
    assert trainer.loader.state_dict()["batches"] == 4


def test_clamp_logit_scale_caps_the_parameter_in_place():
    holder = torch.nn.Module()
    holder.logit_scale = torch.nn.Parameter(torch.tensor([6.0, 1.5]))
    param = holder.logit_scale
    clamp_logit_scale_(holder, max_logit_scale=100.0)
    assert holder.logit_scale is param                               # in place: the optimiser keeps it
    torch.testing.assert_close(param.detach(), torch.tensor([math.log(100.0), 1.5]))
    clamp_logit_scale_(torch.nn.Linear(2, 2), 100.0)                # no logit_scale: nothing to do


def test_trainer_step_clamps_the_logit_scale(tmp_path):
    """An optimiser step through the engine leaves logit_scale at most ln(loss.max_logit_scale), and the
    logged inverse temperature is the one the loss used (exp of the parameter before the step)."""
    from pathlib import Path

    from fasttips.distributed import fsdp
    from fasttips.trainer import Trainer
    cfg = config_lib.load(None, ["data.source=synthetic", "vision.depth=1", "text.depth=1", "text.max_len=8",
                                 "heads.hidden=32", "heads.bottleneck=16", "heads.prototypes=32",
                                 "data.batch_size=2", "data.global_size=28", "data.local_size=14",
                                 "optim.warmup_steps=0", "loss.max_logit_scale=50.0",
                                 f"train.run_dir={tmp_path}"])
    trainer = Trainer(cfg, fsdp.init_distributed(cfg), Path(tmp_path), progress=False)
    model = trainer.training.model
    with torch.no_grad():
        model.logit_scale.copy_(torch.tensor([6.0, 2.0]))           # alt above ln(50), syn below
    out = trainer.training.train_step(trainer.next_batches([iter(trainer.loader)]), trainer.schedules(0))
    assert not out.skipped
    assert out.terms["logit_scale_alt"] == pytest.approx(math.exp(6.0), rel=1e-5)   # unclamped in the loss
    alt, syn = model.logit_scale.detach().tolist()
    assert alt == pytest.approx(math.log(50.0), abs=1e-6)
    assert syn != 2.0 and syn < math.log(50.0)                      # below the cap: a plain Adam step
