"""kNN probe on frozen CLS features, on a tiny ImageFolder train/val pair."""
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
