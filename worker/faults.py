"""Failure injection for tests: proves one request's failure never takes down the engine.

Enabled only by the environment variable LLAMAFLEET_INJECT_FAULTS, e.g. `decode=boom,sampler=badseed`:
a request whose id starts with `boom` has its llama_decode fail, one starting with `badseed` fails to build
its sampler; `start=` and `sample=` raise an unexpected exception (a stand-in for a bug in our own code)
while starting or sampling such a request. Request ids come from the router, which takes a client's
`X-Request-Id` header as prefix.
"""

from __future__ import annotations

import os

from worker.step import SamplerInitError


class FaultInjector:
    def __init__(self, spec: str | None = None) -> None:
        spec = os.environ.get("LLAMAFLEET_INJECT_FAULTS", "") if spec is None else spec
        self.rules: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            where, _, prefix = part.partition("=")
            self.rules[where] = prefix

    def triggered(self, where: str, rid: str) -> bool:
        prefix = self.rules.get(where)
        return bool(prefix) and rid.startswith(prefix)  # type: ignore[arg-type]

    def check(self, where: str, rid: str) -> None:
        if self.triggered(where, rid):
            raise SamplerInitError(f"injected {where} failure")

    def bug(self, where: str, rid: str) -> None:
        if self.triggered(where, rid):
            raise RuntimeError(f"injected {where} bug")
