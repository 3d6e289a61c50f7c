"""``fasttips export``: the dispatcher in fasttips/cli.py calls ``main(argv)`` without the command."""
from .cli import export_main as main

__all__ = ["main"]
