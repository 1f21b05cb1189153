"""Which model a request names: the one place that maps a `model` field to the state serving it.

A config serves one model or several (`models`, shared/config.py); each has its own `ServerState` (vocabulary,
template, dispatcher and worker pool) and all share the router's metrics. Every route asks the registry for
its state, so an unknown name is one 404 (`model_not_found`) everywhere, and a request that names no model
goes to the first one. Names added later (LoRA adapters served under their own name) join `lookup` here.
"""

from __future__ import annotations

from typing import Any

from router.api.errors import APIError
from router.api.metrics import Metrics
from router.state import ServerState
from shared.config import Config


class ModelRegistry:
    def __init__(self, states: list[ServerState]) -> None:
        assert states, "a registry needs at least one model"
        self.states = states
        self._by_name = {state.model_name: state for state in states}

    @classmethod
    def build(cls, config: Config, router: int = 0) -> ModelRegistry:
        """The states of every pool as router process `router` (server.router_processes) sees them."""
        metrics = Metrics()
        pools = config.pools()
        states = []
        try:
            for pool in pools:
                # Worker labels in /metrics: "N" for one model (as always), "ALIAS/N" for several.
                label = f"{pool.model.served_name}/" if len(pools) > 1 else ""
                states.append(ServerState.build(pool, metrics, label, router))
        except BaseException:
            for state in states:
                state.vocab.close()
            raise
        return cls(states)

    @property
    def default(self) -> ServerState:
        return self.states[0]

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def lookup(self, requested: str | None) -> ServerState:
        """The state serving `requested` (no name: the first model); 404 for a name nobody serves."""
        if not requested:
            return self.default
        state = self._by_name.get(requested)
        if state is None:  # a named LoRA adapter is served by its base model's pool
            state = next((s for s in self.states if s.adapters.knows(requested)), None)
        if state is None:
            served = ", ".join(repr(name) for name in self._by_name)
            raise APIError(
                404,
                f"the model {requested!r} does not exist; this server serves {served}",
                "not_found_error",
                param="model",
                code="model_not_found",
            )
        return state

    def model_cards(self) -> list[dict[str, Any]]:
        """/v1/models' `data`: every model, with its context and vocabulary once a worker reported them."""
        cards = []
        for state in self.states:
            card: dict[str, Any] = {
                "id": state.model_name,
                "object": "model",
                "created": state.created,
                "owned_by": "llamafleet",
            }
            info = state.dispatcher.model_info()
            if info is not None:
                card["meta"] = {"n_ctx": info.n_ctx_seq, "n_vocab": info.n_vocab}
            cards.append(card)
            cards.extend(state.adapters.cards())
        return cards

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Ready when every model has a worker up (each request it accepts can be served); per-pool counts."""
        pools: dict[str, dict[str, Any]] = {}
        for state in self.states:
            up = state.dispatcher.up_workers()
            pools[state.model_name] = {
                "workers_up": len(up),
                "workers": len(state.dispatcher.workers),
                # Where each ready worker runs: its backend, devices and GPU layers (shared/gpu.py).
                "placement": {
                    str(worker.index): {
                        "backend": worker.info.backend,
                        "devices": list(worker.info.devices),
                        "offloaded_layers": worker.info.offloaded_layers,
                        "layers": worker.info.n_layer + 1,
                    }
                    for worker in up
                    if worker.info is not None
                },
            }
        ready = all(pool["workers_up"] for pool in pools.values())
        body = {
            "status": "ok" if ready else "unavailable",
            "workers_up": sum(pool["workers_up"] for pool in pools.values()),
            "workers": sum(pool["workers"] for pool in pools.values()),
            "models": pools,
        }
        return ready, body
