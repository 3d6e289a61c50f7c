"""Loading a model for evaluation from DCP checkpoints on one process, with no process group."""
import pytest
import torch
import torch.distributed.checkpoint as dcp

from fasttips import config as config_mod
from fasttips.data.tokenizer import Tokenizer
from fasttips.eval.loading import CheckpointNotFound, load_for_eval, resolve_checkpoint
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
