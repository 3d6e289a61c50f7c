"""Load a trained model (and its tokenizer and config) for evaluation on one CPU process.

Accepts a run directory (the newest complete checkpoint under ``<run>/checkpoints`` is used) or one
checkpoint folder (``step_XXXXXXXX`` holding ``COMPLETE``). The DCP shards are read with
``torch.distributed.checkpoint.load`` and no process group, which reassembles FSDP-sharded tensors
into plain ones whatever the world size of the training run was.

Before anything is read, the checkpoint's files are checked against the sizes and checksums recorded
when it was written (``MANIFEST.json``), and what would be unpickled (DCP's ``.metadata`` and
non-tensor items) is checked to hold only DCP's own records: a checkpoint from elsewhere is data, never
code. Given a run dir, a damaged newest checkpoint is passed over for the newest intact one, with a
warning naming the file; given one damaged checkpoint folder, :class:`DamagedCheckpointError` says what
is wrong in one line. Checkpoints of older fasttips versions (no manifest) load after a structural
check, with a note.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from fasttips import config as config_mod
from fasttips.distributed.checkpoint import (MANIFEST, MARKER, DamagedCheckpoint, check_checkpoint, load_dcp,
                                             newest_intact, saved_keys)


class CheckpointNotFound(FileNotFoundError):
    pass


class DamagedCheckpointError(CheckpointNotFound):
    """The checkpoint's files do not match what was recorded when it was written."""


def _warn(message: str) -> None:
    print(f"fasttips eval: warning: {message}", file=sys.stderr, flush=True)


def _note_unverified(ckpt: Path, warn) -> None:
    warn(f"{ckpt} has no {MANIFEST} (written by an older fasttips): its files are not checksummed")


def resolve_checkpoint(path: str | Path, warn=_warn) -> Path:
    """A run dir or a checkpoint folder → the (verified) checkpoint folder to load."""
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFound(f"RUN_DIR_OR_CHECKPOINT: {str(p)!r} does not exist")
    if (p / MARKER).is_file():
        verdict = check_checkpoint(p)
        if verdict.problems:
            raise DamagedCheckpointError(f"checkpoint {p} is damaged: {verdict.describe()}")
        if not verdict.verified:
            _note_unverified(p, warn)
        return p
    if p.name.startswith("step_") and not (p / MARKER).is_file():
        raise CheckpointNotFound(f"RUN_DIR_OR_CHECKPOINT: {p} is an incomplete checkpoint (no {MARKER} "
                                 "marker: its write never finished)")
    passed_over: list[str] = []        # said once an intact one is found (else the error names them)
    try:
        latest = newest_intact(p / "checkpoints", on_damaged=lambda ckpt, verdict: passed_over.append(
            f"checkpoint {ckpt.name} is damaged ({verdict.describe()}); using the previous one"))
    except DamagedCheckpoint as exc:
        raise DamagedCheckpointError(str(exc)) from None
    for message in passed_over:
        warn(message)
    if latest is None:
        raise CheckpointNotFound(f"RUN_DIR_OR_CHECKPOINT: {p} holds no complete checkpoint under "
                                 f"{p / 'checkpoints'}; pass a run dir of 'fasttips train' or a step_* folder")
    if not latest[2].verified:
        _note_unverified(latest[1], warn)
    return latest[1]


def _model_prefix(saved_keys: set[str], model_keys: list[str]) -> str:
    """The prefix under which the trainer stored the model's state dict ("model." usually)."""
    probe = next(k for k in model_keys if k.startswith("vision."))
    candidates = [k[: -len(probe)] for k in saved_keys if k.endswith(probe)]
    # the shortest prefix is the student (a full-EMA teacher would sit under a longer one)
    for prefix in sorted(candidates, key=len):
        if all(prefix + k in saved_keys for k in model_keys if k.startswith(("vision.", "text."))):
            return prefix
    raise KeyError(f"checkpoint holds no vision/text weights matching the model (looked for '*{probe}')")


def load_model_weights(model: torch.nn.Module, ckpt: Path) -> list[str]:
    """Fill ``model`` from the DCP shards in ``ckpt``; return the model keys that were not found
    (heads of a different layout, say). The vision and text towers must be complete."""
    # checked by resolve_checkpoint; these are the last line of defence (and the only safe readers)
    try:
        saved = saved_keys(ckpt)
    except (OSError, DamagedCheckpoint) as exc:
        raise DamagedCheckpointError(f"checkpoint {ckpt}: cannot read .metadata ({_first_line(exc)})") from None
    own = model.state_dict()
    prefix = _model_prefix(saved, list(own))
    wanted = {prefix + k: v for k, v in own.items() if prefix + k in saved}
    try:
        load_dcp(wanted, ckpt)
    except Exception as exc:
        raise DamagedCheckpointError(f"checkpoint {ckpt}: cannot read its shards "
                                     f"({type(exc).__name__}: {_first_line(exc)})") from None
    model.load_state_dict({k[len(prefix):]: v for k, v in wanted.items()}, strict=False)
    return [k for k in own if prefix + k not in saved]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def load_for_eval(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, cfg, checkpoint folder) from a run dir or a checkpoint."""
    from fasttips.data.tokenizer import Tokenizer
    from fasttips.models import build_model

    ckpt = resolve_checkpoint(path)
    cfg_file = ckpt / "config.yaml"
    if not cfg_file.is_file():
        cfg_file = ckpt.parent.parent / "config.yaml"      # the run dir's resolved config
    if not cfg_file.is_file():
        raise CheckpointNotFound(f"{ckpt}: no config.yaml in the checkpoint or its run dir")
    cfg = config_mod.load(cfg_file)
    tok_file = ckpt / "tokenizer.model"
    if not tok_file.is_file():
        raise CheckpointNotFound(f"{ckpt}: no tokenizer.model (checkpoints carry the tokenizer they trained with)")
    tokenizer = Tokenizer.from_bytes(tok_file.read_bytes(), max_len=cfg.text.max_len)
    model = build_model(cfg, device="cpu")
    load_model_weights(model, ckpt)
    return model.to(device).eval(), tokenizer, cfg, ckpt
