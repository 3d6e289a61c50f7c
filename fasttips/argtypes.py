"""argparse value types shared by the ``fasttips`` sub-commands."""
from __future__ import annotations

import argparse


def int_at_least(low: int):
    """argparse type: an integer >= ``low`` (argparse reports a bad one as one usage line, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse
