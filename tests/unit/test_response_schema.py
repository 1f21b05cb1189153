"""Parsing hand-written outputs of each shipped model family with its config's response_schema.

Streaming must reproduce the whole-text parse exactly, for every way of splitting the text.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from router.parsers import (
    IncrementalSchemaParser,
    ParsedDelta,
    ParsedMessage,
    ResponseSchemaParser,
)
from router.parsers.gemma_args import GemmaArgumentsError, parse_gemma_arguments
from router.parsers.output import SchemaOutput
from router.parsers.regex_literals import literal_runs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QWEN_CONFIGS = ["qwen3.5-0.8b.json", "qwen3.6-27b.json", "qwen3.6-35b-a3b.json"]
SEED_CONFIGS = [
    *QWEN_CONFIGS,
    "gemma-4-12b-it-qat.json",
    "gpt-oss-120b.json",
    "bge-small-en-v1.5.json",
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {"type": "object", "properties": properties},
        },
    }
    for name, properties in {
        "get_weather": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "get_time": {"timezone": {"type": "string"}},
        "search": {
            "query": {"type": "string"},
            "limit": {"type": "integer"},
            "filters": {"type": "object"},
            "strict": {"type": ["boolean", "null"]},
        },
    }.items()
]


@dataclass
class Case:
    name: str
    prefix: str
    text: str
    content: str | None = None
    reasoning: str | None = None
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    parse_error: bool = False


def _ids(index: int) -> str:
    return f"call_{index}"


QWEN_THINK = "<|im_start|>assistant\n<think>\n"
QWEN_NO_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def _qwen_call(name: str, **params: str) -> str:
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


QWEN_CASES = [
    Case(
        "plain",
        QWEN_NO_THINK,
        "Paris is the capital of France.",
        content="Paris is the capital of France.",
    ),
    Case(
        "reasoning_content",
        QWEN_THINK,
        "The user asks about France.\nIts capital is Paris; 2 < 3 holds.\n</think>\n\n"
        "The capital of France is **Paris**.\n\nAnything else?",
        content="The capital of France is **Paris**.\n\nAnything else?",
        reasoning="The user asks about France.\nIts capital is Paris; 2 < 3 holds.\n",
    ),
    Case(
        "one_tool_call",
        QWEN_THINK,
        "I need the weather.\n</think>\n\n" + _qwen_call("get_weather", city="Paris", days="3"),
        reasoning="I need the weather.\n",
        calls=[("get_weather", {"city": "Paris", "days": 3})],
    ),
    Case(
        "two_tool_calls",
        QWEN_NO_THINK,
        _qwen_call("get_weather", city="Paris") + "\n" + _qwen_call("get_time", timezone="Europe/Paris"),
        calls=[("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})],
    ),
    Case(
        "reasoning_content_tool_call",
        QWEN_THINK,
        "Search for pizza.\n</think>\n\nLet me look that up.\n\n"
        + _qwen_call(
            "search",
            query="best <b>pizza</b>\nin town",
            limit="5",
            filters='{"lang": "en"}',
            strict="true",
        ),
        content="Let me look that up.",
        reasoning="Search for pizza.\n",
        calls=[
            (
                "search",
                {
                    "query": "best <b>pizza</b>\nin town",
                    "limit": 5,
                    "filters": {"lang": "en"},
                    "strict": True,
                },
            )
        ],
    ),
    Case(
        "forced_tool_prefix",
        "<|im_start|>assistant\n<tool_call>\n<function=get_weather>\n",
        "<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
        calls=[("get_weather", {"city": "Paris"})],
    ),
    Case(
        "truncated_reasoning",
        QWEN_THINK,
        "Still thinking about <tool_call> syntax and",
        reasoning="Still thinking about <tool_call> syntax and",
    ),
]

GEMMA_THINK = "<|turn>model\n"
GEMMA_NO_THINK = "<|turn>model\n<|channel>thought\n<channel|>"
Q = '<|"|>'

GEMMA_CASES = [
    Case(
        "plain",
        GEMMA_NO_THINK,
        "Paris is the capital of France.",
        content="Paris is the capital of France.",
    ),
    Case(
        "reasoning_content",
        GEMMA_THINK,
        "<|channel>thought\nThe user asks about France.\nCapital: Paris.<channel|>"
        "The capital of France is Paris.<turn|>",
        content="The capital of France is Paris.",
        reasoning="The user asks about France.\nCapital: Paris.",
    ),
    Case(
        "one_tool_call",
        GEMMA_NO_THINK,
        f"<|tool_call>call:get_weather{{city:{Q}Paris{Q},days:3}}<tool_call|>",
        calls=[("get_weather", {"city": "Paris", "days": 3})],
    ),
    Case(
        "two_tool_calls",
        GEMMA_NO_THINK,
        f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>"
        f"<|tool_call>call:get_time{{timezone:{Q}Europe/Paris{Q}}}<tool_call|>",
        calls=[("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})],
    ),
    Case(
        "reasoning_content_tool_call",
        GEMMA_THINK,
        "<|channel>thought\nNeed to search.<channel|>Let me search."
        f"<|tool_call>call:search{{query:{Q}a, b {{c}}: d{Q},filters:{{lang:{Q}en{Q},max:5}},"
        f"tags:[{Q}x{Q},{Q}y{Q}],strict:true}}<tool_call|>",
        content="Let me search.",
        reasoning="Need to search.",
        calls=[
            (
                "search",
                {
                    "query": "a, b {c}: d",
                    "filters": {"lang": "en", "max": 5},
                    "tags": ["x", "y"],
                    "strict": True,
                },
            )
        ],
    ),
    Case(
        "truncated_reasoning",
        GEMMA_THINK,
        "<|channel>thought\nStill thinking",
        reasoning="Still thinking",
    ),
]

OSS = "<|start|>assistant"


def _oss_call(name: str, arguments: str) -> str:
    return f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>{arguments}<|call|>"


GPT_OSS_CASES = [
    Case(
        "plain",
        OSS,
        "<|channel|>final<|message|>Paris is the capital of France.<|return|>",
        content="Paris is the capital of France.",
    ),
    Case(
        "plain_without_stop_marker",
        OSS,
        "<|channel|>final<|message|>Paris.",
        content="Paris.",
    ),
    Case(
        "reasoning_content",
        OSS,
        "<|channel|>analysis<|message|>User asks for the capital. Answer: Paris.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>The capital of France is Paris.<|return|>",
        content="The capital of France is Paris.",
        reasoning="User asks for the capital. Answer: Paris.",
    ),
    Case(
        "one_tool_call",
        OSS,
        _oss_call("get_weather", '{"city": "Paris", "days": 3}'),
        calls=[("get_weather", {"city": "Paris", "days": 3})],
    ),
    Case(
        "two_tool_calls",
        OSS,
        _oss_call("get_weather", '{"city":"Paris"}')
        + OSS
        + _oss_call("get_time", '{"timezone":"Europe/Paris"}'),
        calls=[("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})],
    ),
    Case(
        "reasoning_tool_call",
        OSS,
        "<|channel|>analysis<|message|>Need weather for Paris.<|end|>"
        + OSS
        + _oss_call("get_weather", '{"city": "Paris <3"}'),
        reasoning="Need weather for Paris.",
        calls=[("get_weather", {"city": "Paris <3"})],
    ),
    Case(
        "invalid_json_arguments",
        OSS,
        _oss_call("get_weather", "{city: Paris}"),
        calls=[("get_weather", {})],  # arguments checked separately: raw text is kept
        parse_error=True,
    ),
]

FAMILY_CASES = [(config, case) for config in QWEN_CONFIGS for case in QWEN_CASES]
FAMILY_CASES += [("gemma-4-12b-it-qat.json", case) for case in GEMMA_CASES]
FAMILY_CASES += [("gpt-oss-120b.json", case) for case in GPT_OSS_CASES]
CASE_IDS = [f"{config.removesuffix('.json')}-{case.name}" for config, case in FAMILY_CASES]
# The Qwen configs share one schema (checked below), so streaming runs once per distinct schema.
STREAM_CASES = [(c, case) for c, case in FAMILY_CASES if c not in QWEN_CONFIGS[1:]]
STREAM_IDS = [f"{config.removesuffix('.json')}-{case.name}" for config, case in STREAM_CASES]

_PARSERS: dict[str, ResponseSchemaParser] = {}


def _config(name: str) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((CONFIGS / name).read_text())
    return config


def _parser(name: str) -> ResponseSchemaParser:
    if name not in _PARSERS:
        _PARSERS[name] = ResponseSchemaParser(_config(name)["model"]["response_schema"])
    return _PARSERS[name]


def _stream(
    parser: ResponseSchemaParser, case: Case, chunks: list[str], fast_path: bool = True
) -> tuple[list[ParsedDelta], IncrementalSchemaParser]:
    stream = IncrementalSchemaParser(
        parser, prefix=case.prefix, tools=TOOLS, id_factory=_ids, fast_path=fast_path
    )
    deltas: list[ParsedDelta] = []
    for chunk in chunks:
        deltas.extend(stream.feed(chunk))
    deltas.extend(stream.finish())
    return deltas, stream


def _rebuild(deltas: list[ParsedDelta]) -> ParsedMessage:
    """Apply deltas the way an OpenAI client accumulates them."""
    message = ParsedMessage()
    for delta in deltas:
        assert [delta.content, delta.reasoning_content, delta.tool_call].count(None) == 2  # one field set
        if delta.content is not None:
            message.content = (message.content or "") + delta.content
        if delta.reasoning_content is not None:
            message.reasoning_content = (message.reasoning_content or "") + delta.reasoning_content
        if delta.tool_call is not None:
            call = delta.tool_call
            assert call.index == len(message.tool_calls)
            message.tool_calls.append(
                {
                    "id": call.id,
                    "type": call.type,
                    "function": {"name": call.name, "arguments": call.arguments},
                }
            )
    return message


def _assert_stream_matches(
    parser: ResponseSchemaParser,
    case: Case,
    chunks: list[str],
    fast_paths: tuple[bool, ...] = (True, False),
) -> None:
    expected = parser.parse(case.text, prefix=case.prefix, tools=TOOLS, id_factory=_ids)
    for fast_path in fast_paths:
        deltas, stream = _stream(parser, case, chunks, fast_path)
        assert not stream.diverged, chunks
        assert stream.message == expected
        rebuilt = _rebuild(deltas)
        assert rebuilt.content == expected.content, chunks
        assert rebuilt.reasoning_content == expected.reasoning_content, chunks
        assert rebuilt.tool_calls == expected.tool_calls, chunks
        markers = [m for m in parser.markers if any(c in m for c in "<|>")]
        for delta in deltas:
            for text in (delta.content, delta.reasoning_content):
                assert text != ""
            if delta.content is not None:
                assert not any(marker in delta.content for marker in markers), delta


@pytest.mark.parametrize("config", SEED_CONFIGS)
def test_seed_configs_load(config: str) -> None:
    model = _config(config)["model"]
    assert {"alias", "from_pretrained"} <= set(model)
    if "response_schema" in model:
        ResponseSchemaParser(model["response_schema"])
        assert isinstance(model["chat_template"], list)
    else:
        assert config == "bge-small-en-v1.5.json"


def test_qwen_configs_share_one_schema() -> None:
    schemas = [_config(name)["model"]["response_schema"] for name in QWEN_CONFIGS]
    assert all(schema == schemas[0] for schema in schemas)


@pytest.mark.parametrize(("config", "case"), FAMILY_CASES, ids=CASE_IDS)
def test_parse_recorded_output(config: str, case: Case) -> None:
    parser = _parser(config)
    message = parser.parse(case.text, prefix=case.prefix, tools=TOOLS, id_factory=_ids)
    assert message.role == "assistant"
    assert message.content == case.content
    assert message.reasoning_content == case.reasoning
    assert message.tool_call_parse_error == case.parse_error
    assert [call["function"]["name"] for call in message.tool_calls] == [n for n, _ in case.calls]
    assert [call["id"] for call in message.tool_calls] == [_ids(i) for i in range(len(case.calls))]
    for call, (_, arguments) in zip(message.tool_calls, case.calls, strict=True):
        assert call["type"] == "function"
        assert isinstance(call["function"]["arguments"], str)
        if not case.parse_error:
            assert json.loads(call["function"]["arguments"]) == arguments
    output = SchemaOutput(parser, case.prefix, TOOLS)  # what chat and Responses read
    output.feed(case.text)
    output.finish("stop")
    assert output.message().content == (case.content if case.calls else case.content or "")


@pytest.mark.parametrize(("config", "case"), STREAM_CASES, ids=STREAM_IDS)
def test_stream_split_at_every_boundary(config: str, case: Case) -> None:
    parser = _parser(config)
    text = case.text
    _assert_stream_matches(parser, case, list(text), (True,))
    # Two chunks: the second feed re-parses fully at most cuts, which tests that path too.
    for cut in range(1, len(text)):
        _assert_stream_matches(parser, case, [text[:cut], text[cut:]], (True,))


@pytest.mark.parametrize(("config", "case"), STREAM_CASES, ids=STREAM_IDS)
def test_stream_random_chunks(config: str, case: Case) -> None:
    parser = _parser(config)
    rng = random.Random(f"{config}/{case.name}")
    for _ in range(8):
        chunks, rest = [], case.text
        while rest:
            size = rng.randint(1, 8)
            chunks.append(rest[:size])
            rest = rest[size:]
        _assert_stream_matches(parser, case, chunks)


def test_stream_without_tools_keeps_key_value_arguments_as_text() -> None:
    parser = _parser("qwen3.5-0.8b.json")
    text = _qwen_call("get_weather", city="Paris", days="3")
    message = parser.parse(text, prefix=QWEN_NO_THINK)
    assert json.loads(message.tool_calls[0]["function"]["arguments"]) == {
        "city": "Paris",
        "days": "3",
    }
    assert message.tool_calls[0]["id"].startswith("call_")


def test_invalid_json_arguments_are_kept_raw() -> None:
    parser = _parser("gpt-oss-120b.json")
    message = parser.parse(_oss_call("get_weather", "{city: Paris}"), prefix=OSS)
    assert message.tool_calls[0]["function"]["arguments"] == "{city: Paris}"
    assert message.tool_call_parse_error


def test_non_object_json_arguments_are_flagged() -> None:
    message = _parser("gpt-oss-120b.json").parse(_oss_call("get_weather", "[1, 2]"), prefix=OSS)
    assert message.tool_calls[0]["function"]["arguments"] == "[1, 2]"
    assert message.tool_call_parse_error


def test_plain_text_streams_with_few_full_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = ResponseSchemaParser(_config("qwen3.5-0.8b.json")["model"]["response_schema"])
    calls = 0
    original = parser.analyse

    def counting(text: str, tools: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(text, tools)

    monkeypatch.setattr(parser, "analyse", counting)
    stream = IncrementalSchemaParser(parser, prefix=QWEN_THINK)
    words = [f" word{i}" + ("\n" if i % 7 == 0 else "") for i in range(400)]
    reasoning = "".join(stream.feed(word)[0].reasoning_content or "" for word in words[:5])
    for word in words[5:]:
        for delta in stream.feed(word):
            reasoning += delta.reasoning_content or ""
    stream.feed("</think>\n\n")
    for word in words:
        stream.feed(word)
    stream.finish()
    assert stream.message.reasoning_content == "".join(words)
    assert stream.message.content == "".join(words).lstrip().rstrip("\n")
    assert reasoning == "".join(words).rstrip()
    assert calls < 100  # ~800 feeds; without the fast path every feed re-parses ~8 times


def test_truncated_reasoning_then_stream_end() -> None:
    parser = _parser("qwen3.5-0.8b.json")
    stream = IncrementalSchemaParser(parser, prefix=QWEN_THINK)
    pieces = [d.reasoning_content for d in stream.feed("Let me think") if d.reasoning_content]
    pieces += [d.reasoning_content for d in stream.finish() if d.reasoning_content]
    assert "".join(pieces) == "Let me think"
    assert stream.message.content is None


@pytest.mark.parametrize(
    ("config", "prefix"), [("qwen3.5-0.8b.json", QWEN_THINK), ("gemma-4-12b-it-qat.json", GEMMA_THINK)]
)
def test_empty_reasoning_block_leaves_no_marker(config: str, prefix: str) -> None:
    opened = prefix if config.startswith("qwen") else prefix + "<|channel>thought\n"
    message = _parser(config).parse(opened)
    assert (message.content, message.reasoning_content) == (None, None)


def test_missing_prefix_holds_ambiguous_text_until_the_end() -> None:
    parser = _parser("qwen3.5-0.8b.json")
    stream = IncrementalSchemaParser(parser)
    assert stream.feed("Hello there") == []  # could still be reasoning closed by </think>
    assert [d.content for d in stream.finish()] == ["Hello there"]


# Schema validation ---------------------------------------------------------------------------


def _schema(**content: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"role": {"const": "assistant"}, "content": {"type": "string", **content}},
    }


@pytest.mark.parametrize(
    ("schema", "pointer"),
    [
        (_schema(**{"x-regex": "(unclosed"}), "/properties/content/x-regex"),
        (_schema(**{"x-regexp": "(.*)"}), "/properties/content/x-regexp"),
        (_schema(**{"x-parser": "yaml"}), "/properties/content/x-parser"),
        (_schema(**{"x-regex": 5}), "/properties/content/x-regex"),
        (_schema(**{"x-parser-args": {}}), "/properties/content/x-parser-args"),
        (_schema(**{"x-regex-iterator": "(.*)"}), "/properties/content/x-regex-iterator"),
        (
            {
                "type": "object",
                "properties": {"a/b": {"type": "object", "x-regex-key-value": "(?P<key>\\w+)=(\\w+)"}},
            },
            "/properties/a~1b/x-regex-key-value",
        ),
        ({"type": "string", "x-regex": "(.*)"}, "/"),
    ],
)
def test_invalid_schema_names_pointer(schema: dict[str, Any], pointer: str) -> None:
    with pytest.raises(ValueError, match=f"at {pointer}:"):
        ResponseSchemaParser(schema)


def test_named_groups_and_const() -> None:
    schema = {
        "type": "object",
        "properties": {
            "role": {"const": "assistant"},
            "content": {"type": "string", "x-regex": "^(.*?)(?=CALL|$)"},
            "tool_calls": {
                "type": "array",
                "x-regex-iterator": "CALL (\\w+ \\{.*?\\})",
                "items": {
                    "type": "object",
                    "properties": {
                        "type": {"const": "function"},
                        "id": {"const": "fixed"},
                        "function": {
                            "type": "object",
                            "x-regex": "^(?P<name>\\w+) (?P<arguments>\\{.*\\})$",
                            "properties": {
                                "name": {"type": "string"},
                                "arguments": {"type": "object"},
                            },
                        },
                    },
                },
            },
        },
    }
    parser = ResponseSchemaParser(schema)
    message = parser.parse('Hi CALL f {"a": 1} CALL g {oops}')
    assert message.content == "Hi "
    assert [c["function"]["name"] for c in message.tool_calls] == ["f", "g"]
    assert [c["id"] for c in message.tool_calls] == ["fixed", "fixed"]
    assert message.tool_calls[0]["function"]["arguments"] == '{"a":1}'
    assert message.tool_calls[1]["function"]["arguments"] == "{oops}"
    assert message.tool_call_parse_error


def test_generic_schema_without_span_tracking() -> None:
    schema = {
        "type": "object",
        "properties": {
            "thinking": {"x-regex": "^<r>(.*?)</r>"},
            "content": {"oneOf": [{"type": "string", "x-regex": "</r>(.+)$"}, {"type": "string"}]},
        },
    }
    parser = ResponseSchemaParser(schema)
    assert not parser.spans_tracked
    case = Case("generic", "", "<r>why</r>because", content="because", reasoning="why")
    message = parser.parse(case.text)
    assert (message.reasoning_content, message.content) == ("why", "because")
    _assert_stream_matches(parser, case, list(case.text))
    _assert_stream_matches(parser, case, [case.text[:5], case.text[5:]])


# Helpers -----------------------------------------------------------------------------------------


def test_literal_runs() -> None:
    assert literal_runs(r"^(?:<\|im_start\|>assistant\n)?(?:<think>\n)?(.*?)(?=</think>)") == [
        "<|im_start|>assistant\n",
        "<think>\n",
        "</think>",
    ]
    assert literal_runs(r"ab?cd[xy]ef{2}(?P<k>gh)\d\.ij") == ["cd", "gh", ".ij"]


def test_gemma_arguments() -> None:
    assert parse_gemma_arguments(f"{{a:{Q}x, y{Q},b:[1,true,null],c:{{d:-2.5}},e:word}}") == {
        "a": "x, y",
        "b": [1, True, None],
        "c": {"d": -2.5},
        "e": "word",
    }
    assert parse_gemma_arguments(f"[k:{Q}v{Q}]") == {"k": "v"}
    assert parse_gemma_arguments("[1, 2]") == [1, 2]
    assert parse_gemma_arguments('{"quoted":"json"}') == {"quoted": "json"}
    with pytest.raises(GemmaArgumentsError):
        parse_gemma_arguments(f"{{a:{Q}unterminated}}")
    with pytest.raises(GemmaArgumentsError):
        parse_gemma_arguments("{a:1} extra")
