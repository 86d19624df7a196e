"""argparse types of the command line: each parses one string into a checked number or raises the one-line
`ArgumentTypeError` that argparse prints before exiting with status 2. NaN and inf are refused here, at the
edge, so nothing inward trains on them (ARCHITECTURE.md section 1)."""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _number(parse: Callable[[str], float], ok: Callable[[float], bool], what: str, name: str):
    def convert(value: str):
        try:
            x = parse(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{value}'") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return x

    convert.__name__ = convert.__qualname__ = name
    convert.__doc__ = f"argparse type: {what}."
    return convert


positive_int = _number(int, lambda n: n > 0, "a positive integer", "positive_int")
non_negative_int = _number(int, lambda n: n >= 0, "a non-negative integer", "non_negative_int")
positive_float = _number(float, lambda x: 0.0 < x < math.inf, "a positive finite number", "positive_float")
unit_float = _number(float, lambda x: 0.0 <= x <= 1.0, "a number in [0, 1]", "unit_float")
keep_fraction = _number(float, lambda x: 0.0 < x <= 1.0, "a kept fraction in (0, 1]", "keep_fraction")
