"""Prompt-lookup decoding: drafts copied from the sequence's own history (prompt and output).

When the sequence's last n tokens (n from `max_ngram` down to 1) occurred before, the tokens that followed
an earlier occurrence are the draft. Among the (at most `_CANDIDATES` latest) occurrences, the one whose
preceding tokens also match the sequence's recent tokens longest wins (ties: the latest), so templated
text ("... near the old ...", repeated boilerplate) continues from the right place rather than from the
last place the n-gram appeared. This pays on copying and editing work (summaries quoting the prompt,
code edits, "repeat this") and costs little: each sequence keeps an index from n-gram to its end
positions, extended by each step's new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from worker.speculative.base import Drafter, DraftSeq

_CANDIDATES = 16  # latest occurrences compared
_CONTEXT = 64  # tokens compared backwards from an occurrence


@dataclass(slots=True)
class _Index:
    """End positions of every n-gram of a history whose following token is known."""

    first: int  # the history's first token, to notice a sequence id reused without a release
    indexed: int = 0  # positions [0, indexed) have been indexed as n-gram ends
    ends: dict[tuple[int, ...], list[int]] = field(default_factory=dict)


class PromptLookup(Drafter):
    name = "prompt-lookup-decoding"
    cheap = True

    def __init__(self, max_ngram: int) -> None:
        self.max_ngram = max(1, max_ngram)
        self._indexes: dict[int, _Index] = {}

    def draft(self, seqs: list[DraftSeq]) -> list[list[int]]:
        return [self._draft(seq) for seq in seqs]

    def _draft(self, seq: DraftSeq) -> list[int]:
        tokens = seq.tokens
        index = self._indexes.get(seq.seq_id)
        if index is None or index.first != tokens[0] or index.indexed > len(tokens):
            index = self._indexes[seq.seq_id] = _Index(int(tokens[0]))
        self._extend(index, tokens)
        return lookup(index.ends, tokens, self.max_ngram, seq.k)

    def _extend(self, index: _Index, tokens: Sequence[int]) -> None:
        """Indexes the n-grams ending at every position that now has a follower (all but the last)."""
        ends, n_max = index.ends, self.max_ngram
        for end in range(index.indexed, len(tokens) - 1):
            for n in range(1, min(n_max, end + 1) + 1):
                ends.setdefault(tuple(tokens[end - n + 1 : end + 1]), []).append(end)
        index.indexed = max(index.indexed, len(tokens) - 1)

    def release(self, seq_id: int) -> None:
        self._indexes.pop(seq_id, None)


def lookup(
    ends: dict[tuple[int, ...], list[int]], tokens: Sequence[int], max_ngram: int, k: int
) -> list[int]:
    """Up to `k` tokens after the earlier occurrence of the longest matching suffix n-gram whose
    preceding context agrees longest with the tokens before that suffix."""
    last = len(tokens) - 1
    for n in range(min(max_ngram, len(tokens)), 0, -1):
        found = ends.get(tuple(tokens[last - n + 1 :]))
        if not found:
            continue
        best, best_len = found[-1], -1
        for end in reversed(found[-_CANDIDATES:]):
            length = 0
            while (
                length < _CONTEXT
                and end - n - length >= 0
                and tokens[end - n - length] == tokens[last - n - length]
            ):
                length += 1
            if length > best_len:
                best, best_len = end, length
        return [int(t) for t in tokens[best + 1 : best + 1 + k]]
    return []
