"""Grammars that make tool calls valid by construction, one per tool-call format.

A format knows how a model writes one call (its opening text, the arguments, its closing text). From a
request's tools and tool_choice this module builds the grammar:

* `required` / a named function: the whole output is calls (one, or up to `MAX_PARALLEL_CALLS` with
  `parallel_tool_calls`), each call's arguments matching that function's `parameters` schema;
* `auto`: the same grammar, lazy: it engages when the model writes the format's call marker.

Formats: `hermes` (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the default protocol and
what Hermes/Qwen 2.5/Qwen 3 templates use) and `qwen-xml` (Qwen 3.5/3.6: `<function=NAME>` with one
`<parameter=KEY>` block per argument). Formats without a grammar here (Gemma 4's, gpt-oss's harmony)
still get their calls parsed by the config's response_schema, but cannot be forced.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router.api.errors import APIError
from router.structured import GrammarBuilder, UnsupportedSchemaError, add_schema
from router.structured.response_format import (
    GrammarPlan,
    check_schema_size,
    escape_trigger,
    gbnf_string,
    schema_rule,
)

MAX_PARALLEL_CALLS = 8  # calls one constrained answer may hold: bounded so a small model cannot loop
_GAP = "[ \\t\\n]{0,4}"  # blanks allowed between calls and around the reasoning end
_XML_TEXT_MAX = 2000  # llama.cpp's repetition limit


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes tool calls; `grammar` False for formats only parsed, never constrained."""

    name: str
    marker: str  # the text that starts a call (the lazy grammar's trigger)
    grammar: bool = True

    def opening(self, function: str) -> str:
        """The text a call of `function` starts with, up to its arguments."""
        raise NotImplementedError

    def call_rule(self, builder: GrammarBuilder, function: Mapping[str, Any], param: str) -> str:
        """A rule for one whole call of `function`."""
        raise NotImplementedError

    def rest_rule(self, builder: GrammarBuilder, function: Mapping[str, Any], param: str) -> str:
        """A rule for the rest of a call of `function` after its `opening` (already in the prompt)."""
        raise NotImplementedError


class HermesFormat(ToolFormat):
    """`<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>` (JSON arguments)."""

    def opening(self, function: str) -> str:
        return f'<tool_call>\n{{"name": "{function}", "arguments": '

    def call_rule(self, builder: GrammarBuilder, function: Mapping[str, Any], param: str) -> str:
        name = str(function["name"])
        args = _arguments_rule(builder, function, param)
        body = (
            f'"<tool_call>" ws "{{" ws "\\"name\\"" ws ":" ws {gbnf_string(_json_string(name))} ws "," ws'
            f' "\\"arguments\\"" ws ":" ws {args} ws "}}" ws "</tool_call>"'
        )
        return builder.add(f"call-{name}", body)

    def rest_rule(self, builder: GrammarBuilder, function: Mapping[str, Any], param: str) -> str:
        args = _arguments_rule(builder, function, param)
        return builder.add(f"rest-{function['name']}", f'{args} ws "}}" ws "</tool_call>"')


class QwenXmlFormat(ToolFormat):
    """`<tool_call>\\n<function=f>\\n<parameter=k>\\nvalue\\n</parameter>\\n</function>\\n</tool_call>`."""

    def opening(self, function: str) -> str:
        return f"<tool_call>\n<function={function}>\n"

    def call_rule(self, builder: GrammarBuilder, function: Mapping[str, Any], param: str) -> str:
        name = str(function["name"])
        rest = self.rest_rule(builder, function, param)
        return builder.add(f"call-{name}", f"{gbnf_string(self.opening(name))} {rest}")

    def rest_rule(self, builder: GrammarBuilder, function: Mapping[str, Any], param: str) -> str:
        name = str(function["name"])
        parameters = function.get("parameters") or {}
        properties = parameters.get("properties") or {}
        if not isinstance(properties, Mapping):
            raise APIError(400, f"{param}/properties must be an object", param=param)
        required = set(parameters.get("required") or [])
        parts: list[str] = []
        for key, schema in properties.items():
            value = _xml_value(builder, schema, f"{name}-{key}", f"{param}/properties/{key}")
            start, end = gbnf_string(f"<parameter={key}>\n"), gbnf_string("\n</parameter>\n")
            block = builder.add(f"param-{name}-{key}", f"{start} {value} {end}")
            parts.append(block if key in required else f"{block}?")
        body = " ".join([*parts, gbnf_string("</function>\n</tool_call>")])
        return builder.add(f"rest-{name}", body)


HERMES = HermesFormat("hermes", "<tool_call>")
QWEN_XML = QwenXmlFormat("qwen-xml", "<tool_call>")


def detect_format(response_schema: Mapping[str, Any] | None) -> ToolFormat:
    """The tool-call format of a config: from its response_schema's tool-call regex, else Hermes."""
    if not response_schema:
        return HERMES
    tool_calls = (response_schema.get("properties") or {}).get("tool_calls") or {}
    pattern = "\n".join(_strings(tool_calls))  # every regex inside, the items' ones included
    if "<function=" in pattern:
        return QWEN_XML
    if "tool_call>" in pattern and "call:" in pattern:
        return ToolFormat("gemma4", "<|tool_call>", grammar=False)
    if "to=functions" in pattern:
        return ToolFormat("harmony", "to=functions.", grammar=False)
    if "<tool_call>" in pattern:
        return HERMES
    return ToolFormat("unknown", "", grammar=False)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def _json_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _arguments_rule(builder: GrammarBuilder, function: Mapping[str, Any], param: str) -> str:
    parameters = function.get("parameters")
    if parameters is None:
        return '"{" ws "}"'
    return schema_rule(builder, parameters, f"args-{function['name']}", param)


def _xml_value(builder: GrammarBuilder, schema: Any, hint: str, param: str) -> str:
    """One `<parameter>` value: raw text for strings (as the template writes them), JSON otherwise."""
    if not isinstance(schema, Mapping):
        return builder.add("xml-text", _xml_text(None, None))
    declared = schema.get("type")
    types = [declared] if isinstance(declared, str) else declared
    choices = schema.get("enum")
    if "const" in schema:
        choices = [schema["const"]]
    if choices is not None and all(isinstance(c, str) for c in choices):
        if any("\n" in c for c in choices):
            raise APIError(400, f"{param}: enum values with line breaks are not supported", param=param)
        return "(" + " | ".join(gbnf_string(c) for c in choices) + ")"
    if not isinstance(types, list) or not types or "string" in types:
        for keyword in ("pattern", "format"):
            if keyword in schema:
                raise APIError(
                    400,
                    f"{param}/{keyword} is not supported for this model's tool-call format",
                    param=param,
                )
        lo, hi = schema.get("minLength"), schema.get("maxLength")
        if lo is None and hi is None:
            return builder.add("xml-text", _xml_text(None, None))
        return builder.add(f"text-{hint}", _xml_text(lo, hi))
    try:
        return add_schema(builder, dict(schema), f"value-{hint}", strict=True)
    except UnsupportedSchemaError as error:
        raise APIError(
            400, f"{param} is not supported: {error.pointer}: {error.reason}", param=param
        ) from error


def _xml_text(lo: Any, hi: Any) -> str:
    """Text that never contains a line starting with `<` (so `\\n</parameter>` always ends it)."""
    if lo is None and hi is None:
        return '[^\\n]* ( "\\n" ( [^<\\n] [^\\n]* )? )*'
    low = int(lo or 0)
    high = min(int(hi), _XML_TEXT_MAX) if hi is not None else None
    if high is not None and low > high:
        raise APIError(400, "minLength exceeds maxLength", param="tools")
    bound = f"{{{low},{'' if high is None else high}}}"
    return f"[^\\n]{bound}"


def tool_grammar(
    fmt: ToolFormat,
    tools: Sequence[Mapping[str, Any]],
    choice: str | None,
    *,
    parallel: bool,
    prefilled: str = "",
    reasoning_end: str | None = None,
) -> GrammarPlan | None:
    """The grammar for a request's tool calls; None when it has nothing to constrain.

    `choice` is "auto", "required" or a function name. `prefilled` is what the template already
    wrote of the answer (a template that opens the forced call itself). `reasoning_end` is set when the
    prompt leaves reasoning open: the grammar then starts at that marker.
    """
    if choice in (None, "none"):
        return None
    if not fmt.grammar:
        if choice == "auto":
            return None
        raise APIError(
            400,
            f"tool_choice {choice!r} is not supported for this model's tool-call format ({fmt.name})",
            param="tool_choice",
        )
    check_schema_size(list(tools), "tools")
    builder = GrammarBuilder()
    functions = [(i, t.get("function", t)) for i, t in enumerate(tools)]
    if choice not in ("auto", "required"):
        functions = [(i, f) for i, f in functions if f.get("name") == choice]
        parallel = False
    if not functions:
        return None
    opening = fmt.opening(str(functions[0][1]["name"])) if len(functions) == 1 else None
    if opening and prefilled.endswith(opening):
        index, function = functions[0]
        rest = fmt.rest_rule(builder, function, f"tools[{index}].function.parameters")
        builder.define(builder.reserve("root"), rest)
        return GrammarPlan(builder.render("root"))
    calls = [fmt.call_rule(builder, f, f"tools[{i}].function.parameters") for i, f in functions]
    call = builder.add("call", " | ".join(calls)) if len(calls) > 1 else calls[0]
    body = call
    if parallel:
        body = f"{call} ( {_GAP} {call} ){{0,{MAX_PARALLEL_CALLS - 1}}}"
    if choice == "auto":
        trigger = escape_trigger(fmt.marker)
        if reasoning_end is not None:
            trigger = f"{escape_trigger(reasoning_end)}[\\s\\S]*?({trigger})"
        builder.define(builder.reserve("root"), body)
        return GrammarPlan(builder.render("root"), [trigger])
    if reasoning_end is not None:
        builder.define(builder.reserve("root"), f"{gbnf_string(reasoning_end)} {_GAP} {body}")
        return GrammarPlan(builder.render("root"), [escape_trigger(reasoning_end)])
    builder.define(builder.reserve("root"), body)
    return GrammarPlan(builder.render("root"))
