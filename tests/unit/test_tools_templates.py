"""Tools through chat templates: every shipped config renders a tool conversation, and plan_chat picks
the right prompt, grammar and parser per model family."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from router.api.errors import APIError
from router.endpoints.chat_format import chat_message
from router.endpoints.responses import RESPONSES_FIELDS
from router.openai.requests import ChatCompletionRequest
from router.parsers import ResponseSchemaParser
from router.preprocess.chat_plan import CHAT_FIELDS, plan_chat
from router.preprocess.templating import ChatTemplate
from router.preprocess.tool_prompts import default_protocol, hf_messages, template_knows_tools
from router.state import ServerState
from tests.unit.gbnf_match import matches

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(
    p
    for p in (REPO / "configs").glob("*.json")
    if "chat_template" in json.loads(p.read_text()).get("model", {})
)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


def model_config(path: Path) -> dict[str, Any]:
    model: dict[str, Any] = json.loads(path.read_text())["model"]
    source = model["chat_template"]
    model["chat_template"] = "".join(source) if isinstance(source, list) else source
    return model


def stub_state(template: str, response_schema: dict[str, Any] | None = None) -> Any:
    state = SimpleNamespace(
        template=ChatTemplate(template, "<bos>", "<eos>"),
        config=SimpleNamespace(model=SimpleNamespace(response_schema=response_schema)),
        response_parser=ResponseSchemaParser(response_schema) if response_schema else None,
    )
    state.render_chat = lambda *args: ServerState.render_chat(state, *args)  # type: ignore[arg-type]
    return state


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": CONVERSATION, "tools": TOOLS, **fields})


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_templates_render_tool_conversations(path: Path) -> None:
    model = model_config(path)
    assert template_knows_tools(model["chat_template"]), "every shipped template renders tools"
    plan = plan_chat(stub_state(model["chat_template"], model.get("response_schema")), request())
    assert "get_weather" in plan.prompt
    assert "Current weather" in plan.prompt  # the tool definition
    assert "Paris" in plan.prompt  # the earlier call's arguments
    assert "sunny, 21 C" in plan.prompt  # the tool result
    assert plan.grammar is not None or "gemma-4" in path.stem or "gpt-oss" in path.stem


def test_template_without_tools_gets_the_default_protocol() -> None:
    assert not template_knows_tools(CHATML)
    plan = plan_chat(stub_state(CHATML), request(tool_choice="required"))
    assert "<|im_start|>system\nYou can call functions." in plan.prompt
    assert json.dumps(TOOLS[0]) in plan.prompt
    assert "You must call at least one function.\n\nBe brief." in plan.prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in plan.prompt
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in plan.prompt
    assert plan.grammar is not None and plan.grammar.triggers == []
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'
    assert matches(plan.grammar.grammar, call)


def test_tool_choice_none_keeps_history_but_no_tools() -> None:
    messages = default_protocol(hf_messages(CONVERSATION), TOOLS, "none")
    assert not any("You can call functions" in str(m["content"]) for m in messages)
    plan = plan_chat(stub_state(CHATML), request(tool_choice="none"))
    assert plan.grammar is None and "<tool_response>" in plan.prompt


def test_gemma_config_template_matches_the_default_protocol() -> None:
    gemma = model_config(REPO / "configs/gemma-3-270m.json")["chat_template"]
    by_template = plan_chat(stub_state(gemma), request()).prompt
    by_router = plan_chat(stub_state(CHATML), request()).prompt
    start = by_router.index("You can call functions.")
    preamble = by_router[start : by_router.index("\n\nBe brief.")]
    assert preamble in by_template
    auto = plan_chat(stub_state(gemma), request())
    assert auto.grammar is not None and auto.grammar.triggers == ["<tool_call>"]


def test_qwen_forced_call_continues_the_templates_opening() -> None:
    model = model_config(REPO / "configs/qwen3.5-0.8b.json")
    state = stub_state(model["chat_template"], model["response_schema"])
    plan = plan_chat(state, request(tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert plan.generation_prompt.endswith("<tool_call>\n<function=get_weather>\n")
    assert plan.grammar is not None and plan.grammar.triggers == []
    rest = "<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>"
    assert matches(plan.grammar.grammar, rest)
    output = plan.outputs()
    output.feed(rest)
    _, reason = output.finish("stop")
    message = chat_message(output.message(), True)
    assert reason == "tool_calls"
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [{"city": "Rome"}]


def test_qwen_thinking_makes_auto_tools_wait_for_the_end_of_reasoning() -> None:
    model = model_config(REPO / "configs/qwen3.5-0.8b.json")
    state = stub_state(model["chat_template"], model["response_schema"])
    thinking = plan_chat(state, request())
    assert thinking.generation_prompt.endswith("<think>\n")
    assert thinking.grammar is not None
    assert thinking.grammar.triggers == ["<\\/think>[\\s\\S]*?(<tool_call>)"]
    quiet = plan_chat(state, request(chat_template_kwargs={"enable_thinking": False}))
    assert quiet.grammar is not None and quiet.grammar.triggers == ["<tool_call>"]
    low = plan_chat(state, request(reasoning_effort="low"))
    assert "</think>" in low.generation_prompt


def test_planning_errors_name_the_fields_as_the_client_sent_them() -> None:
    """Chat and the Responses API share the planner; each error names its own request's field."""
    state = stub_state(CHATML)
    forced = request(tool_choice="required", response_format={"type": "json_object"})
    unsupported = request(
        tool_choice="none",
        response_format={
            "type": "json_schema",
            "json_schema": {"schema": {"not": {"type": "string"}}},
        },
    )
    for fields, format_name, schema_name in (
        (CHAT_FIELDS, "response_format", "response_format.json_schema.schema"),
        (RESPONSES_FIELDS, "text.format", "text.format.schema"),
    ):
        with pytest.raises(APIError) as forced_error:
            plan_chat(state, forced, fields)
        assert forced_error.value.message.endswith(f"cannot be combined with {format_name}")
        with pytest.raises(APIError) as schema_error:
            plan_chat(state, unsupported, fields)
        assert schema_error.value.param == schema_name
        assert schema_error.value.message.startswith(f"{schema_name} is not supported")
