"""The router's probes: /healthz (readiness: a worker of every model is up) and /livez (liveness: the
process answers), which stays open without a key even when /healthz and /metrics need one."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.integration.server import Server, model_config, run_server


def test_livez_and_healthz(tiny_server: Server) -> None:
    live = httpx.get(f"{tiny_server.base_url}/livez", timeout=5)
    assert live.status_code == 200 and live.json() == {"status": "alive"}
    assert httpx.get(f"{tiny_server.base_url}/healthz", timeout=5).status_code == 200


def test_livez_needs_no_key_when_health_is_protected(tiny_llama_gguf: Path) -> None:
    with run_server(model_config(tiny_llama_gguf), server={"protect_health_and_metrics": True}) as server:
        assert httpx.get(f"{server.base_url}/livez", timeout=5).status_code == 200
        assert httpx.get(f"{server.base_url}/healthz", timeout=5).status_code == 401
        assert httpx.get(f"{server.base_url}/metrics", timeout=5).status_code == 401
