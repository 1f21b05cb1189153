"""A response's life as Responses API events, served over SSE or collected into one response object.

The choice output parser (router/parsers/output.py) turns generated text into typed deltas (content,
reasoning, tool-call openings and argument pieces); `OutputAssembler` turns those into output items
and their events in OpenAI's order: each item is added, filled by deltas and done before the next one
is added; `response.created` and `response.in_progress` come first and `response.completed` (or
`.incomplete` / `.failed`) last, every event with a `sequence_number` from 0. The non-streamed answer
runs the same events and keeps the final response object, so both shapes always agree.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from router.api.sse import EventStream, run_unless_disconnected
from router.client.dispatch import WorkerFailure
from router.endpoints.responses import (
    PreparedResponse,
    ResponsesRequest,
    check_stateless,
    new_id,
    start_response,
)
from router.endpoints.responses import usage_object as _usage_object
from router.parsers.output import CallDelta, OutputDelta
from router.state import ServerState
from shared.protocol import FINISH_CANCELLED, FINISH_LENGTH

Event = dict[str, Any]


@dataclass
class _Item:
    index: int  # output_index
    data: dict[str, Any]  # the output item, updated in place

    @property
    def kind(self) -> str:
        return str(self.data["type"])


@dataclass
class OutputAssembler:
    """Output deltas in, output items and their events out (events carry no sequence number yet)."""

    items: list[_Item] = field(default_factory=list)
    _open: _Item | None = None
    _calls: dict[int, _Item] = field(default_factory=dict)
    _pending_blank: str = ""  # whitespace that starts a message only if text follows

    @property
    def output(self) -> list[dict[str, Any]]:
        return [item.data for item in self.items]

    def reasoning_text(self) -> str:
        return "".join(
            part["text"] for item in self.items if item.kind == "reasoning" for part in item.data["content"]
        )

    def _add(self, data: dict[str, Any]) -> tuple[_Item, list[Event]]:
        events = self._close("completed")
        item = _Item(len(self.items), data)
        self.items.append(item)
        self._open = item
        events.append({"type": "response.output_item.added", "output_index": item.index, "item": _copy(data)})
        if item.kind in ("message", "reasoning"):
            part = _empty_part(item.kind)
            data["content"].append(part)
            events.append(
                {
                    "type": "response.content_part.added",
                    "item_id": data["id"],
                    "output_index": item.index,
                    "content_index": 0,
                    "part": _copy(part),
                }
            )
        return item, events

    def _text(self, kind: str, text: str) -> list[Event]:
        events: list[Event] = []
        item = self._open
        if item is None or item.kind != kind:
            if kind == "message":
                item, events = self._add(
                    {
                        "id": new_id("msg"),
                        "type": "message",
                        "status": "in_progress",
                        "role": "assistant",
                        "content": [],
                    }
                )
            else:
                item, events = self._add(
                    {
                        "id": new_id("rs"),
                        "type": "reasoning",
                        "status": "in_progress",
                        "summary": [],
                        "content": [],
                    }
                )
        item.data["content"][0]["text"] += text
        delta: Event = {
            "type": "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta",
            "item_id": item.data["id"],
            "output_index": item.index,
            "content_index": 0,
            "delta": text,
        }
        if kind == "message":
            delta["logprobs"] = []
        events.append(delta)
        return events

    def feed(self, delta: OutputDelta, cut: bool = False) -> list[Event]:
        """Events for one output delta.

        `cut`: one of the last deltas of an output stopped by max_output_tokens. Chat reports a call cut
        short as its raw text; here the call's own item (status incomplete) already says so.
        """
        events: list[Event] = []
        if delta.reasoning:
            events += self._text("reasoning", delta.reasoning)
        content = delta.content if delta.cut_call is None else delta.cut_call
        if cut and self._open is not None and self._open.kind == "function_call":
            content = None
        if content:
            if self._open is None or self._open.kind != "message":
                if not content.strip():
                    self._pending_blank += content
                    return events
                content, self._pending_blank = self._pending_blank + content, ""
            events += self._text("message", content)
        if delta.call is not None:
            events += self._tool_call(delta.call)
        return events

    def _tool_call(self, call: CallDelta) -> list[Event]:
        events: list[Event] = []
        item = self._calls.get(call.index)
        if item is None:
            self._pending_blank = ""
            item, events = self._add(
                {
                    "id": new_id("fc"),
                    "type": "function_call",
                    "status": "in_progress",
                    "call_id": call.id or new_id("call"),
                    "name": call.name or "",
                    "arguments": "",
                }
            )
            self._calls[call.index] = item
        arguments = call.arguments
        if arguments:
            item.data["arguments"] += arguments
            events.append(
                {
                    "type": "response.function_call_arguments.delta",
                    "item_id": item.data["id"],
                    "output_index": item.index,
                    "delta": arguments,
                }
            )
        return events

    def _close(self, status: str) -> list[Event]:
        item, self._open = self._open, None
        if item is None:
            return []
        data = item.data
        data["status"] = status
        head = {"item_id": data["id"], "output_index": item.index}
        events: list[Event] = []
        if item.kind == "function_call":
            events.append(
                {
                    "type": "response.function_call_arguments.done",
                    **head,
                    "name": data["name"],
                    "arguments": data["arguments"],
                }
            )
        else:
            part = data["content"][0]
            done = "response.output_text.done" if item.kind == "message" else "response.reasoning_text.done"
            text_done: Event = {"type": done, **head, "content_index": 0, "text": part["text"]}
            if item.kind == "message":
                text_done["logprobs"] = []
            events.append(text_done)
            events.append(
                {"type": "response.content_part.done", **head, "content_index": 0, "part": _copy(part)}
            )
        events.append({"type": "response.output_item.done", "output_index": item.index, "item": _copy(data)})
        return events

    def finish(self, status: str) -> list[Event]:
        """Closes the open item; whitespace that never led to text becomes a message only if alone."""
        if self._pending_blank and not self.items:
            blank, self._pending_blank = self._pending_blank, ""
            events = self._text("message", blank)
            return events + self._close(status)
        return self._close(status)


def _empty_part(kind: str) -> dict[str, Any]:
    if kind == "message":
        return {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    return {"type": "reasoning_text", "text": ""}


def _copy(data: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(data)


@dataclass
class ResponseRun:
    """Runs one prepared response, yielding its events; `final` is the finished response object."""

    state: ServerState
    prepared: PreparedResponse
    stream_id: str | None = None
    final: dict[str, Any] | None = None
    failure: WorkerFailure | None = None
    _sequence: int = 0

    def _event(self, event: Event) -> Event:
        event = {"type": event["type"], "sequence_number": self._sequence, **event}
        if self.stream_id is not None:
            event["stream_id"] = self.stream_id
        self._sequence += 1
        return event

    async def events(self) -> AsyncGenerator[Event, None]:
        draft, generation, output = self.prepared.draft, self.prepared.generation, self.prepared.output
        assembler = OutputAssembler()
        started = draft.envelope("in_progress", [], None)
        yield self._event({"type": "response.created", "response": started})
        yield self._event({"type": "response.in_progress", "response": started})
        finish: str | None = None
        try:
            async for delta in generation.events():
                if self.prepared.discard_output:
                    finish = delta.finish_reason or finish
                    continue
                deltas = [(d, False) for d in output.feed(delta.text)]
                if delta.finish_reason is not None:
                    last, finish = output.finish(delta.finish_reason)
                    deltas += [(d, finish == FINISH_LENGTH) for d in last]
                for output_delta, cut in deltas:
                    for event in assembler.feed(output_delta, cut):
                        yield self._event(event)
        except WorkerFailure as failure:
            self.failure = failure
            for event in assembler.finish("incomplete"):
                yield self._event(event)
            error = {"code": "server_error", "message": failure.message}
            self.final = draft.envelope("failed", assembler.output, self._usage(assembler), error=error)
            yield self._event({"type": "response.failed", "response": self.final})
            return
        incomplete = finish in (FINISH_LENGTH, FINISH_CANCELLED) and not self.prepared.discard_output
        for event in assembler.finish("incomplete" if incomplete else "completed"):
            yield self._event(event)
        details = None
        if incomplete:
            details = {"reason": "max_output_tokens" if finish == FINISH_LENGTH else "cancelled"}
        status = "incomplete" if incomplete else "completed"
        self.final = draft.envelope(status, assembler.output, self._usage(assembler), details)
        yield self._event({"type": f"response.{status}", "response": self.final})

    def _usage(self, assembler: OutputAssembler) -> dict[str, Any]:
        usage = self.prepared.generation.usage
        if self.prepared.discard_output:
            usage = type(usage)(usage.prompt_tokens, 0, usage.cached_tokens)
        reasoning = self.prepared.reasoning_tokens(self.state, assembler.reasoning_text())
        return _usage_object(usage, reasoning)

    async def collect(self) -> dict[str, Any]:
        """The final response object; a worker failure is raised (an HTTP error, as in chat)."""
        async for _ in self.events():
            pass
        if self.failure is not None:
            raise self.failure
        assert self.final is not None
        return self.final


def sse_event(event: Event) -> bytes:
    payload = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {payload}\n\n".encode()


async def _sse(run: ResponseRun) -> AsyncIterator[bytes]:
    events = run.events()
    try:
        async for event in events:
            yield sse_event(event)
    finally:  # as in sse_with_errors: the generation is cancelled at once, whatever ended the stream
        await events.aclose()


async def create_response(state: ServerState, body: ResponsesRequest, http: Request) -> Any:
    """POST /v1/responses: stateless; streamed as SSE events or answered with the response object."""
    state.check_model(body.model)
    check_stateless(body)
    prefix = http.headers.get("x-request-id", "resp")
    with state.admission.reserve(1, "input"):
        run = ResponseRun(state, await start_response(state, body, prefix))
    if body.stream:
        return EventStream(_sse(run))
    return JSONResponse(await run_unless_disconnected(http, run.collect))
