"""kNN probe on frozen CLS features, on a tiny ImageFolder train/val pair."""
import numpy as np
import pytest
import torch

from fasttips.eval.suites import DatasetLayoutError
from fasttips.eval.suites.knn import knn_predict
from suite_helpers import OracleModel, colour, run_suite, save_image

CLASSES = ["n00000001", "n00000002", "n00000003"]


def write_pair(root, per_class=3):
    for k, c in enumerate(CLASSES):
        for j in range(per_class):
            save_image(root / "train" / c / f"{j}.JPEG", colour(k))
        save_image(root / "val" / c / "v.JPEG", colour(k))


def test_oracle_features_classify_perfectly(tmp_path):
    write_pair(tmp_path)
    res, log = run_suite(OracleModel(16), None, None, "knn", tmp_path, tmp_path)
    assert res["n_train"] == 9 and res["n_val"] == 3 and res["k"] == 20
    assert res["metrics"]["kNN CLS#1 top-1 acc"] == 1.0
    assert res["chance"]["kNN CLS#1 top-1 acc"] == pytest.approx(1 / 3)
    assert "[knn train]" in log and "[knn val]" in log


def test_votes_are_temperature_weighted():
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]]), dim=1)
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    votes = knn_predict(query, bank, labels, n_classes=2, k=3, temperature=0.07)
    assert votes[0, 0] == pytest.approx(torch.exp(torch.tensor(1 / 0.07)).item(), rel=1e-5)
    assert votes.argmax(1).item() == 0           # one very close neighbour outvotes two distant ones
    hot = knn_predict(query, bank, labels, n_classes=2, k=3, temperature=100.0)
    assert hot.argmax(1).item() == 1             # at a high temperature the count wins


def test_tiny_model_and_layout_errors(tmp_path, tiny):
    model, tok, cfg = tiny
    with pytest.raises(DatasetLayoutError, match=f"knn: missing folder {tmp_path / 'train'}"):
        run_suite(model, tok, cfg, "knn", tmp_path, tmp_path)
    write_pair(tmp_path, per_class=1)
    save_image(tmp_path / "val" / "n00000009" / "x.JPEG", colour(0))
    with pytest.raises(DatasetLayoutError, match="has no train/n00000009"):
        run_suite(model, tok, cfg, "knn", tmp_path, tmp_path)
    (tmp_path / "val" / "n00000009" / "x.JPEG").unlink()
    (tmp_path / "val" / "n00000009").rmdir()
    res, _ = run_suite(model, tok, cfg, "knn", tmp_path, tmp_path, workers=1)
    assert res["metrics"]["kNN CLS#2 top-3 acc"] == 1.0 and 0 <= res["metrics"]["kNN CLS#2 top-1 acc"] <= 1


class MajorityOracle(OracleModel):
    """CLS#1 = CLS#2 = one-hot of the code covering most of the input: what the crop shows decides."""

    def __init__(self, dim):
        super().__init__(dim)
        vision = self.vision

        def forward(x, masks=None):
            from suite_helpers import decode
            code = decode(x).flatten(1)                                    # [B, H·W]
            top = torch.stack([torch.bincount(c, minlength=dim)[:dim].argmax() for c in code])
            one = torch.nn.functional.one_hot(top, dim).float()
            return {"cls1": one, "cls2": one, "patch": one[:, None]}

        vision.forward = forward


def framed(inner_code, frame_code, side=64, inner=42):
    """A side×side image: a centred inner square of one code in a frame of another. The frame covers
    57% of the whole image but only 44% of DINOv2's centre crop (the central 224/256 of the side)."""
    img = np.empty((side, side, 3), np.uint8)
    img[:] = colour(frame_code)
    lo = (side - inner) // 2
    img[lo:lo + inner, lo:lo + inner] = colour(inner_code)
    return img


def test_knn_uses_dinov2_resize_256_crop_224(tmp_path):
    """Short side to 256/224 of the crop, then the centre crop: a val image of class 1 framed by class 0
    shows mostly class 0 when the whole image is squeezed into the crop (the old transform, 0 % top-1)
    and mostly class 1 under DINOv2's transform (100 %)."""
    for k, c in enumerate(CLASSES):
        for j in range(2):
            save_image(tmp_path / "train" / c / f"{j}.JPEG", colour(k), size=(64, 64))
    save_image(tmp_path / "val" / CLASSES[1] / "v.JPEG", framed(inner_code=1, frame_code=0))
    res, log = run_suite(MajorityOracle(16), None, None, "knn", tmp_path, tmp_path)
    assert res["metrics"]["kNN CLS#1 top-1 acc"] == 1.0
    assert res["transform"]["resize_short_side"] == 32 and res["transform"]["center_crop"] == 28
    assert "resize 32 crop 28" in log


def test_knn_feeds_exactly_the_torchvision_pixels(tmp_path):
    from fasttips.eval.suites.common import to_pixels
    from fasttips.eval.suites.knn import list_split_pair
    from fasttips.eval.transforms import knn_resize, resize_center_crop
    from PIL import Image
    from suite_helpers import RecordingModel
    rng = np.random.default_rng(0)
    for k, c in enumerate(CLASSES):
        save_image(tmp_path / "train" / c / "t.png", rng.integers(0, 256, (37 + k, 50, 3)))
        save_image(tmp_path / "val" / c / "v.png", rng.integers(0, 256, (45, 31 + k, 3)))
    model = RecordingModel(16)
    run_suite(model, None, None, "knn", tmp_path, tmp_path, batch_size=8)
    seen = torch.cat([x for x, _ in model.seen])
    _, train, val = list_split_pair(tmp_path)
    assert knn_resize(224) == 256 and knn_resize(28) == 32
    want = to_pixels([resize_center_crop(Image.open(p).convert("RGB"), 32, 28) for p, _ in train + val], "tips")
    assert torch.equal(seen, want)


def test_knn_similarities_and_votes_are_fp32_whatever_comes_in():
    """bf16 features (from a bf16 encoder) are scored in fp32: the matmul, the exponential and the votes."""
    from torch.overrides import TorchFunctionMode

    class Dtypes(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in ("matmul", "__matmul__", "exp", "topk", "scatter_add_"):
                self.seen.append((name, args[0].dtype))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    query = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=1)
    labels = torch.randint(0, 4, (50,), generator=g)
    spy = Dtypes()
    with spy:
        votes = knn_predict(query.bfloat16(), bank.bfloat16(), labels, n_classes=4, k=5)
    assert votes.dtype == torch.float32
    assert {name for name, _ in spy.seen} >= {"exp", "topk"}
    assert all(dtype == torch.float32 for _, dtype in spy.seen), spy.seen
    want = knn_predict(query.bfloat16().float(), bank.bfloat16().float(), labels, n_classes=4, k=5)
    assert torch.equal(votes, want)


@pytest.mark.gpu
def test_knn_on_cuda_scores_like_the_cpu_in_fp32():
    """On a GPU the bank is not rounded to bf16: votes match the CPU's fp32 votes closely. Neighbours
    chosen so that bf16 rounding of their similarities (steps of 2^-8 near 1) would move each vote by
    several per cent."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(1, 64, generator=g), dim=1)
    bank = torch.nn.functional.normalize(base + 0.03 * torch.randn(300, 64, generator=g), dim=1)
    query = torch.nn.functional.normalize(base + 0.03 * torch.randn(20, 64, generator=g), dim=1)
    labels = torch.randint(0, 10, (300,), generator=g)
    cpu = knn_predict(query, bank, labels, n_classes=10)
    gpu = knn_predict(query, bank, labels, n_classes=10, device="cuda")
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=0)
