"""Print the Hopper gate's report for every kernel and configuration of every op, failures marked.

    cd tests && python -m tooling [attention|dino_loss|ema ...]

Compiles in spawned workers with TRITON_INTERPRET=0, as the gate tests do (no GPU needed).
"""
from __future__ import annotations

import argparse
import importlib

OPS = ("attention", "dino_loss", "ema")
MATMUL = {"attention": True, "dino_loss": True, "ema": False}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tooling", description=__doc__.splitlines()[0])
    parser.add_argument("ops", nargs="*", metavar="OP", help=f"ops to report, of {list(OPS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [op for op in args.ops if op not in OPS]
    if unknown:
        parser.error(f"unknown op(s) {unknown}; choose from {list(OPS)}")
    failed = 0
    for op in args.ops or OPS:
        gate = importlib.import_module(f"tooling.gate_{op}")
        for case, report in sorted(gate.compile_all().items(), key=lambda kv: str(kv[0])):
            if isinstance(report, Exception):
                failed += 1
                print(f"FAIL {op} {case}: compile error {report!r}")
                continue
            known = getattr(gate, "KNOWN_SERIALISED", {}).get(case[0])
            try:
                matmul = MATMUL[op] and case[0] not in getattr(gate, "NO_MATMUL", ())   # e.g. a row kernel
                report.check(matmul=matmul, serialised_ok=known is not None)
                if hasattr(gate, "expected"):          # what the kernel claims (GEMMs, EX2, TMA, WS, budgets)
                    report.check_expected(gate.expected(case))
                tag = "known" if known and report.wgmma_serialised else "ok   "
                print(f"{tag} {report.summary()}")
            except AssertionError as exc:
                failed += 1
                print(f"FAIL {report.summary()}\n     {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
