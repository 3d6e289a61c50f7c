"""iBOT patch loss (docs/loss_math.md §2.4) and iBOT++ (§2.9; DESIGN.md "iBOT++").

tokens="masked" (DINOv2 iBOT): only masked patches; token j of image i has weight
    1/max(1, n_masked(i)) / M   with M = number of global crops on this rank (masked or not),
so images without a mask contribute 0 but count in the divisor. Teacher rows = masked tokens only.

tokens="all" (iBOT++, default): every patch; token j of image i has weight
    ω_j / (N·M),   ω_j = masked_weight if j is masked else visible_weight   (1, 1 by default),
i.e. the per-image mean over all N patches. Teacher rows = all tokens (so the center and the
Sinkhorn-Knopp count run over all tokens).

Rows are passed flattened ([R, d], image-major then patch order); ``ibot_rows`` tells which.
"""
from __future__ import annotations

import torch

from fasttips import kernels
from fasttips.config import IBOT_TOKENS as TOKENS

from ._checks import check_prototypes, check_rows


def _check_tokens(tokens: str) -> None:
    if tokens not in TOKENS:
        raise ValueError(f"ibot: tokens={tokens!r} is not allowed; choose one of {list(TOKENS)}")


def ibot_rows(masks: torch.Tensor, tokens: str = "all") -> torch.Tensor | None:
    """Boolean selector over the flattened [M·N] patches, or None for all of them."""
    _check_tokens(tokens)
    return masks.reshape(-1) if tokens == "masked" else None


def ibot_weights(masks: torch.Tensor, tokens: str = "all", masked_weight: float = 1.0,
                 visible_weight: float = 1.0) -> torch.Tensor:
    """Per-row weights for the rows ``ibot_rows`` selects (fp32)."""
    _check_tokens(tokens)
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"ibot: masks must be bool [M, N], got {masks.dtype} {list(masks.shape)}")
    M, N = masks.shape
    if tokens == "masked":
        n_masked = masks.sum(dim=1, keepdim=True).clamp(min=1).float()
        per_token = (1.0 / n_masked).expand(M, N) / M
        return per_token[masks]
    omega = torch.where(masks, masked_weight, visible_weight).float()
    return (omega / (N * M)).reshape(-1)


def ibot_loss(student: torch.Tensor, teacher: torch.Tensor, masks: torch.Tensor, student_prototypes,
              teacher_prototypes, *, tokens: str = "all", masked_weight: float = 1.0,
              visible_weight: float = 1.0, center: torch.Tensor | None = None,
              student_temp: float = 0.1, teacher_temp: float = 0.04, centering: str = "softmax",
              sk_iterations: int = 3, group=None,
              prototype_ce: str = "fused"):
    """iBOT / iBOT++ over L2-normalised bottleneck rows of the selected patches.

    student [R, d] from the masked student pass, teacher [R, d] from the unmasked teacher features
    (no grad), masks bool [M, N]; R = M·N for tokens="all", = masks.sum() for tokens="masked".
    Returns ``(loss, center_stat)``; center_stat is None when no row is selected.
    ``prototype_ce`` picks the op's implementation (``backward=`` of ``kernels.prototype_cross_entropy``;
    config ``loss.prototype_ce``).
    """
    weights = ibot_weights(masks, tokens, masked_weight, visible_weight).to(student.device)
    R = weights.shape[0]
    check_rows("ibot_loss: student", student, rows=R)
    check_rows("ibot_loss: teacher", teacher, rows=R, dim=student.shape[1])
    d = student.shape[1]
    sv, sg = check_prototypes("ibot_loss: student_prototypes", student_prototypes, d)
    tv, tg = check_prototypes("ibot_loss: teacher_prototypes", teacher_prototypes, d)
    if tv.shape[0] != sv.shape[0]:
        raise ValueError(f"ibot_loss: teacher has K={tv.shape[0]} prototypes, student K={sv.shape[0]}")
    # R == 0 (masked-only iBOT, no masked patch on this rank) still runs the op: its loss is 0, and
    # Sinkhorn-Knopp's all-reduces must be joined by every rank or the others wait forever.
    pairs = torch.arange(R, device=student.device)
    loss, center_stat = kernels.prototype_cross_entropy(
        student, sv, sg, teacher.detach(), tv.detach(), tg.detach(), pairs, weights,
        center=center, student_temp=student_temp, teacher_temp=teacher_temp, centering=centering,
        sk_iterations=sk_iterations, group=group, backward=prototype_ce)
    # No rows: no statistic (Centering.update(None) keeps the center where it is).
    return loss, (center_stat if R else None)
