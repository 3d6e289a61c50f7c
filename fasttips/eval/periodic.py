"""Evaluation during training (``eval.every=N``): one call per step from the training loop.

``fasttips.train`` (the command) hands the trainer an evaluator that calls ``maybe_evaluate``; the
trainer itself never imports this package:

    evaluate = lambda step, model, tokenizer: maybe_evaluate(step, model, tokenizer, cfg)
    record = evaluate(step, model, loader.tokenizer)      # in the loop, after the step
    if record:
        writer.write(step, record)          # an extra metrics.jsonl line: {"step", "eval/..."}

What runs: the demo evaluation (``evaluate``, keys ``eval/<metric>``), or with ``eval.suites`` those
benchmark suites on ``eval.data_root`` (keys ``eval/<suite>/<metric>``), at the run's input size
(``data.global_size`` for every size option; segmentation windows every 3/4 of it), fp32, the first
``eval.limit`` samples of each split when set, quietly (no progress lines, no suites.json).

Every rank must make the call (an FSDP-sharded forward needs all ranks); every rank evaluates the
same images (and trains the same probes, seeded), and only rank 0's writer writes. The demo eval
images are read once and cached.
"""
from __future__ import annotations

import io
import logging
import time

log = logging.getLogger("fasttips.eval")
_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _warned:
        log.warning(msg, *args)
        _warned.add(key)


def maybe_evaluate(step: int, model, tokenizer, cfg) -> dict | None:
    """``{"eval/<metric>": value, "eval/seconds": s}`` (with ``eval.suites``: ``eval/<suite>/<metric>``
    and ``eval/<suite>/seconds``) when ``step`` is a multiple of ``cfg.eval.every`` (> 0), else None.
    Without a tokenizer (synthetic data) only suites that need no text run; the demo evaluation needs
    one, so then nothing runs."""
    every = cfg.eval.every
    if every <= 0 or step <= 0 or step % every:
        return None
    if cfg.eval.suites.strip():
        return evaluate_suites(model, tokenizer, cfg)
    if tokenizer is None:
        _warn_once("demo", "eval.every=%d: no tokenizer (data.source=synthetic?), periodic evaluation skipped", every)
        return None
    from .evaluate import evaluate

    t0 = time.perf_counter()
    result = evaluate(model, tokenizer, cfg)
    record = {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}
    record["eval/seconds"] = time.perf_counter() - t0
    return record


def check_suites(cfg) -> None:
    """``eval.suites`` names known suites whose datasets are laid out under ``eval.data_root``; else a
    ``ConfigError`` with one line naming the field (the unknown name, or the first missing file)."""
    from pathlib import Path

    from fasttips.config import ConfigError

    from .suites import DatasetLayoutError, parse_suites
    from .suites.registry import REGISTRY
    if not cfg.eval.suites.strip():
        return
    try:
        suites = parse_suites(cfg.eval.suites)
    except ValueError as exc:
        raise ConfigError(f"eval.suites: {str(exc).removeprefix('--suite: ')}") from None
    for name in suites:
        try:
            REGISTRY[name].load().check_layout(Path(cfg.eval.data_root) / REGISTRY[name].default_dir, name)
        except DatasetLayoutError as exc:
            raise ConfigError(f"eval.data_root: {exc}") from None


def evaluate_suites(model, tokenizer, cfg) -> dict | None:
    """The ``eval.suites`` benchmarks on ``eval.data_root``, flattened for metrics.jsonl."""
    from .suites import parse_suites, run_suites
    from .suites.registry import REGISTRY

    suites = parse_suites(cfg.eval.suites)
    if tokenizer is None:
        skipped = [s for s in suites if REGISTRY[s].text]
        if skipped:
            _warn_once("suites", "eval.suites: no tokenizer (data.source=synthetic?), skipping %s", ", ".join(skipped))
        suites = [s for s in suites if not REGISTRY[s].text]
        if not suites:
            return None
    device = next(model.parameters()).device
    size = cfg.data.global_size
    payload = run_suites(model, tokenizer, cfg, suites, cfg.eval.data_root, device=device,
                         batch_size=cfg.data.batch_size, image_size=size, seg_size=size,
                         seg_stride=max(1, size * 3 // 4), limit=cfg.eval.limit or None, progress_every=0,
                         log=io.StringIO())               # no suite chatter between the training lines
    record = {}
    for suite, result in payload["suites"].items():
        for name, value in result["metrics"].items():
            record[f"eval/{suite}/{name}"] = value
        record[f"eval/{suite}/seconds"] = result["seconds"]
    return record
