"""The most speculation can gain on this machine: `python -m bench.spec_ceiling` (part of `make bench`).

bench.speculative measures what prompt lookup and predicted outputs gain through the real service. This
says how far that is from what any draft-length policy could gain on the same hardware, so a ratio under
its bar can be read: the policy's fault, the drafts', or the machine's. In process, no router:

1. records the model's greedy answers to bench.speculative's copying and editing requests (the same chat
   template, documents and 128 tokens), timing each prompt's prefill;
2. measures the decode step's cost by output rows (worker/speculative/calibrate.py, as the worker does;
   the median of `--passes` measurements);
3. replays every answer four ways, from the same prefill and curve:
   - plain: one 1-row step per token, the baseline;
   - perfect drafts: every draft right, the best draft length each step: the bound for ANY drafter;
   - these drafts, best policy: the real drafter's proposals, each step verifying the part of the draft
     that comes true when that pays, or more of it where the curve makes that cheaper (a policy that knows
     the future; `fastest_seconds`): the bound for any draft-length policy with this drafter (close rather
     than exact for predicted outputs, whose drafter keeps state: see `matched_drafts`);
   - the worker's policy: `worker.speculative.control.Speculation` choosing draft lengths as it does in the
     worker, from the same curve (held fixed here; in the worker it follows real step times).
Only llama_decode's time counts (no HTTP, sampling or per-step overhead), so every figure is an upper
bound on what the service can show; the service's measured ratio sits a little under its policy line.
`--save FILE` keeps the answers and the curve; `--replay FILE` reruns step 3 from them in a second, without
the model (for trying policy changes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.speculative import request_bodies
from router.preprocess.templating import ChatTemplate
from shared.config import WorkerOverride, load_config
from shared.models import resolve_model_path
from worker.engine import LlamaEngine
from worker.speculative.base import Drafter, DraftSeq
from worker.speculative.calibrate import measure_step_costs
from worker.speculative.control import PREDICTION_K_MAX, Candidate, Speculation
from worker.speculative.costs import StepCosts
from worker.speculative.prediction import PredictionDrafter
from worker.speculative.prompt_lookup import PromptLookup

BARS = {"copying": 2.0, "editing": 2.5}


@dataclass
class Answer:
    """One request's prompt, its greedy answer and what its prefill took."""

    prompt: list[int]
    output: list[int]  # the first token comes from the prefill
    prediction: list[int] | None
    prefill: float


@dataclass
class Recording:
    """What the replays need: the answers by workload and the step-cost curve (seconds by rows - 1)."""

    model: str
    max_ngram: int
    workloads: dict[str, list[Answer]]
    curve: list[float]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> Recording:
        data = json.loads(path.read_text())
        workloads = {name: [Answer(**a) for a in answers] for name, answers in data["workloads"].items()}
        return cls(data["model"], data["max_ngram"], workloads, data["curve"])


def fastest_seconds(
    matched: Sequence[int], curve: Sequence[float], offered: Sequence[int] | None = None
) -> float:
    """The least decode time that produces an answer's tokens after the first, when at each point `i` (the
    first `i` tokens known, 1 <= i < len(matched)) a draft of `offered[i]` tokens (default `matched[i]`)
    whose first `matched[i]` are right is on offer: a step verifies j <= offered[i] of them at `curve[j]`
    (j + 1 rows) and gains min(j, matched[i]) + 1 tokens. Verifying more than comes true can pay where
    the curve is not monotone (a row count just past a matmul tile costs more than the next one up)."""
    n = len(matched)
    offered = matched if offered is None else offered
    best = [0.0] * (n + 1)
    for i in range(n - 1, 0, -1):
        top = min(offered[i], n - i - 1, len(curve) - 1)
        best[i] = min(curve[j] + best[i + min(j, matched[i]) + 1] for j in range(top + 1))
    return best[1] if n > 1 else 0.0


def _coming_true(draft: Sequence[int], tokens: Sequence[int], at: int) -> int:
    """How many of `draft`'s first tokens equal the answer's `tokens` from `at` on."""
    right = 0
    while right < len(draft) and at + right < len(tokens) and draft[right] == tokens[at + right]:
        right += 1
    return right


def matched_drafts(answer: Answer, drafter: Drafter, k: int) -> tuple[list[int], list[int]]:
    """For each point of the answer, how many tokens of the drafter's `k`-token draft come true, and how
    long the draft is. A drafter with state of its own (predicted outputs follow where they drafted last)
    is asked at every point here, fewer times by a real policy: its bound is then close, not exact."""
    tokens, prompt_len = answer.output, len(answer.prompt)
    history = list(answer.prompt)
    matched, offered = [0], [0]
    for i in range(1, len(tokens)):
        history.append(tokens[i - 1])
        ask = DraftSeq(0, history, k, prompt_len, answer.prediction)
        draft = drafter.draft([ask])[0]
        matched.append(_coming_true(draft, tokens, i))
        offered.append(len(draft))
    drafter.release(0)
    return matched, offered


def policy_seconds(answer: Answer, speculation: Speculation, curve: Sequence[float]) -> float:
    """Decode time of the answer with the worker's controller choosing each step's draft."""
    tokens, prompt_len = answer.output, len(answer.prompt)
    history = list(answer.prompt) + tokens[:1]
    i, seconds = 1, 0.0
    while i < len(tokens):
        room = len(tokens) - i - 1
        cand = Candidate(0, history, prompt_len, room, answer.prediction, False, frozenset())
        draft = speculation.propose([cand], 1).get(0, [])
        right = _coming_true(draft, tokens, i)
        if draft:
            speculation.verified(0, len(draft), right)
        gained = min(right + 1, len(tokens) - i)
        history += tokens[i : i + gained]
        i += gained
        seconds += curve[min(len(draft), len(curve) - 1)]
    speculation.release(0)
    return seconds


def record(engine: LlamaEngine, prompt: list[int], n_tokens: int) -> tuple[list[int], float]:
    """The greedy answer (sequence 0, removed afterwards) and the prefill's seconds."""
    batch = engine.batch
    engine.seq_rm(0)
    prefill = 0.0
    for start in range(0, len(prompt), engine.n_batch):
        batch.clear()
        chunk = prompt[start : start + engine.n_batch]
        batch.add_chunk(chunk, start, 0, start + len(chunk) == len(prompt))
        started = time.perf_counter()
        if engine.decode(batch.size) != 0:
            raise RuntimeError("prefill failed")
        prefill += time.perf_counter() - started
    output: list[int] = []
    position = len(prompt)
    while True:
        output.append(int(engine.logits_row(batch.size - 1).argmax()))
        if len(output) == n_tokens:
            break
        batch.clear()
        batch.add_token(output[-1], position, 0, True)
        position += 1
        if engine.decode(1) != 0:
            raise RuntimeError("decode failed")
    engine.seq_rm(0)
    return output, prefill


def measure(config_path: str, documents: int, rows: int, passes: int) -> Recording:
    """Records the answers and measures the step-cost curve on the config's model."""
    config = load_config(config_path)
    path = resolve_model_path(config.model)
    # One sequence (llama.cpp's attention reads only the KV cells in use: the context size does not matter).
    options = config.model.model_copy(update={"n_seq_max": 1, "n_ctx": 4096})
    engine = LlamaEngine(options, path, WorkerOverride())
    try:
        vocab = engine.vocab
        template = ChatTemplate(
            config.model.chat_template or vocab.chat_template() or "",
            vocab.token_text(vocab.bos_id),
            vocab.token_text(vocab.eos_id),
        )
        bos = vocab.token_text(vocab.bos_id) if vocab.add_bos else ""
        workloads: dict[str, list[Answer]] = {}
        for name, seeds, edit in (
            ("copying", range(documents), False),
            ("editing", range(100, 100 + documents), True),
        ):
            answers = workloads[name] = []
            for body in request_bodies(seeds, edit, True, edit):
                text = template.render(body["messages"])
                # As the router tokenizes: no second BOS when the template wrote one.
                add_special = not (bos and text.startswith(bos))
                prompt = vocab.tokenize(text, add_special=add_special, parse_special=True)
                prediction = None
                if edit:
                    content = body["prediction"]["content"]
                    prediction = vocab.tokenize(content, add_special=False, parse_special=False)
                output, prefill = record(engine, prompt, body["max_tokens"])
                answers.append(Answer(prompt, output, prediction, prefill))
        engine.batch.clear()
        prompt = workloads["copying"][0].prompt
        engine.batch.add_chunk(prompt, 0, 0, True)
        engine.decode(engine.batch.size)
        # Each pass times every row count twice, keeping the lower; the median of the passes by row count
        # keeps one slow moment of a noisy machine from bending the curve.
        measured = [measure_step_costs(engine, 0, len(prompt), rows, budget=60.0) for _ in range(passes)]
        size = min(len(m) for m in measured)
        curve = [statistics.median(m[n] for m in measured) for n in range(size)]
        engine.seq_rm(0)
    finally:
        engine.close()
    return Recording(path.name, config.model.draft_model_max_ngram_size, workloads, curve)


def report(recording: Recording, k_lookup: int) -> dict[str, dict[str, float]]:
    """Prints and returns the ratios of the four replays, by workload."""
    curve, workloads = recording.curve, recording.workloads
    providers: dict[str, tuple[int, Callable[[], Drafter]]] = {
        "copying": (k_lookup, lambda: PromptLookup(recording.max_ngram)),
        "editing": (PREDICTION_K_MAX, PredictionDrafter),
    }
    answers_all = [a for w in workloads.values() for a in w]
    prefill = sum(a.prefill for a in answers_all) / len(answers_all)
    shown = ", ".join(
        f"{n} {curve[n - 1] * 1e3:.1f}" for n in (1, 2, 4, 8, 16, 17, 32, 33) if n <= len(curve)
    )
    print(
        f"model {recording.model}: prefill {prefill * 1e3:.0f} ms (mean); decode ms by output rows: {shown}"
    )
    print("ratios to plain decoding, prefill included; only llama_decode's time counts (upper bounds)")
    header = f"{'bar':>5s} {'perfect drafts':>15s} {'these drafts, best policy':>26s} {'the worker':>11s}"
    print(f"  {'':9s} {header}")
    results: dict[str, dict[str, float]] = {}
    for name, answers in workloads.items():
        k, make = providers[name]
        capped = curve[: k + 1]
        plain = perfect = best = ours = 0.0
        for answer in answers:
            n = len(answer.output)
            plain += answer.prefill + (n - 1) * curve[0]
            perfect += answer.prefill + fastest_seconds([n] * n, capped)
            matched, offered = matched_drafts(answer, make(), k)
            best += answer.prefill + fastest_seconds(matched, capped, offered)
            if name == "editing":
                spec = Speculation(None, k, None, make(), costs=StepCosts(capped), prediction_k_max=k)
            else:
                spec = Speculation(make(), k, None, costs=StepCosts(capped))
            ours += answer.prefill + policy_seconds(answer, spec, capped)
        results[name] = figures = {"perfect": plain / perfect, "best": plain / best, "worker": plain / ours}
        print(
            f"  {name:9s} {BARS[name]:>4.1f}x {figures['perfect']:>14.2f}x {figures['best']:>25.2f}x "
            f"{figures['worker']:>10.2f}x   (k {k})"
        )
    return results


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-C", "--config", default="configs/gemma-3-270m.json")
    parser.add_argument("--documents", type=int, default=6, help="requests per workload")
    parser.add_argument("--num-pred-tokens", type=int, default=16, help="prompt lookup's longest draft")
    parser.add_argument("--passes", type=int, default=5, help="times the step-cost curve is measured")
    parser.add_argument("--save", help="also write the answers and the curve to this JSON file")
    parser.add_argument("--replay", help="replay a file --save wrote instead of running the model")
    args = parser.parse_args(argv)
    if args.replay:
        recording = Recording.load(Path(args.replay))
    else:
        rows = max(args.num_pred_tokens, PREDICTION_K_MAX) + 1
        recording = measure(args.config, args.documents, rows, args.passes)
        if args.save:
            recording.save(Path(args.save))
    return report(recording, args.num_pred_tokens)


if __name__ == "__main__":
    main()
