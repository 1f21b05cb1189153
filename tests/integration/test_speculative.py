"""Speculative decoding end to end on the tiny F32 model: real router and worker processes, HTTP.

The server speculates with prompt lookup; `speculative: false` on a request is the same server without
speculation, so every comparison runs the same weights and context. Predicted outputs (`prediction`) give
drafts from the first token on, so verification, rollback and the sampler's exactness are exercised on
every request, whatever the random model writes.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.fixtures.tiny_models import FIRST_BYTE_ID
from tests.integration.server import Server, model_config, run_server

N_SEQ = 4
PROMPTS = [
    "the cat sat on the mat. the cat sat on",
    "abc abc abc abc",
    "hello world, hello",
    "1 2 3 1 2 3 1 2",
]


@pytest.fixture(scope="module")
def server(tiny_llama_gguf: Path) -> Iterator[Server]:
    model = model_config(
        tiny_llama_gguf,
        n_seq_max=N_SEQ,
        flash_attn=False,  # exact logits whatever the batch shape (see test_sampling_api.py)
        draft_model="prompt-lookup-decoding",
        draft_model_num_pred_tokens=6,
        draft_model_max_ngram_size=2,
    )
    with run_server(model) as running:
        yield running


def complete(client: openai.OpenAI, prompt: str, speculative: bool, **kwargs: Any) -> Any:
    extra = {"speculative": speculative, **kwargs.pop("extra_body", {})}
    return client.completions.create(model="test-model", prompt=prompt, extra_body=extra, **kwargs)


def chat(client: openai.OpenAI, speculative: bool, **kwargs: Any) -> Any:
    kwargs.setdefault("messages", [{"role": "user", "content": "copy this"}])
    extra = {"speculative": speculative, **kwargs.pop("extra_body", {})}
    return client.chat.completions.create(model="test-model", extra_body=extra, **kwargs)


def metric(server: Server, name: str, label: str = "") -> float:
    """The sum of a metric's samples whose labels contain `label`."""
    return total(server.metrics(), name, label)


def total(samples: dict[str, float], name: str, label: str = "") -> float:
    return sum(v for k, v in samples.items() if k.partition("{")[0] == name and label in k)


def wait_until(
    server: Server, check: Callable[[dict[str, float]], bool], what: str, timeout: float = 15.0
) -> dict[str, float]:
    """Polls /metrics until `check` holds on one scrape (worker counters arrive with heartbeats, which a
    loaded machine can delay by more than any fixed sleep); returns that scrape. Use it for conditions
    that stay true once reached (counters only grow), so a heartbeat seen early cannot pass the test."""

    def failure(samples: dict[str, float]) -> str:
        return f"{what}: { {k: v for k, v in samples.items() if k.startswith('llamafleet_spec_')} }"

    return server.wait_metrics(check, failure, timeout)


def idle(server: Server) -> None:
    deadline = time.monotonic() + 10
    while True:
        m = server.metrics()
        if (
            m.get('llamafleet_worker_running_sequences{worker="0"}') == 0
            and m.get('llamafleet_worker_kv_cells_reserved{worker="0"}') == 0
            and m.get('llamafleet_worker_seq_ids_free{worker="0"}') == N_SEQ
        ):
            return
        assert time.monotonic() < deadline, "sequences or KV cells still held"
        time.sleep(0.1)


def test_greedy_prompt_lookup_equals_plain_greedy(server: Server) -> None:
    client = server.client()
    before = metric(server, "llamafleet_spec_accepted_tokens_total", 'provider="prompt-lookup-decoding"')
    for prompt in PROMPTS:
        plain = complete(client, prompt, False, max_tokens=80, temperature=0, logprobs=2)
        spec = complete(client, prompt, True, max_tokens=80, temperature=0, logprobs=2)
        assert spec.choices[0].text == plain.choices[0].text
        assert spec.choices[0].logprobs.tokens == plain.choices[0].logprobs.tokens
        spec_lp, plain_lp = spec.choices[0].logprobs.token_logprobs, plain.choices[0].logprobs.token_logprobs
        assert spec_lp == pytest.approx(plain_lp, abs=1e-4)
        assert spec.usage.completion_tokens == plain.usage.completion_tokens
    server.wait_metric('llamafleet_spec_steps_total{worker="0"}', 1)

    def costs(samples: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in samples.items() if k.startswith("llamafleet_spec_step_cost_seconds{")}

    # Waited for, not slept for: a fixed 1.2 s "heartbeat" sleep is what a loaded machine can outlast.
    # The cost curve the draft lengths came from was measured on the first drafting sequence: 1 .. k+1 rows
    # at least (predicted outputs draft up to 32), every entry positive.
    wait_until(
        server,
        lambda m: (
            total(m, "llamafleet_spec_accepted_tokens_total", 'provider="prompt-lookup-decoding"') > before
            and len(costs(m)) >= 7
            and all(v > 0 for v in costs(m).values())
        ),
        "prompt lookup never had a draft accepted (the test proves nothing), or no measured cost curve",
    )
    assert metric(server, "llamafleet_spec_step_overhead_seconds") >= 0
    idle(server)


def test_stop_strings_n_and_seeded_sampling_match(server: Server) -> None:
    client = server.client()
    prediction = "abc abc abc abc abc abc abc abc abc abc"
    for kwargs in (
        {"temperature": 0, "stop": ["c a"]},
        {"temperature": 0.8, "seed": 7, "n": 3},
        {"temperature": 1.0, "seed": 3, "frequency_penalty": 0.5, "presence_penalty": 0.3},
        {"temperature": 0.7, "seed": 5, "top_p": 0.9, "logit_bias": {"100": 3.0}},
    ):
        plain = chat(client, False, max_tokens=40, extra_body={"top_k": 20}, **kwargs)
        extra = {"prediction": {"type": "content", "content": prediction}, "top_k": 20}
        spec = chat(client, True, max_tokens=40, **kwargs, extra_body=extra)
        assert [c.message.content for c in spec.choices] == [c.message.content for c in plain.choices], kwargs
        assert [c.finish_reason for c in spec.choices] == [c.finish_reason for c in plain.choices]
    idle(server)


def test_grammar_constrained_output_matches(server: Server) -> None:
    client = server.client()
    grammar = 'root ::= ("ab" | "c" | " ")+ "."'
    for temperature in (0, 0.9):
        kwargs: dict[str, Any] = {"temperature": temperature, "seed": 11, "max_tokens": 30}
        plain = complete(client, "abc", False, extra_body={"grammar": grammar}, **kwargs)
        spec = complete(client, "abc", True, extra_body={"grammar": grammar}, **kwargs)
        assert spec.choices[0].text == plain.choices[0].text
    idle(server)


def test_predicted_output_is_exact_and_reported_in_usage(server: Server) -> None:
    """The random byte-vocab model writes invalid UTF-8, whose text does not tokenize back to the same
    tokens; an ASCII grammar keeps the text re-tokenizable, so a prediction of the output drafts well."""
    client = server.client()
    ascii_only = {"grammar": "root ::= [a-z ]+"}
    plain = chat(client, False, max_tokens=60, temperature=0, extra_body=ascii_only)
    text = plain.choices[0].message.content
    assert plain.usage.completion_tokens_details is None  # no prediction, no details
    predicted = {"prediction": {"type": "content", "content": text}, **ascii_only}
    same = chat(client, True, max_tokens=60, temperature=0, extra_body=predicted)
    assert same.choices[0].message.content == text
    details = same.usage.completion_tokens_details
    assert details is not None and details.accepted_prediction_tokens >= same.usage.completion_tokens // 2
    edited = text[: len(text) // 2] + "XYZ" + text[len(text) // 2 :]
    parts = [{"type": "text", "text": edited[:10]}, {"type": "text", "text": edited[10:]}]
    predicted = {"prediction": {"type": "content", "content": parts}, **ascii_only}
    other = chat(client, True, max_tokens=60, temperature=0, extra_body=predicted)
    assert other.choices[0].message.content == text
    details = other.usage.completion_tokens_details
    assert details is not None and details.accepted_prediction_tokens > 0
    assert details.rejected_prediction_tokens > 0
    predicted = {"prediction": {"type": "content", "content": text}, **ascii_only}
    stream = chat(
        client,
        True,
        max_tokens=60,
        temperature=0,
        extra_body=predicted,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens_details.accepted_prediction_tokens > 0
    idle(server)


def test_bad_predictions_are_400(server: Server) -> None:
    client = server.client()
    for prediction in (
        {"type": "image", "content": "x"},
        {"type": "content", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
        {"type": "content", "content": 5},
        {"type": "content", "content": "word " * 3000},  # more tokens than the 2048 context
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            chat(client, True, max_tokens=5, extra_body={"prediction": prediction})
        assert "prediction" in str(caught.value)
    idle(server)


def test_sampled_distribution_is_the_targets(server: Server) -> None:
    """With a prediction drafted at every position, the sampled tokens' histograms at the first positions
    must be the target's: over many seeds, speculation on and off. Seeded sampling consumes one draw per
    emitted token either way, so the histograms agree exactly; the bound below only tolerates float
    noise and still fails a verifier that accepts drafts more often than the target samples them."""
    client = server.client()
    # The tiny model, pushed towards "b" and "c", samples "b" about half the time (it likes repeating a
    # letter): drafts of "b" are verified at every position and both accepted and rejected often, so the
    # histograms test the verifier itself, not plain sampling.
    prediction = "b" * 18
    favour = {str(FIRST_BYTE_ID + ord(ch)): 8.0 for ch in "bc"}
    counts: dict[bool, list[collections.Counter[str]]] = {}
    drawn: dict[bool, list[list[str]]] = {False: [], True: []}
    accepted = rejected = 0
    for speculative in (False, True):
        per_position: list[collections.Counter[str]] = [collections.Counter() for _ in range(4)]
        for seed in range(60):
            out = chat(
                client,
                speculative,
                max_tokens=4,
                temperature=1.0,
                seed=seed,
                logprobs=True,
                logit_bias=favour,
                extra_body={"prediction": {"type": "content", "content": prediction}},
            )
            tokens = [t.token for t in out.choices[0].logprobs.content]
            drawn[speculative].append(tokens)
            for position, token in enumerate(tokens):
                per_position[position][token] += 1
            if speculative:
                details = out.usage.completion_tokens_details
                accepted += details.accepted_prediction_tokens
                rejected += details.rejected_prediction_tokens
        counts[speculative] = per_position
    for position in range(4):
        plain, spec = counts[False][position], counts[True][position]
        keys = set(plain) | set(spec)
        chi2 = sum((plain[k] - spec[k]) ** 2 / (plain[k] + spec[k]) for k in keys)
        assert chi2 <= 2.0, (position, plain, spec)
    assert accepted > 20 and rejected > 20, (accepted, rejected)  # else the histograms prove nothing
    # Stronger than the histograms: seed by seed, the same draws give the same tokens (a few may differ by
    # float noise between batch shapes; a verifier that keeps wrong drafts changes many).
    differing = [seed for seed in range(60) if drawn[False][seed] != drawn[True][seed]]
    assert len(differing) <= 3, differing
    idle(server)


def test_a_stop_string_inside_accepted_drafts_cuts_text_usage_and_logprobs(server: Server) -> None:
    """Drafts accepted past a stop string are dropped and not counted, as if never generated."""
    client = server.client()
    ascii_only = {"grammar": "root ::= [a-z ]+"}
    full = chat(client, False, max_tokens=60, temperature=0, extra_body=ascii_only).choices[0].message.content
    stop = full[30:33]
    kwargs: dict[str, Any] = {"max_tokens": 60, "temperature": 0, "stop": [stop], "logprobs": True}
    plain = chat(client, False, extra_body=ascii_only, **kwargs)
    predicted = {"prediction": {"type": "content", "content": full}, **ascii_only}
    spec = chat(client, True, extra_body=predicted, **kwargs)
    assert spec.choices[0].message.content == plain.choices[0].message.content == full[: full.index(stop)]
    assert spec.choices[0].finish_reason == plain.choices[0].finish_reason == "stop"
    assert spec.usage.completion_tokens == plain.usage.completion_tokens
    assert len(spec.choices[0].logprobs.content) == len(plain.choices[0].logprobs.content)
    assert spec.usage.completion_tokens_details.accepted_prediction_tokens > 0
    idle(server)
