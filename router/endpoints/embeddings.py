"""POST /v1/embeddings: inputs to token ids, one worker request, vectors back in OpenAI's shape.

The worker answers with raw float32 bytes per input; the router only truncates to `dimensions` (and
re-normalises, as OpenAI's shortened embeddings are unit vectors) and encodes the list as JSON floats or
base64 little-endian float32. The JSON body is serialised here in one go: FastAPI's generic encoder walks
every float of a batch and costs more than the model on small inputs.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from fastapi import Response
from pydantic import ConfigDict, Field

from router.api.errors import APIError
from router.api.unicode_check import UnicodeCheckedModel
from router.openai.nullable import NullMeansDefault
from router.state import ServerState
from shared.protocol import EmbedRequest
from shared.vocab import TokenizerError

MAX_INPUTS = 2048

EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(NullMeansDefault, UnicodeCheckedModel):
    """OpenAI's fields plus two extensions: `truncate` (cut long inputs instead of a 400) and `normalize`."""

    model_config = ConfigDict(extra="allow")

    input: EmbeddingInput
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    truncate: bool = False
    normalize: bool | None = None


def check_generation(state: ServerState, requested_model: str | None) -> None:
    """Completions and chat on an embedding-only model are a 400 (not a worker error after templating)."""
    state.check_model(requested_model)
    info = state.dispatcher.model_info()
    if info is not None and info.embedding:
        raise APIError(
            400,
            f"{state.model_name!r} is an embedding model; it serves /v1/embeddings only",
            param="model",
            code="model_not_supported",
        )


def _token_inputs(state: ServerState, raw: EmbeddingInput) -> tuple[list[list[int]], list[bool]]:
    """Token ids per input and whether each came from text (so its trailing special token is kept)."""
    items: list[Any] = [raw] if isinstance(raw, str) else list(raw)
    if not items:
        raise APIError(400, "input must not be empty", param="input")
    if all(isinstance(item, int) for item in items):  # one input given as token ids
        items = [items]
    if len(items) > MAX_INPUTS:
        raise APIError(400, f"at most {MAX_INPUTS} inputs per request, got {len(items)}", param="input")
    inputs: list[list[int]] = []
    from_text: list[bool] = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise APIError(400, f"input[{index}] is an empty string", param="input")
            try:
                tokens = state.vocab.tokenize(item, add_special=True, parse_special=False)
            except TokenizerError as error:
                raise APIError(400, f"input[{index}]: {error}", param="input") from error
            inputs.append(tokens)
            from_text.append(True)
        elif isinstance(item, list) and all(isinstance(t, int) for t in item):
            if not item:
                raise APIError(400, f"input[{index}] is an empty token list", param="input")
            inputs.append(state.check_tokens(list(item), "input"))
            from_text.append(False)
        else:
            raise APIError(
                400, "input must be a string, strings, token ids or lists of token ids", param="input"
            )
    return inputs, from_text


def _fit(inputs: list[list[int]], from_text: list[bool], limit: int, truncate: bool) -> None:
    """Inputs over the worker's limit: a 400 naming the first one, or cut to the limit on request."""
    for index, tokens in enumerate(inputs):
        if len(tokens) <= limit:
            continue
        if not truncate:
            raise APIError(
                400,
                f"input[{index}] has {len(tokens)} tokens; this model takes at most {limit} per input "
                "(set truncate: true to cut longer inputs)",
                param="input",
                code="context_length_exceeded",
            )
        # Text keeps its closing special token ([SEP] for BERT), as tokenizers truncate.
        keep_last = from_text[index] and limit > 1
        inputs[index] = tokens[: limit - 1] + tokens[-1:] if keep_last else tokens[:limit]


def _is_token_list(raw: list[Any]) -> bool:
    return bool(raw) and all(isinstance(item, int) for item in raw)


def _encode(vector: npt.NDArray[np.float32], encoding_format: str) -> Any:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")
    return vector.tolist()


async def create_embeddings(state: ServerState, body: EmbeddingRequest) -> Response:
    state.check_model(body.model)
    if body.model and state.adapters.knows(body.model):
        raise APIError(400, "embeddings are computed by the base model, not a LoRA adapter", param="model")
    info = state.info()
    limit = info.embed.max_tokens
    if limit <= 0:
        raise APIError(
            400,
            f"{state.model_name!r} does not serve embeddings",
            param="model",
            code="model_not_supported",
        )
    dim = info.embed.dim
    if body.dimensions is not None and body.dimensions > dim:
        raise APIError(400, f"dimensions must be at most {dim} for this model", param="dimensions")

    def tokenize() -> list[list[int]]:  # on a pool thread: see offload.py
        inputs, from_text = _token_inputs(state, body.input)
        _fit(inputs, from_text, limit, body.truncate)
        return inputs

    # Admission charges what the worker embeds at once: an input per sequence, at most n_seq_max.
    count = len(body.input) if isinstance(body.input, list) and not _is_token_list(body.input) else 1
    sequences = max(1, min(count, info.n_seq_max))
    normalize = body.normalize if body.normalize is not None else info.embed.normalize
    with state.admission.reserve(sequences, "input"):
        inputs = await state.preparer.run(tokenize)
    # No await before `embed` registers the request: from here its in-flight entry is what counts.
    rid = state.dispatcher.new_request_id("emb")
    reply = await state.dispatcher.embed(EmbedRequest(rid, inputs, normalize), sequences)
    data = []
    for index, raw in enumerate(reply.vectors):
        vector = np.frombuffer(raw, dtype="<f4")
        if body.dimensions is not None and body.dimensions < vector.size:
            vector = vector[: body.dimensions]
            norm = float(np.linalg.norm(vector))
            if body.normalize is not False and norm > 0.0:
                vector = vector / norm
        data.append(
            {"object": "embedding", "index": index, "embedding": _encode(vector, body.encoding_format)}
        )
    prompt_tokens = sum(reply.token_counts)
    payload = {
        "object": "list",
        "data": data,
        "model": state.model_name,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return Response(json.dumps(payload, separators=(",", ":")), media_type="application/json")
