"""``loss.prototype_ce`` reaches ``kernels.prototype_cross_entropy(backward=...)`` from both losses, and
its allowed values are exactly the op's variants."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fasttips import config, kernels
from fasttips.kernels import _backend
from fasttips.kernels.dino_loss import common
from fasttips.losses import dino as dino_module
from fasttips.losses import ibot as ibot_module


def test_the_config_field_lists_the_ops_variants_and_defaults_to_measured_dispatch():
    assert config.PROTOTYPE_CES == ("auto",) + common.BACKWARDS
    assert config.Config().loss.prototype_ce == "auto"
    with pytest.raises(config.ConfigError, match="prototype_ce"):
        config.from_dict({"loss": {"prototype_ce": "fast"}})


def _inputs(seed=0, B=2, d=8, K=40, N=3):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g), dim=-1)   # noqa: E731
    protos = (torch.randn(K, d, generator=g), torch.rand(K, generator=g) + 0.5)
    return B, d, K, N, unit, protos


@pytest.mark.parametrize("choice", config.PROTOTYPE_CES)
def test_both_losses_pass_the_choice_to_the_op(monkeypatch, choice):
    seen = []
    real = kernels.prototype_cross_entropy

    def spy(*args, **kwargs):
        seen.append(kwargs.get("backward"))
        return real(*args, **dict(kwargs, backend="reference"))

    monkeypatch.setattr(kernels, "prototype_cross_entropy", spy)
    B, d, K, N, unit, protos = _inputs()
    dino_module.dino_loss(unit(2 * B, d), unit(B, d), protos, protos, n_global=1, prototype_ce=choice)
    ibot_module.ibot_loss(unit(B * N, d), unit(B * N, d), torch.ones(B, N, dtype=torch.bool), protos, protos,
                          prototype_ce=choice)
    assert seen == [choice, choice]


def test_a_wrong_choice_is_refused_by_name():
    B, d, K, N, unit, protos = _inputs()
    with pytest.raises(ValueError, match=r"backward='fast' is not allowed"):
        dino_module.dino_loss(unit(2 * B, d), unit(B, d), protos, protos, n_global=1, prototype_ce="fast")


def test_chunked_through_the_loss_matches_fused():
    """End to end through ibot_loss on the Triton path (interpreter): the same loss and gradients."""
    if not _backend.interpreting():
        pytest.skip("the Triton path runs on the CPU only under TRITON_INTERPRET=1")
    B, d, K, N, unit, protos = _inputs(seed=3, K=70)
    student, teacher = unit(B * N, d), unit(B * N, d)
    masks = torch.rand(B, N, generator=torch.Generator().manual_seed(4)) < 0.5
    out = {}
    for choice in ("fused", "chunked"):
        z = student.clone().requires_grad_()
        v = protos[0].clone().requires_grad_()
        loss, _ = ibot_module.ibot_loss(z, teacher, masks, (v, protos[1]), protos, prototype_ce=choice)
        loss.backward()
        out[choice] = (loss.detach(), z.grad, v.grad)
    for a, b in zip(out["fused"], out["chunked"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
