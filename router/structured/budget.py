"""Refuses, before generation, a structured request whose shortest valid document cannot fit its budget.

The worker ends every tracked grammar's document within `max_tokens` (worker/budget.py) by steering onto
the shortest completion; that only works when the shortest whole document, plus end-of-generation, fits
the budget from the start. The router knows both, so a request that cannot fit is a 400 naming the
shortest document's token count instead of an answer cut mid-document.
"""

from __future__ import annotations

from router.api.errors import APIError
from shared.gbnf_automaton import automaton_for
from shared.vocab import Vocab


def shortest_document_tokens(grammar: str, vocab: Vocab) -> int | None:
    """Tokens of the grammar's shortest document plus end-of-generation; None when not tracked."""
    automaton = automaton_for(grammar)
    if automaton is None:
        return None
    text = automaton.completion(automaton.initial)
    if text is None:
        return None
    decoded = text.decode("utf-8", "replace")
    tokens = vocab.tokenize(decoded, add_special=False, parse_special=True) if decoded else []
    return len(tokens) + 1


def check_budget(grammar: str, lazy: bool, max_tokens: int, vocab: Vocab, limit_param: str) -> None:
    """400 when a non-lazy grammar's shortest document does not fit `max_tokens`."""
    if lazy:
        return
    needed = shortest_document_tokens(grammar, vocab)
    if needed is not None and needed > max_tokens:
        raise APIError(
            400,
            f"the shortest output valid under the requested format needs {needed} tokens (end of "
            f"generation included) but the budget is {max_tokens}: raise {limit_param}",
            param=limit_param,
            code="budget_too_small",
        )
