"""compute_losses and Training.train_step on a small model: every term, the weighted total, the
centers, the options (n_global = 2, SK, masked iBOT, SigLIP, KoLeo), bad batches, the skipped
non-finite step, and a 30-step training run that lowers the total loss."""
import pytest
import torch

from fasttips import config
from fasttips.data.batch import synthetic_batch
from fasttips.models import build_model
from fasttips.schedules import Schedules
from fasttips.distributed import fsdp
from fasttips.step import TERMS, LossState, compute_losses
from fasttips.teacher import Teacher
from fasttips.training import build_training

SMALL = {"vision.width": 32, "vision.heads": 1, "vision.mlp_hidden": 64, "vision.depth": 1,
         "text.depth": 1, "text.vocab_size": 50, "text.max_len": 8, "heads.hidden": 24,
         "heads.bottleneck": 8, "heads.prototypes": 19, "data.batch_size": 4, "data.global_size": 28,
         "data.local_size": 14, "data.n_local": 2}


def setup(**over):
    cfg = config.load(None, [f"{k}={v}" for k, v in {**SMALL, **over}.items()])
    model = build_model(cfg)
    teacher = Teacher(model, cfg)
    return cfg, model, teacher, LossState(cfg)


def training_for(**over):
    """The engine's own model, teacher, objective and AdamW (one CPU process)."""
    cfg = config.load(None, [f"{k}={v}" for k, v in {**SMALL, **over}.items()])
    return cfg, build_training(cfg, fsdp.init_distributed(cfg))


def batch_for(cfg, generator=None):
    d = cfg.data
    return synthetic_batch(d.batch_size, d.global_size, d.local_size, n_global=d.n_global,
                           n_local=d.n_local, max_len=cfg.text.max_len, vocab_size=cfg.text.vocab_size,
                           generator=generator)


def test_compute_losses_terms_and_weighted_total(seed):
    cfg, model, teacher, state = setup(**{"loss.koleo_weight": 0.1, "loss.dino_weight": 0.7,
                                          "loss.ibot_weight": 1.3, "loss.contrastive_weight": 0.5})
    out = compute_losses(model, teacher, state, batch_for(cfg), 0.05, cfg)
    for k in TERMS + ("loss", "logit_scale_alt", "logit_scale_syn"):
        assert k in out and torch.isfinite(out[k]).all(), k
    want = 0.5 * (out["clip_alt"] + out["clip_syn"]) + 0.7 * out["dino"] + 1.3 * out["ibot"] + 0.1 * out["koleo"]
    torch.testing.assert_close(out["loss"], want)
    assert out["logit_scale_alt"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert bool(state.dino_center.has_pending) and bool(state.ibot_center.has_pending)
    out["loss"].backward()
    assert model.vision.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())        # targets carry no gradient


def test_teacher_path_carries_no_gradient(seed):
    """The iBOT++ loss's gradient w.r.t. the backbone equals the one computed with the teacher
    targets fed from an explicitly detached clone of the features (so none flows through them)."""
    cfg, model, teacher, state = setup(**{"loss.contrastive_weight": 0.0, "loss.dino_weight": 0.0})
    batch = batch_for(cfg)
    out = compute_losses(model, teacher, state, batch, 0.05, cfg)
    (g1,) = torch.autograd.grad(out["loss"], [model.vision.pos_embed])

    class Frozen:                                                     # the same teacher, fed clones
        def __getattr__(self, name):
            return getattr(teacher, name)

        def global_features(self, model, crops, student_unmasked=None):
            with torch.no_grad():
                o = model.vision(crops)
            return {"cls1": o["cls1"].clone(), "patch": o["patch"].clone()}

    state2 = LossState(cfg)
    out2 = compute_losses(model, Frozen(), state2, batch, 0.05, cfg)
    (g2,) = torch.autograd.grad(out2["loss"], [model.vision.pos_embed])
    torch.testing.assert_close(out["loss"], out2["loss"])
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("over", [
    {"data.n_global": 2},
    {"loss.centering": "sinkhorn_knopp"},
    {"loss.ibot_tokens": "masked"},
    {"loss.contrastive": "siglip", "heads.shared": True},
    {"data.n_local": 0},
    {"data.n_local": 7, "teacher.mode": "full_ema"},
])
def test_options_give_finite_losses_and_gradients(seed, over):
    cfg, model, teacher, state = setup(**over)
    out = compute_losses(model, teacher, state, batch_for(cfg), 0.04, cfg)
    assert all(torch.isfinite(out[k]) for k in TERMS + ("loss",)), out
    if cfg.data.n_local == 0 and cfg.data.n_global == 1:
        assert out["dino"].item() == 0.0                             # nothing to compare
    else:
        assert out["dino"].item() > 0
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_batches_give_clear_errors(seed):
    cfg, model, teacher, state = setup()
    v = 0.04
    batch = batch_for(cfg)
    bad = dict(batch, global_crops=torch.randn(4, 3, 30, 30), masks=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        compute_losses(model, teacher, state, bad, v, cfg)
    with pytest.raises(ValueError, match="local_crops: 7 rows"):
        compute_losses(model, teacher, state, dict(batch, local_crops=torch.randn(7, 3, 14, 14)), v, cfg)
    with pytest.raises(ValueError, match="masks: expected"):
        compute_losses(model, teacher, state, dict(batch, masks=torch.zeros(4, 5, dtype=torch.bool)), v, cfg)
    for bad_temp in ({"teacher_temp": 0.04}, 0.0, None):
        with pytest.raises(ValueError, match="teacher_temp"):
            compute_losses(model, teacher, state, batch, bad_temp, cfg)


def test_train_step_freezes_prototypes_then_releases_them(seed):
    cfg, training = training_for(**{"optim.freeze_prototypes_steps": 1, "optim.warmup_steps": 0,
                                    "optim.lr": 0.5})
    model, teacher = training.model, training.teacher
    schedules = Schedules(cfg)
    batch = batch_for(cfg)
    batch["masks"][-1, 0] = True      # at least one masked patch, so the mask token gets a gradient (the
    #                                   random masks of 8 patches at ratio 0.3 are all off in 6% of draws)

    def params():
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    before, teacher_before = params(), {n: p.detach().clone() for n, p in teacher.named_parameters()}
    out = training.train_step([batch], schedules(0))
    assert set(TERMS) <= set(out.terms) and {"vision", "text"} <= set(out.grad_norms)
    assert isinstance(out.loss, float) and not out.skipped and not out.stop
    after = params()
    for n in before:
        moved = not torch.equal(before[n], after[n])
        assert moved != (".prototypes." in n) or "logit_bias" in n, n    # (SigLIP bias unused by CLIP)
    moved_teacher = {n for n, p in teacher.named_parameters() if not torch.equal(p, teacher_before[n])}
    assert moved_teacher and all(".prototypes." not in n for n in moved_teacher)   # EMA ran

    training.train_step([batch], schedules(1))
    assert not torch.equal(model.dino_head.prototypes.v, after["dino_head.prototypes.v"])


def test_a_non_finite_step_changes_nothing(seed):
    """A NaN loss skips the step: parameters, teacher, optimiser state and centers stay as they were."""
    cfg, training = training_for()
    schedules, batch = Schedules(cfg), batch_for(cfg)
    training.train_step([batch], schedules(0))
    state = {k: v.clone() for k, v in {**training.model.state_dict(), **training.teacher.state_dict(),
                                       **training.loss_state.state_dict()}.items()}
    moments = [s["exp_avg"].clone() for s in training.optimizer.state.values()]
    out = training.train_step([batch], schedules(1), inject_nan=True)
    assert out.skipped and out.loss != out.loss
    after = {**training.model.state_dict(), **training.teacher.state_dict(), **training.loss_state.state_dict()}
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert all(torch.equal(a["exp_avg"], b) for a, b in zip(training.optimizer.state.values(), moments))
    assert not training.train_step([batch], schedules(1)).skipped


def test_thirty_steps_on_one_batch_lower_the_loss(seed):
    """A small model on one fixed batch whose local crops are quadrants of the global crop (so
    DINO has something to learn): the total loss falls by a clear margin in 30 steps."""
    cfg, training = training_for(**{"data.batch_size": 6, "data.global_size": 28, "data.local_size": 14,
                                    "data.n_local": 2, "optim.lr": 0.02, "optim.warmup_steps": 2,
                                    "train.steps": 100, "loss.teacher_temp_warmup_steps": 5})
    schedules = Schedules(cfg)
    batch = batch_for(cfg, torch.Generator().manual_seed(seed))
    g = batch["global_crops"]
    batch["local_crops"] = torch.cat([g[:, :, :14, :14], g[:, :, 14:, 14:]])
    losses = [training.train_step([batch], schedules(s)).loss for s in range(30)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, [round(x, 3) for x in losses]


def test_train_step_caps_the_logit_scale_after_the_optimiser_step(seed):
    """The forward uses exp(logit_scale) as is; the optimiser step is followed by the clamp of the
    parameter to ln(loss.max_logit_scale) (OpenCLIP), so the logged scale is the one the loss used."""
    import math
    cfg, training = training_for(**{"optim.warmup_steps": 0, "loss.max_logit_scale": 20.0})
    with torch.no_grad():
        training.model.logit_scale.fill_(4.0)                        # above ln(20) ≈ 3.0
    out = training.train_step([batch_for(cfg)], Schedules(cfg)(0))
    assert out.terms["logit_scale_alt"] == pytest.approx(math.exp(4.0), rel=1e-5)
    torch.testing.assert_close(training.model.logit_scale.detach(), torch.full((2,), math.log(20.0)))
