"""Reading JSON from outside (prompt-file rows, manifests, PNG parameters, configs) with bounds.

Python's parser recurses once per nesting level and converts integers of any length, so a
deeply nested line stops it with a RecursionError and a 5000-digit number with a ValueError
(its 4300-digit guard): `parse` checks the depth before parsing and caps the digits, and says
what is wrong in one line.
"""

from __future__ import annotations

import json
import re

from ..errors import CCLDError

MAX_DEPTH = 32  # nesting levels: every ccld file needs fewer than 8
MAX_DIGITS = 40  # digits of an integer: a seed (at most 2**64) has 20

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


class JSONInputError(ValueError):
    """JSON that `parse` refuses; its message says why, as one clause."""


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in `text` (brackets inside strings aside)."""
    import numpy as np

    codes = np.frombuffer(_STRINGS.sub('""', text).encode("utf-8", "replace"), dtype=np.uint8)
    steps = (np.isin(codes, (ord("["), ord("{"))).astype(np.int64)
             - np.isin(codes, (ord("]"), ord("}"))))
    return int(steps.cumsum().max(initial=0))


def _integer(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_DIGITS:
        raise JSONInputError(f"a number of {len(digits.lstrip('-'))} digits (at most "
                             f"{MAX_DIGITS})")
    return int(digits)


def _constant(name: str):
    raise JSONInputError(f"{name} is not JSON")


def parse(text: str | bytes, object_pairs_hook=None):
    """The value of JSON `text`; JSONInputError saying why not (malformed, nested deeper than
    MAX_DEPTH, an integer of more than MAX_DIGITS digits, NaN or Infinity). `object_pairs_hook`
    as `json.loads` takes it."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise JSONInputError("not UTF-8 text") from None
    depth = nesting_depth(text)
    if depth > MAX_DEPTH:
        raise JSONInputError(f"nested {depth} levels deep (at most {MAX_DEPTH})")
    try:
        return json.loads(text, parse_int=_integer, parse_constant=_constant,
                          object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as e:
        raise JSONInputError(f"not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:  # (the depth check makes this unreachable; kept as a last guard)
        raise JSONInputError(f"nested too deep (at most {MAX_DEPTH})") from None


def parse_file_text(text: str | bytes, where: str, fix: str):
    """`parse`, its refusal as a CCLDError "`where`: why; `fix`"."""
    try:
        return parse(text)
    except JSONInputError as e:
        raise CCLDError(f"{where}: {e}; {fix}") from None
