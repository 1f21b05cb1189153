"""OpenAI predicted outputs: a request's `prediction` text (tokenized by the router) is its draft source.

The output is expected to follow the prediction with edits. Each step the generated tokens' last n-gram
(n from 3 down to 1) is looked up in the prediction, preferring the occurrence nearest where the output
would be had it followed the prediction since the previous draft (so templated text, where the same words
recur every sentence, neither sends drafting back nor skips ahead), and the prediction's next tokens are
the draft (the first match takes the first occurrence: an answer may open with a preamble of its own).
Where the prediction offers less than asked (the answer left it, e.g. to quote the question first), the
request's own prompt and output are searched too, as prompt lookup does, and the longer draft wins.
Accepted and rejected draft tokens are reported in the request's usage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from worker.speculative.base import Drafter, DraftSeq
from worker.speculative.prompt_lookup import PromptLookup

_NGRAM = 3


@dataclass(slots=True)
class _Prediction:
    tokens: list[int]
    ends: dict[tuple[int, ...], list[int]]  # n-gram -> its end positions in the prediction, ascending
    cursor: int = 0  # where in the prediction the last draft started
    drafted_at: int = -1  # how many tokens had been generated then (-1: nothing matched yet)


class PredictionDrafter(Drafter):
    name = "prediction"
    cheap = True

    def __init__(self) -> None:
        self._seqs: dict[int, _Prediction] = {}
        self._history = PromptLookup(_NGRAM)

    def draft(self, seqs: list[DraftSeq]) -> list[list[int]]:
        return [self._draft(seq) for seq in seqs]

    def _draft(self, seq: DraftSeq) -> list[int]:
        if not seq.prediction:
            return []
        draft = self._from_prediction(seq)
        if len(draft) < seq.k:
            own = self._history.draft([seq])[0]
            if len(own) > len(draft):
                return own
        return draft

    def _from_prediction(self, seq: DraftSeq) -> list[int]:
        assert seq.prediction is not None
        state = self._seqs.get(seq.seq_id)
        if state is None or state.tokens != list(seq.prediction):
            state = self._seqs[seq.seq_id] = _index(seq.prediction)
        output = seq.tokens[seq.prompt_len :]
        for n in range(min(_NGRAM, len(output)), 0, -1):
            ends = state.ends.get(tuple(output[len(output) - n :]))
            if not ends:
                continue
            if state.drafted_at < 0:  # the first match: the answer may open with text of its own
                end = ends[0]
            else:
                # Where the output should be in the prediction if it followed it since the last draft: the
                # occurrence nearest that (the later of two as near) continues it, not an earlier repeat.
                expected = state.cursor + len(output) - state.drafted_at
                end = min(reversed(ends), key=lambda e: abs(e + 1 - expected))
            state.cursor, state.drafted_at = end + 1, len(output)
            return state.tokens[end + 1 : end + 1 + seq.k]
        return []

    def release(self, seq_id: int) -> None:
        self._seqs.pop(seq_id, None)
        self._history.release(seq_id)


def _index(prediction: Sequence[int]) -> _Prediction:
    tokens = [int(t) for t in prediction]
    ends: dict[tuple[int, ...], list[int]] = {}
    for end in range(len(tokens)):
        for n in range(1, min(_NGRAM, end + 1) + 1):
            ends.setdefault(tuple(tokens[end - n + 1 : end + 1]), []).append(end)
    return _Prediction(tokens, ends)
