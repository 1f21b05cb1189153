"""`draft_model = "draft-mtp"` end to end: real router and worker processes on the tiny glm4moe whose NextN
block drafts (tests/fixtures/tiny_mtp.py), against a server of the same model without speculation.

The plain server never loads the NextN block nor asks the target for hidden states, so equal greedy output
proves both that verification is exact and that turning the MTP machinery on does not move the target's
logits. Concurrent requests share the batch (several sequences draft in one MTP decode); the NextN head
agrees with the target about half the time, so drafts are both accepted and rejected.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.integration.server import Server, model_config, run_server
from tests.integration.test_speculative_startup import start_worker

N_SEQ = 4
PROMPTS = ["the cat sat on the mat", "abc abc", "hello world, hello", "1 2 3 1 2 3 1 2 " * 12]
PROVIDER = 'provider="draft-mtp"'


@pytest.fixture(scope="module")
def servers(tiny_mtp_gguf: Path) -> Iterator[tuple[Server, Server]]:
    common: dict[str, Any] = {"n_seq_max": N_SEQ, "flash_attn": False, "n_batch": 64, "n_ubatch": 64}
    with run_server(model_config(tiny_mtp_gguf, **common)) as plain:
        spec_model = model_config(
            tiny_mtp_gguf, draft_model="draft-mtp", draft_model_num_pred_tokens=3, **common
        )
        with run_server(spec_model) as spec:
            yield plain, spec


def complete(server: Server, prompt: str, **kwargs: Any) -> Any:
    return server.client().completions.create(model="test-model", prompt=prompt, **kwargs)


def metric(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(name) and PROVIDER in k)


def test_greedy_mtp_equals_greedy_without_speculation(servers: tuple[Server, Server]) -> None:
    plain, spec = servers
    kwargs = {"max_tokens": 64, "temperature": 0, "logprobs": 2}
    expected = [complete(plain, p, **kwargs) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # the speculating sequences share each step
        got = list(pool.map(lambda p: complete(spec, p, **kwargs), PROMPTS))
    for want, have in zip(expected, got, strict=True):
        assert have.choices[0].logprobs.tokens == want.choices[0].logprobs.tokens
        assert have.choices[0].text == want.choices[0].text
        have_lp, want_lp = have.choices[0].logprobs.token_logprobs, want.choices[0].logprobs.token_logprobs
        assert have_lp == pytest.approx(want_lp, abs=1e-4)
        assert have.usage.completion_tokens == want.usage.completion_tokens == 64
        assert have.choices[0].finish_reason == want.choices[0].finish_reason


def test_acceptance_is_reported_per_provider(servers: tuple[Server, Server]) -> None:
    _, spec = servers
    for prompt in PROMPTS[:2]:
        complete(spec, prompt, max_tokens=48, temperature=0)

    # The head drafts usefully (accepted > 0), and rejections happened (drafted - accepted > 0). Both only
    # grow, so they are polled for rather than read once after a fixed "heartbeat" sleep, which a loaded
    # machine can outlast.
    def drafted(samples: dict[str, float]) -> float:
        return metric(samples, "llamafleet_spec_drafted_tokens_total")

    def accepted(samples: dict[str, float]) -> float:
        return metric(samples, "llamafleet_spec_accepted_tokens_total")

    spec.wait_metrics(
        lambda m: 0 < accepted(m) < drafted(m),
        lambda m: f"draft-mtp drafted {drafted(m)}, accepted {accepted(m)}",
        timeout=15,
    )


def test_a_model_without_nextn_layers_fails_the_worker_start(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    done = start_worker(tmp_path, model_config(tiny_llama_gguf, draft_model="draft-mtp"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert 'model.draft_model "draft-mtp" needs NextN (MTP) layers' in done.stderr


def test_seeded_sampling_draws_the_same_tokens(servers: tuple[Server, Server]) -> None:
    """Drafts are greedy, verification samples with the request's own chain: a seeded sampled request
    gives the same tokens with and without speculation (penalties and top_p included)."""
    plain, spec = servers
    for kwargs in (
        {"temperature": 0.8, "seed": 7},
        {"temperature": 1.0, "seed": 3, "top_p": 0.9, "frequency_penalty": 0.5},
    ):
        want = complete(plain, PROMPTS[0], max_tokens=48, logprobs=1, **kwargs)
        have = complete(spec, PROMPTS[0], max_tokens=48, logprobs=1, **kwargs)
        assert have.choices[0].logprobs.tokens == want.choices[0].logprobs.tokens, kwargs
