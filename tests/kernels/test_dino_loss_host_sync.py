"""prototype_cross_entropy never reads a tensor value back to the host (issue 17.3).

On a GPU such a read waits for every queued kernel. ``no_host_reads`` (tests/test_no_host_sync.py) makes
``.item()``, ``.tolist()``, ``bool(t)`` and friends raise while the op runs, forward and backward, for
softmax centering and Sinkhorn-Knopp: the chunked reference on the CPU and the Triton path (fused,
slab and chunked) under the interpreter, whose launcher hands tensors to the interpreter by pointer.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fasttips.kernels import _backend, prototype_cross_entropy
from test_no_host_sync import HostRead, no_host_reads


def _problem(S=10, T=4, K=130, d=16):
    g = torch.Generator().manual_seed(0)
    return dict(student_z=F.normalize(torch.randn(S, d, generator=g), dim=1).requires_grad_(),
                student_v=torch.randn(K, d, generator=g).requires_grad_(),
                student_g=(torch.rand(K, generator=g) + 0.5).requires_grad_(),
                teacher_z=F.normalize(torch.randn(T, d, generator=g), dim=1),
                teacher_v=torch.randn(K, d, generator=g), teacher_g=torch.rand(K, generator=g) + 0.5,
                pairs=torch.randint(0, T, (S,), generator=g), weights=torch.rand(S, generator=g) / S,
                center=0.1 * torch.randn(K, generator=g))


CASES = [("reference", "fused"), ("triton", "fused"), ("triton", "slab"), ("triton", "chunked")]


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
@pytest.mark.parametrize("backend, backward", CASES, ids=[f"{b}-{w}" for b, w in CASES])
def test_no_host_read_in_forward_or_backward(backend, backward, centering):
    if backend == "triton" and not _backend.interpreting():
        pytest.skip("the Triton path runs on the CPU only under TRITON_INTERPRET=1")
    problem = _problem()
    with no_host_reads():
        loss, stat = prototype_cross_entropy(**problem, centering=centering, backend=backend, backward=backward)
        loss.backward()
    assert torch.isfinite(loss.detach()).all() and torch.isfinite(stat).all()
    assert problem["student_z"].grad is not None and problem["student_v"].grad is not None


def test_bad_pairs_are_still_refused_by_name():
    """The pair-range check moved to the device; on the CPU it still raises a ValueError naming the
    field, and only the failure path reads the values back for the message."""
    problem = _problem()
    problem["pairs"] = problem["pairs"].clone()
    problem["pairs"][3] = 99
    with pytest.raises(ValueError, match=r"pairs must index teacher rows in \[0, 4\), got values in \[0, 99\]"):
        prototype_cross_entropy(**problem, backend="reference")
    with pytest.raises(HostRead), no_host_reads():     # the guard is live around the op
        problem["pairs"].tolist()


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_the_losses_read_nothing_back(centering):
    """dino_loss (2 globals, 3 locals) and iBOT++ (tokens="all") around the op, forward and backward.
    (Masked-only iBOT selects its rows with a boolean mask, a data-dependent row count: not covered.)"""
    from fasttips.losses.dino import dino_loss
    from fasttips.losses.ibot import ibot_loss
    B, d, K, N = 3, 16, 90, 5
    g = torch.Generator().manual_seed(1)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g), dim=-1)   # noqa: E731
    protos = (torch.randn(K, d, generator=g).requires_grad_(), (torch.rand(K, generator=g) + 0.5).requires_grad_())
    teacher = (torch.randn(K, d, generator=g), torch.rand(K, generator=g) + 0.5)
    student_local, student_global = unit(3 * B, d).requires_grad_(), unit(2 * B, d).requires_grad_()
    student_patches = unit(2 * N, d).requires_grad_()
    masks = torch.rand(2, N, generator=g) < 0.5
    backend = "triton" if _backend.interpreting() else "reference"
    with no_host_reads():
        with _backend_override(backend):
            dino, _ = dino_loss(student_local, unit(2 * B, d), protos, teacher, n_global=2,
                                student_global=student_global, centering=centering)
            ibot, _ = ibot_loss(student_patches, unit(2 * N, d), masks, protos, teacher, tokens="all",
                                centering=centering)
            (dino + ibot).backward()
    assert student_local.grad is not None and student_patches.grad is not None and protos[0].grad is not None


def _backend_override(backend):
    import os
    from unittest import mock
    return mock.patch.dict(os.environ, {"FASTTIPS_KERNELS": backend})
