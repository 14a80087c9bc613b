"""JSON from files cllm did not write itself, parsed within bounds: nesting at most
MAX_DEPTH deep, integers of at most MAX_INT_DIGITS digits, no NaN or Infinity. Whatever the
text, the result is a value or one ValueError that says what is wrong, never a RecursionError
or a quadratic-time integer conversion."""
from __future__ import annotations

import json
import re

MAX_DEPTH = 64
MAX_INT_DIGITS = 40   # the largest integer cllm stores: the 128-bit state of its PCG64 generator


# a JSON string (skipped whole: the unrolled form, which runs at the regular expression engine's
# speed) or one bracket
_STRUCTURE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|([\[\]{}])', re.DOTALL)


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def loads(text: str | bytes):
    """json.loads within the bounds above; any violation or syntax error is a ValueError."""
    _check_depth(text)
    try:
        return json.loads(text, parse_int=_int, parse_constant=_constant)
    except RecursionError:   # unreachable after _check_depth, kept as the last guard
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep") from None


def _check_depth(text: str | bytes) -> None:
    """Refuse nesting deeper than MAX_DEPTH before the recursive parser sees it. Brackets in
    strings are skipped; the scan is linear in the text (regular-expression speed)."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return
    depth = 0
    for token in _STRUCTURE.finditer(raw):
        bracket = token.group(1)
        if bracket is None:
            continue
        depth += 1 if bracket in b"[{" else -1
        if depth > MAX_DEPTH:
            raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
