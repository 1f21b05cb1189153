"""A chat request turned into what generation needs: prompt tokens, grammar, and output parsers.

Decides, per request: how tools reach the prompt (the template, or the default protocol), which
grammar constrains the answer (tool calls, response_format or a raw grammar; lazily after reasoning
when the prompt leaves a `<think>` block open), and which parser splits the output into reasoning,
content and tool calls (the config's response_schema, else the Hermes/`<think>` parser).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from router.api.errors import APIError
from router.client.generation import Generation
from router.openai.requests import ChatCompletionRequest, ChatMessage, ToolChoiceObject
from router.parsers.output import ChoiceOutput, HermesOutput, SchemaOutput
from router.preprocess.tool_prompts import default_protocol, hf_messages, template_knows_tools
from router.state import ServerState, make_submit
from router.structured.response_format import GrammarPlan, structured_grammar
from router.structured.tool_grammar import HERMES, detect_format, tool_grammar
from shared.protocol import MediaInput
from shared.vocab import TokenizerError

if TYPE_CHECKING:
    from router.preprocess.media_parts import PromptMedia


@dataclass(frozen=True)
class RequestFields:
    """What the request calls the fields that planning errors name: chat's names, or the Responses API's."""

    messages: str = "messages"
    max_tokens: str = "max_tokens"
    response_format: str = "response_format"
    schema: str = "response_format.json_schema.schema"


CHAT_FIELDS = RequestFields()

REASONING_OPEN = "<think>"
REASONING_CLOSE = "</think>"


def _text_of(
    content: str | list[dict[str, Any]] | None, index: int, media: PromptMedia | None = None
) -> str | None:
    """Flattens OpenAI content parts to text; media parts (loaded into `media`) become placeholders, and
    need a multimodal model."""
    if content is None or isinstance(content, str):
        return content
    texts: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind in ("text", "input_text"):
            texts.append(str(part.get("text", "")))
        elif media is not None and (index, j) in media.blobs:
            texts.append(media.marker(index, j))
        elif kind in ("image_url", "input_image", "input_audio", "audio_url", "video_url"):
            raise APIError(
                400,
                f"messages[{index}] has a {kind} part but this model has no multimodal projector",
                param=f"messages[{index}].content",
            )
        else:
            raise APIError(400, f"messages[{index}] has an unknown content part type {kind!r}")
    return "".join(texts)


def template_messages(messages: list[ChatMessage], media: PromptMedia | None = None) -> list[dict[str, Any]]:
    """Messages as the Hugging Face chat-template convention expects them."""
    rendered: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        item: dict[str, Any] = {"role": message.role, "content": _text_of(message.content, index, media)}
        if message.name:
            item["name"] = message.name
        if message.tool_call_id:
            item["tool_call_id"] = message.tool_call_id
        if message.reasoning_content:
            item["reasoning_content"] = message.reasoning_content
        if message.tool_calls:
            item["tool_calls"] = [call.model_dump(exclude_none=True) for call in message.tool_calls]
        rendered.append(item)
    return rendered


def tool_choice_of(body: ChatCompletionRequest) -> str:
    """ "none", "auto", "required" or the forced function's name (OpenAI's defaults)."""
    choice = body.tool_choice
    if isinstance(choice, ToolChoiceObject):
        return choice.function.name
    if choice is None:
        return "auto" if body.tools else "none"
    return choice


@dataclass
class ChatPlan:
    prompt: str
    generation_prompt: str  # what the template appended after the last message
    grammar: GrammarPlan | None
    outputs: Callable[[], ChoiceOutput]  # a fresh parser per choice
    render_special: bool  # detokenize control tokens as text (markers the parser must see)


def _generation_prompt(
    state: ServerState, messages: list[dict[str, Any]], tools: Any, extra: dict[str, Any], full: str
) -> str:
    """What the template appends for the answer: the full prompt minus the one without it."""
    try:
        head = state.render_chat(messages, tools, False, extra)
    except APIError:
        return ""
    return full[len(head) :] if full.startswith(head) else ""


def plan_chat(
    state: ServerState,
    body: ChatCompletionRequest,
    fields: RequestFields = CHAT_FIELDS,
    media: PromptMedia | None = None,
) -> ChatPlan:
    choice = tool_choice_of(body)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else []
    extra = dict(body.chat_template_kwargs or {})
    if body.reasoning_effort is not None:
        extra.setdefault("reasoning_effort", body.reasoning_effort)
    messages = hf_messages(template_messages(body.messages, media))
    source = state.template.source if state.template is not None else ""
    response_schema = state.config.model.response_schema
    if template_knows_tools(source):
        fmt = detect_format(response_schema)
        template_tools = tools if tools and choice != "none" else None
        if template_tools and isinstance(body.tool_choice, ToolChoiceObject):
            extra.setdefault("tool_choice", body.tool_choice.model_dump())
    else:
        fmt = HERMES
        messages = default_protocol(messages, tools, choice)
        template_tools = None
    add_prompt = body.add_generation_prompt and not body.continue_final_message
    prompt = state.render_chat(messages, template_tools, add_prompt, extra, fields.messages)
    generation_prompt = (
        _generation_prompt(state, messages, template_tools, extra, prompt) if add_prompt else ""
    )
    reasoning_open = generation_prompt.rstrip().endswith(REASONING_OPEN)
    reasoning_end = REASONING_CLOSE if reasoning_open else None
    use_tools = bool(tools) and choice != "none"
    wants_format = body.grammar or (body.response_format and body.response_format.type != "text")
    grammar: GrammarPlan | None = None
    if use_tools and choice != "auto":
        if wants_format:
            raise APIError(
                400,
                f"a forced tool_choice cannot be combined with {fields.response_format}",
                param="tool_choice",
            )
        grammar = tool_grammar(
            fmt,
            tools,
            choice,
            parallel=body.parallel_tool_calls,
            prefilled=generation_prompt,
            reasoning_end=reasoning_end,
        )
    elif wants_format:
        grammar = structured_grammar(
            body.response_format,
            body.grammar,
            reasoning_end=reasoning_end,
            format_param=fields.response_format,
            schema_param=fields.schema,
        )
    elif use_tools:
        grammar = tool_grammar(
            fmt, tools, "auto", parallel=body.parallel_tool_calls, reasoning_end=reasoning_end
        )
    parser = state.response_parser
    outputs: Callable[[], ChoiceOutput]
    if parser is not None:
        outputs = lambda: SchemaOutput(parser, generation_prompt, tools or None)  # noqa: E731
    else:
        outputs = lambda: HermesOutput(use_tools, reasoning_open)  # noqa: E731
    return ChatPlan(prompt, generation_prompt, grammar, outputs, use_tools or parser is not None)


def chat_generation(
    state: ServerState,
    body: ChatCompletionRequest,
    *,
    rid_prefix: str,
    endpoint: str,
    output_limit: int | None,
    logprobs: int | None = None,
    fields: RequestFields = CHAT_FIELDS,
    media: PromptMedia | None = None,
) -> tuple[Generation, ChatPlan]:
    """Plans a chat request (template, grammar, parsers) and builds its generation, not yet submitted.

    Chat completions and the Responses API both answer through this, so tools, grammars and reasoning
    behave the same in both; errors name the fields as the client's request calls them (`fields`)."""
    plan = plan_chat(state, body, fields, media)
    media_inputs: list[MediaInput] = []
    if media is not None:
        tokens, media_inputs = media.tokenize(state, plan.prompt)
    else:
        tokens = state.tokenize_prompt(plan.prompt)
    budget = state.output_budget(
        len(tokens), output_limit, body.n, prompt_param=fields.messages, limit_param=fields.max_tokens
    )
    rid = state.dispatcher.new_request_id(rid_prefix[:64])
    grammar = plan.grammar
    submit = make_submit(
        state,
        rid,
        tokens,
        budget,
        body,
        logprobs,
        grammar.grammar if grammar else None,
        grammar.triggers if grammar else None,
        fields.response_format,
        fields.max_tokens,
    )
    submit.media = media_inputs
    prediction = getattr(body, "prediction", None)
    if prediction is not None:
        submit.prediction = prediction_tokens(state, prediction.text)
    generation = Generation(
        state.dispatcher,
        state.vocab,
        state.metrics,
        [submit],
        body.stop_list,
        endpoint,
        render_special=plan.render_special,
    )
    return generation, plan


def prediction_tokens(state: ServerState, text: str) -> list[int]:
    """A predicted output's tokens (the request's draft source); a 400 when it is larger than the context."""
    try:
        tokens = state.vocab.tokenize(text, add_special=False, parse_special=False)
    except TokenizerError as error:
        raise APIError(400, str(error), param="prediction") from error
    limit = state.info().n_ctx_seq
    if len(tokens) > limit:
        raise APIError(
            400,
            f"prediction ({len(tokens)} tokens) is larger than the context length {limit}",
            param="prediction",
        )
    return tokens
