"""Head-only EMA never touches the backbone; full_ema does; v and g average separately; targets carry
no gradient; the teacher never trains."""
import pytest
import torch

from fasttips import config
from fasttips.models import build_model
from fasttips.teacher import Teacher

SMALL = {"vision.width": 32, "vision.heads": 1, "vision.mlp_hidden": 64, "vision.depth": 1,
         "text.depth": 1, "text.vocab_size": 50, "text.max_len": 8, "heads.hidden": 24,
         "heads.bottleneck": 8, "heads.prototypes": 19, "data.batch_size": 3, "data.global_size": 28,
         "data.local_size": 14}


def small_cfg(**over):
    return config.load(None, [f"{k}={v}" for k, v in {**SMALL, **over}.items()])


def perturb_(module, scale=0.1):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_head_ema_never_touches_the_backbone(seed):
    cfg = small_cfg()
    model = build_model(cfg)
    teacher = Teacher(model, cfg)
    assert teacher.backbone is None
    assert not any(n.startswith("vision") or n.startswith("backbone") for n, _ in teacher.named_parameters())
    vision_ptrs = {p.data_ptr() for p in model.vision.parameters()}
    t_tensors, s_tensors = teacher.ema_tensors(model)
    assert not vision_ptrs & {t.data_ptr() for t in t_tensors + s_tensors}
    n_head = sum(1 for _ in model.dino_head.parameters()) + sum(1 for _ in model.ibot_head.parameters())
    assert len(t_tensors) == n_head

    perturb_(model)
    before_model, before_teacher = snapshot(model), snapshot(teacher)
    teacher.update(model, 0.75)
    for n, p in model.named_parameters():                 # the student is never written
        assert torch.equal(p, before_model[n]), n
    for n, p in teacher.named_parameters():               # v and g separately: plain lerp per tensor
        s = dict(model.named_parameters())[n]
        torch.testing.assert_close(p, 0.75 * before_teacher[n] + 0.25 * s.detach())


def test_full_ema_averages_the_backbone_too(seed):
    cfg = small_cfg(**{"teacher.mode": "full_ema"})
    model = build_model(cfg)
    teacher = Teacher(model, cfg)
    assert teacher.backbone is not None          # full_ema runs its own EMA backbone, whatever teacher.features says
    perturb_(model.vision)
    before = snapshot(teacher.backbone)
    teacher.update(model, 0.5)
    student = dict(model.vision.named_parameters())
    for n, p in teacher.backbone.named_parameters():
        torch.testing.assert_close(p, 0.5 * before[n] + 0.5 * student[n].detach())
    assert any(not torch.equal(p, before[n]) for n, p in teacher.backbone.named_parameters())


def test_momentum_zero_copies_and_one_freezes(seed):
    cfg = small_cfg()
    model = build_model(cfg)
    teacher = Teacher(model, cfg)
    perturb_(model)
    frozen = snapshot(teacher)
    teacher.update(model, 1.0)
    assert all(torch.equal(p, frozen[n]) for n, p in teacher.named_parameters())
    teacher.update(model, 0.0)
    student = dict(model.named_parameters())
    assert all(torch.equal(p, student[n]) for n, p in teacher.named_parameters())
    with pytest.raises(ValueError, match="momentum must be in"):
        teacher.update(model, 1.5)


def test_shared_heads_stay_shared(seed):
    cfg = small_cfg(**{"heads.shared": True})
    model = build_model(cfg)
    teacher = Teacher(model, cfg)
    assert teacher.ibot_head is teacher.dino_head
    t_tensors, _ = teacher.ema_tensors(model)
    assert len(t_tensors) == sum(1 for _ in model.dino_head.parameters())
    assert teacher.modules_to_shard() == [teacher.dino_head]


def test_targets_carry_no_gradient_and_teacher_stays_in_eval(seed):
    cfg = small_cfg()
    model = build_model(cfg)
    teacher = Teacher(model, cfg)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    images = torch.randn(3, 3, 28, 28)
    out = model.vision(images)
    assert out["cls1"].requires_grad
    feats = teacher.global_features(model, images, student_unmasked=out)
    for x in (feats["cls1"], feats["patch"], teacher.dino_bottleneck(feats["cls1"]),
              teacher.ibot_bottleneck(out["patch"].reshape(-1, 32)), *teacher.prototypes("dino")):
        assert not x.requires_grad and x.grad_fn is None


@pytest.mark.parametrize("mode,features", [("head_ema", "separate_no_grad"), ("full_ema", "separate_no_grad")])
def test_separate_teacher_forward_equals_detached_student_forward(seed, mode, features):
    """With no drop-path the extra no-grad pass (or an unmoved EMA backbone) gives the same features."""
    cfg = small_cfg(**{"teacher.mode": mode, "teacher.features": features})
    model = build_model(cfg)
    teacher = Teacher(model, cfg)
    images = torch.randn(2, 3, 28, 28)
    out = model.vision(images)
    feats = teacher.global_features(model, images)
    torch.testing.assert_close(feats["patch"], out["patch"].detach(), atol=1e-5, rtol=1e-5)
    assert model.vision.training                          # the eval pass restored train mode


def test_bad_teacher_config():
    cfg = small_cfg()
    model = build_model(cfg)
    cfg.teacher.mode = "half_ema"
    with pytest.raises(ValueError, match="teacher.mode"):
        Teacher(model, cfg)
    cfg = small_cfg()
    teacher = Teacher(model, cfg)
    with pytest.raises(ValueError, match="needs the student's unmasked forward"):
        teacher.global_features(model, torch.randn(1, 3, 28, 28))
