"""Text apart from tokens: one request's output decoded incrementally, cut at its first stop string,
and streamed.

The engine commits tokens; this module turns them into text. Each commit decodes only a short
window of recent tokens (the way vLLM and TGI detokenise), so a whole output costs time linear in
its length, and looks for stop strings only in the text that could hold a new one.

The text is the same as decoding every token at once (`tokenizer.decode(tokens,
skip_special_tokens=True)`): the window starts at a token boundary whose text was already complete,
and a window whose text ends in an unfinished UTF-8 character ("\ufffd") stays pending until a later
token completes it.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    """The text of a growing token list, decoding only the tokens since the last complete character.

    The stable text is that of `tokens[:read_offset]` and only ever grows (kept as pieces, joined
    once at the end); `pending` is the text of the tokens after it (it may end in "\ufffd" and
    change when more tokens arrive).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pieces: list[str] = []  # the stable text, one piece per commit that completed text
        self.stable_len = 0
        self.pending = ""
        # Window start: one decode step behind `read_offset`, so the window keeps the context a
        # tokenizer needs to decode its first token the way a full decode would (leading spaces).
        self.prefix_offset = 0
        self.read_offset = 0
        # (token count, stable text length) each time the stable text grew: where a stop string cuts.
        self.checkpoints: list[tuple[int, int]] = [(0, 0)]

    def decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""

    def update(self, tokens: list[int]) -> None:
        """Take the token list after a commit (the old one plus new tokens at the end)."""
        if self.tokenizer is None:
            return
        prefix_text = self.decode(tokens[self.prefix_offset:self.read_offset])
        window_text = self.decode(tokens[self.prefix_offset:])
        if not window_text.startswith(prefix_text):
            # A tokenizer whose window text does not extend its prefix's text: take this commit's
            # pending text from the whole decode (the stable text stays what was streamed).
            self.pending = self.decode(tokens)[self.stable_len:]
            return
        new_text = window_text[len(prefix_text):]
        if new_text.endswith("\ufffd"):
            self.pending = new_text  # an unfinished character: wait for the tokens that complete it
            return
        self.pieces.append(new_text)
        self.stable_len += len(new_text)
        self.pending = ""
        self.prefix_offset, self.read_offset = self.read_offset, len(tokens)
        self.checkpoints.append((self.read_offset, self.stable_len))

    def __len__(self) -> int:
        return self.stable_len + len(self.pending)

    def slice(self, start: int, stop: int) -> str:
        """`text[start:stop]` for a `start` near the end, reading only the pieces it needs."""
        stop = min(stop, len(self))
        if start >= stop:
            return ""
        parts, end = [self.pending], self.stable_len  # `end`: where the text in `parts` begins
        for piece in reversed(self.pieces):
            if end <= start:
                break
            parts.append(piece)
            end -= len(piece)
        text = "".join(reversed(parts))
        return text[start - end: stop - end]

    def stable_len_without_unfinished(self) -> int:
        """Length of the stable text without trailing "\ufffd" characters."""
        length = self.stable_len
        for piece in reversed(self.pieces):
            stripped = piece.rstrip("\ufffd")
            length -= len(piece) - len(stripped)
            if stripped:
                break
        return length

    @property
    def text(self) -> str:
        return "".join(self.pieces) + self.pending


class StopStringMatcher:
    """The first occurrence of any stop string in a growing text, searching each part once."""

    def __init__(self, stop_strings):
        self.stop_strings = [s for s in stop_strings if s]
        self.longest = max((len(s) for s in self.stop_strings), default=0)
        self.searched_stable = 0  # stable text already searched (no stop string lies wholly inside it)

    def find(self, detokenizer: IncrementalDetokenizer) -> int | None:
        """Index of the earliest stop string in the detokenizer's text, or None."""
        if not self.stop_strings:
            return None
        # A new occurrence must end past the text searched before, so it starts at most
        # `longest - 1` characters before that text's end.
        start = max(0, self.searched_stable - self.longest + 1)
        window = detokenizer.slice(start, len(detokenizer))
        self.searched_stable = detokenizer.stable_len
        hits = [index for index in (window.find(stop) for stop in self.stop_strings) if index >= 0]
        return start + min(hits) if hits else None


class RequestText:
    """One request's text: decoded incrementally, cut at the first stop string, streamed in pieces.

    Streaming holds back a trailing unfinished character and any tail that could still turn out to
    be the start of a stop string, so the streamed pieces always add up to the final text.
    """

    def __init__(self, tokenizer, stop_strings):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop = StopStringMatcher(stop_strings)
        self.hold_back = max(max((len(stop) for stop in stop_strings), default=1) - 1, 0)
        self.stopped_at: int | None = None  # character index where a stop string cut the text
        self.emitted = 0  # characters already streamed

    def update(self, tokens: list[int]) -> int | None:
        """Decode a commit's tokens. Returns, if a stop string now appears, how many tokens to keep:
        the shortest prefix whose text reaches the stop string (the text is cut where it starts)."""
        detokenizer = self.detokenizer
        detokenizer.update(tokens)
        index = self.stop.find(detokenizer)
        if index is None:
            return None
        self.stopped_at = index
        # Every checkpoint up to `index` holds at most `index` characters, so the shortest prefix
        # reaching past it lies after the last such checkpoint: decode whole prefixes only from there.
        first = max(count for count, length in detokenizer.checkpoints if length <= index)
        for cut in range(max(first, 1), len(tokens) + 1):
            if len(detokenizer.decode(tokens[:cut])) > index:
                return cut
        return len(tokens)

    @property
    def text(self) -> str:
        text = self.detokenizer.text
        return text[: self.stopped_at] if self.stopped_at is not None else text

    def take_ready(self, finished: bool) -> str:
        """The text not streamed yet that is safe to stream now (all of it once finished)."""
        detokenizer = self.detokenizer
        if self.stopped_at is not None:
            ready = self.stopped_at
        elif finished:
            ready = len(detokenizer)
        else:
            # Hold back a trailing unfinished character until a later token completes it, and any
            # tail that could still turn out to be the start of a stop string.
            complete = detokenizer.pending.rstrip("\ufffd")
            ready = detokenizer.stable_len + len(complete) if complete else detokenizer.stable_len_without_unfinished()
            ready = max(ready - self.hold_back, 0)
        piece = detokenizer.slice(self.emitted, ready) if ready > self.emitted else ""
        self.emitted = max(self.emitted, ready)
        return piece
