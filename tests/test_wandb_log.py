"""The optional Weights & Biases writer: the same scalars as TensorBoard, the config, the loss-curve
image, the run id kept for --resume, and a clear error without wandb. A fake module records the calls
(fast, exact); one smoke test runs the real wandb offline when it is installed."""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest

from fasttips import config as config_lib
from fasttips.runlog import MetricsWriter
from fasttips.wandb_log import RUN_ID_FILE, WandbMissing, import_wandb, wandb_writer


class FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, data, step=None):
        self.calls.append(("log", data, step))

    def finish(self):
        self.calls.append(("finish",))


def fake_wandb():
    calls = []
    module = types.SimpleNamespace(calls=calls)
    module.init = lambda **kwargs: calls.append(("init", kwargs)) or FakeRun(calls)
    module.Image = lambda path: ("image", path)
    return module


@pytest.fixture(autouse=True)
def wandb_counts_as_installed(monkeypatch):
    """The fake-module tests run without wandb installed: the config's start-up check passes."""
    installed = config_lib._installed
    monkeypatch.setattr(config_lib, "_installed", lambda name: name == "wandb" or installed(name))


def cfg_with(*overrides):
    return config_lib.load(None, ["preset=tiny", *overrides])


def test_off_by_default():
    assert wandb_writer(cfg_with(), "unused") is None


def test_scalars_config_and_loss_curve_reach_wandb(tmp_path):
    pytest.importorskip("matplotlib")
    fake = fake_wandb()
    cfg = cfg_with("train.wandb_project=proj", "train.wandb_mode=offline")
    writer = MetricsWriter(tmp_path, wandb=wandb_writer(cfg, tmp_path, module=fake))
    writer.write(1, {"loss": 2.5, "loss/dino": 1.0, "skipped": False, "mfu": None, "note": "text"})
    writer.write(2, {"loss": float("nan"), "loss/dino": 0.5})
    writer.close()
    kind, init = fake.calls[0]
    assert kind == "init" and init["project"] == "proj" and init["mode"] == "offline"
    assert init["dir"] == str(tmp_path) and init["resume"] == "allow"
    assert init["config"] == config_lib.to_dict(cfg)                          # the resolved config
    logs = [c for c in fake.calls if c[0] == "log"]
    # numbers only (bools as 0/1, like TensorBoard); None, text and non-finite values are left out
    assert logs[0] == ("log", {"loss": 2.5, "loss/dino": 1.0, "skipped": False}, 1)
    assert logs[1] == ("log", {"loss/dino": 0.5}, 2)
    image = logs[2][1]["loss_curve"]
    assert image == ("image", str(tmp_path / "loss_curve.png")) and (tmp_path / "loss_curve.png").is_file()
    assert fake.calls[-1] == ("finish",)
    # the run id is kept in the run folder: a resumed run continues the same W&B run
    run_id = (tmp_path / RUN_ID_FILE).read_text().strip()
    assert init["id"] == run_id
    again = fake_wandb()
    wandb_writer(cfg, tmp_path, module=again)
    assert again.calls[0][1]["id"] == run_id


def test_metrics_writer_builds_the_wandb_writer_from_the_config(tmp_path, monkeypatch):
    cfg = cfg_with("train.wandb_project=p")
    fake = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    writer = MetricsWriter(tmp_path, cfg=cfg)
    writer.write(3, {"loss": 1.0})
    writer.close()
    assert ("log", {"loss": 1.0}, 3) in fake.calls
    off = MetricsWriter(tmp_path / "other", enabled=False, cfg=cfg)
    assert off._wandb is None                       # ranks other than 0 never open a W&B run


def test_missing_wandb_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)                 # import wandb → ImportError
    with pytest.raises(WandbMissing, match=r"pip install 'fasttips\[wandb\]'"):
        import_wandb()
    monkeypatch.setattr(config_lib, "_installed", lambda name: name != "wandb")
    with pytest.raises(config_lib.ConfigError, match="train.wandb_project"):
        cfg_with("train.wandb_project=p")
    with pytest.raises(config_lib.ConfigError, match="train.wandb_mode"):
        cfg_with("train.wandb_mode=sometimes")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_offline_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = cfg_with("train.wandb_project=fasttips-test", "train.wandb_mode=offline")
    writer = MetricsWriter(tmp_path, cfg=cfg)
    run = writer._wandb.run
    for step in (1, 2):
        writer.write(step, {"loss": 3.0 - step, "loss/clip_alt": 0.1 * step})
    assert run.summary["loss"] in (1.0, 2.0) and run.config["preset"] == "tiny"   # a step commits on the next
    writer.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_a_training_run_logs_every_step_to_wandb(tmp_path, monkeypatch):
    """Trainer.run → MetricsWriter(cfg=...) → the W&B run: one log per step, the image, finish."""
    from fasttips.distributed import fsdp
    from fasttips.trainer import Trainer
    cfg = config_lib.load(None, ["data.source=synthetic", "vision.depth=1", "text.depth=1", "text.max_len=8",
                                 "heads.hidden=32", "heads.bottleneck=16", "heads.prototypes=32",
                                 "data.batch_size=2", "data.global_size=28", "data.local_size=14",
                                 "train.steps=3", "train.ckpt_every=100", f"train.run_dir={tmp_path}",
                                 "train.wandb_project=p", "train.wandb_mode=offline"])
    fake = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert Trainer(cfg, fsdp.init_distributed(cfg), tmp_path, progress=False).run() == 0
    logs = [c for c in fake.calls if c[0] == "log"]
    steps = [step for _, data, step in logs if "loss" in data]
    assert steps == [1, 2, 3] and all("loss/dino" in data for _, data, _ in logs[:3])
    assert "loss_curve" in logs[-1][1] and fake.calls[-1] == ("finish",)
