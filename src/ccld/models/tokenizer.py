"""OpenAI CLIP tokenisation, as CLOOB's text encoder was trained with it.

The byte-pair encoding itself comes from `instant-clip-tokenizer` (a fast reimplementation of
CLIP's, with the same vocabulary); the text cleaning around it is CLIP's own: ftfy, HTML
entities unescaped twice, whitespace collapsed, lower case. Rows are `[start, tokens..., end]`
padded with zeros to 77, like `clip.tokenize(texts, truncate=True)`.
"""

from __future__ import annotations

import functools
import html
import re
import sys
import warnings
from pathlib import Path

import torch

CONTEXT_LENGTH = 77
START_TOKEN = 49406  # <|startoftext|>
END_TOKEN = 49407  # <|endoftext|>, also the text encoder's end-of-text marker
_SPECIAL = {"<|startoftext|>": START_TOKEN, "<|endoftext|>": END_TOKEN}
_SPECIAL_RE = re.compile(r"<\|startoftext\|>|<\|endoftext\|>")
# Warnings point at the first caller outside ccld (Python 3.12+), or else at tokenize's caller.
_WARN_AT = ({"skip_file_prefixes": (str(Path(__file__).resolve().parents[1]),)}
            if sys.version_info >= (3, 12) else {"stacklevel": 2})


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's context; its end was dropped."""


@functools.lru_cache(maxsize=1)
def _bpe():
    # Reading the vocabulary takes a moment, so it is done once, on first use.
    from instant_clip_tokenizer import Tokenizer

    return Tokenizer()


def clean_text(text: str) -> str:
    """CLIP's cleaning: mojibake fixed, entities unescaped (twice, as CLIP does), spaces collapsed."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r"\s+", " ", text).strip().lower()


def _encode(text: str) -> list[int]:
    """Token ids of a cleaned text, without start and end tokens.

    CLIP's tokenizer turns a literal `<|startoftext|>` or `<|endoftext|>` in the text into the
    special token, but only where its word-splitting regex starts a new piece there: at the start,
    or after a space, a letter, a digit or another special token. After punctuation the `<|` is
    swallowed into a punctuation run and stays text. instant-clip-tokenizer never makes special
    tokens, so they are split out here the same way.
    """
    bpe = _bpe()
    ids, start = [], 0
    for m in _SPECIAL_RE.finditer(text):
        before = text[m.start() - 1] if m.start() > 0 else " "
        if m.start() != start and not (before.isspace() or before.isalnum()):
            continue  # glued to punctuation: CLIP reads it as ordinary text
        ids += bpe.encode(text[start:m.start()]) if m.start() > start else []
        ids.append(_SPECIAL[m.group()])
        start = m.end()
    return ids + bpe.encode(text[start:]) if start < len(text) else ids


def tokenize(texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """LongTensor [n, context_length]: start token, text tokens, end token, zero padding.

    A text too long for the context keeps its first `context_length - 2` tokens and the end token,
    with a `PromptTruncatedWarning` (CLIP's `truncate=True`); it is not an error.
    """
    if isinstance(texts, str):
        texts = [texts]
    out = torch.zeros([len(texts), context_length], dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [START_TOKEN, *_encode(clean_text(text)), END_TOKEN]
        if len(ids) > context_length:
            dropped = len(ids) - context_length
            head = " ".join(text.split())
            head = head if len(head) <= 40 else head[:40] + "..."
            warnings.warn(f"prompt {head!r} is longer than the text encoder's {context_length} "
                          f"tokens; its last {dropped} token{'s' * (dropped != 1)} were dropped",
                          PromptTruncatedWarning, **_WARN_AT)
            ids = ids[:context_length - 1] + [END_TOKEN]
        out[i, :len(ids)] = torch.tensor(ids)
    return out
