"""`PROMPT[:WEIGHT]` parsing, shared by the CLI, the web app and the Python API."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import CCLDError
from .limits import WEIGHT

_NUMBERISH = re.compile(r"^[+\-.\d]")


def parse_weighted(spec: str, default_weight: float | None, what: str = "prompt",
                   is_path: bool = False) -> tuple[str, float | None]:
    """Splits `TEXT:WEIGHT` at the last colon; a prompt without a weight gets `default_weight`
    (None: the painting's guidance, filled in once the model's defaults are known).

    A suffix that is not a number is part of the text ("Monet: water lilies"), unless it looks
    like a mistyped number ("cat:3x", "cat:"), which is an error rather than a silent guess. For
    image prompts an existing path wins, so "C:/art.png" and "a:b.png" stay paths.
    """
    default = None if default_weight is None else float(default_weight)
    if is_path and Path(spec).exists():
        return spec, default
    text, sep, suffix = spec.rpartition(":")
    if not sep:
        return spec, default
    try:
        weight = float(suffix)
    except ValueError:
        s = suffix.strip()
        if is_path:
            raise CCLDError(f"{what} {spec!r}: no such file, and {suffix!r} is not a weight; "
                            "give an existing image, optionally as PATH:WEIGHT") from None
        if s == "" or (_NUMBERISH.match(s) and " " not in s):
            raise CCLDError(f"bad {what} weight in {spec!r}: {suffix!r} is not a number; "
                            f"write TEXT:WEIGHT, e.g. '{text.strip() or 'a castle'}:2.5'") from None
        return spec, default
    if not text:
        raise CCLDError(f"bad {what} {spec!r}: nothing before the weight; write TEXT:WEIGHT")
    return text, float(WEIGHT.check(f"the weight in {what} {spec!r}", weight))


def how_read(spec: str, default_weight: float) -> str | None:
    """Says how a prompt with a colon was read when what follows the colon is not a weight
    ("a tree:abc" is all prompt text), so that a mistyped weight is never taken silently; None
    for every other prompt."""
    text, weight = parse_weighted(spec, default_weight)
    if ":" not in spec or text != spec:
        return None
    before, _, after = spec.rpartition(":")
    return (f"{spec!r} is all prompt text, at weight {weight:g} ({after.strip()!r} is not a "
            f"weight); to weight it, write TEXT:WEIGHT, e.g. '{before.strip() or spec}:{weight:g}'")
