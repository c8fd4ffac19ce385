"""Command-line numbers checked where they are typed: a usage error naming the option, not a traceback."""

from __future__ import annotations

import argparse
from collections.abc import Callable

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type`` for an integer from ``low`` to ``high`` (the API field's range)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: {low} to {high}")
        return value

    return parse
