"""The explicit FLOP model (fasttips/flops.py) against torch's own FLOP counter.

``FlopCounterMode`` counts the matmuls, convolutions and attention calls torch actually runs in a
forward and backward pass; the model predicts them from the config. They count the same things
(matmuls and convolutions, nothing elementwise), so they must agree closely: the tolerance, 2 %, is
far below the smallest term of the model (the attention output projection, ~10 % of a tiny block),
so dropping any term fails here. On the CPU the kernels are the PyTorch references, whose attention
is two plain matmuls (counted as such).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fasttips import config, flops
from fasttips.data.batch import synthetic_batch
from fasttips.models import build_model
from fasttips.models.heads import ProjectionHead
from fasttips.models.text import text_from_config
from fasttips.models.vit import vision_from_config
from fasttips.step import LossState, compute_losses
from fasttips.teacher import Teacher

REL = 0.02


def tiny(*overrides):
    return config.load(None, ["preset=tiny", *overrides])


def counted(fn) -> int:
    """Matmul/conv/attention FLOPs torch runs in ``fn`` (forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _outputs_sum(outputs) -> torch.Tensor:
    outputs = outputs if isinstance(outputs, list) else [outputs]
    return sum(o[k].float().sum() for o in outputs for k in ("cls1", "cls2", "patch"))


@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
def test_vision_tower_forward_and_backward(ffn, seed):
    cfg = tiny(f"vision.ffn={ffn}")
    vision = vision_from_config(cfg.vision)
    B, d = 2, cfg.data
    crops = [torch.randn(B, 3, d.global_size, d.global_size), torch.randn(B, 3, d.local_size, d.local_size)]
    got = counted(lambda: _outputs_sum(vision(crops)).backward())
    want = B * (flops._vision_train(cfg, d.global_size) + flops._vision_train(cfg, d.local_size))
    assert got == pytest.approx(want, rel=REL)
    with torch.no_grad():                           # a no-grad pass (the teacher's) is one forward
        got_fwd = counted(lambda: vision(crops[0]))
    assert got_fwd == pytest.approx(B * flops._vision_pass(cfg, d.global_size), rel=REL)


def test_text_tower_forward_and_backward(seed):
    cfg = tiny()
    text = text_from_config(cfg)
    B, L = 3, cfg.text.max_len
    ids = torch.randint(1, cfg.text.vocab_size, (B, L))
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, L // 2:] = True                          # padding still costs (the model counts max_len)
    got = counted(lambda: text(ids, pad).sum().backward())
    assert got == pytest.approx(B * 3 * flops._text_pass(cfg), rel=REL)


@pytest.mark.parametrize("nlayers", [1, 3])
def test_projection_head_forward_and_backward(nlayers, seed):
    cfg = tiny(f"heads.nlayers={nlayers}")
    h = cfg.heads
    head = ProjectionHead(cfg.vision.width, h.hidden, h.bottleneck, h.prototypes, h.nlayers)
    rows = 5
    x = torch.randn(rows, cfg.vision.width, requires_grad=True)   # the backbone's features need grads
    got = counted(lambda: head(x).sum().backward())
    assert got == pytest.approx(rows * 3 * flops._head_row(cfg), rel=REL)


@pytest.mark.parametrize("overrides", [[], ["data.n_local=4"]])
def test_the_whole_objective_per_image(overrides, seed):
    """compute_losses + backward of one tiny batch against the model's per-image total: every pass
    and head row (student, masked copy, locals, text, heads on CLS and patch rows, teacher heads).

    One allowance: the loss's backward recomputes each (student, teacher) pair's logits instead of
    keeping [rows × K] (the reference chunks do, the fused kernel does too). Recomputation is not
    useful work, so the model (and MFU) leave it out; here it is added to the expectation.
    n_global = 2 is not checked here: each local crop then pairs with both teacher globals, and the
    loss computes student logits per pair rather than per row (~0.2 % more than the model, which
    counts each row's logits once, as useful work)."""
    cfg = tiny(*overrides)
    d, h = cfg.data, cfg.heads
    model = build_model(cfg)
    teacher, state = Teacher(model, cfg), LossState(cfg)
    B = 2
    batch = synthetic_batch(B, d.global_size, d.local_size, n_global=d.n_global, n_local=d.n_local,
                            max_len=cfg.text.max_len, vocab_size=cfg.text.vocab_size,
                            generator=torch.Generator().manual_seed(0))
    got = counted(lambda: compute_losses(model, teacher, state, batch, 0.05, cfg)["loss"].backward())
    patches = (d.global_size // cfg.vision.patch_size) ** 2
    pairs = d.n_local + (d.n_global if d.n_global > 1 else 0) + d.n_global * patches   # per image
    recompute = pairs * 2 * (2 * h.bottleneck * h.prototypes)
    want = (flops.flop_model(cfg, global_batch=B).per_image + recompute) * B
    # 0.25 %: below the smallest row term (the DINO rows of the local crops, ~0.3 % of the total)
    assert got == pytest.approx(want, rel=0.0025)


@pytest.mark.parametrize("overrides", [["train.activation_checkpointing=full"],
                                       ["train.activation_checkpointing=every_k", "vision.depth=3",
                                        "train.ac_every=2"],
                                       ["train.activation_checkpointing=selective"],
                                       ["train.activation_checkpointing=full", "vision.layerscale=0.1"],
                                       ["train.activation_checkpointing=full", "vision.drop_path=0.1"]],
                         ids=["full", "every_k", "selective", "full-layerscale", "full-drop-path"])
def test_recomputation_is_counted_as_hardware_flops(overrides, seed):
    """The same objective with its blocks checkpointed (``fsdp.apply_activation_checkpointing``):
    what torch runs is the model FLOPs plus the model's recomputed forward (``recompute``: none for
    selective, which keeps every matmul), with the loss's own allowance as above."""
    from fasttips.distributed import fsdp
    cfg = tiny(*overrides)
    d, h, t = cfg.data, cfg.heads, cfg.train
    model = build_model(cfg)
    teacher, state = Teacher(model, cfg), LossState(cfg)
    fsdp.apply_activation_checkpointing(model, t.activation_checkpointing, t.ac_every)
    B = 2
    batch = synthetic_batch(B, d.global_size, d.local_size, n_global=d.n_global, n_local=d.n_local,
                            max_len=cfg.text.max_len, vocab_size=cfg.text.vocab_size,
                            generator=torch.Generator().manual_seed(0))
    got = counted(lambda: compute_losses(model, teacher, state, batch, 0.05, cfg)["loss"].backward())
    patches = (d.global_size // cfg.vision.patch_size) ** 2
    pairs = d.n_local + (d.n_global if d.n_global > 1 else 0) + d.n_global * patches
    allowance = pairs * 2 * (2 * h.bottleneck * h.prototypes)
    fm = flops.flop_model(cfg, global_batch=B)
    assert (fm.recompute == 0) == (t.activation_checkpointing == "selective")
    assert got == pytest.approx((fm.hardware_per_image + allowance) * B, rel=0.0025)
