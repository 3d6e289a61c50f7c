"""Image-text contrastive losses (docs/loss_math.md §2.7; DESIGN.md "contrastive").

CLIP: with L2-normalised image rows u and text rows v, ``S = exp(logit_scale)·u vᵀ`` and
``L = ½[CE_rows(S) + CE_cols(S)]`` against the matching pair.
SigLIP (ablation): ``L = −(1/B) Σ_ij log σ(z_ij (t·u_i·v_j + b))``, z = +1 on the diagonal, −1 elsewhere.

Across ranks the features are all-gathered *with gradient*; each rank scores its local rows against
the gathered ones, so the per-rank loss is the global loss restricted to local rows, and the mean
over ranks (what FSDP's gradient averaging computes) is exactly the global-batch loss.

The scale is not clamped here: a clamp on ``exp(logit_scale)`` zeroes its gradient once the cap is
reached, so the parameter could never come back down. As in OpenCLIP, the parameter itself is clamped
to ``ln(loss.max_logit_scale)`` after every optimiser step (``fasttips.optim.clamp_logit_scale_``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._checks import check_rows

NORM_EPS = 1e-6


class _AllGatherWithGrad(torch.autograd.Function):
    """Rows of every rank, concatenated; the backward sums each rank's gradient for a rank's rows
    (every rank's loss reads every row) and hands back this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rows = group, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = dist.get_rank(ctx.group) * ctx.rows
        return grad[start:start + ctx.rows], None


def _gather_with_grad(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` from every rank (gradient flows back to each owner); return it and this
    rank's row offset. One process (or a group of one) is a no-op."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x, 0
    return _AllGatherWithGrad.apply(x, group), dist.get_rank(group) * x.shape[0]


def _check_pair(image, text):
    check_rows("contrastive: image", image)
    check_rows("contrastive: text", text, rows=image.shape[0], dim=image.shape[1])
    if image.shape[0] < 1:
        raise ValueError("contrastive: need at least one image-text pair")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 at least (fp64 stays fp64, so double-precision checks are meaningful)."""
    return x if x.dtype == torch.float64 else x.float()


def _scalar(name, t):
    if t.numel() != 1:
        raise ValueError(f"contrastive: {name} must hold one value, got shape {list(t.shape)}")
    return t.reshape(())


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
              group=None) -> torch.Tensor:
    """CLIP softmax loss; ``logit_scale`` = log(1/τ) (one value, learnable)."""
    _check_pair(image, text)
    scale = _upcast(_scalar("logit_scale", logit_scale)).exp()
    u = F.normalize(_upcast(image), dim=-1, eps=NORM_EPS)
    v = F.normalize(_upcast(text), dim=-1, eps=NORM_EPS)
    u_all, offset = _gather_with_grad(u, group)
    v_all, _ = _gather_with_grad(v, group)
    labels = torch.arange(u.shape[0], device=u.device) + offset
    image_to_text = F.cross_entropy(scale * u @ v_all.t(), labels)
    text_to_image = F.cross_entropy(scale * v @ u_all.t(), labels)
    return 0.5 * (image_to_text + text_to_image)


def siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, group=None) -> torch.Tensor:
    """SigLIP sigmoid loss; ``logit_scale`` = log t, ``logit_bias`` = b (one value each)."""
    _check_pair(image, text)
    scale = _upcast(_scalar("logit_scale", logit_scale)).exp()
    bias = _upcast(_scalar("logit_bias", logit_bias))
    u = F.normalize(_upcast(image), dim=-1, eps=NORM_EPS)
    v = F.normalize(_upcast(text), dim=-1, eps=NORM_EPS)
    v_all, offset = _gather_with_grad(v, group)
    logits = scale * u @ v_all.t() + bias
    sign = -torch.ones_like(logits)
    rows = torch.arange(u.shape[0], device=u.device)
    sign[rows, rows + offset] = 1.0
    return -F.logsigmoid(sign * logits).sum() / u.shape[0]


def contrastive_loss(kind: str, image, text, logit_scale, logit_bias=None, group=None) -> torch.Tensor:
    if kind == "clip":
        return clip_loss(image, text, logit_scale, group)
    if kind == "siglip":
        if logit_bias is None:
            raise ValueError("contrastive_loss: kind='siglip' needs logit_bias")
        return siglip_loss(image, text, logit_scale, logit_bias, group)
    raise ValueError(f"contrastive_loss: kind={kind!r} is not allowed; choose 'clip' or 'siglip'")
