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
