"""The GBNF automaton behind budget closing: it follows text like llama.cpp's grammar, and the shortest
completion of any prefix of a valid document is a valid document (checked with jsonschema and with the
independent matcher in gbnf_match)."""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import pytest

from router.structured import json_object_gbnf, schema_to_gbnf
from router.structured.tool_grammar import HERMES, QWEN_XML, tool_grammar
from shared.gbnf_automaton import Automaton, GrammarUnsupported
from tests.integration.structured_cases import SCHEMAS, TOOLS
from tests.unit.gbnf_match import matches
from tests.unit.json_schema_cases import CASES
from tests.unit.test_json_schema_grammar import _validator


def complete(automaton: Automaton, prefix: bytes) -> bytes:
    state = automaton.advance(automaton.initial, prefix)
    assert not state.dead, prefix
    rest = automaton.completion(state)
    assert rest is not None
    assert len(rest) == automaton.completion_cost(state) or state.pending
    return prefix + rest


def documents(value: Any) -> list[bytes]:
    return [
        json.dumps(value, ensure_ascii=False).encode(),
        json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode(),
    ]


@pytest.mark.parametrize(
    ("case", "schema", "strict", "valid"), [c[:4] for c in CASES], ids=[c[0] for c in CASES]
)
def test_every_prefix_of_a_valid_document_completes_validly(
    case: str, schema: dict[str, Any], strict: bool, valid: list[Any]
) -> None:
    grammar = schema_to_gbnf(schema, strict=strict)
    automaton = Automaton(grammar)
    validator = _validator(schema, strict)
    shortest = complete(automaton, b"")
    assert validator.is_valid(json.loads(shortest)), shortest
    for value in valid:
        for doc in documents(value):
            if not matches(grammar, doc.decode()):
                continue  # a spelling the grammar does not use (key order, whitespace)
            assert automaton.advance(automaton.initial, doc).complete
            for cut in range(len(doc) + 1):
                text = complete(automaton, doc[:cut])
                assert validator.is_valid(json.loads(text)), (doc[:cut], text)
                assert matches(grammar, text.decode()), text


@pytest.mark.parametrize(("name", "schema"), [(c[0], c[2]) for c in SCHEMAS], ids=[c[0] for c in SCHEMAS])
def test_random_walks_complete_validly(name: str, schema: dict[str, Any]) -> None:
    """Wander through the grammar (a random allowed character at a time), then complete: valid."""
    grammar = schema_to_gbnf(schema, strict=True)
    automaton = Automaton(grammar)
    validator = jsonschema.Draft202012Validator(schema)
    alphabet = [bytes([c]) for c in range(0x20, 0x7F)] + [b"\n", "é".encode()]
    rng = random.Random(name)
    for steps in (5, 20, 60, 150):
        state, text = automaton.initial, b""
        for _ in range(steps):
            options = [c for c in alphabet if not automaton.advance(state, c).dead]
            if not options:
                break
            char = rng.choice(options)
            state, text = automaton.advance(state, char), text + char
        rest = automaton.completion(state)
        assert rest is not None
        assert validator.is_valid(json.loads(text + rest)), text + rest


def test_json_object_closes_a_runaway_string() -> None:
    automaton = Automaton(json_object_gbnf())
    prefix = b'{\n\t"name": "Test",\n\t"depends": [\n\t"base_test_test'
    assert json.loads(complete(automaton, prefix)) == {"name": "Test", "depends": ["base_test_test"]}
    assert complete(automaton, b"") == b"{}"
    assert automaton.advance(automaton.initial, b"{}").complete
    assert automaton.advance(automaton.initial, b"x").dead


def test_unfinished_utf8_character_is_completed() -> None:
    automaton = Automaton(json_object_gbnf())
    text = complete(automaton, b'{"a": "\xc3')
    assert isinstance(json.loads(text)["a"], str)


def test_tool_call_block_is_closed() -> None:
    grammar = tool_grammar(HERMES, TOOLS, "required", parallel=True)
    assert grammar is not None
    automaton = Automaton(grammar.grammar)
    text = complete(automaton, b'<tool_call>\n{"name": "get_weather", "arguments": {"city": "Ro').decode()
    assert text.endswith("</tool_call>")
    body = json.loads(text.removeprefix("<tool_call>\n").removesuffix("</tool_call>"))
    assert body["arguments"]["city"] == "Ro" and body["arguments"]["unit"] in ("celsius", "fahrenheit")
    after_one = automaton.advance(automaton.initial, text.encode())
    assert after_one.complete and automaton.completion(after_one) == b""
    xml = tool_grammar(QWEN_XML, TOOLS, "get_weather", parallel=False)
    assert xml is not None
    automaton = Automaton(xml.grammar)
    assert complete(automaton, b"<tool_call>\n<function=get_weather>\n<parameter=city>\nPa").endswith(
        b"</tool_call>"
    )


@pytest.mark.parametrize(
    ("grammar", "text", "shortest"),
    [
        ('root ::= "a"+ "b"?', b"aaa", b""),
        ('root ::= x{2,4} "!"\nx ::= [0-9]', b"1", b"0!"),
        ('root ::= ( "ab" | "c" )* "."  # comment\n', b"a", b"b."),
        ('root ::= "[" (\n  item\n  ("," item)*\n)? "]"\nitem ::= [^\\]\\x00-\\x1F,]{1,3}', b"[a,", b"a]"),
        ('root ::= "x" .', b"x", b"a"),
        ('root ::= "\\u00e9" "\\x41"', b"", "éA".encode()),
    ],
)
def test_raw_grammars(grammar: str, text: bytes, shortest: bytes) -> None:
    automaton = Automaton(grammar)
    state = automaton.advance(automaton.initial, text)
    assert automaton.completion(state) == shortest
    assert automaton.advance(state, shortest).complete


@pytest.mark.parametrize(
    "grammar",
    ['root ::= root "a" | "b"', 'root ::= <[1234]> "a"', "root ::= undefined", 'x ::= "a"'],
)
def test_untrackable_grammars_are_refused(grammar: str) -> None:
    with pytest.raises(GrammarUnsupported):
        Automaton(grammar)
