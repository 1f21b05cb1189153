"""What every route needs: config, vocabulary, chat template, dispatcher, metrics; built once at start-up."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from router.api.admission import Admission
from router.api.errors import APIError
from router.api.metrics import Metrics
from router.client.adapters import AdapterCatalog
from router.client.dispatch import Dispatcher
from router.parsers import ResponseSchemaParser
from router.preprocess.offload import Preparer
from router.preprocess.templating import ChatTemplate, TemplateError
from router.structured.budget import check_budget
from router.structured.response_format import check_grammar_size
from shared.config import Config
from shared.models import resolve_model_path
from shared.protocol import SamplingParams, SubmitRequest, WorkerInfo
from shared.vocab import TokenizerError, Vocab

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    config: Config
    vocab: Vocab
    template: ChatTemplate | None
    dispatcher: Dispatcher
    metrics: Metrics
    created: int
    # The config's response_schema, compiled once (None: Hermes/<think> parsing).
    response_parser: ResponseSchemaParser | None = None
    # Admission by sequences (router/api/admission.py) and the threads that prepare requests off the loop.
    admission: Admission = field(init=False)
    preparer: Preparer = field(init=False)
    # Named LoRA adapters, each served as a model of its own (router/client/adapters.py).
    adapters: AdapterCatalog = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.dispatcher, self.config.server.max_queued_requests, self.metrics)
        self.preparer = Preparer()
        self.adapters = AdapterCatalog(self.config.model, self.model_name, self.created)
        self.dispatcher.runtime_adapters = self.adapters.runtime_paths

    @classmethod
    def build(
        cls, config: Config, metrics: Metrics | None = None, worker_label: str = "", router: int = 0
    ) -> ServerState:
        """The state of one model's pool (`config` is one of `Config.pools()`) in router process `router`;
        pools share `metrics`, and this pool's workers are labelled `worker_label + index` there."""
        vocab = Vocab.load(resolve_model_path(config.model))
        source = config.model.chat_template or vocab.chat_template()
        template = None
        if source:
            template = ChatTemplate(source, vocab.token_text(vocab.bos_id), vocab.token_text(vocab.eos_id))
        metrics = metrics or Metrics()
        dispatcher = Dispatcher(config, router)
        metrics.attach(dispatcher, worker_label)
        schema = config.model.response_schema
        parser = ResponseSchemaParser(schema) if schema else None
        return cls(config, vocab, template, dispatcher, metrics, int(time.time()), parser)

    @property
    def model_name(self) -> str:
        return self.config.model.served_name

    def check_model(self, requested: str | None) -> None:
        if requested and requested != self.model_name and not self.adapters.knows(requested):
            raise APIError(
                404,
                f"the model {requested!r} does not exist; this server serves {self.model_name!r}",
                "not_found_error",
                param="model",
                code="model_not_found",
            )

    def info(self) -> WorkerInfo:
        info = self.dispatcher.model_info()
        if info is None:
            raise APIError(503, "no worker is ready yet", "worker_unavailable", code="worker_unavailable")
        return info

    def tokenize_prompt(self, text: str) -> list[int]:
        # A chat template usually writes the BOS token itself: do not add a second one.
        bos_text = self.vocab.token_text(self.vocab.bos_id) if self.vocab.add_bos else ""
        add_special = not (bos_text and text.startswith(bos_text))
        try:
            return self.vocab.tokenize(text, add_special=add_special, parse_special=True)
        except TokenizerError as error:
            raise APIError(400, str(error), param="prompt") from error

    def check_tokens(self, tokens: list[int], param: str) -> list[int]:
        try:
            self.vocab.check_ids(tokens)
        except TokenizerError as error:
            raise APIError(400, str(error), param=param) from error
        return tokens

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        add_generation_prompt: bool,
        extra: dict[str, Any],
        param: str = "messages",
    ) -> str:
        """The chat template applied; its errors are 400s naming `param` (the request's messages)."""
        if self.template is None:
            raise APIError(400, "this model has no chat template; use /v1/completions", param=param)
        try:
            return self.template.render(
                messages, tools=tools, add_generation_prompt=add_generation_prompt, extra=extra
            )
        except TemplateError as error:
            raise APIError(400, str(error), param=param) from error

    def output_budget(
        self,
        prompt_tokens: int,
        requested: int | None,
        n: int,
        *,
        prompt_param: str = "messages",
        limit_param: str = "max_tokens",
    ) -> int:
        """max_tokens for a request: the client's value capped by the config, or what the context has left.

        A prompt plus an explicit max_tokens beyond the context is a 400 before anything is queued; errors
        name the request's fields `prompt_param` and `limit_param`.
        """
        info = self.info()
        n_ctx_seq = info.n_ctx_seq
        if n > info.n_seq_max:
            raise APIError(400, f"n={n} exceeds the {info.n_seq_max} sequences a worker can run", param="n")
        room = n_ctx_seq - prompt_tokens
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {prompt_tokens} tokens; this model's context is {n_ctx_seq}",
                param=prompt_param,
                code="context_length_exceeded",
            )
        cap = self.config.model.max_output_tokens
        budget = requested if requested is not None else room
        if cap:
            budget = min(budget, cap)
        if budget > room:
            raise APIError(
                400,
                f"prompt ({prompt_tokens} tokens) plus {limit_param} ({budget}) exceeds the context "
                f"length {n_ctx_seq}",
                param=limit_param,
                code="context_length_exceeded",
            )
        return budget


# Request field -> SamplingParams field, copied when the client set it (llama.cpp's neutral value otherwise).
_OPTIONAL_SAMPLING = {
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "penalty_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


def sampling_from(request: Any) -> SamplingParams:
    """SamplingParams from a completion or chat request's fields (OpenAI's default temperature is 1)."""
    params = SamplingParams()
    params.temperature = 1.0 if request.temperature is None else request.temperature
    for source, target in _OPTIONAL_SAMPLING.items():
        value = getattr(request, source)
        if value is not None:
            setattr(params, target, value)
    params.seed = request.seed
    params.logit_bias = [(int(k), float(v)) for k, v in (request.logit_bias or {}).items()]
    return params


def _grammar_param(request: Any, format_param: str) -> str:
    """The request field a grammar came from, for error messages."""
    if request.grammar is not None:
        return "grammar"
    response_format = getattr(request, "response_format", None)
    if response_format is not None and response_format.type != "text":
        return format_param
    return "tools"


def make_submit(
    state: ServerState,
    rid: str,
    prompt: list[int],
    max_tokens: int,
    request: Any,
    logprobs: int | None,
    grammar: str | None = None,
    grammar_triggers: list[str] | None = None,
    format_param: str = "response_format",
    limit_param: str = "max_tokens",
) -> SubmitRequest:
    sampling = sampling_from(request)
    for token, _ in sampling.logit_bias:
        if not 0 <= token < state.vocab.n_vocab:
            raise APIError(400, f"logit_bias token id {token} is out of range", param="logit_bias")
    grammar = grammar if grammar is not None else request.grammar
    if grammar is not None:
        check_grammar_size(grammar, _grammar_param(request, format_param))
    if grammar is not None and not state.vocab.grammar_is_valid(grammar):  # a 400 before any streaming
        raise APIError(
            400, "the grammar could not be parsed by llama.cpp (GBNF, root rule `root`)", param="grammar"
        )
    lora, lora_scale = state.adapters.resolve(request.model, request.lora_scale)
    budget_close = state.config.model.structured_budget
    if grammar is not None and budget_close:
        check_budget(grammar, bool(grammar_triggers), max_tokens, state.vocab, limit_param)
    return SubmitRequest(
        rid=rid,
        prompt=prompt,
        max_tokens=max_tokens,
        n=request.n,
        sampling=sampling,
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        grammar=grammar,
        grammar_triggers=list(grammar_triggers or []),
        speculative=bool(getattr(request, "speculative", True)),
        lora=lora,
        lora_scale=lora_scale,
        budget_close=budget_close,
        string_repeat_limit=state.config.model.structured_repeat_limit,
    )
