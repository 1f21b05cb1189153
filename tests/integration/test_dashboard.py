"""deploy/grafana-dashboard.json queries only metrics a real server exports, with the labels it groups by."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx

from tests.integration.server import REPO, Server

DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"
_SELECTOR = re.compile(r"(llamafleet_[a-z_]+)(\{[^}]*\})?")
_TYPE_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}


def _expressions(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for value in node.values() for e in _expressions(value)]
    if isinstance(node, list):
        return [e for item in node for e in _expressions(item)]
    return []


def _exported(text: str) -> dict[str, set[str]]:
    """Every series name /metrics can have, with the label names seen on its samples."""
    names: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            names.setdefault(family, set())
            for suffix in _TYPE_SUFFIXES.get(kind, ()):
                names.setdefault(family + suffix, set())
        elif line and not line.startswith("#"):
            name, _, labels = line.partition("{")
            name = name.split()[0]
            names.setdefault(name, set()).update(re.findall(r'(\w+)="', labels))
    return names


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "job", "worker"}
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"


def test_every_queried_metric_exists(tiny_server: Server) -> None:
    client = tiny_server.client()
    stream = client.chat.completions.create(
        model="test-model",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        stream=True,
        temperature=0,
    )
    assert list(stream)
    exported = _exported(httpx.get(f"{tiny_server.base_url}/metrics", timeout=10).text)
    queried = [
        match for expr in _expressions(json.loads(DASHBOARD.read_text())) for match in _SELECTOR.findall(expr)
    ]
    assert len(queried) > 20
    missing = sorted({name for name, _ in queried if name not in exported})
    assert not missing, f"the dashboard queries metrics /metrics does not export: {missing}"
    # A series filtered or grouped by worker must carry that label.
    unlabelled = sorted(
        {name for name, selector in queried if "$worker" in selector and "worker" not in exported[name]}
    )
    assert not unlabelled, unlabelled
    for family in ("llamafleet_time_to_first_token_seconds", "llamafleet_inter_token_latency_seconds"):
        assert "le" in exported[f"{family}_bucket"], family  # observed by the stream above


def test_the_dashboard_queries_the_operations_the_issue_lists() -> None:
    text = Path(DASHBOARD).read_text()
    for metric in (
        "llamafleet_requests_total",
        "llamafleet_time_to_first_token_seconds_bucket",
        "llamafleet_inter_token_latency_seconds_bucket",
        "llamafleet_worker_generated_tokens_total",
        "llamafleet_worker_queued_requests",
        "llamafleet_worker_kv_cells_used",
        "llamafleet_prefix_cache_hits_total",
    ):
        assert metric in text, metric
