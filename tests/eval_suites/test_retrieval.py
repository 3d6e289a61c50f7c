"""COCO / Flickr30k retrieval on tiny fixtures in the Karpathy-split layout."""
import json

import pytest
import torch

from fasttips.eval.suites import DatasetLayoutError
from fasttips.eval.suites.retrieval import chance_recall, multi_caption_recall
from suite_helpers import OracleModel, OracleTokenizer, colour, run_suite, save_image


def write_karpathy(root, suite, n_test=4, n_other=2, captions=6):
    """Karpathy JSON + images; the image of test entry i has colour code i and captions 'image i, caption j'."""
    images = []
    for i in range(n_test + n_other):
        split = "test" if i < n_test else ("train" if i % 2 else "restval")
        name = f"COCO_val2014_{i:012d}.jpg" if suite == "coco" else f"{1000 + i}.jpg"
        entry = {"filename": name, "split": split, "imgid": i,
                 "sentences": [{"raw": f" image {i}, caption {j} ", "tokens": []} for j in range(captions)]}
        if suite == "coco":
            entry["filepath"] = "val2014"
            save_image(root / "val2014" / name, colour(i))
        else:
            save_image(root / "flickr30k-images" / name, colour(i))
        images.append(entry)
    fname = "dataset_coco.json" if suite == "coco" else "dataset_flickr30k.json"
    (root / fname).write_text(json.dumps({"images": images, "dataset": suite}))


def caption_image(text):
    return int(text.split(",")[0].split()[-1])


@pytest.mark.parametrize("suite", ["coco", "flickr30k"])
def test_oracle_retrieves_perfectly(tmp_path, suite):
    write_karpathy(tmp_path, suite)
    res, log = run_suite(OracleModel(64), OracleTokenizer(caption_image), None, suite, tmp_path, tmp_path)
    assert res["n_images"] == 4 and res["n_captions"] == 20           # test split only, 5 captions each
    assert all(v == 1.0 for v in res["metrics"].values()), res["metrics"]
    assert res["chance"]["CLS#1 text->image R@1"] == pytest.approx(1 / 4)
    assert res["chance"]["CLS#1 text->image R@10"] == 1.0           # k ≥ number of images
    assert f"[{suite}] batch 2/2" in log


def test_a_confused_model_scores_zero_at_one(tmp_path):
    write_karpathy(tmp_path, "coco")
    # 4 test images: image i reads as code (i + 1) % 4, so every caption matches exactly one wrong image
    res, _ = run_suite(OracleModel(4, shift=1), OracleTokenizer(caption_image), None, "coco", tmp_path, tmp_path)
    assert res["metrics"]["CLS#2 image->text R@1"] == 0.0 and res["metrics"]["CLS#2 text->image R@1"] == 0.0


def test_tiny_model_end_to_end(tmp_path, tiny):
    model, tok, cfg = tiny
    write_karpathy(tmp_path, "flickr30k", n_test=3)
    res, _ = run_suite(model, tok, cfg, "flickr30k", tmp_path, tmp_path)
    assert len(res["metrics"]) == 12
    assert all(0.0 <= v <= 1.0 for v in res["metrics"].values())
    assert res["metrics"]["CLS#1 text->image R@5"] == 1.0          # 3 images: always within the top 5


def test_multi_caption_recall_hand_computed():
    # 2 images, 4 texts: texts 0, 1 describe image 0; texts 2, 3 image 1
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.2],
                        [0.5, 0.5, 0.4, 0.6]])
    owner = torch.tensor([0, 0, 1, 1])
    r = multi_caption_recall(sim, owner, ks=(1, 2))
    assert r["i2t_r1"] == 1.0            # each image's best own caption beats its wrong ones
    assert r["t2i_r1"] == 0.5            # texts 1 and 2 prefer the other image
    assert r["t2i_r2"] == 1.0



def test_ties_rank_a_lower_index_first():
    """A wrong candidate scoring the same as the best right one ranks ahead only with a lower index (a
    stable descending sort, open_clip's rule), not always."""
    owner = torch.tensor([0, 0, 1, 1])                 # texts 0, 1 describe image 0; texts 2, 3 image 1
    sim = torch.tensor([[0.5, 0.1, 0.5, 0.2],          # image 0: own text 0 ties text 2 (after it): hit
                        [0.7, 0.0, 0.7, 0.1]])         # image 1: own text 2 ties text 0 (before it): miss
    r = multi_caption_recall(sim, owner, ks=(1, 2))
    assert r["i2t_r1"] == 0.5 and r["i2t_r2"] == 1.0
    # text→image: text 0 ties images 0 and 1 → image 0 first (its own: hit); text 2 ties → image 0
    # first (not its own: miss); texts 1 and 3 prefer their own image
    sim = torch.tensor([[0.3, 0.4, 0.6, 0.1],
                        [0.3, 0.2, 0.6, 0.5]])
    r = multi_caption_recall(sim, owner, ks=(1, 2))
    assert r["t2i_r1"] == 0.75 and r["t2i_r2"] == 1.0
    # a tie with the image's other caption is no loss: both are right
    assert multi_caption_recall(torch.tensor([[0.9, 0.9, 0.1, 0.1], [0.2, 0.2, 0.8, 0.8]]), owner,
                                ks=(1,))["i2t_r1"] == 1.0


def test_chance_recall_formula():
    i2t, t2i = chance_recall(n_img=10, n_txt=50, per_image=5, k=1)
    assert i2t == pytest.approx(0.1) and t2i == pytest.approx(0.1)
    i2t, _ = chance_recall(n_img=2, n_txt=4, per_image=2, k=2)
    assert i2t == pytest.approx(1 - (2 / 4) * (1 / 3))


def test_layout_errors_name_the_missing_path(tmp_path, tiny):
    model, tok, cfg = tiny
    with pytest.raises(DatasetLayoutError, match=f"coco: missing file {tmp_path / 'dataset_coco.json'}"):
        run_suite(model, tok, cfg, "coco", tmp_path, tmp_path)
    write_karpathy(tmp_path, "coco")
    (tmp_path / "val2014" / "COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match="missing file .*COCO_val2014_000000000002.jpg"):
        run_suite(model, tok, cfg, "coco", tmp_path, tmp_path)
