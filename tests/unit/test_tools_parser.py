"""The Hermes/<think> output parser and the chat output layer: same result however the text is split."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router.endpoints.chat_format import chat_deltas, chat_message
from router.parsers import ResponseSchemaParser
from router.parsers.hermes import ToolCallParser
from router.parsers.output import HermesOutput, SchemaOutput
from router.preprocess.tool_prompts import render_call

CALL = render_call("get_weather", {"city": 'Paris "Left" </tool_call>', "days": [1, 2]})
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("plain", "  Hello <b>world</b>  \n", {"parse_tools": False}),
    ("plain-with-tools", "Hello world  ", {"parse_tools": True}),
    ("think", "<think>\nstep one\n</think>\n\nThe answer.", {"parse_tools": False}),
    ("think-open", "step one\nstep two</think>answer", {"parse_tools": False, "reasoning_open": True}),
    ("content-then-call", "Let me check.\n" + CALL, {"parse_tools": True}),
    ("two-calls", CALL + "\n" + render_call("f", {}), {"parse_tools": True}),
    ("think-call", "<think>hmm</think>\n" + CALL, {"parse_tools": True}),
    ("other-shape", '<tool_call>\n{"arguments": {"a": 1}, "name": "f"}\n</tool_call>', {"parse_tools": True}),
    ("not-a-call", "<tool_call>not json</tool_call> done", {"parse_tools": True}),
    ("cut", '<tool_call>\n{"name": "f", "arguments": {"a": "unfinished', {"parse_tools": True}),
    ("cut-header", '<tool_call>\n{"na', {"parse_tools": True}),
    ("marker-prefix-at-end", "text <tool_ca", {"parse_tools": True}),
]


def run(text: str, size: int | None, **options: Any) -> tuple[ToolCallParser, list[Any]]:
    parser = ToolCallParser(**options)
    pieces = []
    if size is None:
        pieces += parser.feed(text)
    else:
        for start in range(0, len(text), size):
            pieces += parser.feed(text[start : start + size])
    pieces += parser.finish()
    return parser, pieces


def summary(parser: ToolCallParser) -> tuple[Any, ...]:
    calls = [(c.name, c.arguments, c.complete) for c in parser.calls]
    return parser.reasoning, parser.content, calls, parser.cut_call


@pytest.mark.parametrize(("name", "text", "options"), CASES, ids=[c[0] for c in CASES])
def test_any_split_gives_the_same_result(name: str, text: str, options: dict[str, Any]) -> None:
    whole, _ = run(text, None, **options)
    for size in (1, 2, 3, 5, 11):
        parser, pieces = run(text, size, **options)
        assert summary(parser) == summary(whole), size
        assert "".join(p.content or "" for p in pieces) == parser.content
        assert "".join(p.reasoning or "" for p in pieces) == parser.reasoning
        for call in parser.calls:
            streamed = "".join(p.arguments or "" for p in pieces if p.call is call)
            assert streamed == call.arguments


def test_fields() -> None:
    parser, _ = run("<think>\nstep one\n</think>\n\nThe answer.", 4, parse_tools=False)
    assert (parser.reasoning, parser.content) == ("step one", "The answer.")
    parser, _ = run("Let me check.\n" + CALL, 3, parse_tools=True)
    assert parser.content == "Let me check."
    (call,) = parser.calls
    assert call.complete and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": 'Paris "Left" </tool_call>', "days": [1, 2]}
    parser, _ = run('<tool_call>\n{"arguments": {"a": 1}, "name": "f"}\n</tool_call>', 2, parse_tools=True)
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == [("f", {"a": 1})]
    parser, _ = run("<tool_call>not json</tool_call> done", 2, parse_tools=True)
    assert parser.calls == [] and parser.content == "<tool_call>not json</tool_call>done"
    parser, _ = run("no <tool_call> parsing here", 2, parse_tools=False)
    assert parser.content == "no <tool_call> parsing here"


def collect(
    output: Any, text: str, finish: str, size: int = 3, include_reasoning: bool = True
) -> tuple[list[dict[str, Any]], str | None]:
    """The chat deltas of `text` fed in pieces of `size`, and the finish reason."""
    deltas = []
    for start in range(0, len(text), size):
        deltas += output.feed(text[start : start + size])
    last, reason = output.finish(finish)
    return chat_deltas(deltas + last, include_reasoning), reason


def reassemble(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """What an OpenAI client builds from streamed deltas."""
    content, reasoning, calls = "", "", {}
    for delta in deltas:
        content += delta.get("content") or ""
        reasoning += delta.get("reasoning_content") or ""
        assert delta.get("reasoning") == delta.get("reasoning_content")
        for part in delta.get("tool_calls", []):
            call = calls.setdefault(part["index"], {"function": {"name": "", "arguments": ""}})
            if "id" in part:
                call["id"], call["type"] = part["id"], part["type"]
            call["function"]["name"] += part["function"].get("name", "")
            call["function"]["arguments"] += part["function"].get("arguments", "")
    return {"content": content, "reasoning": reasoning, "tool_calls": [calls[i] for i in sorted(calls)]}


def test_hermes_output_stream_matches_message() -> None:
    text = "<think>plan</think>\n" + CALL + "\n" + render_call("f", {"x": True})
    output = HermesOutput(parse_tools=True, reasoning_open=False)
    deltas, reason = collect(output, text, "stop")
    message = chat_message(output.message(), True)
    assert reason == "tool_calls"
    assert message["content"] is None
    assert message["reasoning_content"] == message["reasoning"] == "plan"
    streamed = reassemble(deltas)
    assert streamed["tool_calls"] == message["tool_calls"]
    assert streamed["reasoning"] == "plan"
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "f"]
    assert all(c["id"].startswith("call_") for c in message["tool_calls"])
    names = [
        p["function"]["name"] for d in deltas for p in d.get("tool_calls", []) if "name" in p["function"]
    ]
    assert names == ["get_weather", "f"]  # the name is sent once per call


def test_cut_call_reports_length_and_raw_text() -> None:
    text = 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": "unfin'
    output = HermesOutput(parse_tools=True, reasoning_open=False)
    deltas, reason = collect(output, text, "length")
    message = chat_message(output.message(), True)
    assert reason == "length"
    assert "tool_calls" not in message
    assert message["content"] == "Sure." + text[len("Sure.\n") :]
    assert reassemble(deltas)["content"] == message["content"]


def test_reasoning_can_be_dropped() -> None:
    output = HermesOutput(parse_tools=False, reasoning_open=True)
    deltas, reason = collect(output, "secret</think>visible", "stop", include_reasoning=False)
    assert reason == "stop"
    assert chat_message(output.message(), False) == {"role": "assistant", "content": "visible"}
    assert all("reasoning" not in d and "reasoning_content" not in d for d in deltas)


QWEN_SCHEMA = json.loads(
    json.dumps(
        {
            "type": "object",
            "properties": {
                "role": {"const": "assistant"},
                "reasoning_content": {
                    "type": "string",
                    "x-regex": "^(?:<\\|im_start\\|>assistant\\n)?(?:<think>\\n)?(.*?)(?=</think>)",
                },
                "content": {
                    "type": "string",
                    "x-regex": "^(?:<\\|im_start\\|>assistant\\n)?(?:(?:<think>\\n)?.*?</think>\\s*)?"
                    "(.*?)(?=\\s*<tool_call>\\n|<\\|im_end\\|>$|$)",
                },
            },
        }
    )
)


def test_schema_output_reasoning_under_both_names() -> None:
    parser = ResponseSchemaParser(QWEN_SCHEMA)
    output = SchemaOutput(parser, "<|im_start|>assistant\n<think>\n", None)
    deltas, reason = collect(output, "let me think\n</think>\n\nHello!", "stop")
    message = chat_message(output.message(), True)
    assert reason == "stop"
    assert message["content"] == "Hello!"
    assert message["reasoning_content"] == message["reasoning"] == "let me think\n"  # the regex's capture
    streamed = reassemble(deltas)
    assert (streamed["content"], streamed["reasoning"]) == ("Hello!", message["reasoning"])
