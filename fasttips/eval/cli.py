"""``fasttips eval RUN_DIR_OR_CHECKPOINT``: zero-shot metrics of a trained model on held-out data.

Writes ``eval.json`` (all metrics, per-class IoU, what was evaluated) and ``pca.png`` (the PCA
picture of patch features for a few images) to ``--out`` and prints a short table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import get_args

from fasttips.argtypes import int_at_least
from fasttips.config import KernelDispatch

DESCRIPTION = __doc__.splitlines()[0]
KERNEL_POLICIES = get_args(KernelDispatch)       # the values of kernels.dispatch


def check_arguments(args) -> str | None:
    """What is wrong with the arguments before any model is loaded (one line), or None."""
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            return "--device cuda, but torch sees no CUDA device; use --device cpu"
    if args.data is not None:
        from fasttips.data.shards import list_shards
        try:
            list_shards(args.data, what="--data")
        except FileNotFoundError as exc:
            return str(exc)
    return None


def default_out_dir(ckpt: Path) -> Path:
    """RUN_DIR/eval/step_N for a checkpoint inside a run (never inside the checkpoint folder: pruning
    old checkpoints would delete it), else a sibling folder eval-<name>."""
    ckpt = Path(ckpt)
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / "eval" / ckpt.name
    return ckpt.parent / f"eval-{ckpt.name}"


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a run dir of 'fasttips train' (newest complete checkpoint) or a step_* folder")
    parser.add_argument("--split", default="eval", choices=("eval", "train", "photos"),
                        help="split of the embedded demo data (default: eval, the held-out procedural scenes "
                             "with exact masks; photos have captions but no masks)")
    parser.add_argument("--data", default=None,
                        help="a folder or glob of .tar shards in the demo caption format instead of the "
                             "demo data (masks and class names are used when the shards carry them)")
    parser.add_argument("--n-images", type=int_at_least(2), default=None,
                        help="evaluate on the first N images, N >= 2 as retrieval needs candidates "
                             "(default: eval.n_images of the run's config)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: RUN_DIR/eval/step_N, outside the checkpoint folder, "
                             "which checkpoint pruning deletes)")
    parser.add_argument("--pca-images", type=int_at_least(0), default=4, help="images in the PCA picture (0 = none)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu or cuda (default: cpu)")
    parser.add_argument("--kernels", default=None, choices=KERNEL_POLICIES,
                        help="how each op picks its implementation on CUDA (default: the run's kernels.dispatch): "
                             "measured = the fastest measured on this device; fasttips = the Triton kernels; "
                             "pytorch = PyTorch's own ops. On the CPU every op runs its PyTorch reference")
    parser.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    from .suites import add_arguments as add_suite_arguments
    add_suite_arguments(parser)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on an argparse sub-parser set (for a single argparse-based CLI)."""
    parser = subparsers.add_parser("eval", help=DESCRIPTION, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(parser)
    parser.set_defaults(func=lambda args: run(args))
    return parser


def configure_kernels(cfg, args) -> None:
    """The run's ``kernels.*`` (``--kernels`` overriding ``kernels.dispatch``), as training used them:
    evaluation on CUDA then runs the implementations the run chose (e.g. measured dispatch, which
    picks fasttips' forward where it wins), or the ones the user names."""
    from fasttips.kernels import dispatch
    from fasttips.training import configure_dispatch
    configure_dispatch(cfg, policy=getattr(args, "kernels", None))
    if args.device == "cuda":
        print(f"fasttips eval: {dispatch.describe('cuda')}", file=sys.stderr, flush=True)


def run(args) -> int:
    from .data import load_eval_set
    from .evaluate import evaluate
    from .loading import CheckpointNotFound, load_for_eval
    from .pca import save_pca_png
    from .report import chance_levels, table, write_json

    problem = check_arguments(args)
    if problem:
        print(f"fasttips eval: {problem}", file=sys.stderr)
        return 2
    try:
        model, tokenizer, cfg, ckpt = load_for_eval(args.path, device=args.device)
    except CheckpointNotFound as e:
        print(f"fasttips eval: {e}", file=sys.stderr)
        return 2
    configure_kernels(cfg, args)
    if args.suite:
        from .suites import run_from_args
        return run_from_args(args, model, tokenizer, cfg, default_out=default_out_dir(ckpt))
    n = args.n_images or cfg.eval.n_images
    try:
        eval_set = load_eval_set(cfg, split=args.split, path=args.data, n_images=n)
    except (OSError, ValueError) as exc:         # no usable sample, unreadable shards: one line
        print(f"fasttips eval: {exc}", file=sys.stderr)
        return 2
    result, feats = evaluate(model, tokenizer, cfg, eval_set=eval_set, n_images=n, per_class=True,
                             return_features=True)
    result["checkpoint"] = str(ckpt)
    result["split"] = args.data or args.split

    out = Path(args.out) if args.out else default_out_dir(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", result)
    if args.pca_images > 0:
        k = min(args.pca_images, len(eval_set))
        grid = model.vision.patch_embed.grid(*eval_set.images.shape[-2:])
        save_pca_png(out / "pca.png", feats["patch"][:k], grid, eval_set.images[:k])
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{ckpt}  ({result['n_images']} images, split {result['split']})")
        print(table({"value": result, "chance": chance_levels(result, eval_set)}))
        print(f"wrote {out / 'eval.json'}" + (f" and {out / 'pca.png'}" if args.pca_images > 0 else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _configure(argparse.ArgumentParser(prog="fasttips eval", description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
