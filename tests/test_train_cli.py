"""``fasttips train``: the default job end to end (shortened), and --help."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fasttips import config as config_lib
from fasttips.train import main


def test_default_train_runs_end_to_end(tmp_path):
    """The default preset and data, through the ``fasttips`` entry point, with 2 steps."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-m", "fasttips.cli", "train", "train.steps=2",
                           f"train.run_dir={run_dir}"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GFLOP per training image" in done.stdout
    assert "step 2/2" in done.stderr                       # the progress bar
    assert "done, 2 steps" in done.stdout
    # the long line on the first run only (the demo data may be cached by an earlier test)
    assert ("data: preparing the demo data" in done.stdout or "data: the demo data, cached in" in done.stdout)
    assert "data: ready in" in done.stdout
    assert f"next: fasttips eval {run_dir}" in done.stdout
    saved = config_lib.load(run_dir / "config.yaml")
    assert saved.preset == "tiny" and saved.data.source == "auto"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(isinstance(r["loss"], float) for r in records)
    assert (run_dir / "loss_curve.png").is_file()
    assert (run_dir / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    assert (run_dir / "checkpoints" / "step_00000002" / "tokenizer.model").is_file()


def test_help_documents_every_option_and_config_field(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--config", "--resume", "--no-progress", "key=value", "exit codes", "--fault-nan-steps",
                   "--fault-pause-in-checkpoint"):
        assert option in text, option
    for line in config_lib.describe().splitlines():
        assert line.split()[0] in text, line


def test_a_finished_run_directory_is_not_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000001" / "COMPLETE").write_text("1\n")
    code = main(["data.source=synthetic", "vision.depth=1", "text.depth=1", f"train.run_dir={run_dir}"])
    assert code == 2
    assert "--resume" in capsys.readouterr().err


def test_out_of_memory_names_the_batch_size_and_the_options(tmp_path, capsys, monkeypatch):
    from fasttips.training import Training

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Training, "train_step", oom)
    code = main(["data.source=synthetic", "vision.depth=1", "text.depth=1", "data.batch_size=3",
                 "heads.prototypes=64", f"train.run_dir={tmp_path / 'run'}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 4
    for words in ("out of memory", "data.batch_size=3", "optim.accum_steps", "train.activation_checkpointing"):
        assert words in err, words


def test_a_batch_larger_than_the_data_is_warned_about():
    from fasttips.trainer import batch_warning
    assert batch_warning(16, 16, 0) is None
    message = batch_warning(16, 5, 1)
    assert "data.batch_size=16" in message and "5 usable samples of rank 1" in message


def test_every_loader_kind_satisfies_the_trainers_loader_protocol():
    """The trainer uses its loader only through fasttips.trainer.Loader (no hasattr probing): the
    three kinds must all provide it."""
    from fasttips.data.dali_loader import DaliLoader
    from fasttips.data.loader import Loader as PytorchLoader
    from fasttips.data.loader import SyntheticLoader
    from fasttips.trainer import Loader
    cfg = config_lib.load(None, ["data.source=synthetic"])
    assert isinstance(SyntheticLoader(cfg, 0), Loader)
    for cls in (PytorchLoader, DaliLoader):       # built from shards: their classes are checked
        assert isinstance(cls.kind, str)
        for method in ("__iter__", "__next__", "state_dict", "load_state_dict"):
            assert callable(getattr(cls, method, None)), f"{cls.__name__}.{method}"
        init = cls.__init__.__code__
        assert {"batch_size", "tokenizer", "stats"} <= set(init.co_names), cls.__name__


def test_a_run_dir_under_a_file_is_named_before_and_after_the_data_start_up(tmp_path, capsys, monkeypatch):
    """train.run_dir=FILE/run: refused with the field name before the data starts; and when the file
    appears only while the data starts (the late check, at the run directory's creation), the message
    still names train.run_dir."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    small = ["data.source=synthetic", "vision.depth=1", "text.depth=1"]
    assert main([*small, f"train.run_dir={blocker / 'run'}"]) == 2
    out, err = capsys.readouterr()
    assert "train.run_dir" in err and str(blocker) in err and len(err.strip().splitlines()) == 1, err
    assert "data:" not in out                               # refused before anything slow

    from fasttips.trainer import Trainer
    late = tmp_path / "late"
    build = Trainer._build_loader

    def build_then_block(self):
        loader = build(self)
        late.write_text("written while the data started")
        return loader
    monkeypatch.setattr(Trainer, "_build_loader", build_then_block)
    assert main([*small, f"train.run_dir={late / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "train.run_dir" in err and str(late) in err and len(err.strip().splitlines()) == 1, err
