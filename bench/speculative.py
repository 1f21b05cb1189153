"""Speculative decoding benchmarks: `python -m bench.speculative` (Gemma 3 270M, the real service).

Two servers in the same run: one with `draft_model: prompt-lookup-decoding`, the baseline without it (its
requests also say `speculative: false`), fed the same documents, rounds alternating. Two, so that neither
side starts from the prompt KV the other left in the prefix cache. Ratios are over all rounds.

1. copying: a fresh ~150-word document per request, asked to be repeated; greedy, concurrency 1, 128
   output tokens (ignore_eos): prompt lookup on vs off, tokens/s (bar >= 2.0x).
2. editing: the same documents with a small edit asked for, `prediction` = the original text (OpenAI
   predicted outputs), vs no prediction and speculation off (bar >= 2.5x).
3. serving: distinct prompts (bench/serving.py's), 64 output tokens, concurrency 16, on vs off (bar >=
   0.97x).
Each prints acceptance rates from /metrics. Machines here are noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from bench.serving import make_prompts, run_load
from shared.config import ModelOptions, load_config
from shared.models import resolve_model_path
from shared.vocab import Vocab

WORDS = [
    "river",
    "market",
    "winter",
    "garden",
    "letter",
    "station",
    "bridge",
    "village",
    "morning",
    "engine",
    "teacher",
    "window",
    "harbour",
    "council",
    "summer",
    "library",
    "mountain",
    "doctor",
    "kitchen",
    "museum",
    "forest",
    "island",
    "painter",
    "captain",
    "factory",
    "orchard",
    "theatre",
    "soldier",
    "valley",
    "lantern",
    "merchant",
    "journey",
    "festival",
    "meadow",
    "castle",
    "weather",
    "traveller",
    "student",
    "farmer",
    "chapel",
    "quarry",
    "tower",
    "canal",
    "workshop",
    "bakery",
    "lighthouse",
    "vineyard",
    "archive",
]
VERBS = [
    "opened",
    "closed",
    "visited",
    "repaired",
    "painted",
    "described",
    "counted",
    "carried",
    "found",
    "watched",
]


def document(seed: int, words: int = 150) -> str:
    """A fresh ~`words`-word document (plain sentences from a seeded generator)."""
    rng = random.Random(seed)
    sentences: list[str] = []
    count = 0
    while count < words:
        a, b = rng.sample(WORDS, 2)
        sentence = f"The {a} near the old {b} was {rng.choice(VERBS)} by {rng.randint(2, 99)} people"
        sentence += f" on a {rng.choice(['cold', 'bright', 'quiet', 'busy'])} {rng.choice(WORDS)} day."
        sentences.append(sentence)
        count += len(sentence.split())
    return " ".join(sentences)


@dataclass
class Timed:
    seconds: float = 0.0
    tokens: int = 0
    accepted_prediction: int = 0
    rejected_prediction: int = 0

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


async def _chat(client: httpx.AsyncClient, body: dict[str, Any], out: Timed) -> None:
    started = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    out.seconds += time.perf_counter() - started
    usage = response.json()["usage"]
    out.tokens += usage["completion_tokens"]
    details = usage.get("completion_tokens_details") or {}
    out.accepted_prediction += details.get("accepted_prediction_tokens", 0)
    out.rejected_prediction += details.get("rejected_prediction_tokens", 0)


def request_bodies(seeds: range, edit: bool, speculative: bool, predict: bool) -> list[dict[str, Any]]:
    bodies = []
    for seed in seeds:
        doc = document(seed)
        if edit:
            ask = "Rewrite the document below, changing every 'people' to 'visitors'. Keep everything else."
        else:
            ask = "Repeat the document below exactly, word for word."
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": f"{ask}\n\n{doc}"}],
            "max_tokens": 128,
            "temperature": 0,
            "ignore_eos": True,
            "speculative": speculative,
        }
        if predict:
            body["prediction"] = {"type": "content", "content": doc}
        bodies.append(body)
    return bodies


async def _sequential(base_url: str, bodies: list[dict[str, Any]]) -> Timed:
    out = Timed()
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        for body in bodies:
            await _chat(client, body, out)
    return out


def _spec_counters(metrics_text: str) -> dict[str, float]:
    counters: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("llamafleet_spec_"):
            name, _, value = line.rpartition(" ")
            counters[name] = float(value)
    return counters


def _acceptance(before: dict[str, float], after: dict[str, float], provider: str) -> str:
    def delta(kind: str) -> float:
        key = f'llamafleet_spec_{kind}_tokens_total{{provider="{provider}",worker="0"}}'
        alt = f'llamafleet_spec_{kind}_tokens_total{{worker="0",provider="{provider}"}}'
        return after.get(key, after.get(alt, 0.0)) - before.get(key, before.get(alt, 0.0))

    drafted, accepted = delta("drafted"), delta("accepted")
    rate = accepted / drafted if drafted else 0.0
    return f"{provider}: drafted {drafted:.0f}, accepted {accepted:.0f} ({rate:.1%})"


def _render(body: dict[str, Any]) -> str:
    """The text our chat template (configs/gemma-3-270m.json) makes of a one-message request, without the
    BOS token (llama-server adds it)."""
    content = body["messages"][0]["content"].strip()
    return f"<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"


async def _llama_server_sequential(base_url: str, bodies: list[dict[str, Any]]) -> Timed:
    """The copying requests against llama-server's /completion, the same prompt text as ours."""
    out = Timed()
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        for body in bodies:
            request = {
                "prompt": _render(body),
                "n_predict": body["max_tokens"],
                "temperature": 0,
                "ignore_eos": True,
                "cache_prompt": False,
            }
            started = time.perf_counter()
            response = await client.post("/completion", json=request)
            response.raise_for_status()
            out.seconds += time.perf_counter() - started
            out.tokens += int(response.json()["tokens_predicted"])
    return out


@contextlib.contextmanager
def _llama_servers(binary: str | None, options: ModelOptions) -> Iterator[dict[str, str]]:
    """llama-server without and with its n-gram speculation (`--spec-type ngram-simple`, its defaults),
    warmed up; none without a binary."""
    if binary is None:
        yield {}
        return
    from bench.vs_llama_server import llama_server
    from tests.integration.server import free_port

    gguf = resolve_model_path(options)
    with (
        llama_server(binary, gguf, options, free_port()) as off,
        llama_server(binary, gguf, options, free_port(), ("--spec-type", "ngram-simple")) as on,
    ):
        for url in (off, on):
            asyncio.run(_llama_server_sequential(url, request_bodies(range(1000, 1001), False, True, False)))
        yield {"theirs off": off, "theirs on": on}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-C", "--config", default="configs/gemma-3-270m.json")
    parser.add_argument("--documents", type=int, default=4, help="requests per round and workload")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=32, help="serving workload requests")
    parser.add_argument("--num-pred-tokens", type=int, default=16)
    parser.add_argument(
        "--passive-threads",
        action="store_true",
        help="OMP_WAIT_POLICY=passive (a machine shared with other work; each decode then wakes threads)",
    )
    parser.add_argument(
        "--llama-server",
        default=os.environ.get("LLAMA_SERVER_BIN"),
        help="a llama-server binary (default $LLAMA_SERVER_BIN): also time its copying with ngram-simple",
    )
    args = parser.parse_args(argv)

    from tests.integration.server import run_server

    config = load_config(args.config)
    model_path = resolve_model_path(config.model)
    vocab = Vocab.load(model_path)
    serving_prompts = [make_prompts(vocab, args.requests, 130, tag=f"spec{r}-") for r in range(args.rounds)]
    vocab.close()
    model = config.model.model_dump(exclude_none=True)
    model.update(draft_model="prompt-lookup-decoding", draft_model_num_pred_tokens=args.num_pred_tokens)
    best: dict[str, Timed] = {}  # all rounds together: the same documents on and off
    rounds: dict[str, list[float]] = {}
    acceptance: list[str] = []
    n = args.documents

    def keep(name: str, result: Timed) -> None:
        total = best.setdefault(name, Timed())
        total.seconds += result.seconds
        total.tokens += result.tokens
        total.accepted_prediction += result.accepted_prediction
        total.rejected_prediction += result.rejected_prediction
        rounds.setdefault(name, []).append(result.rate)

    plain = config.model.model_dump(exclude_none=True)
    passive = args.passive_threads
    # Two servers, so that neither side finds the other's prompts in its prefix cache; the off side's
    # requests also say `speculative: false` (predicted outputs would speculate on any worker).
    with (
        run_server(plain, api_key=None, passive_threads=passive) as off_server,
        run_server(model, api_key=None, passive_threads=passive) as on_server,
        _llama_servers(args.llama_server, config.model) as theirs,
    ):
        urls = {False: off_server.base_url, True: on_server.base_url}
        for url in urls.values():  # warm-up (the on side measures its step costs here)
            asyncio.run(_sequential(url, request_bodies(range(1000, 1001), False, True, True)))
        metrics = httpx.Client(base_url=on_server.base_url, timeout=30)

        def workload(name: str, seeds: range, edit: bool, provider: str, last: bool) -> None:
            keep(
                f"{name} off",
                asyncio.run(_sequential(urls[False], request_bodies(seeds, edit, False, False))),
            )
            before = _spec_counters(metrics.get("/metrics").text)
            keep(f"{name} on", asyncio.run(_sequential(urls[True], request_bodies(seeds, edit, True, edit))))
            if last:
                time.sleep(1.5)  # a heartbeat carries the counters
                after = _spec_counters(metrics.get("/metrics").text)
                acceptance.append(f"{name}ing  " + _acceptance(before, after, provider))

        for r in range(args.rounds):
            last = r == args.rounds - 1
            workload("copy", range(r * n, (r + 1) * n), False, "prompt-lookup-decoding", last)
            for name, url in theirs.items():  # the same documents, in the same round
                keep(
                    name,
                    asyncio.run(
                        _llama_server_sequential(
                            url, request_bodies(range(r * n, (r + 1) * n), False, True, False)
                        )
                    ),
                )
            workload("edit", range(100 + r * n, 100 + (r + 1) * n), True, "prediction", last)
        serving: dict[bool, list[tuple[int, float]]] = {True: [], False: []}
        for r in range(args.rounds):
            for on in (False, True) if r % 2 == 0 else (True, False):  # neither side always goes first
                prompts = serving_prompts[r]
                result = asyncio.run(run_load(urls[on], prompts, 64, 16, extra={"speculative": on}))
                serving[on].append((result.output_tokens, result.seconds))
        after = _spec_counters(metrics.get("/metrics").text)
        steps = after.get('llamafleet_spec_steps_total{worker="0"}', 0.0)
        metrics.close()

    def serving_rate(on: bool) -> float:
        return sum(t for t, _ in serving[on]) / sum(s for _, s in serving[on])

    copy = best["copy on"].rate / best["copy off"].rate
    edit = best["edit on"].rate / best["edit off"].rate
    serve = serving_rate(True) / serving_rate(False)
    print(
        f"model {model_path.name}, draft_model_num_pred_tokens {args.num_pred_tokens}, "
        f"{args.rounds} rounds of {n} documents (tokens/s over all rounds; each round's in brackets)"
    )
    for name in ("copy off", "copy on", "edit off", "edit on"):
        each = ", ".join(f"{rate:.1f}" for rate in rounds[name])
        print(f"  {name:9s}: {best[name].rate:7.1f} tok/s  [{each}]")
    print(f"copying (prompt lookup, concurrency 1): on/off = {copy:.2f}x (bar >= 2.0)")
    print(f"editing (prediction, concurrency 1):    on/off = {edit:.2f}x (bar >= 2.5)")
    print(
        f"  prediction tokens accepted {best['edit on'].accepted_prediction}, "
        f"rejected {best['edit on'].rejected_prediction}"
    )
    print(
        f"serving (distinct prompts, concurrency 16): on {serving_rate(True):.1f} / off "
        f"{serving_rate(False):.1f} tok/s = {serve:.3f}x (bar >= 0.97)"
    )
    for line in acceptance:
        print(f"acceptance, {line}")
    if "theirs on" in best:
        their_off, their_on = best["theirs off"].rate, best["theirs on"].rate
        print(
            f"llama-server copying: off {their_off:.1f} / ngram-simple {their_on:.1f} tok/s = "
            f"{their_on / their_off:.2f}x; ours on / theirs on = {best['copy on'].rate / their_on:.2f}x"
        )
    print(f"steps with speculation: {steps:.0f}")
    return {"copy": copy, "edit": edit, "serving": serve}


if __name__ == "__main__":
    main()
