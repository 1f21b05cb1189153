"""Checks deploy/: systemd accepts the units, and what they run is what our CLI and config accept.

`systemd-analyze verify` exits 0 on unknown keys and unparsable values (it only logs "ignoring"), so
the verify test fails on any line it prints about our units, and a negative control proves that
scanning catches a broken unit on this host's systemd version.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shared import cli, config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROUTER = "llamafleet-router.service"
WORKER = "llamafleet-worker@.service"
TARGET = "llamafleet.target"
UNIT_FILES = (ROUTER, WORKER, TARGET)
INSTALLED_BINARY = "/opt/llamafleet/.venv/bin/llamafleet"
CONFIG_PATH = "/etc/llamafleet/config.json"
# Characters systemd allows before the executable path in Exec*= lines.
_EXEC_PREFIXES = "-@:+!"

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Parses a unit into section -> ordered (key, value) pairs, keeping repeated keys as systemd
    does (configparser would merge or reject them)."""
    unit: Unit = {}
    section: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and section is not None, f"not a key=value line inside a section: {raw!r}"
        section.append((key.strip(), value.strip()))
    return unit


def load_unit(name: str) -> Unit:
    return parse_unit((DEPLOY / name).read_text())


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def single(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"expected exactly one {key}= in [{section}], got {found}"
    return found[0]


def exec_argv(unit: Unit) -> list[str]:
    """ExecStart= as argv, without systemd's prefix characters (`-`, `@`, `+`...)."""
    argv = shlex.split(single(unit, "Service", "ExecStart"))
    argv[0] = argv[0].lstrip(_EXEC_PREFIXES)
    return argv


def environment(unit: Unit) -> dict[str, str]:
    env: dict[str, str] = {}
    for assignment in values(unit, "Service", "Environment"):
        for item in shlex.split(assignment):
            key, _, value = item.partition("=")
            env[key] = value
    return env


# --- ExecStart matches the CLI ------------------------------------------------------------------


def test_router_execstart_runs_router_with_config() -> None:
    assert exec_argv(load_unit(ROUTER)) == [INSTALLED_BINARY, "router", "-C", CONFIG_PATH]


def test_worker_execstart_passes_instance_as_index_and_gpu() -> None:
    unit = load_unit(WORKER)
    argv = exec_argv(unit)
    assert argv == [INSTALLED_BINARY, "worker", "-C", CONFIG_PATH, "--index", "%i"]
    env = environment(unit)
    assert env["CUDA_VISIBLE_DEVICES"] == "%i"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_execstart_argv_parses_with_the_cli() -> None:
    """What the units run is what shared.cli's argparse parser accepts (and it refuses an unknown flag)."""
    for name in (ROUTER, WORKER):
        args = [a.replace("%i", "0") for a in exec_argv(load_unit(name))[1:]]
        cli.build_parser().parse_args(args)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["worker", "-C", CONFIG_PATH, "--no-such-flag"])


# --- hardening and lifecycle ---------------------------------------------------------------------


@pytest.mark.parametrize("name", [ROUTER, WORKER])
def test_service_hardening_and_lifecycle(name: str) -> None:
    unit = load_unit(name)
    expected = {
        "Type": "exec",
        "User": "llamafleet",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "RuntimeDirectory": "llamafleet",
        "RuntimeDirectoryPreserve": "yes",
        "CacheDirectory": "llamafleet",
        "WorkingDirectory": "/var/cache/llamafleet",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "KillMode": "mixed",
    }
    for key, value in expected.items():
        assert single(unit, "Service", key) == value, key
    assert int(single(unit, "Service", "RestartSec")) > 0
    assert values(unit, "Service", "EnvironmentFile")[0] == "-/etc/llamafleet/llamafleet.env"
    # ipc:// sockets must be in the shared RuntimeDirectory, not in each unit's private /tmp.
    assert environment(unit)["XDG_RUNTIME_DIR"] == "/run/llamafleet"
    assert single(unit, "Unit", "PartOf") == TARGET
    assert single(unit, "Install", "WantedBy") == TARGET


def test_router_drains_before_systemd_kills_it() -> None:
    timeout = float(single(load_unit(ROUTER), "Service", "TimeoutStopSec"))
    assert config.ServerOptions().drain_timeout_seconds < timeout


def test_worker_keeps_gpu_devices_and_stops_after_router() -> None:
    unit = load_unit(WORKER)
    assert not values(unit, "Service", "PrivateDevices")
    assert "char-nvidia* rw" in values(unit, "Service", "DeviceAllow")
    assert ROUTER in single(unit, "Unit", "Before").split()
    assert single(unit, "Install", "DefaultInstance") == "0"


def test_router_stays_off_the_gpus() -> None:
    unit = load_unit(ROUTER)
    assert single(unit, "Service", "PrivateDevices") == "yes"
    assert environment(unit)["CUDA_VISIBLE_DEVICES"] == ""


# --- environment file and Prometheus example -----------------------------------------------------

_ASSIGNMENT = re.compile(r"^#?([A-Z][A-Z0-9_]*)=(.*)$")


def _env_example() -> dict[str, str]:
    """Every KEY=value in the example, commented out or not."""
    found: dict[str, str] = {}
    for line in (DEPLOY / "llamafleet.env.example").read_text().splitlines():
        match = _ASSIGNMENT.match(line.strip())
        if match:
            found[match.group(1)] = match.group(2)
        else:
            assert not line.strip() or line.startswith("#"), f"not systemd env syntax: {line!r}"
    return found


def test_env_example_overrides_are_real_config_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    # LLAMAFLEET_<SECTION>__<FIELD> only: LLAMAFLEET_MODELS_DIR and the like are not config fields.
    overrides = {k: v for k, v in _env_example().items() if k.startswith("LLAMAFLEET_") and "__" in k}
    assert {"LLAMAFLEET_SERVER__PORT", "LLAMAFLEET_SERVER__API_KEY"} <= overrides.keys()
    for key, value in overrides.items():
        monkeypatch.setenv(key, value)
    parsed = config.parse_config({"model": {"path": "/models/x.gguf"}}, "<env example>")
    for key, value in overrides.items():
        node: object = parsed
        for part in key.removeprefix("LLAMAFLEET_").lower().split("__"):
            node = getattr(node, part)
        if isinstance(node, bool):
            assert node == (value.lower() in ("1", "true", "yes", "on")), key
        elif isinstance(node, (int, float)):
            assert node == float(value), key
        else:
            assert str(node) == value, key


def test_env_example_leaves_gpu_selection_to_the_worker_unit() -> None:
    assert "CUDA_VISIBLE_DEVICES" not in _env_example()


def test_prometheus_example_scrapes_router_metrics() -> None:
    data = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [j for j in data["scrape_configs"] if j["job_name"] == "llamafleet"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"127.0.0.1:{config.ServerOptions().port}"]


# --- systemd's own checks ------------------------------------------------------------------------


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip(
            "systemd-analyze not installed (Debian/Ubuntu: "
            "apt-get update && apt-get install -y --no-install-recommends systemd)"
        )
    return path


def _stage_units(tmp_path: Path) -> Path:
    """Copies the units with ExecStart pointed at a stub: verify checks syntax, not the install."""
    stub = tmp_path / "llamafleet"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    for name in UNIT_FILES:
        text = (DEPLOY / name).read_text()
        if name.endswith(".service"):
            assert f"ExecStart={INSTALLED_BINARY} " in text, name
            text = text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={stub} ")
        (tmp_path / name).write_text(text)
    return tmp_path


def _verify(tool: str, folder: Path) -> tuple[int, list[str]]:
    """Verifies the router, worker instance 0 and the target; returns rc and lines about them."""
    units = [folder / ROUTER, folder / "llamafleet-worker@0.service", folder / TARGET]
    result = subprocess.run(
        [tool, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=folder,
        env={"PATH": "/usr/bin:/bin", "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
        check=False,
    )
    output = (result.stdout + result.stderr).splitlines()
    return result.returncode, [line for line in output if "llamafleet" in line]


def test_systemd_analyze_verify_accepts_units(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    returncode, complaints = _verify(tool, _stage_units(tmp_path))
    assert returncode == 0 and not complaints, "\n".join(complaints)


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """Negative control: the scan sees warnings that verify does not turn into a failing rc."""
    tool = _systemd_analyze()
    folder = _stage_units(tmp_path)
    worker = folder / WORKER
    worker.write_text(worker.read_text().replace("KillMode=mixed", "KillMode=bogus"))
    _, complaints = _verify(tool, folder)
    assert any("bogus" in line for line in complaints), complaints


@pytest.mark.parametrize("name", [ROUTER, "llamafleet-worker@0.service"])
def test_systemd_analyze_security_exposure_stays_low(tmp_path: Path, name: str) -> None:
    """Guards the hardening: exposure is about 2 of 10 on systemd 252, the limit is 3."""
    tool = _systemd_analyze()
    folder = _stage_units(tmp_path)
    result = subprocess.run(
        [tool, "security", "--offline=yes", "--threshold=30", "--no-pager", str(folder / name)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=folder,
        env={"PATH": "/usr/bin:/bin", "SYSTEMD_LOG_COLOR": "0"},
        check=False,
    )
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
