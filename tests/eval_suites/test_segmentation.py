"""Zero-shot segmentation (TIPS protocol) on tiny ADE20K / VOC / Context fixtures."""
import numpy as np
import pytest
import torch
from PIL import Image

from fasttips.eval.suites import DatasetLayoutError
from fasttips.eval.suites.common import load_metadata
from fasttips.eval.suites.segmentation import chance_miou, to_targets, value_attention, windows
from fasttips.eval.zeroshot import class_prompts
from suite_helpers import P, OracleModel, OracleTokenizer, colour, run_suite, save_image

META = load_metadata("segmentation")
GRID = (2, 3)                      # patch rows × cols of each fixture image: 28 × 42 pixels


def prompt_lookup(names):
    table = {p: i for i, n in enumerate(names) for p in class_prompts([n], tuple(META["templates"]))}
    return lambda text: table[text]


def scene(rng, n_classes, first=1):
    """A 28×42 image whose 14×14 patches are painted with the oracle code of their class, and the
    label map. Label value v means class v - 1 (v = 0: not scored); patches get v = k + first for k
    drawn from 0..n_classes-1 (first = 0 makes some of them background)."""
    classes = rng.integers(0, n_classes, size=GRID)
    label = np.kron(classes + first, np.ones((P, P), dtype=np.int64)).astype(np.uint8)
    pixels = np.zeros(label.shape + (3,), np.uint8)
    for (r, c), k in np.ndenumerate(classes):
        pixels[r * P:(r + 1) * P, c * P:(c + 1) * P] = colour(max(int(k) + first - 1, 0))
    return pixels, label


def write_ade(root, rng, n=3, n_classes=4):
    (root / "annotations" / "validation").mkdir(parents=True)
    for i in range(n):
        pixels, label = scene(rng, n_classes)
        label[0, :] = 0                                    # an unlabelled row
        save_image(root / "images" / "validation" / f"ADE_val_{i + 1:08d}.jpg", pixels)
        Image.fromarray(label).save(root / "annotations" / "validation" / f"ADE_val_{i + 1:08d}.png")


def write_voc(root, rng, context=False, n=2):
    split, ann = (("SegmentationContext", "SegmentationClassContext") if context
                  else ("Segmentation", "SegmentationClass"))
    ids = [f"2008_{i:06d}" for i in range(n)]
    (root / "ImageSets" / split).mkdir(parents=True)
    (root / "ImageSets" / split / "val.txt").write_text("\n".join(ids) + "\n")
    (root / ann).mkdir(parents=True)
    for i in ids:
        pixels, label = scene(rng, 3, first=0)             # label 0 = background: not scored
        if not context:
            label[:, -2:] = 255                            # VOC's void border
        save_image(root / "JPEGImages" / f"{i}.jpg", pixels)
        png = Image.fromarray(label, mode="L")
        if not context:                                    # VOC ships palette PNGs
            png = png.convert("P")
            png.putpalette([v for k in range(256) for v in (k, k, k)])
        png.save(root / ann / f"{i}.png")


def test_ade20k_oracle_scores_near_perfect_and_a_confused_model_does_not(tmp_path, seed):
    write_ade(tmp_path, np.random.default_rng(seed))
    tok = OracleTokenizer(prompt_lookup(META["ade20k"]))
    res, log = run_suite(OracleModel(256), tok, None, "ade20k", tmp_path, tmp_path, seg_tokens="final")
    assert res["n_images"] == 3 and res["n_classes"] == 150
    # bilinear upsampling may flip a few corner pixels where three neighbours meet
    assert res["metrics"]["mIoU"] > 0.85 and res["metrics"]["pixel accuracy"] > 0.9
    assert res["chance"]["pixel accuracy"] == pytest.approx(1 / 150)
    assert "[ade20k] batch 3/3" in log
    bad, _ = run_suite(OracleModel(256, shift=1), tok, None, "ade20k", tmp_path, tmp_path, seg_tokens="final")
    assert bad["metrics"]["mIoU"] < 0.05


@pytest.mark.parametrize("context", [False, True])
def test_voc_and_context_ignore_background_and_void(tmp_path, seed, context):
    write_voc(tmp_path, np.random.default_rng(seed), context=context)
    suite = "context" if context else "voc"
    tok = OracleTokenizer(prompt_lookup(META[suite]))
    # the oracle paints background patches with class 0's colour: scored, they would be errors
    res, _ = run_suite(OracleModel(256), tok, None, suite, tmp_path, tmp_path, seg_tokens="final")
    assert res["n_classes"] == (59 if context else 20)
    assert res["metrics"]["pixel accuracy"] > 0.9


def test_tiny_model_runs_the_value_attention_protocol(tmp_path, tiny, seed):
    model, tok, cfg = tiny
    write_ade(tmp_path, np.random.default_rng(seed), n=2)
    # windows of both images share batches of 3; one decoding worker process
    res, _ = run_suite(model, tok, cfg, "ade20k", tmp_path, tmp_path, batch_size=3, workers=1)
    assert res["protocol"] == {"size": 28, "stride": 14, "tokens": "values", "templates": 9}
    assert 0.0 <= res["metrics"]["mIoU"] <= 1.0 and len(res["iou_per_class"]) == 150


def test_value_attention_keeps_patches_apart(tiny, seed):
    """With the last block's attention replaced by its values, a patch's output depends on that patch
    only; with ordinary attention, changing one patch changes the others too."""
    model, _, _ = tiny
    x = torch.rand(1, 3, 28, 28)
    y = x.clone()
    y[:, :, :P, :P] = torch.rand(3, P, P)                  # change patch 0 only

    def patches(img):
        return model.vision(img)["patch"][0]

    with torch.no_grad():
        with value_attention(model.vision):
            a, b = patches(x), patches(y)
        assert not torch.allclose(a[0], b[0])
        torch.testing.assert_close(a[1:], b[1:])
        a, b = patches(x), patches(y)                       # hook removed: mixing is back
        assert not torch.allclose(a[1:], b[1:])


def test_value_attention_matches_the_hand_written_block(tiny, seed):
    """x + LS(proj(v(LN x))), then the MLP residual and the final LayerNorm: the TIPS notebook's
    value-attention pass, written out by hand on the 1-block model's embedded tokens."""
    model, _, _ = tiny
    vision, block = model.vision, model.vision.blocks[-1]
    img = torch.rand(2, 3, 28, 42)
    with torch.no_grad():
        x = vision._embed(img, None, {})                                  # [B, 2 + N, D]
        D = x.shape[-1]
        v = block.attn.qkv(block.norm1(x))[..., 2 * D:]
        x = x + block.ls1(block.attn.proj(v))
        x = x + block.ls2(block.mlp(block.norm2(x)))
        expected = vision.norm(x)[:, vision.n_cls:]
        with value_attention(vision):
            got = vision(img)["patch"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_windows_cover_the_image_flush_with_the_border():
    assert windows(28, 42, 28, 14) == [(0, 28, 0, 28), (0, 28, 14, 42)]
    wins = windows(30, 50, 28, 14)
    cover = np.zeros((30, 50), int)
    for y1, y2, x1, x2 in wins:
        assert (y2 - y1, x2 - x1) == (28, 28)
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1 and wins[-1] == (2, 30, 22, 50)


def test_targets_and_chance_miou():
    assert to_targets(np.array([0, 1, 150, 255])).tolist() == [255, 0, 149, 255]
    cm = torch.diag(torch.tensor([6, 3, 1]))
    assert chance_miou(cm) == pytest.approx((6 / 22 + 3 / 16 + 1 / 12) / 3)


def test_layout_errors_name_the_missing_path(tmp_path, tiny):
    model, tok, cfg = tiny
    with pytest.raises(DatasetLayoutError, match=f"ade20k: missing folder {tmp_path / 'images' / 'validation'}"):
        run_suite(model, tok, cfg, "ade20k", tmp_path, tmp_path)
    write_ade(tmp_path, np.random.default_rng(0), n=1)
    (tmp_path / "annotations" / "validation" / "ADE_val_00000001.png").unlink()
    with pytest.raises(DatasetLayoutError, match="missing file .*ADE_val_00000001.png"):
        run_suite(model, tok, cfg, "ade20k", tmp_path, tmp_path)
    with pytest.raises(DatasetLayoutError, match="voc: missing file .*ImageSets/Segmentation/val.txt"):
        run_suite(model, tok, cfg, "voc", tmp_path / "voc", tmp_path)


def test_an_unreadable_label_map_is_skipped_and_counted(tmp_path, seed):
    write_ade(tmp_path, np.random.default_rng(seed), n=2)
    (tmp_path / "annotations" / "validation" / "ADE_val_00000002.png").write_bytes(b"not a png")
    tok = OracleTokenizer(prompt_lookup(META["ade20k"]))
    res, _ = run_suite(OracleModel(256), tok, None, "ade20k", tmp_path, tmp_path, seg_tokens="final")
    assert res["n_images"] == 1 and res["n_skipped"] == 1 and res["metrics"]["pixel accuracy"] > 0.9
