"""The scheduler with media spans (worker/media.py), on the fake runner of test_scheduler: a span is planned
whole as its own work item (one per step), text chunks stop at it, other sequences keep decoding, and a
prefix-cache match never ends inside a span."""

from __future__ import annotations

from shared.protocol import SubmitRequest
from tests.unit.test_scheduler import VOCAB, Run, drive, make, prompt_of, step
from worker.media import MediaSpan, RequestMedia, placeholders
from worker.mtmd_context import MediaPiece

SPAN = 6


def with_image(
    seed: int, sha: str, before: int = 10, after: int = 10, span: int = SPAN, causal: bool = False
) -> tuple[list[int], RequestMedia]:
    """A prompt of `before` text tokens, one media span of `span` placeholders, `after` text tokens; an
    image span is non-causal (gemma3), an audio one causal."""
    media = RequestMedia()
    piece = MediaPiece("audio" if causal else "image", [], [], span, not causal, None)
    media.spans.append(MediaSpan(before, sha, piece))
    prompt = prompt_of(seed, before) + placeholders(sha, span, VOCAB) + prompt_of(seed + 1, after)
    media.added_tokens = span
    return prompt, media


def media_items(runner: object, rid: str) -> list[tuple[int, int, bool]]:
    """(position, length, planned as media) of every work item of `rid`."""
    out: list[tuple[int, int, bool]] = []
    for plan in runner.plans:  # type: ignore[attr-defined]
        spans = {seq_id for seq_id, _ in plan.media}
        out.extend((w.position, len(w.tokens), w.seq_id in spans) for w in plan.work if w.rid == rid)
    return out


def test_a_span_is_planned_whole_while_others_keep_decoding() -> None:
    sched, runner = make(n_batch=16)
    sched.submit(SubmitRequest("short", prompt_of(1, 4), 12))
    run = Run()
    step(sched, run)
    prompt, media = with_image(5, "aa" * 32, before=10, after=20)
    sched.submit(SubmitRequest("img", prompt, 2), media)
    assert sched.waiting[0].has_media
    before = len(run.tokens["short", 0])
    for _ in range(4):
        step(sched, run)
    assert len(run.tokens["short", 0]) == before + 4, "the running stream got a token every step"
    assert media_items(runner, "img") == [(0, 10, False), (10, SPAN, True), (16, 15, False), (31, 5, False)]
    drive(sched, run)
    assert run.cached["img"] == 0


def test_a_causal_span_is_chunked_like_text() -> None:
    sched, runner = make(n_batch=8)
    sched.submit(SubmitRequest("short", prompt_of(1, 4), 12))
    run = Run()
    step(sched, run)
    prompt, media = with_image(6, "ab" * 32, before=3, after=4, span=20, causal=True)
    sched.submit(SubmitRequest("audio", prompt, 2), media)
    drive(sched, run)
    assert media_items(runner, "audio")[:5] == [  # then its decode rows
        (0, 3, False),
        (3, 7, True),
        (10, 7, True),
        (17, 6, True),
        (23, 4, False),
    ]
    assert len(run.tokens["short", 0]) == 12


def test_one_span_per_step() -> None:
    sched, runner = make(n_batch=32)
    first, media_a = with_image(1, "aa" * 32, before=0)
    second, media_b = with_image(2, "bb" * 32, before=0)
    sched.submit(SubmitRequest("a", first, 2), media_a)
    sched.submit(SubmitRequest("b", second, 2), media_b)
    step(sched, Run())
    assert len(runner.plans[0].media) == 1
    drive(sched)
    assert sum(len(p.media) for p in runner.plans) == 2


def test_a_cached_prefix_is_cut_back_to_the_span_start() -> None:
    sched, _ = make(n_batch=32)
    prompt, media = with_image(3, "cc" * 32, before=20)  # over the slot table's MIN_REUSE_TOKENS
    sched.submit(SubmitRequest("first", prompt, 2), media)
    drive(sched)
    # The same image again: the span is reused.
    again, again_media = with_image(3, "cc" * 32, before=20)
    sched.submit(SubmitRequest("again", again, 2), again_media)
    run = drive(sched)
    assert run.cached["again"] >= 20 + SPAN
    # Same text, an image whose first placeholders happen to match: only the text before it is reused.
    other, other_media = with_image(3, "dd" * 32, before=20)
    other[20:23] = prompt[20:23]
    sched.submit(SubmitRequest("other", other, 2), other_media)
    run = drive(sched)
    assert run.cached["other"] == 20


def test_media_tokens_ride_on_the_first_item() -> None:
    sched, _ = make()
    prompt, media = with_image(4, "ee" * 32)
    sched.submit(SubmitRequest("m", prompt, 3), media)
    seen = []
    while not sched.idle:
        for item in sched.step().items:
            seen.append(item.media_tokens)
    assert seen[0] == SPAN and all(m is None for m in seen[1:])


def test_placeholders_depend_on_the_hash_and_stay_in_the_vocabulary() -> None:
    a = placeholders("aa" * 32, 40, 100)
    assert a == placeholders("aa" * 32, 40, 100) and a != placeholders("ab" * 32, 40, 100)
    assert all(0 <= t < 100 for t in a)
    assert RequestMedia([MediaSpan(5, "aa", MediaPiece("image", [], [], 4, True, None))]).clamp_reuse(7) == 5
