"""/v1/embeddings through the real supervisor, router and worker on the converted all-MiniLM-L6-v2 GGUF.

The numpy reference forward pass (tests/support/bert_reference.py) is the oracle: vectors served over HTTP
must match it, whatever batch they were packed into. A generation model serves embeddings only when its
config asks, from a second context that leaves running generations untouched.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import openai
import pytest

from tests.integration.server import REPO, Server, model_config, run_server

ALIAS = "all-minilm-l6-v2"
N_EMBD = 384
MAX_TOKENS = 512
SENTENCES = [
    "A man is playing a guitar.",
    "Someone strums an acoustic guitar on stage.",
    "The stock market fell sharply after the announcement.",
    "Naïve café owners don't like long queues.",
]

Vector = npt.NDArray[np.float64]


@pytest.fixture(scope="session")
def minilm_source() -> Path:
    from shared.convert_bert import packaged_minilm_source_dir

    try:
        return packaged_minilm_source_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def minilm_gguf(minilm_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from shared.convert_bert import convert_sentence_transformer

    return convert_sentence_transformer(
        minilm_source, tmp_path_factory.mktemp("minilm") / "all-MiniLM-L6-v2.gguf"
    )


@pytest.fixture(scope="session")
def reference(minilm_source: Path) -> Any:
    from tests.support.bert_reference import BertReference

    return BertReference(minilm_source)


@pytest.fixture(scope="module")
def minilm_server(minilm_gguf: Path) -> Iterator[Server]:
    """The shipped config's context sizes, on the session's converted file, with one thread."""
    shipped = json.loads((REPO / "configs" / f"{ALIAS}.json").read_text())["model"]
    del shipped["packaged"]
    model = model_config(minilm_gguf, **shipped)
    with run_server(model) as server:
        yield server


def _vectors(response: Any) -> list[Vector]:
    assert [item.index for item in response.data] == list(range(len(response.data)))
    return [np.asarray(item.embedding, dtype=np.float64) for item in response.data]


def _embed(server: Server, inputs: Any, **kwargs: Any) -> list[Vector]:
    return _vectors(server.client().embeddings.create(model=ALIAS, input=inputs, **kwargs))


def _cos(a: Vector, b: Vector) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_similar_sentences_are_closer_than_unrelated(minilm_server: Server) -> None:
    guitar, strum, market, _ = _embed(minilm_server, SENTENCES, encoding_format="float")
    assert len(guitar) == N_EMBD
    assert abs(np.linalg.norm(guitar) - 1.0) < 1e-4
    assert _cos(guitar, strum) > _cos(guitar, market) + 0.3


def test_matches_the_numpy_reference(minilm_server: Server, reference: Any) -> None:
    served = _embed(minilm_server, SENTENCES, encoding_format="float")
    for text, vector in zip(SENTENCES, served, strict=True):
        assert _cos(vector, reference.embed(text)) >= 0.99


def test_float_and_base64_agree(minilm_server: Server) -> None:
    client = minilm_server.client()
    floats = _embed(minilm_server, SENTENCES, encoding_format="float")
    raw = client.embeddings.create(model=ALIAS, input=SENTENCES, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(item.embedding), dtype="<f4") for item in raw.data]
    by_default = _embed(minilm_server, SENTENCES)  # the client asks for base64 and decodes it itself
    for f, b, d in zip(floats, decoded, by_default, strict=True):
        assert np.array_equal(f.astype(np.float32), b)
        assert np.array_equal(f.astype(np.float32), d.astype(np.float32))


def test_nulls_take_the_defaults(minilm_server: Server) -> None:
    """`encoding_format: null` is float and `truncate: null` is no truncation, as if they were not sent."""
    nulls = {"encoding_format": None, "truncate": None, "dimensions": None, "normalize": None}
    with minilm_server.http() as http:
        answer = http.post("/v1/embeddings", json={"model": ALIAS, "input": SENTENCES[:2], **nulls})
    assert answer.status_code == 200, answer.text
    got = [np.array(item["embedding"], dtype=np.float32) for item in answer.json()["data"]]
    plain = _embed(minilm_server, SENTENCES[:2], encoding_format="float")
    for g, p in zip(got, plain, strict=True):
        assert np.array_equal(g, p.astype(np.float32))


def test_dimensions_truncate_and_renormalise(minilm_server: Server) -> None:
    (full,) = _embed(minilm_server, SENTENCES[0], encoding_format="float")
    (short,) = _embed(minilm_server, SENTENCES[0], encoding_format="float", dimensions=64)
    assert len(short) == 64
    assert abs(np.linalg.norm(short) - 1.0) < 1e-5
    assert np.allclose(short, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)


def test_token_arrays_match_text(minilm_server: Server, reference: Any) -> None:
    ids = [reference.tokenizer.encode(text) for text in SENTENCES[:2]]
    client = minilm_server.client()
    by_text = client.embeddings.create(model=ALIAS, input=SENTENCES[:2], encoding_format="float")
    by_ids = client.embeddings.create(model=ALIAS, input=ids, encoding_format="float")
    one = client.embeddings.create(model=ALIAS, input=ids[0], encoding_format="float")
    for a, b in zip(_vectors(by_text), _vectors(by_ids), strict=True):
        assert _cos(a, b) > 0.9999
    assert _cos(_vectors(one)[0], _vectors(by_ids)[0]) > 0.9999
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == sum(map(len, ids))
    assert one.usage.prompt_tokens == one.usage.total_tokens == len(ids[0])


def test_batch_of_64_keeps_order(minilm_server: Server) -> None:
    texts = [
        f"Sentence number {i} talks about {['cats', 'rain', 'jazz', 'taxes'][i % 4]}." for i in range(64)
    ]
    batch = _embed(minilm_server, texts, encoding_format="float")
    reverse = _embed(minilm_server, texts[::-1], encoding_format="float")
    assert len(batch) == 64
    for i in range(64):
        assert _cos(batch[i], reverse[63 - i]) > 0.9999
    for i in (0, 17, 63):
        (alone,) = _embed(minilm_server, texts[i], encoding_format="float")
        assert _cos(alone, batch[i]) > 0.9999
    # Neighbours differ: the vectors really are per input.
    assert _cos(batch[0], batch[1]) < 0.99


def test_concurrent_requests_are_packed_and_answered_each(minilm_server: Server) -> None:
    texts = [
        [f"Request {r} item {i} about {['sun', 'code', 'tea'][i % 3]}." for i in range(8)] for r in range(6)
    ]
    expected = [_embed(minilm_server, group, encoding_format="float") for group in texts]
    results: dict[int, list[Vector]] = {}

    def call(r: int) -> None:
        results[r] = _embed(minilm_server, texts[r], encoding_format="float")

    threads = [threading.Thread(target=call, args=(r,)) for r in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == list(range(len(texts)))
    for r, group in enumerate(expected):
        for a, b in zip(group, results[r], strict=True):
            assert _cos(a, b) > 0.9999


def _post(server: Server, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    with server.http() as http:
        response = http.post(path, json=body)
    return response.status_code, response.json()


@pytest.mark.parametrize(
    ("body", "status", "hint"),
    [
        ({"input": []}, 400, "empty"),
        ({"input": ""}, 400, "empty"),
        ({"input": ["ok", ""]}, 400, "input[1]"),
        ({"input": [[101, 102], []]}, 400, "input[1]"),
        ({"input": [101, 10**7]}, 400, "out of range"),
        ({"input": ["text", [101, 102]]}, 400, "input"),
        ({"input": "hi", "encoding_format": "hex"}, 400, "encoding_format"),
        ({"input": "hi", "dimensions": 0}, 400, "dimensions"),
        ({"input": "hi", "dimensions": N_EMBD + 1}, 400, "dimensions"),
        ({"input": "hi", "model": "nope"}, 404, "model"),
    ],
)
def test_bad_embedding_requests(minilm_server: Server, body: dict[str, Any], status: int, hint: str) -> None:
    code, reply = _post(minilm_server, "/v1/embeddings", {"model": ALIAS, **body})
    assert code == status, reply
    error = reply["error"]
    assert hint in (error.get("param") or "") + error["message"]


def test_too_long_input_names_its_index_unless_truncated(minilm_server: Server) -> None:
    long_text = "word " * 700
    code, reply = _post(minilm_server, "/v1/embeddings", {"input": ["short", "fine", long_text]})
    assert code == 400
    assert "input[2]" in reply["error"]["message"]
    assert reply["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        minilm_server.client().embeddings.create(model=ALIAS, input=[long_text])
    code, reply = _post(minilm_server, "/v1/embeddings", {"input": ["short", long_text], "truncate": True})
    assert code == 200, reply
    assert len(reply["data"]) == 2
    assert reply["usage"]["prompt_tokens"] == 3 + MAX_TOKENS  # [CLS] short [SEP] + the cut input


def test_generation_endpoints_refuse_an_embedding_model(minilm_server: Server) -> None:
    code, reply = _post(minilm_server, "/v1/completions", {"prompt": "hello", "max_tokens": 2})
    assert code == 400 and "embedding" in reply["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="embedding"):
        minilm_server.client().chat.completions.create(
            model=ALIAS, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )


def test_generation_model_without_embedding_pooling_refuses(tiny_server: Server) -> None:
    with pytest.raises(openai.BadRequestError, match="does not serve embeddings"):
        tiny_server.client().embeddings.create(model="test-model", input="hello")


def test_generation_model_embeds_without_disturbing_generation(tiny_llama_gguf: Path) -> None:
    model = model_config(tiny_llama_gguf, embedding_pooling="mean")
    with run_server(model) as server:
        client = server.client()
        prompt = {"model": "test-model", "prompt": "hello world", "max_tokens": 200, "temperature": 0}
        alone = client.completions.create(**prompt).choices[0].text
        (first,) = _vectors(client.embeddings.create(model="test-model", input="hello"))
        stream = client.completions.create(**prompt, stream=True)
        pieces: list[str] = []
        during: list[Vector] = []
        for n, chunk in enumerate(stream):
            pieces.append(chunk.choices[0].text)
            if n in (2, 20, 60):
                during += _vectors(client.embeddings.create(model="test-model", input=["hello"] * 3))
        assert "".join(pieces) == alone
        assert len(during) == 9  # the stream ran long enough to interleave all three calls
        assert len(first) == 64 and abs(np.linalg.norm(first) - 1.0) < 1e-4
        for vector in during:
            assert _cos(vector, first) > 0.9999
        assert client.completions.create(**prompt).choices[0].text == alone
