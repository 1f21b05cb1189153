"""Tool-call and response_format grammars: what they accept, what they refuse, that llama.cpp parses them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from router.api.errors import APIError
from router.openai.requests import ResponseFormat
from router.parsers import ResponseSchemaParser
from router.preprocess.tool_prompts import render_call
from router.structured.response_format import (
    escape_trigger,
    json_object_grammar,
    schema_grammar,
    structured_grammar,
)
from router.structured.tool_grammar import HERMES, QWEN_XML, detect_format, tool_grammar
from shared.vocab import Vocab
from tests.unit.gbnf_match import matches

REPO = Path(__file__).resolve().parents[2]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
        },
    },
}
NOTE = {"type": "function", "function": {"name": "note", "parameters": {"type": "object", "properties": {}}}}
PING = {"type": "function", "function": {"name": "ping"}}
TOOLS = [WEATHER, NOTE, PING]


@pytest.fixture(scope="module")
def vocab(tiny_llama_gguf: Path) -> Vocab:
    return Vocab.load(tiny_llama_gguf)


def parses_in_llama_cpp(vocab: Vocab, grammar: str, triggers: list[str] | None = None) -> bool:
    from worker.sampling import _Grammar

    try:
        _Grammar(vocab._vocab, grammar, triggers or []).close()
    except ValueError:
        return False
    return True


def test_forced_hermes_call(vocab: Vocab) -> None:
    plan = tool_grammar(HERMES, TOOLS, "get_weather", parallel=True)
    assert plan is not None and plan.triggers == []
    assert parses_in_llama_cpp(vocab, plan.grammar)
    good = render_call("get_weather", {"city": "Paris", "unit": "celsius", "days": 3})
    assert matches(plan.grammar, good)
    assert matches(plan.grammar, render_call("get_weather", {"city": "Oslo", "unit": "fahrenheit"}))
    assert not matches(plan.grammar, render_call("get_weather", {"city": "Paris"}))  # unit required
    assert not matches(plan.grammar, render_call("get_weather", {"city": "Paris", "unit": "kelvin"}))
    assert not matches(plan.grammar, render_call("get_weather", {"city": "x" * 21, "unit": "celsius"}))
    assert not matches(plan.grammar, good + "\n" + good)  # a named function: one call
    assert not matches(plan.grammar, render_call("note", {}))


def test_required_and_parallel(vocab: Vocab) -> None:
    single = tool_grammar(HERMES, TOOLS, "required", parallel=False)
    several = tool_grammar(HERMES, TOOLS, "required", parallel=True)
    assert single is not None and several is not None
    assert parses_in_llama_cpp(vocab, several.grammar)
    calls = [render_call("note", {"text": 1}), render_call("ping", {}), render_call("note", {})]
    assert not matches(single.grammar, calls[0])  # strict: no properties beyond the schema's
    assert matches(single.grammar, calls[1]) and matches(single.grammar, calls[2])
    assert not matches(single.grammar, calls[1] + "\n" + calls[2])
    assert matches(several.grammar, calls[1] + "\n" + calls[2])
    assert not matches(several.grammar, "")


def test_auto_is_lazy_and_waits_for_reasoning(vocab: Vocab) -> None:
    plan = tool_grammar(HERMES, TOOLS, "auto", parallel=False)
    assert plan is not None and plan.triggers == ["<tool_call>"]
    assert parses_in_llama_cpp(vocab, plan.grammar, plan.triggers)
    assert tool_grammar(HERMES, TOOLS, "none", parallel=False) is None
    plan = tool_grammar(HERMES, TOOLS, "auto", parallel=False, reasoning_end="</think>")
    assert plan is not None
    (trigger,) = plan.triggers
    assert parses_in_llama_cpp(vocab, plan.grammar, plan.triggers)
    assert re.search(trigger, "<think>I could write <tool_call> here</think>") is None
    match = re.search(trigger, "<think>x</think>\nok <tool_call>")
    assert match is not None and match.group(1) == "<tool_call>"
    forced = tool_grammar(HERMES, TOOLS, "ping", parallel=False, reasoning_end="</think>")
    assert forced is not None and forced.triggers == ["<\\/think>"]
    assert matches(forced.grammar, "</think>\n\n" + render_call("ping", {}))


def test_prefilled_opening_continues_the_call() -> None:
    opening = QWEN_XML.opening("get_weather")
    plan = tool_grammar(
        QWEN_XML, TOOLS, "get_weather", parallel=False, prefilled="<|im_start|>assistant\n" + opening
    )
    assert plan is not None
    rest = (
        "<parameter=city>\nParis\n</parameter>\n<parameter=unit>\ncelsius\n</parameter>\n"
        "</function>\n</tool_call>"
    )
    assert matches(plan.grammar, rest)
    assert not matches(plan.grammar, opening + rest)


def qwen_config() -> dict[str, Any]:
    return json.loads((REPO / "configs/qwen3.5-0.8b.json").read_text())["model"]


def test_qwen_xml_calls_parse_back(vocab: Vocab) -> None:
    config = qwen_config()
    assert detect_format(config["response_schema"]) is QWEN_XML
    plan = tool_grammar(QWEN_XML, TOOLS, "required", parallel=True)
    assert plan is not None and parses_in_llama_cpp(vocab, plan.grammar)
    text = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco, CA\n</parameter>\n"
        "<parameter=unit>\nfahrenheit\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
        "</function>\n</tool_call>\n<tool_call>\n<function=ping>\n</function>\n</tool_call>"
    )
    assert matches(plan.grammar, text)
    assert not matches(plan.grammar, text.replace("\n3\n", "\nthree\n"))
    assert not matches(plan.grammar, text.replace("fahrenheit", "kelvin"))
    message = ResponseSchemaParser(config["response_schema"]).parse(text, tools=TOOLS)
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.tool_calls]
    assert calls == [
        ("get_weather", {"city": "San Francisco, CA", "unit": "fahrenheit", "days": 3}),
        ("ping", {}),
    ]


def test_formats_without_grammar_refuse_forcing() -> None:
    gemma4 = json.loads((REPO / "configs/gemma-4-12b-it-qat.json").read_text())["model"]["response_schema"]
    fmt = detect_format(gemma4)
    assert not fmt.grammar
    assert tool_grammar(fmt, TOOLS, "auto", parallel=True) is None
    with pytest.raises(APIError) as error:
        tool_grammar(fmt, TOOLS, "required", parallel=True)
    assert error.value.status == 400 and error.value.param == "tool_choice"
    assert detect_format(None) is HERMES


def test_unsupported_parameters_are_a_400() -> None:
    bad = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": True}},
    }
    with pytest.raises(APIError) as error:
        tool_grammar(HERMES, [WEATHER, bad], "required", parallel=False)
    assert error.value.status == 400
    assert "tools[1].function.parameters" in error.value.message and "uniqueItems" in error.value.message


def test_response_format_grammars(vocab: Vocab) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    plan = schema_grammar(schema, "response_format.json_schema.schema")
    assert parses_in_llama_cpp(vocab, plan.grammar)
    assert matches(plan.grammar, '{"a": 5}') and not matches(plan.grammar, '{"a": 5, "b": 1}')
    lazy = json_object_grammar(reasoning_end="</think>")
    assert lazy.triggers == [escape_trigger("</think>")]
    assert matches(lazy.grammar, '</think>\n\n{"x": [1, {}]}')
    with pytest.raises(APIError) as error:
        schema_grammar(
            {"type": "object", "properties": {"t": {"not": {}}}}, "response_format.json_schema.schema"
        )
    assert error.value.status == 400 and "#/properties/t/not" in error.value.message
    fmt = ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    assert structured_grammar(fmt, None) is not None
    assert structured_grammar(ResponseFormat(type="text"), None) is None
    assert structured_grammar(None, 'root ::= "x"') is not None
    with pytest.raises(APIError):
        structured_grammar(fmt, 'root ::= "x"')


@pytest.mark.parametrize("literal", ["<tool_call>", "<|im_end|>", "</think>", "a.b*c+(d)?[e]{f}\\g/h^$|"])
def test_escaped_triggers_match_literally(literal: str, vocab: Vocab) -> None:
    """Same meaning in Python and in C++ std::regex (which aborts the process on a regex it rejects)."""
    from worker.sampling import check_trigger

    pattern = check_trigger(escape_trigger(literal))
    assert pattern.fullmatch(literal.encode()) is not None
    assert pattern.search(b"xx" + literal.encode() + b"yy") is not None
    after_reasoning = escape_trigger("</think>") + "[\\s\\S]*?(" + escape_trigger(literal) + ")"
    assert parses_in_llama_cpp(vocab, 'root ::= "x"', [escape_trigger(literal), after_reasoning])
