"""Optional Weights & Biases logging beside metrics.jsonl and TensorBoard (``train.wandb_project``).

The same scalars as TensorBoard (every numeric field of a metrics line, at its step), the resolved
config once at the start, and the loss-curve PNG at the end. ``wandb`` is imported only when a
project is set, with a one-line error naming the extra when it is missing. The W&B run id is kept in
the run folder (``wandb-run-id``) so that ``fasttips train --resume`` continues the same W&B run.
``train.wandb_mode=offline`` writes under ``RUN_DIR/wandb`` for a later ``wandb sync``.
"""
from __future__ import annotations

import importlib
import math
import secrets
from pathlib import Path

RUN_ID_FILE = "wandb-run-id"


class WandbMissing(RuntimeError):
    """train.wandb_project is set but the wandb package is not importable."""


def import_wandb():
    try:
        return importlib.import_module("wandb")
    except ImportError as exc:
        raise WandbMissing("train.wandb_project is set, but wandb is not installed: "
                           "pip install 'fasttips[wandb]' (or leave train.wandb_project empty)") from exc


def _run_id(run_dir: Path) -> str:
    """The W&B run id of this run folder: read back on resume, made (and written) on the first start."""
    path = run_dir / RUN_ID_FILE
    if path.is_file():
        text = path.read_text().strip()
        if text:
            return text
    run_id = secrets.token_hex(4)
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


class WandbWriter:
    """One W&B run; ``write`` logs a metrics record's numbers, ``log_image`` a PNG, ``close`` finishes."""

    def __init__(self, run_dir: str | Path, project: str, mode: str = "online", config: dict | None = None,
                 module=None):
        self.wandb = module or import_wandb()
        run_dir = Path(run_dir)
        self.run = self.wandb.init(project=project, mode=mode, dir=str(run_dir), config=config or {},
                                   id=_run_id(run_dir), resume="allow", name=run_dir.name)

    def write(self, step: int, record: dict) -> None:
        scalars = {k: v for k, v in record.items() if k != "step" and _is_number(v)}
        if scalars:
            self.run.log(scalars, step=step)

    def log_image(self, key: str, png: str | Path, step: int | None = None) -> None:
        self.run.log({key: self.wandb.Image(str(png))}, step=step)

    def close(self) -> None:
        self.run.finish()


def _is_number(value) -> bool:
    # bool is an int: log it as 0/1 like TensorBoard would; drop None and the "nan"/"inf" strings
    return isinstance(value, (int, float)) and math.isfinite(float(value))


def wandb_writer(cfg, run_dir: str | Path, module=None) -> WandbWriter | None:
    """The writer the config asks for, or None when ``train.wandb_project`` is empty."""
    project = getattr(cfg.train, "wandb_project", "")
    if not project:
        return None
    from fasttips import config as config_lib
    return WandbWriter(run_dir, project, mode=cfg.train.wandb_mode, config=config_lib.to_dict(cfg),
                       module=module)


__all__ = ["WandbWriter", "WandbMissing", "wandb_writer", "import_wandb", "RUN_ID_FILE"]
