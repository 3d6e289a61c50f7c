"""``eval.every`` with ``eval.suites``: a short training run evaluates the chosen benchmark suites and logs
their numbers to metrics.jsonl; a wrong suite name or data root stops the run at start."""
import json
import math

import pytest

from test_dense_probes import write_bts
from test_knn import write_pair

SMALL = ["--no-progress", "data.source=synthetic", "vision.depth=1", "text.depth=1", "text.max_len=8",
         "heads.hidden=64", "heads.bottleneck=32", "heads.prototypes=64", "data.batch_size=2",
         "data.global_size=28", "data.local_size=14", "data.n_local=1", "train.device=cpu", "train.steps=2"]


def test_a_short_run_evaluates_the_chosen_suites_every_n_steps(tmp_path):
    from fasttips import train
    root = tmp_path / "data"
    write_pair(root / "imagenet")
    (root / "imagenet" / "classnames.txt").write_text("cat\ndog\nfish\n")      # its zero-shot needs names
    write_bts(root / "nyu_depth_v2")
    run_dir = tmp_path / "run"
    # synthetic data has no tokenizer: imagenet (zero-shot, needs text) is skipped, the probes run
    rc = train.main([*SMALL, "eval.every=1", "eval.suites=knn,nyu-depth,imagenet", f"eval.data_root={root}",
                     "eval.limit=4", f"train.run_dir={run_dir}"])
    assert rc == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/knn/kNN CLS#1 top-1 acc" in r]
    assert [r["step"] for r in evals] == [1, 2]
    for r in evals:
        assert 0.0 <= r["eval/knn/kNN CLS#2 top-1 acc"] <= 1.0
        assert math.isfinite(r["eval/nyu-depth/RMSE"]) and r["eval/nyu-depth/seconds"] >= 0
        assert not any(k.startswith("eval/imagenet/") for k in r)
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


@pytest.mark.parametrize("overrides, message", [
    (["eval.suites=knn,cifar", "eval.data_root=DATA"], "eval.suites: unknown suite 'cifar'; choose from imagenet"),
    (["eval.suites=knn"], "eval.data_root: required when eval.suites is set"),
    (["eval.suites=nyu-depth", "eval.data_root=DATA"], "eval.data_root: nyu-depth: missing file DATA/nyu_depth_v2/"
                                                       "nyudepthv2_train_files_with_gt.txt"),
])
def test_a_wrong_suite_or_data_root_stops_the_run_at_start(tmp_path, capsys, overrides, message):
    from fasttips import train
    data = str(tmp_path / "data")
    overrides = [o.replace("DATA", data) for o in overrides]
    rc = train.main([*SMALL, "eval.every=1", *overrides, f"train.run_dir={tmp_path / 'run'}"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.replace("DATA", data) in err[0], err
    assert not (tmp_path / "run").exists()
