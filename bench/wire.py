"""The wire format's cost: `python -m bench.wire` (part of `make bench`).

Encodes and decodes one `frames` message of 64 items (a 64-sequence engine step), with and without 5 top
logprobs per token, two ways: the protocol's msgspec Structs (shared/protocol.py) against what version 1 of
the protocol did (NamedTuple items in a dict, msgpack.packb, then msgpack.unpackb and a rebuild of the
typed items). Prints microseconds per round trip and the ratio; the msgspec side also validates every field.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, NamedTuple

import msgpack

from shared import protocol


class _OldLogprob(NamedTuple):
    logprob: float
    top: list[tuple[int, float]]


class _OldItem(NamedTuple):
    rid: str
    choice: int
    token_ids: list[int]
    logprobs: list[_OldLogprob] | None
    finish: str | None
    usage: dict[str, int] | None


def _old_round_trip(items: list[_OldItem]) -> list[_OldItem]:
    payload = msgpack.packb({"t": "frames", "step": 1, "items": items, "v": 1}, use_bin_type=True)
    message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    parsed: list[_OldItem] = []
    for rid, choice, tokens, logprobs, finish, usage in message["items"]:
        parsed_lp = None
        if logprobs is not None:
            parsed_lp = [_OldLogprob(lp, [(int(t), float(p)) for t, p in top]) for lp, top in logprobs]
        parsed.append(_OldItem(rid, choice, tokens, parsed_lp, finish, usage))
    return parsed


def _items(n: int, top: int) -> tuple[list[_OldItem], list[protocol.FrameItem]]:
    old: list[_OldItem] = []
    new: list[protocol.FrameItem] = []
    for i in range(n):
        rid, token = f"chatcmpl-{i}-{i * 7919:x}", 100 + i
        alternatives = [(token + k, -0.25 * (k + 1)) for k in range(top)]
        old_lp = [_OldLogprob(-0.25, alternatives)] if top else None
        new_lp = [protocol.TokenLogprob(-0.25, alternatives)] if top else None
        old.append(_OldItem(rid, 0, [token], old_lp, None, None))
        new.append(protocol.FrameItem(rid, 0, [token], new_lp, None))
    return old, new


def _time_us(function: Any, argument: Any, rounds: int) -> float:
    best = float("inf")
    for _ in range(5):  # best of five batches: the least disturbed by the rest of the machine
        started = time.perf_counter()
        for _ in range(rounds):
            function(argument)
        best = min(best, (time.perf_counter() - started) / rounds)
    return best * 1e6


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args(argv)
    sender, receiver = protocol.worker_codec(), protocol.router_codec()

    def new_round_trip(items: list[protocol.FrameItem]) -> Any:
        return receiver.decode(sender.encode(protocol.Frames(items)))

    ratios: dict[str, float] = {}
    print(f"frames message of {args.items} items, encode + decode per message")
    for label, top in (("no logprobs", 0), ("5 top logprobs", 5)):
        old, new = _items(args.items, top)
        assert [tuple(i[:3]) for i in _old_round_trip(old)] == [(i.rid, i.choice, i.token_ids) for i in new]
        old_us = _time_us(_old_round_trip, old, args.rounds)
        new_us = _time_us(new_round_trip, new, args.rounds)
        ratios[label] = old_us / new_us
        print(
            f"  {label:15s}: msgspec {new_us:7.1f} us, dataclasses + msgpack {old_us:7.1f} us"
            f" ({ratios[label]:.1f}x faster)"
        )
    return ratios


if __name__ == "__main__":
    main()
