"""BudgetCloser on a byte-level fake vocabulary: whatever a (random, structure-loving) model wants, the
sequence ends with end-of-generation on a complete valid document within its budget."""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import pytest

from router.structured import json_object_gbnf, schema_to_gbnf
from router.structured.tool_grammar import HERMES, tool_grammar
from shared.gbnf_automaton import Automaton
from tests.integration.structured_cases import SCHEMAS, TOOLS
from worker.budget import BudgetCloser, runaway

EOS = 256
_ALPHABET = [c for c in range(0x20, 0x7F)] + [0x0A]
_GREEDY_FOR = b'{["abc0123456789,:'  # what a model that never wants to stop prefers


def spell(text: bytes) -> list[int]:
    return list(text)


def generate(automaton: Automaton, budget: int, seed: int) -> tuple[bytes, bool, int]:
    """Runs a fake model under the closer: (text, closed, tokens used, end-of-generation included)."""
    rng = random.Random(seed)
    closer = BudgetCloser(automaton, spell, EOS, budget)
    state, text = automaton.initial, b""
    for used in range(1, budget + 1):
        token = closer.forced()
        if token is None:
            options = [c for c in _ALPHABET if not automaton.advance(state, bytes([c])).dead]
            liked = [c for c in options if c in _GREEDY_FOR]
            token = rng.choice(liked or options) if options else EOS
            if token != EOS and not closer.permits(bytes([token])):
                token = closer.steer()
                assert token is not None
        assert not closer.lost
        if token == EOS:
            assert state.complete, text
            closer.accept(token, b"", True)
            return text, closer.closed, used
        state = automaton.advance(state, bytes([token]))
        assert not state.dead, (text, token)
        text += bytes([token])
        closer.accept(token, bytes([token]), False)
    raise AssertionError(f"no end of generation within {budget} tokens: {text!r}")


@pytest.mark.parametrize("budget", [3, 4, 8, 16, 32, 64])
def test_json_object_always_closes(budget: int) -> None:
    automaton = Automaton(json_object_gbnf())
    for seed in range(5):
        text, closed, used = generate(automaton, budget, seed)
        assert isinstance(json.loads(text), dict) and used <= budget
        assert closed  # this model never stops by itself


@pytest.mark.parametrize(("name", "schema"), [(c[0], c[2]) for c in SCHEMAS], ids=[c[0] for c in SCHEMAS])
def test_schemas_close_at_every_budget(name: str, schema: dict[str, Any]) -> None:
    automaton = Automaton(schema_to_gbnf(schema, strict=True))
    shortest = automaton.completion(automaton.initial)
    assert shortest is not None
    validator = jsonschema.Draft202012Validator(schema)
    for budget in (len(shortest) + 1, len(shortest) + 2, len(shortest) + 10, 2 * len(shortest) + 40):
        text, _, used = generate(automaton, budget, budget)
        assert validator.is_valid(json.loads(text)), text
        assert used <= budget


def test_no_tool_call_is_started_that_cannot_finish() -> None:
    grammar = tool_grammar(HERMES, TOOLS[:1], "required", parallel=True)
    assert grammar is not None
    automaton = Automaton(grammar.grammar)
    one = automaton.completion(automaton.initial)
    assert one is not None
    for budget in range(len(one) + 1, 3 * len(one) + 8, 7):
        text, _, used = generate(automaton, budget, budget)
        calls = text.decode().count("<tool_call>")
        assert calls >= 1 and text.decode().count("</tool_call>") == calls
        assert used <= budget


def test_nothing_is_forced_with_room_to_spare() -> None:
    automaton = Automaton(json_object_gbnf())
    closer = BudgetCloser(automaton, spell, EOS, 100)
    assert closer.forced() is None
    closer.accept(ord("{"), b"{", False)
    assert closer.forced() is None and closer.permits(b'"')
    tight = BudgetCloser(automaton, spell, EOS, 3)  # "{}" and end of generation: exactly enough
    assert tight.forced() == ord("{")
    tight.accept(ord("{"), b"{", False)
    assert tight.forced() == ord("}")
    tight.accept(ord("}"), b"}", False)
    assert tight.forced() == EOS and tight.closed


def test_a_plan_the_grammar_refuses_stops_tracking() -> None:
    closer = BudgetCloser(Automaton(json_object_gbnf()), spell, EOS, 3)
    assert closer.forced() is not None
    closer.abandon()
    assert closer.lost and closer.forced() is None and closer.permits(b"x")


def test_runaway_detection() -> None:
    assert runaway(b"base_test" + b"_test" * 10, 32)
    assert runaway(b"x" + b" \n" * 20, 32)
    assert not runaway(b"_test" * 3, 32)  # too short to call
    assert not runaway(b"The quick brown fox jumps over the lazy dog, twice over.", 32)
    assert not runaway(b"_test" * 20, 0)


def test_repeat_limit_closes_a_looping_string_and_lets_the_model_go_on() -> None:
    automaton = Automaton(json_object_gbnf())
    closer = BudgetCloser(automaton, spell, EOS, 400, repeat_limit=24)
    state, text = automaton.initial, b""
    loop = b'{"a": "base' + b"_test" * 40
    for _ in range(200):
        forced = closer.forced()
        if forced is not None:
            piece = bytes([forced])
        elif len(text) < len(loop) and text == loop[: len(text)]:
            piece = loop[len(text) : len(text) + 1]
        else:
            piece = b"}"  # after the string was closed: end the object
        if automaton.advance(state, piece).complete and piece == b"}":
            text += piece
            break
        state = automaton.advance(state, piece)
        assert not state.dead, text + piece
        text += piece
        closer.accept(piece[0], piece, False)
    value = json.loads(text)
    assert value["a"].startswith("base_test") and len(value["a"]) < 40 and closer.closed
