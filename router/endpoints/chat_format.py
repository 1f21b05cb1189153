"""Typed choice output (router/parsers/output.py) in chat completions' shapes: `delta` and `message` objects.

Reasoning goes out under both names clients read (`reasoning_content`, as llama-server, and `reasoning`, as
vLLM), or not at all when the request drops it (`include_reasoning: false`). A tool call's first delta
carries its id, type and name; later ones only argument text. The raw text of a call the output ended
inside is content.
"""

from __future__ import annotations

from typing import Any

from router.parsers.output import CallDelta, OutputDelta, OutputMessage


def reasoning_fields(text: str) -> dict[str, str]:
    return {"reasoning_content": text, "reasoning": text}


def _call_delta(call: CallDelta) -> dict[str, Any]:
    if call.opens:
        function = {"name": call.name, "arguments": call.arguments}
        return {"index": call.index, "id": call.id, "type": call.type, "function": function}
    return {"index": call.index, "function": {"arguments": call.arguments}}


def chat_delta(delta: OutputDelta, include_reasoning: bool) -> dict[str, Any] | None:
    """The chunk's `delta` object, or None when nothing of it goes to the client."""
    if delta.content is not None:
        return {"content": delta.content}
    if delta.reasoning is not None:
        return reasoning_fields(delta.reasoning) if include_reasoning else None
    if delta.call is not None:
        return {"tool_calls": [_call_delta(delta.call)]}
    if delta.cut_call is not None:
        return {"content": delta.cut_call}
    return None


def chat_deltas(deltas: list[OutputDelta], include_reasoning: bool) -> list[dict[str, Any]]:
    formatted = (chat_delta(delta, include_reasoning) for delta in deltas)
    return [delta for delta in formatted if delta is not None]


def chat_message(message: OutputMessage, include_reasoning: bool) -> dict[str, Any]:
    """The choice's `message` object."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": call.id, "type": call.type, "function": {"name": call.name, "arguments": call.arguments}}
            for call in message.tool_calls
        ]
    if message.reasoning is not None and include_reasoning:
        out.update(reasoning_fields(message.reasoning))
    return out
