import json

import pytest
import torch
from safetensors.torch import load_file

from ccld.models.tokenizer import END_TOKEN, START_TOKEN, PromptTruncatedWarning, tokenize


def test_every_reference_case(fixtures):
    cases = json.loads((fixtures / "tokenizer_cases.json").read_text())
    with pytest.warns(PromptTruncatedWarning):  # the cases include over-long texts
        tokens = tokenize([c["text"] for c in cases])
    for row, case in zip(tokens, cases):
        assert row.tolist() == case["tokens"], case["text"]


def test_cloob_io_tokens(fixtures):
    texts = json.loads((fixtures / "meta.json").read_text())["cloob"]["texts"]
    with pytest.warns(PromptTruncatedWarning):
        tokens = tokenize(texts)
    assert torch.equal(tokens, load_file(fixtures / "cloob_io.safetensors")["tokens"].long())


def test_layout():
    tokens = tokenize("A Red  circle")
    assert tokens.dtype == torch.long and tokens.shape == (1, 77)
    n = int((tokens[0] != 0).sum())
    assert tokens[0, 0] == START_TOKEN and tokens[0, n - 1] == END_TOKEN
    assert not tokens[0, n:].any()
    assert torch.equal(tokens, tokenize(["a red circle"]))  # lower case, whitespace collapsed
    assert torch.equal(tokenize(""), torch.tensor([[START_TOKEN, END_TOKEN] + [0] * 75]))


def test_truncation_warns_and_keeps_end_token():
    text = "a painting of a lighthouse " * 20
    with pytest.warns(PromptTruncatedWarning, match=r"'a painting of a lighthouse.*last \d+ tokens"):
        tokens = tokenize([text, "short"])
    assert tokens.shape == (2, 77)
    assert tokens[0, -1] == END_TOKEN and (tokens[0, 1:-1] != END_TOKEN).all()
    assert tokens[1, 2] == END_TOKEN


def test_literal_special_tokens_as_clip_reads_them():
    # CLIP makes the special token where its word splitter starts a piece at '<', not after
    # punctuation, which swallows the '<|' into a punctuation run.
    assert tokenize("<|endoftext|>")[0, :3].tolist() == [START_TOKEN, END_TOKEN, END_TOKEN]
    glued = tokenize("a.<|endoftext|>")[0]
    assert (glued == END_TOKEN).sum() == 1
