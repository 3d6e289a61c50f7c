"""``fasttips ablate ibot-vs-ibotpp``: the TIPSv2 iBOT++ claim at toy scale.

Trains the ``tiny`` preset twice per seed, everything equal (seed, data order, initialisation,
steps) except ``loss.ibot_tokens``: ``masked`` (DINOv2 iBOT: patch loss on masked tokens only) and
``all`` (TIPSv2 iBOT++: patch loss on every token). Both runs are evaluated on the held-out demo
scenes and the metrics are printed side by side with the seeds, plus the mean over seeds and the
difference (iBOT++ − iBOT). A run whose final checkpoint already exists is not trained again, so an
interrupted ablation resumes where it stopped.

The runs use the preset's own schedule (for ``tiny``: 300 steps, ``optim.lr=8e-3``, i.e. a peak of
1e-3 after the sqrt(batch/1024) scaling at batch 16, and a 30-step warm-up; docs/ablation.md);
key=value overrides apply to both runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

VARIANTS = (("masked", "iBOT"), ("all", "iBOT++"))
ABLATIONS = ("ibot-vs-ibotpp",)
SUMMARY_ROWS = (
    ("seg/miou", "zero-shot seg mIoU"),
    ("seg/pixel_acc", "zero-shot seg pixel acc"),
    ("seg/miou_fg", "seg mIoU, objects only"),
    ("seg/pixel_acc_fg", "seg pixel acc, objects only"),
    ("cls/cls1_acc", "zero-shot cls acc, CLS#1"),
    ("cls/cls2_acc", "zero-shot cls acc, CLS#2"),
    ("ret/cls1_alt/i2t_r1", "CLS#1-alt  I->T R@1"),
    ("ret/cls1_alt/t2i_r1", "CLS#1-alt  T->I R@1"),
    ("ret/cls2_short/i2t_r1", "CLS#2-short I->T R@1"),
    ("ret/cls2_short/t2i_r1", "CLS#2-short T->I R@1"),
    ("ret/cls2_long/i2t_r1", "CLS#2-long I->T R@1"),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fasttips ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ablation", choices=ABLATIONS, help="which ablation to run")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default: 0,1,2)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per run (default: the preset's train.steps; 300 for tiny)")
    p.add_argument("--preset", default="tiny", help="config preset (default: tiny)")
    p.add_argument("--out", default="runs/ablate-ibot", help="folder for the runs and ablation.json")
    p.add_argument("--n-images", type=int, default=None, help="eval images (default: eval.n_images)")
    p.add_argument("--device", default="cpu", help="train.device for every run (default: cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is much faster on a busy machine)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="extra config overrides applied to BOTH runs (e.g. data.batch_size=8)")
    return p


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers like 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: need at least one seed and no repeats, got {text!r}")
    return seeds


def train_overrides(args, seed: int, tokens: str, run_dir: Path) -> list[str]:
    """The only differences between the two runs of a seed are ``loss.ibot_tokens`` and the run dir."""
    over = [f"preset={args.preset}", f"train.seed={seed}", f"loss.ibot_tokens={tokens}",
            f"train.run_dir={run_dir}", f"train.device={args.device}", "eval.every=0"]
    if args.steps is not None:
        over.append(f"train.steps={args.steps}")
    return over + list(args.overrides)


def _finished(run_dir: Path, steps: int) -> bool:
    from fasttips.distributed.checkpoint import latest_checkpoint
    latest = latest_checkpoint(run_dir / "checkpoints")
    return latest is not None and latest[0] >= steps


def _step_seconds(run_dir: Path) -> float:
    """Total training step time logged in the run's metrics.jsonl (excludes start-up and evaluation;
    also right for a run trained by an earlier invocation)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return float("nan")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum(r.get("step_time_s", 0.0) for r in records if "loss" in r)


def train_and_evaluate(args, seed: int, tokens: str, out: Path, eval_set_cache: dict) -> dict:
    from fasttips import config as config_mod
    from fasttips import train

    from fasttips.eval.data import load_eval_set
    from fasttips.eval.evaluate import evaluate
    from fasttips.eval.loading import load_for_eval

    run_dir = out / f"seed{seed}-{tokens}"
    over = train_overrides(args, seed, tokens, run_dir)
    steps = config_mod.load(None, over).train.steps    # training always checkpoints its last step
    if _finished(run_dir, steps):
        print(f"[ablate] {run_dir}: already trained, evaluating", flush=True)
    else:
        print(f"[ablate] training {run_dir}: fasttips train {' '.join(over)}", flush=True)
        rc = train.main(["--no-progress", *over])
        if rc not in (0, None):
            raise RuntimeError(f"training {run_dir} failed with exit code {rc}")
    model, tokenizer, cfg, ckpt = load_for_eval(run_dir)
    n = args.n_images or cfg.eval.n_images
    key = (n, cfg.data.global_size)
    if key not in eval_set_cache:
        eval_set_cache[key] = load_eval_set(cfg, n_images=n)
    result = evaluate(model, tokenizer, cfg, eval_set=eval_set_cache[key], n_images=n)
    result.update(seed=seed, ibot_tokens=tokens, checkpoint=str(ckpt),
                  train_step_seconds=round(_step_seconds(run_dir), 1), overrides=over)
    return result


def constant_baseline(eval_set) -> dict[str, float]:
    """Segmentation scores of a constant prediction: "background" everywhere for the all-class
    metrics, the best single object class on object pixels for the objects-only ones. A model must
    beat these before its mIoU says anything about patch-text alignment."""
    import torch

    from fasttips.eval.evaluate import BACKGROUND
    from fasttips.eval.metrics import IGNORE_INDEX, confusion_matrix, mean_iou, pixel_accuracy
    if eval_set.masks is None or BACKGROUND not in eval_set.class_names:
        return {}
    C, bg, masks = len(eval_set.class_names), eval_set.class_names.index(BACKGROUND), eval_set.masks
    cm = confusion_matrix(torch.full_like(masks, bg), masks, C)
    out = {"seg/miou": mean_iou(cm), "seg/pixel_acc": pixel_accuracy(cm)}
    objects = masks.masked_fill(masks == bg, IGNORE_INDEX)
    fg = [confusion_matrix(torch.full_like(masks, c), objects, C) for c in range(C) if c != bg]
    out["seg/miou_fg"] = max(mean_iou(cm) for cm in fg)
    out["seg/pixel_acc_fg"] = max(pixel_accuracy(cm) for cm in fg)
    return out


def summarize(results: list[dict], seeds: list[int]) -> dict[str, dict]:
    """Table columns: each run, then the mean over seeds per variant and the difference."""
    columns: dict[str, dict] = {}
    for seed in seeds:
        for tokens, name in VARIANTS:
            columns[f"{name} s{seed}"] = next(r for r in results if r["seed"] == seed and r["ibot_tokens"] == tokens)
    means = {}
    for tokens, name in VARIANTS:
        runs = [r for r in results if r["ibot_tokens"] == tokens]
        means[name] = {k: statistics.fmean(r[k] for r in runs) for k, _ in SUMMARY_ROWS
                       if all(isinstance(r.get(k), float) for r in runs)}
        columns[f"{name} mean"] = means[name]
    columns["diff"] = {k: means["iBOT++"][k] - means["iBOT"][k] for k in means["iBOT++"] if k in means["iBOT"]}
    if len(seeds) > 1:   # spread of the per-seed paired differences: is the mean diff more than noise?
        pairs = [(columns[f"iBOT s{s}"], columns[f"iBOT++ s{s}"]) for s in seeds]
        columns["diff sd"] = {k: statistics.stdev(b[k] - a[k] for a, b in pairs) for k in columns["diff"]}
    return columns


def main(argv: list[str] | None = None) -> int:
    from fasttips.eval.report import table

    args = _parser().parse_intermixed_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        print(f"fasttips ablate: {e}", file=sys.stderr)
        return 2
    if args.threads is not None:
        import torch
        torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, cache = [], {}
    for seed in seeds:
        for tokens, _ in VARIANTS:
            results.append(train_and_evaluate(args, seed, tokens, out, cache))
    columns = summarize(results, seeds)
    baseline = constant_baseline(next(iter(cache.values())))
    text = table({**columns, "constant": baseline}, rows=SUMMARY_ROWS)
    command = "fasttips ablate " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {"command": command, "seeds": seeds, "runs": results, "mean": {k: v for k, v in columns.items()
                                                                          if k.endswith("mean") or k.startswith("diff")},
               "constant_baseline": baseline}
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    print(f"\niBOT (loss.ibot_tokens=masked) vs iBOT++ (loss.ibot_tokens=all), seeds {seeds}, "
          f"{results[0]['n_images']} eval images (values in %, diff = iBOT++ - iBOT, diff sd = "
          f"its standard deviation over seeds; constant = "
          f"predicting background everywhere, or the best single class on object pixels)")
    print(text)
    print(f"wrote {out / 'ablation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
