"""Incremental detokenization and stop strings, independent of the server."""

from __future__ import annotations

import random

from router.client.detokenizer import StopMatcher


def feed_all(matcher: StopMatcher, pieces: list[str]) -> str:
    out = "".join(matcher.feed(p) for p in pieces)
    return out + matcher.flush()


def test_stop_string_split_across_pieces() -> None:
    matcher = StopMatcher(["END"])
    assert feed_all(matcher, ["hello E", "N", "D and more"]) == "hello "
    assert matcher.matched == "END"


def test_partial_stop_is_released_when_it_does_not_complete() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("abc EN") == "abc "
    assert matcher.feed("X") == "ENX"
    assert matcher.flush() == ""
    assert matcher.matched is None


def test_earliest_of_several_stops_wins() -> None:
    matcher = StopMatcher(["world", "lo w"])
    assert feed_all(matcher, ["hel", "lo world"]) == "hel"


def test_random_chunkings_agree() -> None:
    text = "the quick brown fox jumps over the lazy dog" * 3
    rng = random.Random(0)
    for stop in ["fox", "lazy dog", "zzz", "o"]:
        expected = text[: text.find(stop)] if stop in text else text
        for _ in range(50):
            cuts = sorted(rng.sample(range(1, len(text)), 8))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            assert feed_all(StopMatcher([stop]), pieces) == expected
