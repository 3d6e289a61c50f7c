"""The batched photometric augmentation of the DALI loader, against per-sample numpy formulas."""
import numpy as np
import pytest
import torch

from fasttips.data import augment
from fasttips.data.photometric import colour_maps, gaussian_blur, photometric


def recipe(blur_p=0.0, solarize_p=0.0, size=12):
    return augment.CropRecipe(size, (0.5, 1.0), blur_p, solarize_p)


def crops(seed, n=16, size=12):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def blur_one(img, sigma, window=augment.BLUR_KERNEL):
    """Dense 2-D Gaussian (outer product of the 1-D taps) over reflected borders, one image [C, H, W]."""
    r = np.arange(window) - window // 2
    taps = np.exp(-r ** 2 / (2 * sigma ** 2))
    kernel = np.outer(taps, taps) / taps.sum() ** 2
    p = window // 2
    padded = np.pad(img, ((0, 0), (p, p), (p, p)), mode="reflect")
    H, W = img.shape[1:]
    return np.stack([sum(kernel[i, j] * ch[i:i + H, j:j + W] for i in range(window) for j in range(window))
                     for ch in padded])


@pytest.mark.parametrize("shape", [(3, 3, 17, 17), (2, 3, 10, 23), (1, 1, 9, 40)])
def test_gaussian_blur_matches_a_dense_kernel_per_sample(seed, shape):
    x = np.random.default_rng(seed).uniform(0, 1, shape)
    sigma = np.random.default_rng(seed + 1).uniform(*augment.BLUR_SIGMA, size=shape[0])
    got = gaussian_blur(torch.from_numpy(x), torch.from_numpy(sigma)).numpy()
    for i in range(shape[0]):
        np.testing.assert_allclose(got[i], blur_one(x[i], sigma[i]), rtol=1e-10, atol=1e-12)


def test_colour_maps_are_the_jitter_then_gray_affine(seed):
    x = crops(seed).double().numpy()
    out = photometric(crops(seed), recipe(), np.random.default_rng(seed)).double().numpy()
    A, t0, T = colour_maps(len(x), np.random.default_rng(seed))
    for i in range(len(x)):
        px = x[i].reshape(3, -1)
        expected = np.clip(A[i] @ px + (t0[i] + T[i] @ px.mean(1))[:, None], 0, 255) / 255
        np.testing.assert_allclose(out[i].reshape(3, -1), expected, rtol=1e-5, atol=2e-6)


def test_solarize_inverts_the_bright_pixels(seed):
    rng_seed = [seed, 7]
    plain = photometric(crops(seed), recipe(), np.random.default_rng(rng_seed))
    solar = photometric(crops(seed), recipe(solarize_p=1.0), np.random.default_rng(rng_seed))
    np.testing.assert_allclose(solar, torch.where(plain * 255 >= augment.SOLARIZE_THRESHOLD, 1 - plain, plain),
                               atol=1e-6)


def test_probabilities_of_gray_and_blur(seed):
    n = 3000
    # colourful, textured crops: gray outputs have three equal channels, blurred ones lose variation
    x = crops(seed, n=n, size=10)
    rng = np.random.default_rng(seed)
    out = photometric(x, recipe(blur_p=0.5), rng)
    is_gray = (out[:, 0] - out[:, 1]).abs().amax(dim=(1, 2)) < 1e-6
    # gray share: p(gray) = 0.2 (binomial sd 0.007 at n = 3000)
    assert abs(float(is_gray.float().mean()) - augment.GRAY_P) < 0.03
    # blurred share: the same draws without blur differ exactly in the blurred samples, except those with
    # σ < 0.177, whose off-centre taps (exp(-1/2σ²) < 1e-7) leave float32 pixels unchanged: 0.5·(1 - 0.04)
    plain = photometric(x, recipe(blur_p=0.0), np.random.default_rng(seed))
    changed = (out - plain).abs().amax(dim=(1, 2, 3)) > 1e-6
    assert abs(float(changed.float().mean()) - 0.5 * (1 - 0.077 / 1.9)) < 0.04


def test_deterministic_by_rng_and_normalised(seed):
    x = crops(seed)
    r = recipe(blur_p=0.5, solarize_p=0.2)
    a = photometric(x, r, np.random.default_rng([seed, 1]))
    assert torch.equal(a, photometric(x, r, np.random.default_rng([seed, 1])))
    assert not torch.equal(a, photometric(x, r, np.random.default_rng([seed, 2])))
    assert a.dtype == torch.float32 and a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    im = photometric(x, r, np.random.default_rng([seed, 1]), "imagenet")
    mean, std = torch.tensor(augment.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(augment.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(im, (a - mean) / std)
    with pytest.raises(ValueError, match="data.pixel_norm"):
        photometric(x, r, np.random.default_rng(0), "zscore")
