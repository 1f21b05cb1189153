"""The router <-> worker wire protocol: typed msgspec Structs in a versioned msgpack envelope.

Topology (as vLLM V1's): the router binds a ROUTER socket for requests and a PULL socket for results; each
worker connects a DEALER (routing id `worker-N`) for requests and PUSH sockets for results and heartbeats.
Results travel as one `frames` message per engine step holding every sequence that advanced.

Every payload is the msgpack array `[PROTOCOL_VERSION, message]`, the message a map tagged by `t`. A `Codec`
decodes the version first, then the message against the union of what its side may receive, so a payload
of another version, an unknown tag, a missing, unknown or mistyped field is a `ProtocolError` that the
receiver logs and drops; nothing mistyped reaches the engine. msgspec validates while it decodes and is
3-4.6x faster than dataclasses + msgpack on a 64-item frames batch (bench/wire.py); frame items and their
logprobs travel as positional arrays (`array_like`) because they are the hot path.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeAlias, TypeVar

import msgspec

# 2: msgspec Structs in a [version, message] envelope; dead fields gone (submit priority and
# stop_token_ids, the frames' step, ready's model, the frame usage's token counts); `shutdown` removed.
# 3: speculative decoding: submit `prediction` and `speculative`, the frame item's `prediction_tokens`, the
# stats' `spec_*` counters.
# 4: the stats' measured decode step costs (`spec_step_seconds`, `spec_step_overhead_seconds`).
PROTOCOL_VERSION = 4

# Finish reasons a worker reports.
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
# Worker -> router only: stopped on a complete document the token budget steered (the client sees "stop").
FINISH_BUDGET = "budget"


class ProtocolError(ValueError):
    """A message that does not decode, has an unknown tag or mistyped fields, or carries another version."""


# A worker index, and the HTTP status of a worker's error (the router answers the client with it).
WorkerIndex = Annotated[int, msgspec.Meta(ge=0)]
HttpStatus = Annotated[int, msgspec.Meta(ge=400, le=599)]


def worker_identity(index: int) -> bytes:
    return f"worker-{index}".encode()


class _Message(msgspec.Struct, tag_field="t", forbid_unknown_fields=True):
    """Base of every message: a map tagged by `t` (the class's tag); unknown fields are an error."""


# -- router -> worker -------------------------------------------------------------------------------------


class SamplingParams(msgspec.Struct, forbid_unknown_fields=True):
    """What a worker's sampler chain needs; defaults are llama.cpp's neutral values."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    logit_bias: list[tuple[int, float]] = msgspec.field(default_factory=list)


class MediaInput(msgspec.Struct, frozen=True):
    """One image or audio item of a prompt: its bytes go before prompt token `position` (the worker
    expands it into the projector's tokens there). `sha256` (hex) keys the prefix and embedding caches."""

    kind: str  # "image" or "audio"
    data: bytes
    sha256: str
    position: int
    part: str = ""  # the request field it came from, named in errors


class SubmitRequest(_Message, tag="submit"):
    """A generation request: one prompt, `n` parallel choices sharing its KV."""

    rid: str
    prompt: list[int]
    max_tokens: int
    n: int = 1
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    ignore_eos: bool = False
    # Top alternatives per token to return; None = no logprobs at all.
    logprobs: int | None = None
    grammar: str | None = None
    # Regexes on the generated text; the grammar engages at the first match (lazy tool/reasoning grammars,
    # see worker/sampling.py).
    grammar_triggers: list[str] = msgspec.field(default_factory=list)
    # Image and audio items, in prompt order (needs a worker with a projector, model.mtmd).
    media: list[MediaInput] = msgspec.field(default_factory=list)
    # OpenAI predicted outputs: the predicted completion's tokens, the request's draft source.
    prediction: list[int] | None = None
    # False: this request never speculates (the `speculative` request field).
    speculative: bool = True
    # A named LoRA adapter to run with, at this scale ("": the base model; see shared/lora.py).
    lora: str = ""
    lora_scale: float = 0.0
    # End a (non-lazy) grammar's document within max_tokens, steering onto its shortest completion
    # (worker/budget.py); a sequence it closed finishes with FINISH_BUDGET.
    budget_close: bool = True
    # Bytes of one short unit repeated at the end of a free JSON string after which the string is closed
    # (worker/budget.py `runaway`); 0: off. Only with budget_close.
    string_repeat_limit: int = 0


class LoadAdapter(_Message, tag="load_adapter"):
    """Load a named LoRA adapter (the router checked the file); answered by `adapter_reply`."""

    name: str
    path: str


class UnloadAdapter(_Message, tag="unload_adapter"):
    """Free a named adapter once no request holds it; answered by `adapter_reply` when done."""

    name: str


class Cancel(_Message, tag="cancel"):
    """The client of `rid` is gone: free its sequences (or drop its queued embed request)."""

    rid: str


class EmbedRequest(_Message, tag="embed"):
    """Embeddings for several inputs, one llama.cpp sequence each; inputs already fit the worker's limit."""

    rid: str
    inputs: list[list[int]]
    normalize: bool = True


class Hello(_Message, tag="hello"):
    """ "Who are you?" from a router that does not know the worker as ready (just started, or it marked the
    worker down). Carries the request ids the router still waits for on that worker; the worker cancels
    every other request it holds (their clients are gone) and answers `ready`."""

    live: list[str]


# -- worker -> router -------------------------------------------------------------------------------------


class EmbedInfo(msgspec.Struct, forbid_unknown_fields=True):
    """A worker's embedding limits and default (max_tokens 0: this worker serves no embeddings)."""

    max_tokens: int = 0
    dim: int = 0
    normalize: bool = True


class ModelInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A worker's model and context sizes: the engine reports them, the router plans with them."""

    n_ctx: int
    n_ctx_seq: int
    n_seq_max: int
    n_batch: int
    n_vocab: int
    n_ctx_train: int
    embedding: bool
    pooling_type: int
    swa: bool
    recurrent: bool
    can_shift: bool
    description: str
    # Where it runs (shared/gpu.py): the backend (CPU, CUDA, Vulkan...), every device of the build, and how
    # many of the model's n_layer + 1 layers went to a GPU.
    backend: str = "CPU"
    devices: tuple[str, ...] = ()
    offloaded_layers: int = 0
    n_layer: int = 0


class WorkerInfo(ModelInfo, frozen=True, forbid_unknown_fields=True):
    """What the router needs to know about a worker's model (sent in `ready`)."""

    embed: EmbedInfo = msgspec.field(default_factory=EmbedInfo)


class Ready(_Message, tag="ready"):
    """A worker's announcement, on its DEALER: once the router receives it there, it can route to it."""

    worker: WorkerIndex
    pid: int
    info: WorkerInfo


class WorkerStats(msgspec.Struct, forbid_unknown_fields=True):
    """The counters a worker's engine keeps current and its heartbeats send (router/metrics.py exports)."""

    running_sequences: int = 0
    running_requests: int = 0
    queued_requests: int = 0
    kv_cells_used: int = 0
    kv_cells_reserved: int = 0
    kv_cells_total: int = 0
    seq_ids_free: int = 0
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    steps_total: int = 0
    decode_failures_total: int = 0
    requests_failed_total: int = 0
    seq_ids_cached: int = 0
    kv_cells_cached: int = 0
    prefix_cache_lookups_total: int = 0
    prefix_cache_hits_total: int = 0
    prefix_cache_reused_tokens_total: int = 0
    prefix_cache_evictions_total: int = 0
    checkpoint_restores_total: int = 0
    checkpoint_bytes: int = 0
    disk_cache_lookups_total: int = 0
    disk_cache_restores_total: int = 0
    disk_cache_restored_tokens_total: int = 0
    disk_cache_saves_total: int = 0
    disk_cache_save_failures_total: int = 0
    disk_cache_evictions_total: int = 0
    disk_cache_corrupt_removed_total: int = 0
    disk_cache_bytes: int = 0
    # Speculative decoding: drafted / accepted tokens by provider, by draft position (index 0: the first
    # draft token), and steps in which some sequence speculated.
    spec_drafted_tokens_total: dict[str, int] = msgspec.field(default_factory=dict)
    spec_accepted_tokens_total: dict[str, int] = msgspec.field(default_factory=dict)
    spec_drafted_by_position: list[int] = msgspec.field(default_factory=list)
    spec_accepted_by_position: list[int] = msgspec.field(default_factory=list)
    spec_steps_total: int = 0
    # Speculation's cost curve: seconds of a decode step by output rows (index: rows - 1; empty until
    # measured) and the time a step spends outside llama_decode (worker/speculative/costs.py).
    spec_step_seconds: list[float] = msgspec.field(default_factory=list)
    spec_step_overhead_seconds: float = 0.0
    # LoRA: named adapters loaded, switches of the context's adapter set, and per adapter name ("": base)
    # requests admitted and tokens generated.
    adapters_loaded: int = 0
    adapter_switches_total: int = 0
    adapter_requests_total: dict[str, int] = msgspec.field(default_factory=dict)
    adapter_tokens_total: dict[str, int] = msgspec.field(default_factory=dict)


class AdapterReply(_Message, tag="adapter_reply"):
    """A worker's answer to load_adapter / unload_adapter (`ok` False: `message` says why)."""

    worker: WorkerIndex
    name: str
    op: str  # "load" or "unload"
    ok: bool
    message: str = ""


class Stats(_Message, tag="stats"):
    """A heartbeat: the worker's process id (a late beat of a replaced process is ignored) and counters."""

    worker: WorkerIndex
    pid: int
    counters: WorkerStats


class TokenLogprob(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Log-probability of the chosen token and the top alternatives as (token id, logprob) pairs."""

    logprob: float
    top: list[tuple[int, float]]


class FrameItem(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One sequence's progress in one engine step."""

    rid: str
    choice: int
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish: str | None
    # Set on a request's last item only: its prompt tokens served from a prefix cache (the router counts
    # prompt and completion tokens itself).
    cached_tokens: int | None = None
    # Set on a request's first item when it had media: the prompt tokens the media added (the router
    # counts only the text tokens it sent).
    media_tokens: int | None = None
    # Requests with a predicted output: the (accepted, rejected) prediction tokens so far.
    prediction_tokens: tuple[int, int] | None = None


class Frames(_Message, tag="frames"):
    """Every sequence that advanced in one engine step."""

    items: list[FrameItem]


class Error(_Message, tag="error"):
    """A request failed in the worker; `status` is the HTTP status the router should answer with."""

    rid: str
    status: HttpStatus
    kind: str
    message: str


class EmbeddingsReply(_Message, tag="embeddings"):
    """A worker's answer to an EmbedRequest: little-endian float32 bytes per input, in input order."""

    rid: str
    vectors: list[bytes]
    token_counts: list[int]


RouterMessage: TypeAlias = SubmitRequest | Cancel | EmbedRequest | Hello | LoadAdapter | UnloadAdapter
WorkerMessage: TypeAlias = Ready | Stats | Frames | Error | EmbeddingsReply | AdapterReply
Message: TypeAlias = RouterMessage | WorkerMessage

M = TypeVar("M")


class _Legacy(msgspec.Struct):
    """Just enough of a version-1 message (a map with `v`) to say which version it was."""

    v: Any = None


class Codec(Generic[M]):
    """One socket side's encoder and decoder, built once: encodes any message, decodes what this side
    receives. Not shared between threads (the worker's heartbeat thread has its own)."""

    def __init__(self, inbound: Any) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._envelope = msgspec.msgpack.Decoder(tuple[int, msgspec.Raw])
        self._decoder: msgspec.msgpack.Decoder[M] = msgspec.msgpack.Decoder(inbound)

    def encode(self, message: Message) -> bytes:
        """The versioned payload of `message` (left untouched); OverflowError for an int beyond 64 bits."""
        return self._encoder.encode((PROTOCOL_VERSION, message))

    def decode(self, payload: bytes) -> M:
        try:
            version, body = self._envelope.decode(payload)
        except msgspec.DecodeError as error:
            raise ProtocolError(_envelope_problem(payload, error)) from error
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {version} != {PROTOCOL_VERSION}")
        try:
            return self._decoder.decode(body)
        except msgspec.DecodeError as error:
            raise ProtocolError(f"malformed message: {error}") from error


def _envelope_problem(payload: bytes, error: Exception) -> str:
    """Why a payload is no envelope; names the version of a version-1 peer (a map with `v`)."""
    try:
        legacy = msgspec.msgpack.decode(payload, type=_Legacy)
    except msgspec.DecodeError:
        return f"not a versioned message: {error}"
    return f"protocol version {legacy.v} != {PROTOCOL_VERSION}"


def router_codec() -> Codec[WorkerMessage]:
    """The router's codec: decodes what workers send."""
    return Codec(WorkerMessage)


def worker_codec() -> Codec[RouterMessage]:
    """A worker's codec: decodes what the router sends."""
    return Codec(RouterMessage)
