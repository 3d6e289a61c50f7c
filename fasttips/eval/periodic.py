"""Evaluation during training (``eval.every=N``): one call per step from the training loop.

``fasttips.train`` (the command) hands the trainer an evaluator that calls ``maybe_evaluate``; the
trainer itself never imports this package:

    evaluate = lambda step, model, tokenizer: maybe_evaluate(step, model, tokenizer, cfg)
    record = evaluate(step, model, loader.tokenizer)      # in the loop, after the step
    if record:
        writer.write(step, record)          # an extra metrics.jsonl line: {"step", "eval/..."}

Every rank must make the call (an FSDP-sharded forward needs all ranks); every rank evaluates the
same images, and only rank 0's writer writes. The eval images are read once and cached.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("fasttips.eval")
_warned = False


def maybe_evaluate(step: int, model, tokenizer, cfg) -> dict | None:
    """``{"eval/<metric>": value, "eval/seconds": s}`` when ``step`` is a multiple of ``cfg.eval.every``
    (> 0), else None. Without a tokenizer (synthetic data) there is nothing to prompt with: None."""
    global _warned
    every = cfg.eval.every
    if every <= 0 or step <= 0 or step % every:
        return None
    if tokenizer is None:
        if not _warned:
            log.warning("eval.every=%d: no tokenizer (data.source=synthetic?), periodic evaluation skipped", every)
            _warned = True
        return None
    from .evaluate import evaluate

    t0 = time.perf_counter()
    result = evaluate(model, tokenizer, cfg)
    record = {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}
    record["eval/seconds"] = time.perf_counter() - t0
    return record
