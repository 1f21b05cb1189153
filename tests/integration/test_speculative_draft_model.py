"""The `draft-model` provider end to end: a tiny draft GGUF with the target's vocabulary, real processes.

With the target itself as the draft model every draft is right (acceptance proves the batched drafting
path); with another random model most drafts are wrong (rollback of both KVs is exercised). Either way
greedy and seeded output must equal the same server's output with speculation off.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.model_fixtures import TinyLlamaFactory
from tests.fixtures.tiny_models import write_tiny_llama_with_vocab_of
from tests.integration.server import Server, model_config, run_server
from tests.integration.test_speculative import complete, idle, total, wait_until
from tests.integration.test_speculative_startup import start_worker

PROMPTS = ["the cat sat on the mat", "hello world", "1 2 3", "abc"]


def _server(target: Path, draft: Path) -> Any:
    model = model_config(
        target,
        n_seq_max=4,
        flash_attn=False,
        draft_model="draft-model",
        draft_model_path=str(draft),
        draft_model_num_pred_tokens=4,
    )
    return run_server(model)


@pytest.fixture(scope="module", params=["same-weights", "other-weights"])
def server(request: pytest.FixtureRequest, tiny_llama_factory: TinyLlamaFactory) -> Iterator[Server]:
    target = tiny_llama_factory()
    draft = target if request.param == "same-weights" else tiny_llama_factory(seed=1)
    with _server(target, draft) as running:
        yield running


def test_draft_model_output_equals_plain(server: Server) -> None:
    client = server.client()
    generated = 'llamafleet_worker_generated_tokens_total{worker="0"}'
    start = server.metrics().get(generated, 0.0)  # the module's first generation: nothing counted yet
    answered = 0
    for prompt in PROMPTS:
        plain = complete(client, prompt, False, max_tokens=40, temperature=0)
        spec = complete(client, prompt, True, max_tokens=40, temperature=0)
        assert spec.choices[0].text == plain.choices[0].text
        answered += plain.usage.completion_tokens + spec.usage.completion_tokens
    # Read the counters from a heartbeat sent after these requests (it counts their tokens), not after a
    # fixed sleep that a loaded machine can outlast: a stale one would miss the last drafts.
    samples = wait_until(
        server,
        lambda m: (
            m.get(generated, 0.0) >= start + answered
            and total(m, "llamafleet_spec_drafted_tokens_total", 'provider="draft-model"') > 50
        ),
        "fewer than 50 tokens drafted",
    )
    drafted = total(samples, "llamafleet_spec_drafted_tokens_total", 'provider="draft-model"')
    accepted = total(samples, "llamafleet_spec_accepted_tokens_total", 'provider="draft-model"')
    if server.config["model"]["draft_model_path"] == server.config["model"]["path"]:
        assert accepted == drafted  # greedy with the same weights: every draft is right
    else:
        assert accepted < drafted
    for seed in range(3):  # several sequences drafting in one batch, sampled
        kwargs: dict[str, Any] = {"max_tokens": 30, "temperature": 0.9, "seed": seed, "n": 3}
        plain = complete(client, PROMPTS[seed], False, **kwargs)
        spec = complete(client, PROMPTS[seed], True, **kwargs)
        assert [c.text for c in spec.choices] == [c.text for c in plain.choices]
    idle(server)


def test_a_draft_model_of_another_vocabulary_is_refused(
    tmp_path: Path, tiny_llama_gguf: Path, smollm2_gguf: Path
) -> None:
    other = write_tiny_llama_with_vocab_of(tmp_path / "other-vocab.gguf", smollm2_gguf)
    model = model_config(tiny_llama_gguf, draft_model="draft-model", draft_model_path=str(other))
    done = start_worker(tmp_path, model)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "model.draft_model_path" in done.stderr and "tokens" in done.stderr
