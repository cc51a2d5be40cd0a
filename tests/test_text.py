"""Incremental text (runtime/text.py): the streamed pieces, the final text and the stop-string cut are
exactly what decoding every token at once gives, for long outputs chunked the way commits come."""

from __future__ import annotations

import random

import pytest

from blockpilot.runtime.text import RequestText

LONG_TEXT = ("Déjà vu: naïve café owners serve crème brûlée 🍮 at 3 p.m. — «très bien» ✓. "
             "東京 and 北京 are capitals; emoji 👩‍💻 and 🚀 take several tokens each.\n"
             "def f(x):\n    return x ** 2  # squares\n") * 12


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from blockpilot.runtime.assets import ensure_default_model

    return AutoTokenizer.from_pretrained(ensure_default_model())


def reference_stream(tokenizer, tokens, chunks, stop):
    """The engine's text handling before runtime/text.py: decode everything on every commit."""
    state_tokens, emitted, pieces = [], 0, []
    for chunk in chunks:
        state_tokens += chunk
        finished = len(state_tokens) == len(tokens)
        text = tokenizer.decode(state_tokens, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
        if hits:
            index = min(hits)
            text = text[:index]
            for cut in range(1, len(state_tokens) + 1):
                if len(tokenizer.decode(state_tokens[:cut], skip_special_tokens=True)) > index:
                    state_tokens = state_tokens[:cut]
                    break
            finished = True
        ready = text
        if not finished:
            ready = ready.rstrip("\ufffd")
            held = max(max((len(s) for s in stop), default=1) - 1, 0)
            ready = ready[: max(len(ready) - held, 0)]
        if len(ready) > emitted or finished:
            pieces.append(ready[emitted:])
        emitted = max(emitted, len(ready))
        if finished:
            return pieces, text, state_tokens
    return pieces, text, state_tokens


def new_stream(tokenizer, tokens, chunks, stop):
    """What the engine does now (engine._commit's text part)."""
    text, state_tokens, pieces = RequestText(tokenizer, stop), [], []
    for chunk in chunks:
        state_tokens += chunk
        finished = len(state_tokens) == len(tokens)
        keep = text.update(state_tokens)
        if keep is not None:
            state_tokens, finished = state_tokens[:keep], True
        piece = text.take_ready(finished)
        if piece or finished:
            pieces.append(piece)
        if finished:
            return pieces, text.text, state_tokens
    return pieces, text.text, state_tokens


def random_chunks(tokens, rng, widest=9):
    chunks, i = [], 0
    while i < len(tokens):
        n = rng.randint(1, widest)
        chunks.append(tokens[i:i + n])
        i += n
    return chunks


def test_long_stream_adds_up_to_the_whole_decode(tokenizer):
    tokens = tokenizer.encode(LONG_TEXT)
    assert len(tokens) > 1000
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    rng = random.Random(0)
    for _ in range(3):
        chunks = random_chunks(tokens, rng)
        pieces, final, kept = new_stream(tokenizer, tokens, chunks, [])
        assert "".join(pieces) == final == full and kept == tokens
        assert pieces == reference_stream(tokenizer, tokens, chunks, [])[0]  # the same pieces, commit by commit


@pytest.mark.parametrize("stop", [["brûlée 🍮"], ["京 and 北"], ["x ** 2  #"], ["\n    return", "«très"], ["never there"]])
def test_stop_strings_spanning_token_boundaries_cut_where_they_did(tokenizer, stop):
    tokens = tokenizer.encode(LONG_TEXT[:200] + LONG_TEXT)  # the stop string first appears after a long stretch
    rng = random.Random(1)
    for _ in range(3):
        chunks = random_chunks(tokens, rng)
        pieces, final, kept = new_stream(tokenizer, tokens, chunks, stop)
        assert (pieces, final, kept) == reference_stream(tokenizer, tokens, chunks, stop)
        assert "".join(pieces) == final
        if stop != ["never there"]:
            full = tokenizer.decode(tokens, skip_special_tokens=True)
            assert final == full[: min(full.find(s) for s in stop if s in full)]
            assert tokenizer.decode(kept, skip_special_tokens=True).startswith(final)


def test_special_tokens_and_no_tokenizer():
    text = RequestText(None, ["x"])
    assert text.update([1, 2, 3]) is None and text.take_ready(True) == "" and text.text == ""
