"""The benchmark scripts, installed with the package as ``fasttips.bench`` so that ``fasttips bench``
works from a wheel. Each script also runs alone: ``python bench/bench_<name>.py --help``."""
