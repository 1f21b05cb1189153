"""POST /tokenize and /detokenize: the router's own vocabulary answers, no worker involved.

Two servers' shapes are accepted, so clients written for either work unchanged:

- llama-server: `{"content": "...", "add_special": false, "parse_special": true, "with_pieces": false}` ->
  `{"tokens": [...]}` (with `with_pieces`, `[{"id": 1, "piece": "Hi"}]`, a piece that is not valid UTF-8 on
  its own as a list of byte values); `/detokenize` `{"tokens": [...]}` -> `{"content": "..."}`.
- vLLM: `{"model", "prompt", "add_special_tokens": true, "return_token_strs"}` or a chat request (`messages`,
  `tools`, `add_generation_prompt`, `continue_final_message`, `chat_template_kwargs`) -> `{"tokens", "count",
  "max_model_len", "token_strs"}`; `/detokenize` -> `{"prompt": "..."}`.

Chat messages go through the chat endpoint's own planner, so the count equals a chat completion's
`prompt_tokens` for the same messages. Token ids are range-checked before any reaches llama.cpp (an
out-of-range id aborts the process there): a 400 naming `tokens`.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, StrictInt, model_validator

from router.api.errors import APIError
from router.api.unicode_check import UnicodeCheckedModel
from router.openai.nullable import NullMeansDefault
from router.openai.requests import ChatCompletionRequest, ChatMessage, FieldError, Tool
from router.preprocess.chat_plan import plan_chat
from router.state import ServerState
from shared.vocab import TokenizerError

# Token ids a /detokenize call may carry (about what fits the default 8 MiB body anyway).
MAX_DETOKENIZE_TOKENS = 1 << 20


class TokenizeRequest(NullMeansDefault, UnicodeCheckedModel):
    """Exactly one of `content` (llama-server), `prompt` (vLLM) or `messages` (vLLM's chat form)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    content: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # llama-server's name, then vLLM's; unset: llama-server's default (false) for `content`, vLLM's (true)
    # for `prompt`, and for chat whatever the chat endpoint does (no second BOS after the template's).
    add_special: bool | None = None
    add_special_tokens: bool | None = None
    parse_special: bool = True
    with_pieces: bool = False
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        given = [name for name in ("content", "prompt", "messages") if getattr(self, name) is not None]
        if len(given) != 1:  # blames the second input given, or `content` when none is
            blamed = given[1] if given else "content"
            raise FieldError(blamed, "give exactly one of content, prompt or messages")
        return self

    def add_special_choice(self) -> bool | None:
        return self.add_special if self.add_special is not None else self.add_special_tokens


class DetokenizeRequest(NullMeansDefault, UnicodeCheckedModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[StrictInt] = Field(max_length=MAX_DETOKENIZE_TOKENS)


def _piece_json(piece: bytes) -> str | list[int]:
    """llama-server's piece: the text, or its bytes when they are not valid UTF-8 on their own."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)


def _chat_tokens(state: ServerState, body: TokenizeRequest) -> list[int]:
    assert body.messages is not None
    chat = ChatCompletionRequest(
        messages=body.messages,
        tools=body.tools,
        chat_template_kwargs=body.chat_template_kwargs,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
    )
    prompt = plan_chat(state, chat).prompt
    add_special = body.add_special_choice()
    if add_special is None:
        return state.tokenize_prompt(prompt)
    return _tokenize(state, prompt, add_special, body.parse_special, "messages")


def _tokenize(state: ServerState, text: str, add_special: bool, parse_special: bool, param: str) -> list[int]:
    try:
        return state.vocab.tokenize(text, add_special=add_special, parse_special=parse_special)
    except TokenizerError as error:
        raise APIError(400, str(error), param=param) from error


def tokenize(state: ServerState, body: TokenizeRequest) -> dict[str, Any]:
    """The answer to POST /tokenize (runs on the preparation pool: templates and long texts take time)."""
    if body.messages is not None:
        tokens = _chat_tokens(state, body)
    elif body.content is not None:
        add_special = body.add_special_choice()
        tokens = _tokenize(state, body.content, bool(add_special), body.parse_special, "content")
    else:
        assert body.prompt is not None
        add_special = body.add_special_choice()
        tokens = _tokenize(
            state, body.prompt, True if add_special is None else add_special, body.parse_special, "prompt"
        )
    info = state.dispatcher.model_info()
    answer: dict[str, Any] = {
        "tokens": tokens,
        "count": len(tokens),
        "max_model_len": info.n_ctx_seq if info is not None else None,
    }
    if body.with_pieces:
        answer["tokens"] = [{"id": t, "piece": _piece_json(state.vocab.special_piece(t))} for t in tokens]
    if body.return_token_strs:
        answer["token_strs"] = [state.vocab.special_piece(t).decode("utf-8", "replace") for t in tokens]
    return answer


def detokenize(state: ServerState, body: DetokenizeRequest) -> dict[str, Any]:
    """The answer to POST /detokenize: control tokens render as their text, as both servers do."""
    tokens = state.check_tokens(body.tokens, "tokens")
    text = state.vocab.render(tokens)
    return {"content": text, "prompt": text}
