"""Linear probes on frozen features: the training loop (probe.py) and the ImageNet ``linear`` suite on a
tiny ImageFolder train/val pair."""
import numpy as np
import pytest
import torch

from fasttips.eval.suites import DatasetLayoutError
from fasttips.eval.suites.probe import DINOV2_LRS, Recipe, Store, fit, split_heldout
from fasttips.eval.suites.report import table
from suite_helpers import OracleModel, colour, run_suite, save_image

CLASSES = ["n00000001", "n00000002", "n00000003"]
FAST = dict(probe_epochs=30, probe_lrs=(0.5,), probe_batch_size=8)


def write_pair(root, per_class=4):
    for k, c in enumerate(CLASSES):
        for j in range(per_class):
            save_image(root / "train" / c / f"{j}.JPEG", colour(k))
        save_image(root / "val" / c / "v.JPEG", colour(k))


class Ctx:
    """The parts of a SuiteContext that ``fit`` reads."""
    device = torch.device("cpu")
    progress_every = 1

    def __init__(self):
        self.lines = []

    def say(self, msg):
        self.lines.append(msg)


class Blobs:
    """A linearly separable task: class c's inputs are noisy copies of a random centre."""

    def __init__(self, n=200, d=8, c=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        centres = torch.randn(c, d, generator=g) * 3
        self.y = torch.randint(0, c, (n,), generator=g)
        self.x = centres[self.y] + 0.3 * torch.randn(n, d, generator=g)
        self.d_in, self.d_out = d, c

    def batch(self, idx):
        return self.x[idx], self.y[idx]

    def forward(self, linear, x):
        return linear(x)

    def loss(self, logits, y):
        return torch.nn.functional.cross_entropy(logits, y)

    def error(self, logits, y):
        return int((logits.argmax(1) != y).sum()), len(y)


def test_the_grid_is_judged_on_a_held_out_tenth_and_the_best_rate_wins():
    task, ctx = Blobs(), Ctx()
    recipe = Recipe("sgd", (1e-7, 0.1), epochs=5, batch_size=32)
    probe = fit(task, torch.arange(200), recipe, ctx, "blobs")
    rec = probe.record
    assert rec["n_train"] == 180 and rec["n_heldout"] == 20
    assert rec["lr"] == 0.1                                   # 1e-7 barely moves from the N(0, 0.01²) start
    assert rec["selection_error"]["0.1"] < rec["selection_error"]["1e-07"]
    acc = (probe.linear()(task.x).argmax(1) == task.y).float().mean()
    assert acc > 0.95
    assert any("epoch 5/5" in line for line in ctx.lines)
    again = fit(task, torch.arange(200), recipe, Ctx(), "blobs")            # deterministic
    torch.testing.assert_close(again.linear()(task.x), probe.linear()(task.x))


def test_held_out_split_rule():
    items = torch.arange(25)
    train, held = split_heldout(items, n_lrs=3)
    assert held.tolist() == [9, 19] and len(train) == 23
    assert len(split_heldout(items, n_lrs=1)[1]) == 0          # one rate: nothing to choose, nothing held out
    assert len(split_heldout(torch.arange(9), n_lrs=3)[1]) == 0
    assert len(DINOV2_LRS) == 13


def test_memory_mapped_store_reads_what_was_written(tmp_path):
    rows = np.random.default_rng(0).standard_normal((6, 2, 3)).astype(np.float16)
    stores = [Store(6, (2, 3), np.float16), Store(6, (2, 3), np.float16, tmp_path, "x")]
    for store in stores:
        for i, r in enumerate(rows):
            store[i] = r
    idx = torch.tensor([4, 0, 5, 0])
    for store in stores:
        np.testing.assert_array_equal(store.take(idx).numpy(), rows[[4, 0, 5, 0]].astype(np.float32))
    assert len(list(tmp_path.rglob("*.npy"))) == 1
    stores[1].close()
    assert not list(tmp_path.rglob("*.npy"))


def test_oracle_features_are_probed_perfectly_and_blind_ones_score_chance(tmp_path):
    write_pair(tmp_path)
    res, log = run_suite(OracleModel(16), None, None, "linear", tmp_path, tmp_path, **FAST)
    assert res["n_train"] == 12 and res["n_val"] == 3 and res["n_classes"] == 3
    for name in ("CLS#1", "CLS#2", "CLS#1+CLS#2"):
        assert res["metrics"][f"linear {name} top-1 acc"] == 1.0, name
        assert res["probes"][name]["lr"] == 0.5 and res["probes"][name]["n_heldout"] == 0
    assert res["chance"]["linear CLS#1 top-1 acc"] == pytest.approx(1 / 3)
    assert res["transform"]["resize_short_side"] == 32          # DINOv2's 256/224 at a 28-px crop
    assert "[linear train] batch" in log and "[linear CLS#2] epoch 30/30" in log
    blind, _ = run_suite(OracleModel(16, blind=True), None, None, "linear", tmp_path, tmp_path, **FAST)
    assert blind["metrics"]["linear CLS#1 top-1 acc"] == pytest.approx(1 / 3)
    assert "linear  linear CLS#1+CLS#2 top-1 acc" in table({"linear": res})


def test_tiny_model_and_layout_errors(tmp_path, tiny):
    model, tok, cfg = tiny
    with pytest.raises(DatasetLayoutError, match=f"linear: missing folder {tmp_path / 'train'}"):
        run_suite(model, tok, cfg, "linear", tmp_path, tmp_path)
    write_pair(tmp_path, per_class=4)
    res, _ = run_suite(model, tok, cfg, "linear", tmp_path, tmp_path, probe_epochs=2,
                       probe_lrs=(1e-3, 1e-2), probe_cache=str(tmp_path / "cache"))
    assert res["probes"]["CLS#1"]["n_heldout"] == 1 and res["probes"]["CLS#1"]["lr"] in (1e-3, 1e-2)
    assert 0.0 <= res["metrics"]["linear CLS#1 top-1 acc"] <= 1.0
