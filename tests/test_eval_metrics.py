"""Evaluation metrics against hand-computed cases, and the PCA picture."""
import math

import numpy as np
import pytest
import torch

from fasttips.eval.metrics import (IGNORE_INDEX, accuracy, confusion_matrix, iou_per_class, mean_iou,
                                   patch_grid, pixel_accuracy, recall_at_k, upsample_patch_logits)
from fasttips.eval.pca import pca_components, pca_rgb, save_pca_png
from fasttips.eval.zeroshot import average_prompts, class_prompts, classify, segment


# ---------------------------------------------------------------- retrieval recall
def test_recall_perfect(seed):
    n = 7
    sim = torch.randn(n, n) + 100 * torch.eye(n)
    r = recall_at_k(sim)
    assert r == {"i2t_r1": 1.0, "i2t_r5": 1.0, "t2i_r1": 1.0, "t2i_r5": 1.0}


def test_recall_hand_computed():
    sim = torch.tensor([[0.9, 0.1, 0.2],
                        [0.8, 0.3, 0.5],
                        [0.1, 0.6, 0.7]])
    # image→text (rows), rank of the diagonal: img0 1st, img1 3rd (0.8, 0.5 above), img2 1st
    # text→image (columns): txt0 1st, txt1 2nd (0.6 above), txt2 1st
    r = recall_at_k(sim, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(2 / 3)
    assert r["i2t_r2"] == pytest.approx(2 / 3)
    assert r["t2i_r1"] == pytest.approx(2 / 3)
    assert r["t2i_r2"] == pytest.approx(1.0)


def test_recall_ties_go_to_the_lower_index():
    # a constant model: every candidate ties, so the one with the lowest index ranks first (open_clip's
    # stable sort): image 0 finds text 0 at rank 1, image 3 finds text 3 at rank 4
    r = recall_at_k(torch.zeros(4, 4), ks=(1, 2, 4))
    assert r["i2t_r1"] == r["t2i_r1"] == 0.25
    assert r["i2t_r2"] == r["t2i_r2"] == 0.5
    assert r["i2t_r4"] == 1.0 and r["t2i_r4"] == 1.0     # k = N always finds it


def test_recall_rank_is_the_stable_sort_position(seed):
    """Against a brute force: the rank of a query's first correct candidate in a stable descending sort."""
    for _ in range(20):
        n_img, n_txt = 6, 9
        sim = torch.randint(0, 3, (n_img, n_txt)).float()          # few values: many ties
        pos = torch.zeros(n_img, n_txt, dtype=torch.bool)
        pos[torch.randint(0, n_img, (n_txt,)), torch.arange(n_txt)] = True    # each text has one image
        pos[torch.arange(n_img), torch.randint(0, n_txt, (n_img,))] = True    # each image at least one text
        from fasttips.eval.metrics import recall_from_positives

        def brute(s, p):
            ranks = []
            for row, prow in zip(s, p):
                order = torch.sort(row, descending=True, stable=True).indices.tolist()
                wrong_before = 0
                for j in order:
                    if prow[j]:
                        break
                    wrong_before += 1
                ranks.append(wrong_before)
            return torch.tensor(ranks)

        ks = (1, 2, 3)
        got = recall_from_positives(sim, pos, ks)
        for k in ks:
            assert got[f"i2t_r{k}"] == pytest.approx((brute(sim, pos) < k).float().mean().item())
            assert got[f"t2i_r{k}"] == pytest.approx((brute(sim.T, pos.T) < k).float().mean().item())


def test_recall_duplicate_captions_are_interchangeable():
    # texts 0 and 1 are the same caption, so their embeddings (columns) are equal
    sim = torch.tensor([[0.9, 0.9, 0.1],
                        [0.8, 0.8, 0.2],
                        [0.1, 0.1, 0.7]])
    plain = recall_at_k(sim, ks=(1,))
    assert plain["i2t_r1"] == pytest.approx(2 / 3)        # image 1 loses the tie to text 0 (lower index)
    pos = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    r = recall_at_k(sim, ks=(1,), positives=pos)
    assert r["i2t_r1"] == 1.0 and r["t2i_r1"] == 1.0
    pos[2, 2] = False
    with pytest.raises(ValueError, match="diagonal"):
        recall_at_k(sim, positives=pos)


def test_recall_nan_scores_rank_last():
    r = recall_at_k(torch.full((4, 4), math.nan), ks=(1, 4))
    assert r["i2t_r1"] == 0.25 and r["t2i_r1"] == 0.25     # all -inf: ties, broken by index
    assert r["i2t_r4"] == 1.0 and r["t2i_r4"] == 1.0
    sim = torch.eye(3)
    sim[1, 1] = math.nan                                   # image 1's own caption is NaN: behind the zeros
    assert recall_at_k(sim, ks=(1,))["i2t_r1"] == pytest.approx(2 / 3)


def test_recall_random_is_near_chance(seed):
    n, trials = 50, 40
    r1 = [recall_at_k(torch.randn(n, n))["i2t_r1"] for _ in range(trials)]
    assert abs(np.mean(r1) - 1 / n) < 0.02


def test_recall_rejects_bad_input():
    with pytest.raises(ValueError, match="similarity"):
        recall_at_k(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(torch.zeros(3, 3), ks=(0,))


# ---------------------------------------------------------------- classification
def test_accuracy_hand_computed():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [5.0, 0.0, 0.0], [0.0, 1.0, 0.5]])
    assert accuracy(logits, torch.tensor([0, 2, 1, 1])) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="labels"):
        accuracy(logits, torch.tensor([0, 2, 1, 3]))


# ---------------------------------------------------------------- mIoU
def test_miou_perfect(seed):
    target = torch.randint(0, 5, (2, 9, 11))
    cm = confusion_matrix(target.clone(), target, n_classes=5)
    assert mean_iou(cm) == 1.0 and pixel_accuracy(cm) == 1.0


def test_miou_hand_computed_with_ignore_and_missing_class():
    # 4 classes; class 3 is absent from both target and prediction -> ignored (NaN), not 0.
    target = torch.tensor([[0, 0, 1, 1],
                           [0, 2, 2, IGNORE_INDEX]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [0, 2, 0, 3]])          # the last pixel is ignored, so its "3" does not count
    cm = confusion_matrix(pred, target, n_classes=4)
    assert cm.sum() == 7
    iou = iou_per_class(cm)
    # class 0: TP 2 (pixels (0,0), (1,0)); FP 1 (pixel (1,2)); FN 1 (pixel (0,1)) -> 2/4
    # class 1: TP 2; FP 1 (pixel (0,1)); FN 0 -> 2/3
    # class 2: TP 1; FP 0; FN 1 -> 1/2
    assert iou[:3].tolist() == pytest.approx([0.5, 2 / 3, 0.5])
    assert math.isnan(iou[3].item())
    assert mean_iou(cm) == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert pixel_accuracy(cm) == pytest.approx(5 / 7)


def test_miou_class_predicted_but_absent_counts_as_zero():
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    pred = torch.tensor([[[0, 0], [0, 1]]])      # class 1 never in the truth but predicted: IoU 0
    cm = confusion_matrix(pred, target, n_classes=3)
    assert iou_per_class(cm)[:2].tolist() == pytest.approx([0.75, 0.0])
    assert mean_iou(cm) == pytest.approx(0.375)


def test_miou_random_is_low(seed):
    C = 6
    target = torch.randint(0, C, (4, 32, 32))
    pred = torch.randint(0, C, (4, 32, 32))
    m = mean_iou(confusion_matrix(pred, target, C))
    # independent uniform labels: IoU per class ≈ (1/C²)/(2/C - 1/C²) = 1/(2C-1)
    assert abs(m - 1 / (2 * C - 1)) < 0.02


def test_confusion_matrix_rejects_bad_labels():
    with pytest.raises(ValueError, match="target"):
        confusion_matrix(torch.zeros(2, 2), torch.full((2, 2), 7), n_classes=3)
    with pytest.raises(ValueError, match="pred"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(2, 2), n_classes=3)


# ---------------------------------------------------------------- upsampling and segmentation
def test_upsample_patch_logits_constant_and_shape(seed):
    logits = torch.randn(2, 3, 1, 1).expand(2, 3, 4, 5)
    up = upsample_patch_logits(logits, (28, 35))
    assert up.shape == (2, 3, 28, 35)
    torch.testing.assert_close(up, logits[:, :, :1, :1].expand_as(up))


def test_patch_grid():
    assert patch_grid(64) == (8, 8)
    assert patch_grid(12, image_hw=(42, 56)) == (3, 4)
    with pytest.raises(ValueError, match="n_patches"):
        patch_grid(12)


def test_segment_recovers_planted_labels(seed):
    # patches carry the class embedding of their label plus a little noise -> perfect segmentation.
    C, D, h, w, P = 4, 16, 3, 5, 14
    class_emb = torch.linalg.qr(torch.randn(D, C))[0].T          # orthonormal classes [C, D]
    labels = torch.randint(0, C, (2, h, w))
    patches = class_emb[labels.reshape(2, -1)] + 0.01 * torch.randn(2, h * w, D)
    pred = segment(patches, class_emb, image_hw=(h * P, w * P))
    target = labels.repeat_interleave(P, 1).repeat_interleave(P, 2)
    # bilinear upsampling may move a boundary by a pixel; inside each patch the label must be exact
    centres = pred[:, P // 2::P, P // 2::P]
    assert torch.equal(centres, labels)
    assert mean_iou(confusion_matrix(pred, target, C)) > 0.8


def test_prompts_and_classify(seed):
    prompts = class_prompts(["red circle", "tree"], templates=("{}", "a {}"))
    assert prompts == ["red circle", "a red circle", "tree", "a tree"]
    emb = torch.randn(4, 8)
    cls = average_prompts(emb, 2)
    assert cls.shape == (2, 8)
    torch.testing.assert_close(cls.norm(dim=1), torch.ones(2))
    scores = classify(cls * 3, cls)
    assert scores.argmax(1).tolist() == [0, 1]
    with pytest.raises(ValueError, match="templates"):
        class_prompts(["x"], templates=("no slot",))


# ---------------------------------------------------------------- PCA picture
def test_pca_components_find_the_planted_direction(seed):
    direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
    coef = torch.randn(200, 1) * 10
    x = coef * direction + 0.01 * torch.randn(200, 32)
    proj = pca_components(x, k=3)
    assert proj.shape == (200, 3)
    corr = torch.corrcoef(torch.stack([proj[:, 0], coef[:, 0]]))[0, 1].abs()
    assert corr > 0.999
    assert proj[:, 0].var() > 100 * proj[:, 1].var()


def test_pca_rgb_shape_and_range(seed):
    maps = pca_rgb(torch.randn(3, 6 * 4, 20), grid=(6, 4))
    assert maps.shape == (3, 6, 4, 3) and maps.dtype == np.uint8
    assert maps.min() == 0 and maps.max() == 255
    with pytest.raises(ValueError, match="grid"):
        pca_rgb(torch.randn(1, 10, 4), grid=(3, 3))


def test_save_pca_png(tmp_path, seed):
    from PIL import Image
    feats, images = torch.randn(2, 16, 12), torch.randn(2, 3, 56, 56)
    pic = save_pca_png(tmp_path / "pca.png", feats, (4, 4), images)
    assert pic.shape == (2 * 56, 2 * 56, 3)
    assert Image.open(tmp_path / "pca.png").size == (112, 112)
