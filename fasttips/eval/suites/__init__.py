"""Standard benchmarks with the TIPS protocol, read from local dataset folders (nothing is downloaded).

Suites (listed in ``registry.py``): ``imagenet`` (zero-shot classification), ``coco`` and ``flickr30k``
(image-text retrieval, Karpathy test split), ``docci`` (long-description retrieval), ``ade20k``,
``voc``, ``context`` (zero-shot segmentation), ``knn`` (k-NN probe on frozen CLS features), and the
linear probes on frozen features: ``linear`` (ImageNet), ``ade20k-linear``, ``voc-linear``
(segmentation), ``nyu-depth``, ``nyu-normals``.
``run_suites`` runs a list of them on a loaded model; ``add_arguments`` and ``run_from_args`` hook them
into ``fasttips eval``. Layouts, protocols and how to add a suite: docs/eval_suites.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .common import PRECISIONS, DatasetLayoutError, SuiteContext
from .registry import REGISTRY

# the built-in suites and their folders under --data-root (the functions below read REGISTRY itself)
DEFAULT_DIRS = {name: spec.default_dir for name, spec in REGISTRY.items()}
SUITES = tuple(REGISTRY)
JSON_NAME = "suites.json"
PROBE_MODULES = ("linear", "seg_linear", "nyu_depth", "nyu_normals")     # suites that train a probe

__all__ = ["SUITES", "DatasetLayoutError", "add_arguments", "parse_suites", "run_suites", "run_from_args"]


def parse_suites(text: str) -> list[str]:
    """"imagenet,coco" → ["imagenet", "coco"]; "all" → every suite; unknown names are an error."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if names == ["all"]:
        return list(REGISTRY)
    bad = [n for n in names if n not in REGISTRY]
    if bad or not names:
        raise ValueError(f"--suite: unknown suite {bad[0] if bad else text!r}; choose from {', '.join(REGISTRY)} "
                         "(comma-separated) or 'all'")
    return list(dict.fromkeys(names))


def _parse_roots(pairs: list[str] | None) -> dict[str, Path]:
    roots = {}
    for pair in pairs or []:
        name, sep, path = pair.partition("=")
        if not sep or name not in REGISTRY:
            raise ValueError(f"--suite-root: expected SUITE=PATH with SUITE one of {', '.join(REGISTRY)}, got {pair!r}")
        roots[name] = Path(path)
    return roots


def _check_layout(suite: str, root: Path) -> None:
    """List the suite's files now, so a wrong layout stops the run before hours of other suites."""
    REGISTRY[suite].load().check_layout(root, suite)


def _run_one(ctx: SuiteContext, suite: str, root: Path) -> dict:
    return REGISTRY[suite].load().run(ctx, root, suite)


def run_suites(model, tokenizer, cfg, suites: list[str], data_root: str | Path | None, device="cpu",
               batch_size: int = 64, out_dir: str | Path | None = None, *, roots: dict[str, Path] | None = None,
               image_size: int | None = None, workers: int = 0, progress_every: int = 50,
               limit: int | None = None, seg_size: int = 448, seg_stride: int = 336,
               seg_tokens: str = "values", precision: str = "fp32", log=None, probe_epochs: int | None = None,
               probe_lrs: tuple[float, ...] | None = None, probe_batch_size: int | None = None,
               probe_cache: str | Path | None = None) -> dict:
    """Run ``suites`` on ``model``; return {"suites": {suite: result}, "settings": {...}} and, with
    ``out_dir``, write it to ``out_dir/suites.json`` after every suite (a crash keeps finished ones).

    ``precision``: "fp32" (default; the TIPS release evaluates in fp32) or "bf16" (the encoders under
    bf16 autocast). kNN similarities are fp32 either way.

    ``probe_*`` change the linear probes' training (default: each probe's recipe in ``probe.py``):
    epochs, the learning-rate grid, the batch, and a folder for memory-mapped features (default RAM).

    Each result holds "metrics" and "chance" ({name: fraction}) plus counts. Raises
    ``DatasetLayoutError`` (a one-line message naming the missing file or folder) before any suite runs
    when a dataset folder is not laid out as expected."""
    from .report import write_json

    for s in suites:
        if s not in REGISTRY:
            raise ValueError(f"suites: unknown suite {s!r}; choose from {', '.join(REGISTRY)}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision: {precision!r}; choose from {', '.join(PRECISIONS)}")
    if seg_tokens not in ("values", "final"):
        raise ValueError(f"seg_tokens: {seg_tokens!r}; choose 'values' (TIPS protocol) or 'final'")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    roots = dict(roots or {})
    for s in suites:
        if s not in roots:
            if data_root is None:
                raise ValueError(f"--data-root: needed for suite {s!r} (or give --suite-root {s}=PATH)")
            roots[s] = Path(data_root) / REGISTRY[s].default_dir
    for s in suites:
        _check_layout(s, roots[s])

    size = image_size or (cfg.data.global_size if cfg is not None else 224)
    pixel_norm = cfg.data.pixel_norm if cfg is not None else "tips"
    patch = model.vision.patch_embed.patch_size
    inputs = {REGISTRY[s].input for s in suites}
    checks = [("--image-size", size, "image" in inputs), ("--seg-size", seg_size, "seg" in inputs)]
    for flag, value, used in checks:
        if used and (value < patch or value % patch):
            raise ValueError(f"{flag}: {value} is not a positive multiple of the patch size {patch}")
    if seg_stride < 1:
        raise ValueError(f"--seg-stride: must be >= 1, got {seg_stride}")
    if probe_epochs is not None and probe_epochs < 1:
        raise ValueError(f"--probe-epochs: must be >= 1, got {probe_epochs}")
    if probe_batch_size is not None and probe_batch_size < 1:
        raise ValueError(f"--probe-batch-size: must be >= 1, got {probe_batch_size}")
    if probe_lrs is not None and (not probe_lrs or any(not lr > 0 for lr in probe_lrs)):
        raise ValueError(f"--probe-lrs: expected positive learning rates, got {probe_lrs}")
    device = torch.device(device)
    ctx = SuiteContext(model=model, tokenizer=tokenizer, device=device, batch_size=batch_size, image_size=size,
                       pixel_norm=pixel_norm, workers=workers, progress_every=progress_every, limit=limit,
                       seg_size=seg_size, seg_stride=seg_stride, seg_tokens=seg_tokens, precision=precision, log=log,
                       probe_epochs=probe_epochs, probe_lrs=tuple(probe_lrs) if probe_lrs else None,
                       probe_batch_size=probe_batch_size, probe_cache=str(probe_cache) if probe_cache else None)
    settings = {"image_size": size, "pixel_norm": pixel_norm, "batch_size": batch_size, "device": str(device),
                "precision": precision, "limit": limit, "roots": {s: str(roots[s]) for s in suites}}
    if any(REGISTRY[s].module in PROBE_MODULES for s in suites):
        settings["probe"] = {"epochs": probe_epochs, "lrs": list(probe_lrs) if probe_lrs else None,
                             "batch_size": probe_batch_size, "cache": ctx.probe_cache}
    payload: dict = {"suites": {}, "settings": settings}
    was_training = model.training
    model.eval()
    try:
        for s in suites:
            t0 = time.perf_counter()
            result = _run_one(ctx, s, roots[s])
            result["seconds"] = round(time.perf_counter() - t0, 1)
            payload["suites"][s] = result
            if out_dir is not None:
                write_json(Path(out_dir) / JSON_NAME, payload)
    finally:
        model.train(was_training)
    return payload


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register the benchmark options on ``fasttips eval``'s parser (``--device``, ``--out`` and ``--json``
    are the command's own)."""
    g = parser.add_argument_group("standard benchmarks (replace the demo evaluation when --suite is given)")
    g.add_argument("--suite", default=None, metavar="LIST",
                   help="comma-separated benchmarks to run, or 'all': "
                        + "; ".join(f"{n} ({spec.what})" for n, spec in REGISTRY.items()))
    g.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder holding the datasets: " + ", ".join(f"{n}: DIR/{spec.default_dir}" for n, spec in REGISTRY.items()))
    g.add_argument("--suite-root", action="append", default=None, metavar="SUITE=PATH",
                   help="a dataset folder outside --data-root (repeatable)")
    g.add_argument("--batch-size", type=int, default=64,
                   help="images (segmentation: windows) per encoder batch (default 64)")
    g.add_argument("--image-size", type=int, default=None,
                   help="crop side for classification, retrieval and kNN (default: data.global_size of the run); "
                        "images are resized to it, kNN's to 256/224 of it, then centre-cropped")
    g.add_argument("--seg-size", type=int, default=448,
                   help="segmentation short side and window; also the short side the depth / normal probes "
                        "resize images to (default 448)")
    g.add_argument("--seg-stride", type=int, default=336, help="segmentation window stride (default 336)")
    g.add_argument("--seg-tokens", default="values", choices=("values", "final"),
                   help="patch features for segmentation: 'values' (TIPS: value-attention last block) or "
                        "'final' (the ordinary output patch tokens)")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="encoder arithmetic: fp32 (default, as the TIPS release evaluates; no TF32 on GPU) or "
                        "bf16 (bf16 autocast, faster on GPU). kNN similarities are fp32 either way")
    g.add_argument("--probe-epochs", type=int, default=None, metavar="N",
                   help="linear probes: epochs over the cached training features (default 10)")
    g.add_argument("--probe-lrs", type=_float_list, default=None, metavar="LR,LR,...",
                   help="linear probes: learning-rate grid, the best picked on a held-out tenth of the training "
                        "split (default: DINOv2's 13 values for 'linear'; 1e-4,3e-4,1e-3,3e-3 for the dense probes)")
    g.add_argument("--probe-batch-size", type=int, default=None, metavar="N",
                   help="linear probes: training batch (default 256 images for 'linear', 16 for the dense probes)")
    g.add_argument("--probe-cache", default=None, metavar="DIR",
                   help="linear probes: keep the cached training features in memory-mapped files under DIR "
                        "instead of RAM (dense probes on ADE20K / NYUv2 need tens of GiB)")
    g.add_argument("--workers", type=int, default=4, help="image decoding processes (default 4; 0 = in process)")
    g.add_argument("--progress-every", type=int, default=50, help="a progress line every N batches (0 = none)")
    g.add_argument("--limit", type=int, default=None, help="only the first N samples of each split (smoke runs)")
    return parser


def run_from_args(args, model, tokenizer, cfg, default_out: str | Path) -> int:
    """``fasttips eval ... --suite LIST``: run, print one table, write ``suites.json``; 2 on bad input."""
    import json

    from .report import table
    try:
        suites = parse_suites(args.suite)
        out = Path(args.out) if getattr(args, "out", None) else Path(default_out)
        payload = run_suites(model, tokenizer, cfg, suites, args.data_root, device=getattr(args, "device", "cpu"),
                             batch_size=args.batch_size, out_dir=out, roots=_parse_roots(args.suite_root),
                             image_size=args.image_size, workers=args.workers, progress_every=args.progress_every,
                             limit=args.limit, seg_size=args.seg_size, seg_stride=args.seg_stride,
                             seg_tokens=args.seg_tokens, precision=getattr(args, "precision", "fp32"),
                             probe_epochs=getattr(args, "probe_epochs", None),
                             probe_lrs=getattr(args, "probe_lrs", None),
                             probe_batch_size=getattr(args, "probe_batch_size", None),
                             probe_cache=getattr(args, "probe_cache", None))
    except (ValueError, DatasetLayoutError) as e:
        print(f"fasttips eval: {e}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, default=str))
    else:
        print(table(payload["suites"]))
        print(f"wrote {out / JSON_NAME}")
    return 0
