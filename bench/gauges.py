"""What "idle" means on `/metrics`, shared by the overload test and the soak harness.

After any load every per-request gauge must return to its idle value; one that does not is a leaked
sequence, KV reservation or in-flight entry. Keeping the definition in one place keeps the two checks alike.
"""

from __future__ import annotations

import time

import httpx

# Gauges that are 0 on an idle worker (labelled per worker).
IDLE_ZERO = (
    "llamafleet_worker_running_sequences",
    "llamafleet_worker_running_requests",
    "llamafleet_worker_queued_requests",
    "llamafleet_worker_kv_cells_used",
    "llamafleet_worker_kv_cells_reserved",
    "llamafleet_worker_in_flight_requests",
)
# The router counts the /metrics request that reads it.
ROUTER_IN_FLIGHT = "llamafleet_router_in_flight_requests"
SEQ_IDS_FREE = "llamafleet_worker_seq_ids_free"
WORKER_UP = "llamafleet_worker_up"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {'name{labels}': value}."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def family(samples: dict[str, float], name: str) -> dict[str, float]:
    """The samples of one metric family (every label set), by full sample name."""
    return {key: value for key, value in samples.items() if key == name or key.startswith(name + "{")}


def highest(samples: dict[str, float], name: str) -> float:
    """The largest value of a family over its labels (0 when absent)."""
    return max(family(samples, name).values(), default=0.0)


def not_idle(samples: dict[str, float], n_seq_max: int) -> list[str]:
    """Why these samples are not those of an idle server (empty when idle)."""
    problems: list[str] = []
    if not family(samples, WORKER_UP):
        problems.append("no worker stats in /metrics")
    for key, value in family(samples, WORKER_UP).items():
        if value != 1:
            problems.append(f"{key} = {value:g}")
    for name in IDLE_ZERO:
        problems.extend(f"{key} = {value:g}" for key, value in family(samples, name).items() if value != 0)
    for key, value in family(samples, SEQ_IDS_FREE).items():
        if value != n_seq_max:
            problems.append(f"{key} = {value:g}, expected {n_seq_max}")
    if samples.get(ROUTER_IN_FLIGHT, 0.0) > 1:
        problems.append(f"{ROUTER_IN_FLIGHT} = {samples[ROUTER_IN_FLIGHT]:g} (1 is the scrape itself)")
    return problems


def wait_idle(base_url: str, n_seq_max: int, timeout: float = 10.0) -> list[str]:
    """Polls /metrics until the server is idle; the remaining problems if it is not within `timeout`.

    Worker gauges arrive with heartbeats, so they lag the last answer by an interval or two.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            problems = not_idle(parse_metrics(httpx.get(f"{base_url}/metrics", timeout=10).text), n_seq_max)
        except httpx.HTTPError as error:
            problems = [f"/metrics failed: {error!r}"]
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.1)
