"""CPU microbenchmarks of the PyTorch/NumPy reference paths, so regressions in the CPU fallbacks show.

The suite runs them with ``--benchmark-disable`` (pyproject addopts): each body then runs once, as a
plain test whose asserts still check the result. Timed for real:

    pytest tests/microbench --benchmark-enable [--benchmark-autosave] [--benchmark-compare]

Shapes are small on purpose: big enough that the timings mean something on a laptop core, small
enough that the disabled single run costs well under a second each.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fasttips.data import augment, masks
from fasttips.kernels.attention import reference as attention_ref
from fasttips.kernels.dino_loss import naive, reference as loss_ref
from fasttips.kernels.ema import reference as ema_ref

pytestmark = pytest.mark.benchmark


def test_attention_dense_reference(benchmark, seed):
    B, H, N, D = 4, 2, 65, 64                          # odd N, as the ViT's CLS + patches
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    out = benchmark(attention_ref.attention, q, k, v)
    assert out.shape == (B, H, N, D)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_attention_varlen_reference(benchmark, seed):
    H, D = 2, 64
    lengths = [65, 65, 17, 17, 17, 17]                 # 2 global + 4 local crops, packed
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(int(cu[-1]), H, D) for _ in range(3))
    out = benchmark(attention_ref.attention_varlen, q, k, v, cu, max(lengths))
    first = slice(0, lengths[0])
    expected = F.scaled_dot_product_attention(*(t[first].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
    torch.testing.assert_close(out[first], expected, rtol=1e-5, atol=1e-5)


def test_prototype_cross_entropy_reference_fwd_bwd(benchmark, seed):
    rows, K, d = 96, 1024, 64
    student_z = F.normalize(torch.randn(rows, d), dim=1).requires_grad_()
    student_v = torch.randn(K, d, requires_grad=True)
    student_g = torch.ones(K, requires_grad=True)
    teacher = (F.normalize(torch.randn(rows, d), dim=1), torch.randn(K, d), torch.ones(K))
    pairs, weights, center = torch.randperm(rows), torch.full((rows,), 1.0 / rows), 0.01 * torch.randn(K)

    def fwd_bwd():
        loss, _ = loss_ref.prototype_cross_entropy(student_z, student_v, student_g, *teacher, pairs, weights,
                                                   center=center, chunk_bytes=64 * 1024)   # several chunks
        grads = torch.autograd.grad(loss, (student_z, student_v, student_g))
        return loss, grads

    loss, grads = benchmark(fwd_bwd)
    want = naive.prototype_cross_entropy(student_z, student_v, student_g, *teacher, pairs, weights, center=center)[0]
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    want_grads = torch.autograd.grad(want, (student_z, student_v, student_g))
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_ema_reference(benchmark, seed):
    sizes = [(256, 64), (256,), (1024, 64), (1024,)]
    start = [torch.randn(s) for s in sizes]
    student = [torch.randn(s) for s in sizes]
    last = {}

    def fresh_teacher():              # in place: every round starts from the same teacher
        last["teacher"] = [t.clone() for t in start]
        return (last["teacher"], student, 0.99), {}

    benchmark.pedantic(ema_ref.ema_update_, setup=fresh_teacher, rounds=50)
    for t, t0, s in zip(last["teacher"], start, student):
        torch.testing.assert_close(t, 0.99 * t0 + 0.01 * s)


@pytest.mark.parametrize("backend", ["python", "auto"])
def test_ibot_batch_masks(benchmark, backend, seed):
    n_images, grid = 16, 16
    out = benchmark(masks.batch_masks, n_images, grid, 0.5, (0.1, 0.5), seed, backend)
    assert out.shape == (n_images, grid * grid) and out.dtype == torch.bool
    masked = out.sum(dim=1)
    assert int((masked > 0).sum()) == n_images // 2      # probability 0.5: half the images masked
    assert int(masked.max()) <= grid * grid // 2


def test_augment_one_sample(benchmark, seed):
    rng_img = np.random.default_rng(seed)
    img = Image.fromarray(rng_img.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    recipes = augment.crop_recipes(112, 1, (0.32, 1.0), 48, 4, (0.05, 0.32))
    rng = np.random.default_rng(seed)
    crops = benchmark(augment.multicrop, img, recipes, rng)
    assert [c.shape for c in crops] == [(112, 112, 3)] + [(48, 48, 3)] * 4
    assert all(c.dtype == np.uint8 for c in crops)
