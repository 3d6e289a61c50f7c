"""``fasttips bench``: run the benchmarks in bench/ and print their ratio tables, or redraw the plots.

    fasttips bench [attention|dino-loss|ema|data|step|checkpoint|dispatch|recompute|all ...] [--quick] [--plot] [--no-write]
                   [--results DIR]
    fasttips bench dispatch [--timings FILE ...] [--json] ...   (``fasttips bench dispatch --help``)

Benchmarks are the scripts of the repository's bench/ folder, installed with the package as
``fasttips.bench`` (so this works from a wheel as well as from a checkout), each exposing
``run(quick, results_dir=None) -> harness.Bench``. Results are appended as JSON lines to
bench/results/ in a source checkout, else to ./bench-results/ (or ``--results DIR``); ``--plot``
redraws the PNG plots from the JSON in that folder into its plots/ subfolder (it runs nothing when
given alone). Without CUDA, ``--quick`` runs tiny
shapes on the PyTorch reference backends (a smoke test of the benches; peers that need CUDA are
skipped with a printed reason). ``dispatch`` runs the measured dispatch on the bench shapes and prints
its decisions, or with ``--timings`` replays them from bench rows (bench/bench_dispatch.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

# name -> script; each script names its own baseline impl in BASELINE (the ratio tables' reference).
BENCHES = {
    "attention": "bench_attention.py",
    "dino-loss": "bench_dino_loss.py",
    "ema": "bench_ema.py",
    "data": "bench_data.py",
    "step": "bench_train_step.py",
    "checkpoint": "bench_checkpoint.py",
    "dispatch": "bench_dispatch.py",
    "recompute": "bench_recompute.py",
}


def bench_dir() -> Path:
    """The folder of the benchmark scripts: the installed ``fasttips.bench`` package (bench/ itself
    in an editable install)."""
    spec = importlib.util.find_spec("fasttips.bench")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in map(Path, folders):
        if (folder / "harness.py").is_file():
            return folder
    raise SystemExit("fasttips bench: the benchmark scripts (fasttips.bench) are not installed; "
                     "reinstall fasttips (pip install fasttips, or pip install -e . in a checkout)")


def default_results_dir(folder: Path) -> Path:
    """bench/results/ in a source checkout (results are committed beside the scripts), else
    ./bench-results/ (never inside an installed package)."""
    checkout = (folder.parent / "pyproject.toml").is_file() and (folder / "results").is_dir()
    if checkout and os.access(folder / "results", os.W_OK):
        return folder / "results"
    return Path.cwd() / "bench-results"


def load_bench(filename: str):
    folder = bench_dir()
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(Path(filename).stem, folder / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fasttips bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", default=[], metavar="NAME",
                   help=f"benchmarks to run: {', '.join(BENCHES)} or all (default: all, unless --plot)")
    p.add_argument("--quick", action="store_true", help="small shapes and short timing windows "
                   "(under 2 minutes on a GPU; runs on CPU with the reference backends)")
    p.add_argument("--plot", action="store_true", help="redraw the PNG plots from the results folder's *.jsonl")
    p.add_argument("--no-write", action="store_true", help="print the tables but write no JSON")
    p.add_argument("--results", metavar="DIR", default=None,
                   help="folder for the JSON lines (and, with --plot, the source of plots/); default "
                        "bench/results in a source checkout, else ./bench-results")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["dispatch"]:           # its own options (--timings, --json, ...): its own parser
        return load_bench(BENCHES["dispatch"]).main(argv[1:])
    args = parser().parse_args(argv)
    names = list(args.names) or ([] if args.plot else ["all"])
    if "all" in names:
        names = list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"fasttips bench: unknown benchmark(s) {unknown}; choose from {list(BENCHES) + ['all']}",
              file=sys.stderr)
        return 2
    results = str(args.results or default_results_dir(bench_dir()))
    for name in names:
        module = load_bench(BENCHES[name])
        bench = module.run(quick=args.quick, results_dir=results)
        bench.report(baseline=module.BASELINE)
        if not args.no_write:
            print(f"wrote {bench.write()}")
    if args.plot:
        plots = load_bench("plots.py")
        for path in plots.draw_all(results_dir=results, out_dir=str(Path(results) / "plots")):
            print(f"plot {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
