"""deploy/kubernetes/: valid against the Kubernetes schemas (kubernetes-validate, offline), and consistent
with what the code does: workers connect to the router's Service, the router binds, the key mounts give the
layout shared/curve.py reads, probes and scrape annotations point at the router's port."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from shared import curve
from shared.cli import build_parser
from shared.config import Config, parse_config

K8S = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
MANIFESTS = sorted(K8S.glob("*.yaml"))
KUBERNETES_VERSION = "1.30.0"  # the pod-index label the workers read needs 1.28 or later

# What deploy/README.md's `kubectl create` commands put in each Secret / ConfigMap, from `llamafleet keys`.
KEY_SOURCES = {
    "llamafleet-router-secret-key": ["router.key_secret"],
    "llamafleet-worker-public-keys": ["workers/*.key"],
    "llamafleet-router-public-key": ["router.key"],
    "llamafleet-worker-secret-keys": ["workers/*.key_secret"],
}


def _documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def _one(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in _documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _config(env: dict[str, str]) -> Config:
    data = yaml.safe_load(_one("ConfigMap", "llamafleet-config")["data"]["config.json"])
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("LLAMAFLEET_")}
    os.environ.update(env)
    try:
        return parse_config(data, "configmap.yaml")
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)


def _container(kind: str, name: str) -> dict[str, Any]:
    (container,) = _one(kind, name)["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_against_the_schemas(path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_validator_catches_a_broken_manifest() -> None:
    broken = _one("StatefulSet", "llamafleet-worker")
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_workers_connect_to_the_routers_service_which_binds() -> None:
    router = _container("Deployment", "llamafleet-router")
    service = _one("Service", "llamafleet-router")
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in router["ports"]}
    worker_view = _config({})
    router_view = _config(_env(router))
    for name, endpoint in (
        ("zmq-requests", worker_view.requests_endpoint()),
        ("zmq-results", worker_view.results_endpoint()),
    ):
        assert endpoint == f"tcp://{service['metadata']['name']}:{ports[name]}"
        assert container_ports[name] == ports[name]
    assert router_view.requests_endpoint() == f"tcp://0.0.0.0:{ports['zmq-requests']}"
    assert router_view.results_endpoint() == f"tcp://0.0.0.0:{ports['zmq-results']}"
    assert worker_view.workers.keys_dir and not worker_view.workers.insecure_tcp  # CURVE over tcp://
    # The HTTP port: the config's, the Service's, the probes' and Prometheus's.
    assert router_view.server.port == container_ports["http"] == ports["http"]
    annotations = _one("Deployment", "llamafleet-router")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(ports["http"]),
        "prometheus.io/path": "/metrics",
    }
    assert router["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert router["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert router_view.server.host == "0.0.0.0"


def test_workers_are_a_statefulset_with_gpus_and_their_index() -> None:
    statefulset = _one("StatefulSet", "llamafleet-worker")
    worker = _container("StatefulSet", "llamafleet-worker")
    assert statefulset["spec"]["replicas"] == _config({}).workers.count
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    (index_env,) = [e for e in worker["env"] if e["name"] == "WORKER_INDEX"]
    assert (
        index_env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    )
    args = build_parser().parse_args([a.replace("$(WORKER_INDEX)", "1") for a in worker["args"]])
    assert (args.command, args.index, str(args.config)) == ("worker", 1, "/etc/llamafleet/config.json")
    router_args = build_parser().parse_args(_container("Deployment", "llamafleet-router")["args"])
    assert router_args.command == "router"
    pdb = _one("PodDisruptionBudget", "llamafleet-worker")
    assert pdb["spec"]["selector"]["matchLabels"] == statefulset["spec"]["selector"]["matchLabels"]
    assert (
        statefulset["spec"]["template"]["metadata"]["labels"].items()
        >= pdb["spec"]["selector"]["matchLabels"].items()
    )


def _pod_view(kind: str, name: str, keys: Path, root: Path) -> Path:
    """The files a pod sees under its config's keys_dir: each key volume as the manifest mounts it."""
    pod = _one(kind, name)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    keys_dir = Path(_config({}).workers.keys_dir or "")
    for mount in _container(kind, name)["volumeMounts"]:
        target = Path(mount["mountPath"])
        if keys_dir not in (target, *target.parents):
            continue
        volume = volumes[mount["name"]]
        source = volume.get("secret", {}).get("secretName") or volume["configMap"]["name"]
        mode = volume.get("secret", {}).get("defaultMode", 0o644)
        files = [f for pattern in KEY_SOURCES[source] for f in keys.glob(pattern)]
        local = root / target.relative_to("/")
        if "subPath" in mount:
            (file,) = [f for f in files if f.name == mount["subPath"]]
            placed = [(file, local)]
        else:
            placed = [(file, local / file.name) for file in files]
        for file, destination in placed:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, destination)
            os.chmod(destination, mode)
    return root / keys_dir.relative_to("/")


def test_key_mounts_give_the_layout_curve_reads(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    curve.write_keys(keys, workers=_config({}).workers.count)
    router_keys = curve.load_router_keys(
        _pod_view("Deployment", "llamafleet-router", keys, tmp_path / "router")
    )
    assert sorted(router_keys.allowed.values()) == ["worker-0", "worker-1"]
    worker_dir = _pod_view("StatefulSet", "llamafleet-worker", keys, tmp_path / "worker")
    for index in (0, 1):
        loaded = curve.load_worker_keys(worker_dir, index)
        assert loaded.router_public == router_keys.public
    assert not (tmp_path / "router" / "etc/llamafleet/keys/workers/worker-0.key_secret").exists()
    assert not (tmp_path / "worker" / "etc/llamafleet/keys/router.key_secret").exists()
    secret = worker_dir / "workers" / "worker-0.key_secret"
    assert (
        stat.S_IMODE(secret.stat().st_mode) == 0o440
    )  # defaultMode: group-readable, refused if other-readable
