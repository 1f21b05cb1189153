"""`llamafleet check -C FILE`: validate a config without loading a model, and print what it resolves to.

Operators want to know, before a restart, that the config parses (every field, environment overrides
included), that its model sources exist, that the keys and the ipc folder it names are usable and that
the llama.cpp build can do what it asks (GPU layers), and to see the settings the service will really
use: defaults filled in, `LLAMAFLEET_*` overrides applied, secrets masked. Nothing is downloaded, built or
loaded: a model file is checked for the GGUF magic only, a hub model for whether the hub cache has it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

from shared.config import Config, ConfigError, ModelOptions

Role = Literal["serve", "router", "worker"]
_MASK = "***"


def environment_overrides(environ: dict[str, str]) -> dict[str, str]:
    """The LLAMAFLEET_* variables that change settings (values of key variables masked)."""
    found = {}
    for name, value in sorted(environ.items()):
        if name.startswith("LLAMAFLEET_") and ("__" in name or name == "LLAMAFLEET_API_KEYS"):
            found[name] = _MASK if "API_KEY" in name else value
    return found


def _model_source(options: ModelOptions) -> tuple[str, str | None]:
    """(what the source is, a problem or None), looking only at files and caches."""
    if options.path is not None:
        path = Path(options.path).expanduser()
        if not path.is_file():
            return f"path {path}", f"model.path {path} does not exist"
        with path.open("rb") as file:
            if file.read(4) != b"GGUF":
                return f"path {path}", f"model.path {path} is not a GGUF file"
        return f"path {path} ({path.stat().st_size} bytes)", None
    if options.from_pretrained is not None:
        source = options.from_pretrained
        where = f"hub {source.repo_id} {source.filename}"
        if any(char in source.filename for char in "*?["):
            return f"{where} (a pattern: resolved at start-up)", None
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(
            source.repo_id, source.filename, cache_dir=source.cache_dir, revision=source.revision
        )
        state = f"cached at {cached}" if isinstance(cached, str) else "not cached: downloaded at start-up"
        return f"{where} ({state})", None
    from shared.models import PACKAGED_MODELS

    assert options.packaged is not None
    package = options.packaged.package
    if package not in PACKAGED_MODELS:
        return f"package {package}", f"model.packaged.package: unknown packaged model {package!r}"
    module = package.replace("-", "_")
    if importlib.util.find_spec(module) is None:
        return (
            f"package {package}",
            f"model.packaged.package: the Python package {package!r} is not installed",
        )
    return f"package {package} (installed)", None


def _masked(settings: dict[str, Any]) -> dict[str, Any]:
    server = settings.get("server", {})
    if server.get("api_key"):
        server["api_key"] = _MASK
    return settings


def check_config(
    config: Config, role: Role, index: int, environ: dict[str, str]
) -> tuple[dict[str, Any], list[str]]:
    """The resolved settings as JSON-ready data, and the problems found (empty: the config is usable)."""
    from shared import curve
    from shared.gpu import check_offload
    from shared.ipc import IpcSockets, check_worker_endpoints

    problems: list[str] = []

    def attempt(check: Any, *args: Any) -> None:
        try:
            check(*args)
        except (ConfigError, OSError) as error:
            problems.append(str(error))

    models = []
    for pool in config.pools():
        source, problem = _model_source(pool.model)
        if problem:
            problems.append(problem)
        endpoints = [pool.requests_endpoint(), pool.results_endpoint()]
        if role in ("serve", "router"):
            attempt(IpcSockets(endpoints, pool.ipc_dir()).check)
        attempt(check_worker_endpoints, endpoints)
        keys_dir = pool.workers.keys_dir
        if keys_dir and role in ("serve", "router"):
            attempt(curve.load_router_keys, keys_dir)
        workers = range(pool.workers.count) if role == "serve" else [index] if role == "worker" else []
        for worker in workers:
            if keys_dir:
                attempt(curve.load_worker_keys, keys_dir, worker)
            attempt(check_offload, pool.model, pool.workers.override_for(worker), f"worker {worker}")
        models.append(
            {
                "name": pool.model.served_name,
                "source": source,
                "workers": pool.workers.count,
                "requests_endpoint": endpoints[0],
                "results_endpoint": endpoints[1],
                "curve": bool(keys_dir),
            }
        )
    keys: int | None = None
    if role in ("serve", "router"):
        from router.api.auth import load_api_keys

        try:
            keys = len(load_api_keys(config.server, environ))
        except ConfigError as error:
            problems.append(str(error))
    host = config.server.host
    report = {
        "url": f"http://{f'[{host}]' if ':' in host else host}:{config.server.port}/v1",
        "role": role,
        "api_keys": keys,
        "environment": environment_overrides(environ),
        "models": models,
        "settings": _masked(
            config.model_dump(mode="json", exclude={"model", "workers"} if config.models else None)
        ),
    }
    return report, problems


def run_check(config: Config, role: Role, index: int) -> int:
    report, problems = check_config(config, role, index, dict(os.environ))
    print(json.dumps(report, indent=2))
    for problem in problems:
        print(f"llamafleet check: {problem}", file=sys.stderr)
    return 2 if problems else 0
