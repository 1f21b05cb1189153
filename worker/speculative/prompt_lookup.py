"""Prompt-lookup decoding: drafts copied from the sequence's own history (prompt and output).

When the sequence's last n tokens (n from `max_ngram` down to 1) occurred before, the tokens that followed
their latest earlier occurrence are the draft. This pays on copying and editing work (summaries quoting
the prompt, code edits, "repeat this") and costs nothing to compute: each sequence keeps an index from
n-gram to its latest position, extended by the new tokens of each step, so a step's lookup is O(n).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from worker.speculative.base import Drafter, DraftSeq


@dataclass(slots=True)
class _Index:
    """Latest end position of every n-gram of a history whose following token is known."""

    first: int  # the history's first token, to notice a sequence id reused without a release
    indexed: int = 0  # positions [0, indexed) have been indexed as n-gram ends
    last: dict[tuple[int, ...], int] = field(default_factory=dict)


class PromptLookup(Drafter):
    name = "prompt-lookup-decoding"

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
        return lookup(index.last, tokens, self.max_ngram, seq.k)

    def _extend(self, index: _Index, tokens: Sequence[int]) -> None:
        """Indexes the n-grams ending at every position that now has a follower (all but the last)."""
        last, n_max = index.last, self.max_ngram
        for end in range(index.indexed, len(tokens) - 1):
            for n in range(1, min(n_max, end + 1) + 1):
                last[tuple(tokens[end - n + 1 : end + 1])] = end
        index.indexed = max(index.indexed, len(tokens) - 1)

    def release(self, seq_id: int) -> None:
        self._indexes.pop(seq_id, None)


def lookup(last: dict[tuple[int, ...], int], tokens: Sequence[int], max_ngram: int, k: int) -> list[int]:
    """The up to `k` tokens after the latest earlier occurrence of the longest matching suffix n-gram."""
    for n in range(min(max_ngram, len(tokens)), 0, -1):
        end = last.get(tuple(tokens[len(tokens) - n :]))
        if end is not None:
            return [int(t) for t in tokens[end + 1 : end + 1 + k]]
    return []
