"""Argument types for the command line: each parses one flag's text or says, in one line, what
the flag needs. argparse reports the message as `argument -e/--embed: must be ...`."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(convert: Callable[[str], float], accept: Callable[[float], bool], needs: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {needs}, got {text!r}") from None
        # float() accepts "nan" and "inf", which no flag means
        if not math.isfinite(value) or not accept(value):
            raise argparse.ArgumentTypeError(f"must be {needs}, got {text!r}")
        return value
    return parse


positive_int = _number(int, lambda x: x >= 1, "an integer >= 1")
non_negative_int = _number(int, lambda x: x >= 0, "an integer >= 0")
positive_float = _number(float, lambda x: x > 0, "a number > 0")
non_negative_float = _number(float, lambda x: x >= 0, "a number >= 0")
fraction = _number(float, lambda x: 0 <= x < 1, "a number in [0, 1)")
unit_interval = _number(float, lambda x: 0 <= x <= 1, "a number in [0, 1]")
probability = _number(float, lambda x: 0 < x <= 1, "a number in (0, 1]")


def text(value: str) -> str:
    """A non-empty string (a prompt)."""
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return value
