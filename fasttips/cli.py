"""The ``fasttips`` command: one entry point, one sub-command per job.

    fasttips train   [--config FILE] [--resume RUN_DIR] [key=value ...]
    fasttips data    pack | tokenizer | demo ...
    fasttips eval    RUN_DIR_OR_CHECKPOINT ...
    fasttips ablate  ibot-vs-ibotpp ...
    fasttips bench   [attention|dino-loss|ema|data|step|all] [--quick] [--plot]

Each sub-command lives in its own module and parses its own arguments, so ``fasttips X --help``
is that module's help. Modules are imported only when their command runs (fast start-up, and a
missing optional package only affects the command that needs it).
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("fasttips.train", "train a model (default: the tiny preset on the embedded demo data)"),
    "data": ("fasttips.data.cli", "pack shards, train a tokenizer, build the demo data"),
    "eval": ("fasttips.eval.cli", "zero-shot retrieval, classification and segmentation of a run"),
    "ablate": ("fasttips.ablate", "iBOT vs iBOT++ ablation at toy scale"),
    "bench": ("fasttips.benchcli", "kernel and training-step benchmarks against peers"),
    "export": ("fasttips.interop.export_command", "write a run as a transformers folder, a timm file or TIPS npz files"),
    "import": ("fasttips.interop.import_command", "turn a TIPS / TIPSv2 release into a run dir for 'fasttips eval'"),
}


def usage() -> str:
    lines = ["usage: fasttips COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'fasttips COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from fasttips import __version__
        print(f"fasttips {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fasttips: unknown command {name!r}; choose one of {list(COMMANDS)}\n\n{usage()}",
              file=sys.stderr)
        return 2
    if name == "train":     # its imports take seconds: a stop signal there gets the start-up line, exit 0
        from fasttips.distributed.signals import StopRequest
        StopRequest(startup=True).install()
    module = importlib.import_module(COMMANDS[name][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
