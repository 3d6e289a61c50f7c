"""Loading a model for evaluation from DCP checkpoints on one process, with no process group."""
import argparse
import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

from fasttips import config as config_mod
from fasttips.data.tokenizer import Tokenizer
from fasttips.eval.loading import CheckpointNotFound, DamagedCheckpointError, load_for_eval, resolve_checkpoint
from fasttips.models import build_model

TINY = ["vision.width=64", "vision.depth=1", "vision.heads=1", "vision.mlp_hidden=64", "text.depth=1",
        "text.vocab_size=64", "heads.hidden=32", "heads.bottleneck=16", "heads.prototypes=32"]


def write_fake_checkpoint(run_dir, step, prefix="model"):
    cfg = config_mod.load(None, TINY)
    model = build_model(cfg, device="cpu")
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    dcp.save({prefix: model.state_dict(), "optim": {"step": torch.tensor([step])}}, checkpoint_id=str(ckpt))
    config_mod.save(cfg, ckpt / "config.yaml")
    tok = Tokenizer.train(["a red circle on grass", "a blue square under the sky"] * 20, vocab_size=40)
    (ckpt / "tokenizer.model").write_bytes(tok.serialized())
    (ckpt / "COMPLETE").write_text(f"{step}\n")
    return model, ckpt


def test_load_for_eval_restores_the_weights(tmp_path, seed):
    saved, ckpt = write_fake_checkpoint(tmp_path, 7)
    write_fake_checkpoint(tmp_path, 3)               # an older one: the newest must win
    (tmp_path / "checkpoints" / "step_00000009").mkdir()   # no marker: must be ignored
    model, tokenizer, cfg, found = load_for_eval(tmp_path)
    assert found == ckpt and not model.training
    assert cfg.vision.width == 64 and tokenizer.max_len == cfg.text.max_len
    for (name, a), (_, b) in zip(model.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(a, b), name
    ids, pad = tokenizer.encode(["a red circle"])
    assert model.text(ids, pad).shape == (1, 64)


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointNotFound, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointNotFound, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "step_00000001").mkdir()
    with pytest.raises(CheckpointNotFound, match="incomplete"):
        resolve_checkpoint(tmp_path / "step_00000001")


def _with_manifest(ckpt):
    from fasttips.distributed.checkpoint import build_manifest
    (ckpt / "meta.json").write_text('{"step": %d}' % int(ckpt.name.split("_")[1]))
    (ckpt / "MANIFEST.json").write_text(json.dumps(build_manifest(ckpt)))
    return ckpt


def test_a_damaged_newest_checkpoint_is_passed_over_with_a_warning(tmp_path, seed):
    _with_manifest(write_fake_checkpoint(tmp_path, 3)[1])
    _, newest = write_fake_checkpoint(tmp_path, 7)
    _with_manifest(newest)
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    warnings = []
    found = resolve_checkpoint(tmp_path, warn=warnings.append)
    assert found.name == "step_00000003" and newest.exists()     # eval reads; it never moves anything
    assert len(warnings) == 1 and "step_00000007 is damaged" in warnings[0] and shard.name in warnings[0]
    with pytest.raises(DamagedCheckpointError, match=rf"step_00000007 is damaged: {shard.name}: 100 bytes"):
        resolve_checkpoint(newest)


def test_eval_on_a_damaged_checkpoint_says_so_in_one_line(tmp_path, seed, capsys):
    from fasttips.eval import cli
    _, ckpt = write_fake_checkpoint(tmp_path, 5)
    _with_manifest(ckpt)
    metadata = ckpt / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:-10])
    parser = cli._configure(argparse.ArgumentParser())
    assert cli.run(parser.parse_args([str(ckpt)])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ".metadata" in err and "damaged" in err, err
    assert not (ckpt / "eval").exists()


def test_older_checkpoints_without_manifest_load_with_a_note(tmp_path, seed):
    _, ckpt = write_fake_checkpoint(tmp_path, 7)
    notes = []
    assert resolve_checkpoint(ckpt, warn=notes.append) == ckpt
    assert len(notes) == 1 and "no MANIFEST.json" in notes[0]
    # a truncated shard is still caught, from DCP's own record of where the tensors end
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(DamagedCheckpointError, match="truncated"):
        resolve_checkpoint(ckpt, warn=notes.append)


# ------------------------------------------------------------------------------------------------
# A run from someone else is data: a .metadata pickle that would run code is refused on every path
# that reads a run (eval, import, train.init_from; --resume in test_resume_checks.py)
# ------------------------------------------------------------------------------------------------
class _Touch:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("manifest", [True, False], ids=["with-manifest", "older-fasttips"])
def test_a_metadata_payload_runs_no_code_on_eval_import_and_init_from(tmp_path, seed, capsys, manifest):
    import pickle

    from fasttips.eval import cli as eval_cli
    from fasttips.interop import warmstart
    run = tmp_path / "run"
    _, ckpt = write_fake_checkpoint(run, 5)
    if manifest:
        _with_manifest(ckpt)
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Touch(marker)))
    if manifest:                                    # whoever planted it also rewrote the checksums
        (ckpt / "MANIFEST.json").unlink()
        _with_manifest(ckpt)
    parser = eval_cli._configure(argparse.ArgumentParser())
    assert eval_cli.run(parser.parse_args([str(run)])) == 2
    assert not marker.exists(), "fasttips eval ran the payload"
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ".metadata: asks to unpickle posix.system" in err, err
    warmstart._CACHE.clear()
    from fasttips.interop import cli as interop_cli
    assert interop_cli.main(["import", str(run), str(tmp_path / "imported")]) == 2
    assert not marker.exists(), "fasttips import ran the payload"
    err = capsys.readouterr().err.strip()
    assert err.startswith("fasttips import:") and "posix.system" in err and len(err.splitlines()) == 1, err
    from fasttips.train import main as train_main
    warmstart._CACHE.clear()
    assert train_main([f"train.init_from={run}", f"train.run_dir={tmp_path / 'warm'}"]) == 2
    assert not marker.exists(), "train.init_from ran the payload"
    err = capsys.readouterr().err.strip()
    assert "config error: train.init_from:" in err and "posix.system" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "imported" / "checkpoints").exists()


def test_a_normal_checkpoint_still_loads_on_eval_import_and_init_from(tmp_path, seed):
    from fasttips.interop import cli as interop_cli
    from fasttips.interop import init_from, resolve_init_config, warmstart
    saved, ckpt = write_fake_checkpoint(tmp_path / "run", 5)
    _with_manifest(ckpt)
    model, *_ = load_for_eval(tmp_path / "run")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
    warmstart._CACHE.clear()
    assert interop_cli.main(["import", str(tmp_path / "run"), str(tmp_path / "imported")]) == 0
    imported, *_ = load_for_eval(tmp_path / "imported")
    assert torch.equal(imported.vision.patch_embed.proj.weight, saved.vision.patch_embed.proj.weight)
    warmstart._CACHE.clear()
    cfg, _ = resolve_init_config(config_mod.load(None, TINY), tmp_path / "run")
    fresh = build_model(cfg, device="cpu")
    init_from(fresh, tmp_path / "run", cfg)
    assert torch.equal(fresh.text.token_embed.weight, saved.text.token_embed.weight)


def test_eval_of_a_checkpoint_that_lost_its_manifest_says_so(tmp_path, seed):
    _, ckpt = write_fake_checkpoint(tmp_path, 5)
    _with_manifest(ckpt)
    (ckpt / "meta.json").write_text('{"step": 5, "manifest": "MANIFEST.json"}')   # as fasttips writes it
    (ckpt / "MANIFEST.json").unlink()
    shard = next(ckpt.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x5A
    shard.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpointError, match="MANIFEST.json: missing"):
        resolve_checkpoint(ckpt)


def test_eval_of_a_run_warns_about_a_step_folder_without_its_marker(tmp_path, seed):
    _with_manifest(write_fake_checkpoint(tmp_path, 3)[1])
    _, newest = write_fake_checkpoint(tmp_path, 7)
    (newest / "COMPLETE").unlink()
    warnings = []
    assert resolve_checkpoint(tmp_path, warn=warnings.append).name == "step_00000003"
    assert len(warnings) == 1 and "step_00000007" in warnings[0] and "no COMPLETE marker" in warnings[0]


@pytest.mark.parametrize("flag, expected", [([], "pytorch"), (["--kernels", "fasttips"], "fasttips")])
def test_eval_runs_the_kernels_the_run_chose_unless_told_otherwise(tmp_path, seed, monkeypatch, flag, expected):
    """`fasttips eval` applies the run's kernels.* (here kernels.dispatch=pytorch, not the default
    measured) before the model runs; --kernels overrides the policy."""
    from fasttips.eval import cli as eval_cli
    from fasttips.eval import data as eval_data
    from fasttips.kernels import dispatch
    _, ckpt = write_fake_checkpoint(tmp_path, 5)
    cfg = config_mod.load(None, TINY + ["kernels.dispatch=pytorch", "kernels.budget_s=7"])
    config_mod.save(cfg, ckpt / "config.yaml")
    _with_manifest(ckpt)
    seen = {}

    def stop_before_the_data(*args, **kwargs):          # the policy in force when the model would run
        seen.update(policy=dispatch.settings().policy, budget=dispatch.settings().budget_s)
        raise ValueError("stop here")
    monkeypatch.setattr(eval_data, "load_eval_set", stop_before_the_data)
    dispatch.reset()
    try:
        parser = eval_cli._configure(argparse.ArgumentParser())
        assert eval_cli.run(parser.parse_args([str(tmp_path), *flag])) == 2
    finally:
        dispatch.reset()
    assert seen == {"policy": expected, "budget": 7.0}
