"""Token ids to text, incrementally: UTF-8 never split, stop strings matched across token boundaries.

Text is built from each token's raw bytes (so tokenizers whose pieces carry leading spaces or byte
fallback render exactly), decoded with an incremental UTF-8 decoder that holds back an unfinished
character. The stop matcher holds back any tail that could still grow into a stop string, so a stop
string never leaks into the output, streamed or not.
"""

from __future__ import annotations

import codecs

from shared.vocab import Vocab


class IncrementalDetokenizer:
    """`special=True` renders control tokens as their text (`<tool_call>`, `<|channel|>`): output parsers
    need to see markers that are special tokens; plain text output leaves them out."""

    def __init__(self, vocab: Vocab, special: bool = False) -> None:
        self._vocab = vocab
        self._special = special
        self._special_pieces: dict[int, bytes] = {}
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _piece(self, token: int) -> bytes:
        if not self._special:
            return self._vocab.piece(token)
        piece = self._special_pieces.get(token)
        if piece is None:
            piece = self._special_pieces[token] = self._vocab.special_piece(token)
        return piece

    def feed(self, token: int) -> str:
        return self._decoder.decode(self._piece(token))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Feeds text through; returns what is safe to emit, and whether a stop string matched."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        if self.matched is not None:
            return ""
        if not self._stops:
            return text
        buffer = self._held + text
        first: tuple[int, str] | None = None
        for stop in self._stops:
            at = buffer.find(stop)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, stop)
        if first is not None:
            self.matched = first[1]
            self._held = ""
            return buffer[: first[0]]
        keep = self._longest_partial(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def _longest_partial(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:size]):
                    best = size
                    break
        return best

    def flush(self) -> str:
        """The held-back tail, once the generation ended without a match."""
        if self.matched is not None:
            return ""
        held, self._held = self._held, ""
        return held
