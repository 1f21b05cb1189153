"""Tools in the prompt: hand them to a chat template that knows them, or apply the default protocol.

A template "knows tools" when it reads the `tools` variable (Qwen, Gemma 4, gpt-oss, our Gemma 3 config):
it then gets the tools and the messages Hugging Face style (assistant `tool_calls` with arguments as
objects, `role: "tool"` results). Templates that ignore tools (SmolLM2's, most base-model templates) get
the **default tool protocol**, Hermes style, written into the messages by the router:

* a system preamble listing the functions (their JSON Schemas inside `<tools></tools>`) and the call
  syntax: `<tool_call>\\n{"name": <function>, "arguments": <JSON object>}\\n</tool_call>`;
* earlier assistant calls rendered in that syntax, and tool results as user turns wrapped in
  `<tool_response></tool_response>`.

The model's output is then parsed in the same syntax (router/parsers/hermes.py).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from jinja2 import meta

PREAMBLE = (
    "You can call functions. Their signatures (JSON Schema of the arguments) are:\n<tools>\n{tools}\n"
    "</tools>\n\nTo call a function, answer with one block per call, exactly in this form:\n"
    '<tool_call>\n{{"name": "<function name>", "arguments": <arguments as a JSON object>}}\n</tool_call>'
)
_CHOICE_RULES = {
    "required": "\nYou must call at least one function.",
}


@functools.lru_cache(maxsize=16)
def template_knows_tools(source: str) -> bool:
    """Whether a chat template reads the `tools` variable."""
    try:
        parsed = jinja2.Environment().parse(source)
    except jinja2.TemplateSyntaxError:
        return False
    return "tools" in meta.find_undeclared_variables(parsed)


def _arguments_object(arguments: Any) -> Any:
    """Tool-call arguments as templates expect them: an object (OpenAI sends a JSON string)."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return arguments
        return parsed
    return arguments


def hf_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages in the Hugging Face template convention (content never None, arguments as objects)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        item = dict(message)
        if item.get("content") is None:
            item["content"] = ""
        if item.get("tool_calls"):
            calls = []
            for call in item["tool_calls"]:
                call = dict(call)
                function = dict(call.get("function") or {})
                function["arguments"] = _arguments_object(function.get("arguments", {}))
                call["function"] = function
                calls.append(call)
            item["tool_calls"] = calls
        out.append(item)
    return out


def render_call(name: str, arguments: Any) -> str:
    """One call in the default protocol's syntax."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return (
        f'<tool_call>\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}\n</tool_call>'
    )


def preamble(tools: Sequence[Mapping[str, Any]], choice: str) -> str:
    """The default protocol's system text for these tools and tool_choice."""
    listed = "\n".join(json.dumps(dict(tool), ensure_ascii=False) for tool in tools)
    text = PREAMBLE.format(tools=listed)
    if choice in _CHOICE_RULES:
        text += _CHOICE_RULES[choice]
    elif choice not in ("auto", "none"):
        text += f"\nYou must call the function {choice}."
    return text


def default_protocol(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None, choice: str
) -> list[dict[str, Any]]:
    """Messages with the default tool protocol written into them (for templates without tools)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = [
                render_call(
                    str((c.get("function") or {}).get("name", "")),
                    _arguments_object((c.get("function") or {}).get("arguments", {})),
                )
                for c in message["tool_calls"]
            ]
            text = "\n".join(([content] if content else []) + calls)
            out.append({"role": "assistant", "content": text})
        elif role in ("tool", "function"):
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("role") == "user" and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            item = {k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")}
            item["content"] = content
            out.append(item)
    for item in out:
        item.pop("_tool_results", None)
    if tools and choice != "none":
        text = preamble(tools, choice)
        if out and out[0].get("role") in ("system", "developer"):
            first = dict(out[0])
            first["content"] = text + "\n\n" + str(first.get("content") or "")
            out[0] = first
        else:
            out.insert(0, {"role": "system", "content": text})
    return out
