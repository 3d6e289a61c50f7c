"""Multi-crop augmentation: output shapes, dtypes and ranges; crop geometry; the blur recipe."""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fasttips.data import augment


def test_recipes_follow_dinov2_effective_probabilities():
    r = augment.crop_recipes(224, 3, (0.32, 1.0), 98, 8, (0.05, 0.32))
    assert [x.size for x in r] == [224] * 3 + [98] * 8
    assert [x.blur_p for x in r[:3]] == [0.0, 0.9, 0.9] and all(x.blur_p == 0.5 for x in r[3:])
    assert [x.solarize_p for x in r[:3]] == [0.0, 0.2, 0.2] and all(x.solarize_p == 0.0 for x in r[3:])
    assert all(x.scale == (0.05, 0.32) for x in r[3:])


@pytest.mark.parametrize("w,h,scale", [(300, 200, (0.32, 1.0)), (97, 131, (0.05, 0.32)), (640, 64, (0.3, 1.0))])
def test_random_resized_box(w, h, scale, seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        left, top, right, bottom = augment.random_resized_box(w, h, scale, rng)
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        bw, bh = right - left, bottom - top
        area = bw * bh / (w * h)
        if not (left == (w - bw) // 2 and top == (h - bh) // 2):       # not the fallback centre crop
            assert scale[0] * 0.9 - 2 / min(w, h) <= area <= scale[1] * 1.1 + 2 / min(w, h)
            assert 3 / 4 * 0.9 - 2 / bh <= bw / bh <= 4 / 3 * 1.1 + 2 / bh


def test_multicrop_shapes_and_range(seed):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    recipes = augment.crop_recipes(56, 2, (0.32, 1.0), 28, 3, (0.05, 0.32))
    crops = augment.multicrop(img, recipes, rng)
    assert [c.shape for c in crops] == [(56, 56, 3)] * 2 + [(28, 28, 3)] * 3
    assert all(c.dtype == np.uint8 for c in crops)
    batch = torch.from_numpy(np.stack(crops[:2]))
    tips = augment.normalize(batch, "tips")
    assert tips.shape == (2, 3, 56, 56) and tips.dtype == torch.float32
    assert 0.0 <= float(tips.min()) and float(tips.max()) <= 1.0
    inet = augment.normalize(batch, "imagenet")
    expected = (batch.permute(0, 3, 1, 2).float() / 255 - torch.tensor(augment.IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(augment.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(inet, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="data.pixel_norm"):
        augment.normalize(batch, "bogus")


def test_first_global_crop_is_never_blurred(seed):
    """With the effective probabilities, global crop 1 is never blurred: a sharp edge stays sharp."""
    img = Image.new("RGB", (64, 64), (0, 0, 0))
    img.paste((255, 255, 255), (32, 0, 64, 64))
    recipe = augment.CropRecipe(64, (1.0, 1.0), augment.BLUR_P_GLOBAL1, 0.0)
    rng = np.random.default_rng(seed)
    for _ in range(20):
        gray = augment.augment_crop(img, recipe, rng).astype(float).mean(2)
        row = gray[32]
        assert np.abs(np.diff(row)).max() > 0.5 * (row.max() - row.min())    # one sharp step


def test_decode_draft_keeps_enough_resolution(seed):
    rng = np.random.default_rng(seed)
    big = Image.fromarray(rng.integers(0, 256, (800, 1000, 3), dtype=np.uint8))
    buf = io.BytesIO()
    big.save(buf, "JPEG")
    img = augment.decode_rgb(buf.getvalue(), min_side=150)
    assert min(img.size) >= 150 and img.size[0] < 1000
    recipes = augment.crop_recipes(224, 1, (0.32, 1.0), 98, 8, (0.05, 0.32))
    assert augment.min_decode_side(recipes) == max(math.ceil(224 / math.sqrt(0.32)), math.ceil(98 / math.sqrt(0.05)))


def jitter_in_sequence(x, b, c, s, h, order):
    """The four jitter steps applied one after the other to pixels x [P, 3]."""
    for op in order:
        if op == 0:
            x = b * x
        elif op == 1:
            x = c * x + (1 - c) * (x @ augment.LUMA).mean()
        elif op == 2:
            x = s * x + (1 - s) * (x @ augment.LUMA)[:, None]
        else:
            x = x @ augment.hue_matrix(h).T
    return x


def jitter_draws(rng):
    """The draws of one ``jitter_parts`` call, in its order."""
    J = augment.JITTER
    b, c = rng.uniform(1 - J["brightness"], 1 + J["brightness"]), rng.uniform(1 - J["contrast"], 1 + J["contrast"])
    s, h = rng.uniform(1 - J["saturation"], 1 + J["saturation"]), rng.uniform(-J["hue"], J["hue"])
    return b, c, s, h, rng.permutation(4)


def test_color_jitter_affine_equals_the_four_steps_in_sequence(seed):
    """One affine map == brightness, contrast (mean luma at that point), saturation, hue in order."""
    x0 = np.random.default_rng(seed).uniform(0, 255, size=(500, 3))
    for k in range(10):
        A, t = augment.jitter_affine(x0.mean(0), np.random.default_rng([seed, k]))
        expected = jitter_in_sequence(x0, *jitter_draws(np.random.default_rng([seed, k])))
        np.testing.assert_allclose(x0 @ A.T + t, expected, rtol=1e-9, atol=1e-9)
    hm = augment.hue_matrix(0.1)
    np.testing.assert_allclose(augment.LUMA @ hm, augment.LUMA, atol=1e-3)   # hue keeps luma
    np.testing.assert_allclose(hm @ np.ones(3), np.ones(3), atol=1e-9)        # and grays


def test_jitter_offset_is_linear_in_the_mean_colour(seed):
    """``t0 + T m`` is the right offset for any image: the map does not depend on one mean."""
    rng = np.random.default_rng(seed + 1)
    for k in range(20):
        A, t0, T = augment.jitter_parts(np.random.default_rng([seed, k]))
        draws = jitter_draws(np.random.default_rng([seed, k]))
        x0 = rng.uniform(0, 255, size=(50, 3)) * rng.uniform(0.2, 1.0, size=3)       # a tinted image
        np.testing.assert_allclose(x0 @ A.T + t0 + T @ x0.mean(0), jitter_in_sequence(x0, *draws),
                                   rtol=1e-9, atol=1e-9)


def test_color_jitter_applies_the_affine_map_to_pixels(seed):
    arr = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    out = np.asarray(augment.color_jitter(img, np.random.default_rng(seed)), dtype=float)
    A, t = augment.jitter_affine(arr.reshape(-1, 3).mean(0), np.random.default_rng(seed))
    expected = np.clip(arr.reshape(-1, 3) @ A.T + t, 0, 255).reshape(arr.shape)
    assert np.abs(out - expected).max() <= 1.0 + 1e-6        # Pillow rounds to uint8
