"""The one evaluation transform (fasttips.eval.transforms) has torchvision's semantics: Resize truncates
the long side with int(), CenterCrop rounds the offset (half to even), pixels come from PIL's bicubic.

Where torchvision is installed, every case is compared with it; everywhere else, against values
recorded from torchvision 0.29.1 with Pillow 13 (tests of the suites' own image path included)."""
import numpy as np
import pytest
from PIL import Image

from fasttips.eval.transforms import center_crop_box, knn_resize, resize_center_crop, resized_size


def pattern(w, h):
    """A deterministic test image: horizontal and vertical ramps, and a diagonal stripe pattern."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x * 7 + y * 13) % 256], -1).astype(np.uint8)


# (width, height, short side) → size after torchvision's Resize; round() would give 299, 299, 336, 38
RECORDED_SIZES = [((500, 375, 224), (298, 224)), ((375, 500, 224), (224, 298)), ((640, 427, 224), (335, 224)),
                  ((333, 500, 256), (256, 384)), ((1000, 999, 224), (224, 224)), ((50, 37, 28), (37, 28)),
                  ((37, 50, 32), (32, 43)), ((224, 224, 224), (224, 224))]
# (width, height, crop) → (left, top) of torchvision's CenterCrop; flooring would give 37 for 299
RECORDED_OFFSETS = [((298, 224, 224), (37, 0)), ((299, 224, 224), (38, 0)), ((297, 224, 224), (36, 0)),
                    ((301, 224, 224), (38, 0)), ((224, 299, 224), (0, 38)), ((256, 256, 224), (16, 16)),
                    ((37, 28, 28), (4, 0))]
# pattern(50, 37) → Resize(28, BICUBIC) + CenterCrop(28) on the PIL image: blue-channel column and row sums
RECORDED_COLUMN_SUMS = [3775, 3722, 3788, 3655, 3676, 3684, 3690, 3669, 3691, 3561, 3631, 3587, 3554, 3497, 3516,
                        3521, 3521, 3522, 3494, 3390, 3419, 3481, 3322, 3328, 3370, 3544, 3684, 3759]
RECORDED_ROW_SUMS = [3474, 3463, 3444, 3607, 3595, 3582, 3553, 3523, 3639, 3699, 3663, 3659, 3612, 3453, 3422,
                     3440, 3576, 3559, 3536, 3526, 3507, 3644, 3648, 3627, 3607, 3588, 3677, 3728]


@pytest.mark.parametrize("args, size", RECORDED_SIZES)
def test_resize_truncates_the_long_side(args, size):
    assert resized_size(*args) == size


@pytest.mark.parametrize("args, offset", RECORDED_OFFSETS)
def test_center_crop_rounds_the_offset_half_to_even(args, offset):
    w, h, c = args
    assert center_crop_box(w, h, c) == (*offset, offset[0] + c, offset[1] + c)


def test_the_suites_see_the_recorded_torchvision_pixels(tmp_path):
    """Through the dataset classification and retrieval read images with: a 50×37 PNG at 28 px is
    resized to 37×28 (not 38) and cropped at x = 4 (not 5)."""
    from fasttips.eval.suites.common import ImageListDataset
    path = tmp_path / "a.png"
    Image.fromarray(pattern(50, 37)).save(path)
    pixels, label, index = ImageListDataset([(path, 7)], 28)[0]
    assert pixels.shape == (28, 28, 3) and (label, index) == (7, 0)
    assert pixels[..., 2].astype(int).sum(0).tolist() == RECORDED_COLUMN_SUMS
    assert pixels[..., 2].astype(int).sum(1).tolist() == RECORDED_ROW_SUMS


def test_knn_resize_and_bad_sizes():
    assert knn_resize(224) == 256 and knn_resize(448) == 512 and knn_resize(28) == 32
    with pytest.raises(ValueError, match="crop: 30 is larger than the resized short side 28"):
        resize_center_crop(Image.new("RGB", (40, 40)), 28, 30)
    with pytest.raises(ValueError, match="does not fit"):
        center_crop_box(20, 40, 21)
    with pytest.raises(ValueError, match="image size"):
        resized_size(0, 10, 5)


def test_against_torchvision():
    """Sizes, offsets and pixels equal torchvision's on PIL images, for many shapes. Its tensor path
    (torch's antialiased bicubic, a = -0.75) differs from PIL's (a = -0.5) by a few levels: the
    reference evaluations resize PIL images, so that path is the one followed."""
    pytest.importorskip("torchvision")
    import torch
    import torchvision.transforms as T
    import torchvision.transforms.functional as F
    from torchvision.transforms.functional import _compute_resized_output_size

    rng = np.random.default_rng(0)
    bicubic = T.InterpolationMode.BICUBIC
    for _ in range(200):
        w, h = (int(v) for v in rng.integers(8, 400, 2))
        s = int(rng.integers(4, 300))
        th, tw = _compute_resized_output_size((h, w), [s])
        assert resized_size(w, h, s) == (tw, th), (w, h, s)
        c = int(rng.integers(1, min(w, h) + 1))
        coords = np.zeros((h, w, 3), np.uint8)
        coords[..., 0], coords[..., 1] = np.arange(w)[None, :] % 256, np.arange(h)[:, None] % 256
        out = np.asarray(F.center_crop(Image.fromarray(coords), c))
        left, top = center_crop_box(w, h, c)[:2]
        assert (left % 256, top % 256) == (out[0, 0, 0], out[0, 0, 1]), (w, h, c)
    for w, h, resize, crop in [(50, 37, 28, 28), (500, 375, 224, 224), (375, 500, 256, 224), (640, 427, 512, 448),
                               (123, 321, 32, 28), (30, 30, 64, 56)]:
        img = Image.fromarray(pattern(w, h))
        want = np.asarray(T.Compose([T.Resize(resize, interpolation=bicubic), T.CenterCrop(crop)])(img))
        np.testing.assert_array_equal(resize_center_crop(img, resize, crop), want)
    img = pattern(500, 375)
    on_tensor = T.Compose([T.Resize(224, interpolation=bicubic, antialias=True), T.CenterCrop(224)])(
        torch.from_numpy(img).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    diff = np.abs(on_tensor.astype(int) - resize_center_crop(Image.fromarray(img), 224, 224).astype(int))
    assert 0 < diff.max() <= 8
