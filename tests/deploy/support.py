"""Shared by the deployment tests: the repository's deploy files, the container entry point, chart rendering."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import helm_python
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
CHART = ROOT / "helm" / "loraplex"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
DOCKER = ROOT / "docker"
# Kubernetes versions every rendered object must validate against (strict: no unknown fields).
KUBE_VERSIONS = ("1.30.0", "1.33.0", "1.37.0")

# Variables the deployment sets that are no loraplex flag's twin, and who reads them.
RUNTIME_ENV = {
    "HF_HOME": "huggingface_hub: where the hub cache lives (on the model volume)",
    "HF_HUB_OFFLINE": "huggingface_hub: serve only what the cache holds",
    "HF_TOKEN": "huggingface_hub: token for gated models",
    "LORAPLEX_CACHE": "shard/embedded.py: where the embedded model is converted to",
}
# Image-level variables (Dockerfile ENV) read by Python, CuPy or the NVIDIA container toolkit.
IMAGE_ENV = {
    "PYTHONUNBUFFERED": "log lines reach `docker logs` at once",
    "CUPY_CACHE_DIR": "CuPy's compiled-kernel cache (the home directory may be read-only)",
    "NVIDIA_DRIVER_CAPABILITIES": "NVIDIA container toolkit: driver libraries mounted",
}


@functools.cache
def entrypoint() -> ModuleType:
    """docker/entrypoint.py, which is a script in the images rather than a package module."""
    spec = importlib.util.spec_from_file_location("loraplex_entrypoint", DOCKER / "entrypoint.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def docker_compose() -> str:
    """The docker-compose binary; its absence is a failure (`make deploy-tools` installs it), never a skip."""
    path = shutil.which("docker-compose")
    assert path, "docker-compose is not on PATH: `make deploy-tools` installs Debian's package"
    return path


def run_compose_config(
    compose_file: Path, env: Mapping[str, str] | None = None, project_dir: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` in a clean environment, so that only ``env`` can change the result."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(
        [docker_compose(), "--project-directory", str(project_dir), "-f", str(compose_file), "config"],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def compose_config(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    result = run_compose_config(COMPOSE_FILE, env)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def load_values(path: Path) -> dict[str, Any]:
    values = yaml.safe_load(path.read_text()) or {}
    assert isinstance(values, dict)
    return values


def render(values: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Template path → rendered text, through Helm's Go SDK (no cluster)."""
    with helm_python.Chart.load(CHART) as chart:
        return chart.render(dict(values or {}), name="llm", namespace="serving", is_install=True)


def objects(values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders for ``values``."""
    out = []
    for path, text in render(values).items():
        if path.endswith("NOTES.txt"):
            continue
        out += [doc for doc in yaml.safe_load_all(text) if doc]
    return out


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def pod_containers(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The serving pod's containers by name: the router and the shard group (a native sidecar)."""
    spec = one(objs, "Deployment")["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}


def container_env(container: Mapping[str, Any], objs: list[dict[str, Any]]) -> dict[str, str]:
    """The container's environment as the kubelet builds it; Secret references become placeholders."""
    env: dict[str, str] = {}
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        env[var["name"]] = var["value"] if "value" in var else f"<secret {var['valueFrom']['secretKeyRef']['key']}>"
    return env


def use_environ(monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str]) -> None:
    """Make ``env`` the whole process environment: the parsers read the flags' twins from os.environ."""
    for name in list(os.environ):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def published(service: dict[str, Any]) -> set[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port. docker-compose 1.29 prints a port
    with a host address as ``IP:PUBLISHED:TARGET/tcp`` and one without in the long syntax (address: all)."""
    out = set()
    for port in service.get("ports", []):
        if isinstance(port, str):
            host_ip, host_port, target = port.split("/")[0].rsplit(":", 2)
            out.add((host_ip, int(host_port), int(target)))
        else:
            out.add((port.get("host_ip", "0.0.0.0"), int(port["published"]), int(port["target"])))
    return out
