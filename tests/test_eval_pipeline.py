"""evaluate() end to end on an oracle model whose embeddings are known, so every metric has a known value."""
import pytest
import torch
from torch import nn

from fasttips.eval.evaluate import EvalSet, evaluate
from fasttips.eval.report import table

CLASSES = ["sky", "grass", "red circle", "blue square"]
N, P, S, D = 6, 4, 16, 32          # images, patch size, image size, embedding width


class OracleTokenizer:
    """Each text becomes one token: its class (0..C-1) when it names one, else C + image index."""

    def encode(self, texts):
        ids = []
        for t in texts:
            hit = [c for c, name in enumerate(CLASSES) if name in t]
            ids.append(hit[0] if hit else len(CLASSES) + int(t.split()[-1]))
        ids = torch.tensor(ids)[:, None] + 1          # 0 is the pad id
        return ids, torch.zeros_like(ids, dtype=torch.bool)


class OracleModel(nn.Module):
    """Patch embedding = one-hot of the class painted in channel 0 at the patch; CLS#1 = CLS#2 =
    one-hot of the image index (channel 1) + one-hot of the image label (channel 2);
    text = one-hot of its token."""

    def __init__(self, swap_classes=False):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.swap = swap_classes

    def vision(self, x, masks=None):
        cls_map = x[:, 0, P // 2::P, P // 2::P].round().long().flatten(1)     # [B, Np]
        patch = nn.functional.one_hot(cls_map, D).float()
        cls = (nn.functional.one_hot(x[:, 1, 0, 0].round().long() + len(CLASSES), D)
               + nn.functional.one_hot(x[:, 2, 0, 0].round().long(), D)).float()
        return {"cls1": cls, "cls2": cls, "patch": patch}

    def text(self, ids, pad):
        tok = ids[:, 0] - 1
        if self.swap:   # a model that confuses class names: class c reads as class c+1
            tok = torch.where(tok < len(CLASSES), (tok + 1) % len(CLASSES), tok)
        return nn.functional.one_hot(tok, D).float()


def make_eval_set(gen, mask_scale=1):
    grid = S // P
    patch_labels = torch.randint(0, len(CLASSES), (N, grid, grid), generator=gen)
    masks = patch_labels.repeat_interleave(P, 1).repeat_interleave(P, 2)
    images = torch.zeros(N, 3, S, S)
    images[:, 0] = masks.float()
    images[:, 1] = torch.arange(N, dtype=torch.float)[:, None, None]
    labels = torch.mode(patch_labels.flatten(1), dim=1).values
    images[:, 2] = labels.float()[:, None, None]
    caps = {"alt": [f"alt {i}" for i in range(N)], "short": [f"short {i}" for i in range(N)],
            "long": [""] * N}   # an empty granularity is skipped
    # masks may be finer than the model input (scored at their own resolution)
    masks = masks.repeat_interleave(mask_scale, 1).repeat_interleave(mask_scale, 2)
    return EvalSet(images, caps, CLASSES, masks, labels)


@pytest.mark.parametrize("mask_scale", [1, 3])
def test_oracle_model_scores_perfectly(seed, mask_scale):
    es = make_eval_set(torch.Generator().manual_seed(seed), mask_scale)
    model = OracleModel().train()
    res = evaluate(model, OracleTokenizer(), eval_set=es, n_images=N, batch_size=4, per_class=True)
    assert model.training, "evaluate must restore the training mode"
    assert res["n_images"] == N
    for key in ("ret/cls1_alt/i2t_r1", "ret/cls1_alt/t2i_r1", "ret/cls2_short/i2t_r5", "cls/cls1_acc"):
        assert res[key] == 1.0, key
    assert not any(k.startswith("ret/cls2_long") for k in res)
    # classification among a subset of classes: labels are re-indexed into it
    present = sorted(set(es.labels.tolist()))
    es.classify_classes = present
    assert evaluate(model, OracleTokenizer(), eval_set=es, n_images=N)["cls/cls2_acc"] == 1.0
    # bilinear upsampling may flip a few corner pixels where three neighbours share another class
    assert res["seg/miou"] > 0.85 and res["seg/pixel_acc"] > 0.9
    assert set(res["seg/iou_per_class"]) == set(CLASSES)
    assert "mIoU" in table({"oracle": res})


def test_confused_class_names_score_zero(seed):
    es = make_eval_set(torch.Generator().manual_seed(seed))
    res = evaluate(OracleModel(swap_classes=True), OracleTokenizer(), eval_set=es, n_images=N)
    assert res["seg/miou"] < 0.05 and res["cls/cls1_acc"] == 0.0
    assert res["ret/cls1_alt/i2t_r1"] == 1.0     # retrieval does not use class names


def test_duplicate_captions_are_not_retrieval_errors(seed):
    from fasttips.eval.evaluate import same_text
    assert same_text(["a b", "A  b", "c"]).tolist() == [[True, True, False], [True, True, False],
                                                        [False, False, True]]
    es = make_eval_set(torch.Generator().manual_seed(seed))
    es.captions["alt"][1] = es.captions["alt"][0]          # two images share one alt-text ...
    es.images[1, 1] = 0.0                                  # ... and the oracle embeds both as image 0
    res = evaluate(OracleModel(), OracleTokenizer(), eval_set=es, n_images=N)
    assert res["ret/cls1_alt/i2t_r1"] == 1.0
    assert res["ret/cls1_alt/t2i_r1"] == 1.0


def test_eval_set_validates_its_fields():
    with pytest.raises(ValueError, match="captions"):
        EvalSet(torch.zeros(2, 3, 8, 8), {"alt": ["one"]})
    with pytest.raises(ValueError, match="class_names"):
        EvalSet(torch.zeros(2, 3, 8, 8), masks=torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="masks"):
        EvalSet(torch.zeros(2, 3, 8, 8), class_names=["a"], masks=torch.zeros(3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="classify_classes"):
        EvalSet(torch.zeros(2, 3, 8, 8), class_names=["a", "b"], labels=torch.tensor([0, 1]),
                classify_classes=[1])


def test_foreground_only_segmentation_ignores_background(seed):
    from fasttips.eval.evaluate import segmentation_metrics
    names = ["background", "circle", "star"]
    # 2×2 patches of 4×4 pixels; patch labels [[bg, circle], [star, bg]]
    labels = torch.tensor([[[0, 1], [2, 0]]])
    masks = labels.repeat_interleave(4, 1).repeat_interleave(4, 2)
    es = EvalSet(torch.zeros(1, 3, 8, 8), class_names=names, masks=masks)

    def run(said):
        patch = nn.functional.one_hot(torch.tensor([said]), 3).float() + 0.01 * torch.randn(1, 4, 3)
        return segmentation_metrics(patch, torch.eye(3), es, per_class=True)

    # every patch right: on object pixels (background not a candidate) no neighbour can win
    assert run([0, 1, 2, 0])["seg/miou_fg"] == 1.0
    # objects right, background called "circle": background IoU 0 drags mIoU down, objects-only
    # mIoU only loses the star patch's corner pixels to bilinear blending with "circle" neighbours
    res = run([1, 1, 2, 1])
    assert res["seg/iou_per_class"]["background"] == 0.0
    assert res["seg/miou"] < 0.7 < 0.9 < res["seg/miou_fg"]


def test_constant_baseline_hand_computed():
    from fasttips.ablate import constant_baseline
    # 10 pixels: 6 background, 3 circle, 1 star
    masks = torch.tensor([[[0, 0, 0, 0, 0, 0, 1, 1, 1, 2]]])
    es = EvalSet(torch.zeros(1, 3, 1, 10), class_names=["background", "circle", "star"], masks=masks)
    base = constant_baseline(es)
    assert base["seg/miou"] == pytest.approx(0.6 / 3)         # bg IoU 6/10; circle, star 0
    assert base["seg/pixel_acc"] == pytest.approx(0.6)
    assert base["seg/miou_fg"] == pytest.approx(0.75 / 2)     # "circle" on the 4 object pixels: 3/4
    assert base["seg/pixel_acc_fg"] == pytest.approx(0.75)


def test_eval_set_from_shards_with_masks_of_several_sizes(tmp_path, caplog):
    """Masks of different sizes are scored at the model's input size, not silently dropped."""
    import io
    import json
    import logging

    import numpy as np
    from PIL import Image

    from fasttips.data.shards import ShardWriter
    from fasttips.eval.data import load_eval_set

    def png(array):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, "PNG")
        return buf.getvalue()

    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["background", "circle"]}))
    with ShardWriter(tmp_path, samples_per_shard=10) as w:
        for i, side in enumerate((40, 40, 60)):
            mask = np.zeros((side, side), np.uint8)
            mask[: side // 2] = 1                          # top half is the object
            w.write(f"k{i}", png(np.stack([mask * 200] * 3, -1)), "png", {"alt": f"alt {i}"},
                    extras={"mask.png": png(mask)})
    with caplog.at_level(logging.WARNING, logger="fasttips.eval"):
        es = load_eval_set(None, path=str(tmp_path), n_images=3, size=28)
    assert "different sizes" in caplog.text
    assert es.masks is not None and tuple(es.masks.shape) == (3, 28, 28)
    assert (es.masks[:, :14] == 1).all() and (es.masks[:, 14:] == 0).all()
    assert es.labels.tolist() == [1, 1, 1] and es.class_names == ["background", "circle"]
