"""No drift: what compose.yaml, the chart and the images pass is what the router and shard parsers accept."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest

from loraplex.common.shutdown import DRAIN_TIMEOUT, SERVER_STOP_GRACE, stop_grace
from loraplex.launcher import parser as launcher_parser
from loraplex.router.settings import RouterSettings, router_parser, settings_from_args
from loraplex.shard.parallel import rank_device
from loraplex.shard.settings import shard_parser
from tests.deploy.support import (
    CHART,
    CI_VALUES,
    DOCKER,
    IMAGE_ENV,
    RUNTIME_ENV,
    compose_config,
    container_env,
    entrypoint,
    load_values,
    objects,
    pod_containers,
    published,
    use_environ,
)

ROUTER_ENV = set(router_parser().env_names.values())
SHARD_ENV = set(shard_parser().env_names.values())
OWN_ENV = set(entrypoint().OWN_ENV)
DEFAULTS = RouterSettings()


def router_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> RouterSettings:
    """What ``loraplex-entrypoint router`` would start: the router's own parser and checks, on ``env``."""
    ep = entrypoint()
    use_environ(monkeypatch, ep.router_environment(env))
    return settings_from_args([])


def rank_namespaces(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> list[argparse.Namespace]:
    """What each ``loraplex-shard`` started by ``loraplex-entrypoint shards`` would parse."""
    ep = entrypoint()
    prefix = len(ep.command("loraplex-shard", "loraplex.shard.main"))
    use_environ(monkeypatch, env)
    return [shard_parser().parse(cmd[prefix:]) for cmd in ep.rank_commands(env)]


def rank_devices(ranks: list[argparse.Namespace]) -> list[str]:
    """The device each rank runs on, by the shard's own rule."""
    return [rank_device(ns.device, ns.rank, ns.num_shard) for ns in ranks]


def test_the_parsers_have_the_twins_the_deployment_relies_on() -> None:
    """The brief's facts about the code, read from the parsers themselves."""
    assert {"SHARD_UDS", "LORAPLEX_HOSTNAME", "PORT", "GRPC_PORT", "API_KEYS_FILE", "ADMIN_TOKEN"} <= ROUTER_ENV
    assert {"MODEL_ID", "LORA_ADAPTERS", "ADAPTER_DIRS", "MAX_ACTIVE_ADAPTERS", "MAX_CPU_ADAPTERS"} <= SHARD_ENV
    assert {"ADAPTER_DIRS", "MAX_ACTIVE_ADAPTERS", "MAX_CPU_ADAPTERS", "NUM_SHARD"} <= set(
        launcher_parser().env_names.values()
    )
    assert (DEFAULTS.port, DEFAULTS.grpc_port) == (8080, 50051)
    # The rendezvous port is the shard's own setting: the entry point does not choose one.
    assert not [a for a in entrypoint().rank_commands({"NUM_SHARD": "1"})[0] if a.startswith("--master-port")]


# ---- the Helm chart -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CI_VALUES, ids=lambda p: p.stem)
def test_chart_containers_pass_only_known_settings(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    values = load_values(path)
    objs = objects(values)
    containers = pod_containers(objs)
    assert set(containers) == {"router", "shards"}
    router, shards = containers["router"], containers["shards"]
    assert router["args"] == ["router"] and shards["args"] == ["shards"]
    router_env, shard_env = container_env(router, objs), container_env(shards, objs)
    assert set(router_env) - ROUTER_ENV - OWN_ENV == set()
    assert set(shard_env) - SHARD_ENV - OWN_ENV - set(RUNTIME_ENV) == set()

    settings = router_settings(router_env, monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in router["ports"]}
    assert ports == {"http": settings.port, "grpc": settings.grpc_port} == {"http": 8080, "grpc": 50051}
    assert settings.hostname == "0.0.0.0"

    ranks = rank_namespaces(shard_env, monkeypatch)
    num_shard = values.get("numShard", 1)
    assert len(ranks) == num_shard == len(settings.shard_uds)
    gpu = values.get("gpu", {}).get("enabled") is not False
    expected = [f"cuda:{r}" for r in range(num_shard)] if num_shard > 1 else ["cuda"]
    assert rank_devices(ranks) == (expected if gpu else ["cpu"] * num_shard)
    for rank, ns in enumerate(ranks):
        assert (ns.rank, ns.num_shard) == (rank, num_shard)
        # The router dials exactly the sockets the ranks listen on, rank 0 first.
        assert ns.listen == settings.shard_uds[rank]
        assert ns.max_batch_total_tokens == settings.max_batch_total_tokens
        assert ns.model_id == values.get("model", {}).get("id", "")
    # ... through a directory both containers mount from the same volume.
    socket_dir = shard_env["SHARD_SOCKET_DIR"]
    for container in (router, shards):
        assert {"name": "sockets", "mountPath": socket_dir} in container["volumeMounts"]


@pytest.mark.parametrize("path", CI_VALUES, ids=lambda p: p.stem)
def test_chart_probes_match_the_code(path: Path) -> None:
    containers = pod_containers(objects(load_values(path)))
    router, shards = containers["router"], containers["shards"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert router[probe]["httpGet"] == {"path": entrypoint().HEALTH_PATH, "port": "http"}
    assert entrypoint().HEALTH_PATH == "/health"
    for probe in ("startupProbe", "livenessProbe"):
        assert shards[probe]["exec"]["command"] == ["loraplex-entrypoint", "health", "shards"]
    assert "ports" not in shards  # the ranks listen on unix sockets only


def test_chart_defaults_keep_the_code_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Apart from what a container must change (bind address, socket paths), the chart's limits are the code's."""
    objs = objects({})
    containers = pod_containers(objs)
    settings = router_settings(container_env(containers["router"], objs), monkeypatch)
    changed = {f for f in vars(DEFAULTS) if getattr(settings, f) != getattr(DEFAULTS, f)}
    assert changed == {"hostname", "shard_uds"}
    (rank,) = rank_namespaces(container_env(containers["shards"], objs), monkeypatch)
    shard_defaults = shard_parser().parse_args([])
    changed = {k for k, v in vars(rank).items() if v != getattr(shard_defaults, k)}
    assert changed == {"listen", "device"}


def test_values_env_maps_reach_the_right_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """router.env and shard.env go by the flags' twins; the settings take effect in the parsed result."""
    objs = objects({"router": {"env": {"ADAPTER_SLOT_PATIENCE": 0.5}}, "shard": {"env": {"KV_BLOCK_SIZE": 32}}})
    containers = pod_containers(objs)
    assert router_settings(container_env(containers["router"], objs), monkeypatch).adapter_slot_patience == 0.5
    (rank,) = rank_namespaces(container_env(containers["shards"], objs), monkeypatch)
    assert rank.block_size == 32


# ---- compose.yaml ---------------------------------------------------------------------------------------


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    return {k: "" if v is None else str(v) for k, v in service["environment"].items()}


@pytest.mark.parametrize("num_shard", [1, 2])
def test_compose_services_pass_only_known_settings(num_shard: int, monkeypatch: pytest.MonkeyPatch) -> None:
    config = compose_config({"NUM_SHARD": str(num_shard)})
    router, shards = config["services"]["router"], config["services"]["shards"]
    assert router["command"] == ["router"] and shards["command"] == ["shards"]
    router_env, shard_env = compose_env(router), compose_env(shards)
    assert set(router_env) - ROUTER_ENV - OWN_ENV - {"NUM_SHARD"} == set()  # NUM_SHARD: the entry point's
    assert set(shard_env) - SHARD_ENV - OWN_ENV - set(RUNTIME_ENV) == set()

    settings = router_settings(router_env, monkeypatch)
    assert {target for _, _, target in published(router)} == {settings.port, settings.grpc_port} == {8080, 50051}
    assert settings.hostname == "0.0.0.0"
    assert settings.api_keys_file is None and settings.admin_token == ""  # empty: unset, not Path("")

    ranks = rank_namespaces(shard_env, monkeypatch)
    assert [ns.listen for ns in ranks] == list(settings.shard_uds)
    assert rank_devices(ranks) == ([f"cuda:{r}" for r in range(num_shard)] if num_shard > 1 else ["cuda"])
    assert all(ns.num_shard == num_shard and ns.model_id == "" for ns in ranks)


def test_compose_defaults_keep_the_code_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    config = compose_config()
    settings = router_settings(compose_env(config["services"]["router"]), monkeypatch)
    changed = {f for f in vars(DEFAULTS) if getattr(settings, f) != getattr(DEFAULTS, f)}
    assert changed == {"hostname", "shard_uds"}
    (rank,) = rank_namespaces(compose_env(config["services"]["shards"]), monkeypatch)
    shard_defaults = shard_parser().parse_args([])
    changed = {k for k, v in vars(rank).items() if v != getattr(shard_defaults, k)}
    assert changed == {"listen", "device", "adapter_dirs"}
    assert rank.adapter_dirs == "/adapters"


# ---- the images ------------------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#")))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


def final_stage(path: Path) -> list[tuple[str, str]]:
    instructions = dockerfile_instructions(path)
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def env_names(instructions: list[tuple[str, str]]) -> set[str]:
    return {m for op, args in instructions if op == "ENV" for m in re.findall(r"([A-Z_][A-Z0-9_]*)=", args)}


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        ("router", ROUTER_ENV | OWN_ENV | set(IMAGE_ENV)),
        ("shard", SHARD_ENV | OWN_ENV | set(RUNTIME_ENV) | set(IMAGE_ENV)),
    ],
)
def test_image_settings_ports_and_health_checks(image: str, allowed: set[str]) -> None:
    stage = final_stage(DOCKER / f"{image}.Dockerfile")
    names = env_names(stage)
    assert names and names <= allowed, names - allowed
    ops = dict(stage)
    assert ops["USER"] == "1000:1000"  # the same user in both images: the router may connect to the sockets
    assert ops["ENTRYPOINT"] == '["tini", "--", "loraplex-entrypoint"]'
    assert "COPY docker/entrypoint.py /usr/local/bin/loraplex-entrypoint" in {f"{op} {a}" for op, a in stage}
    role = "shards" if image == "shard" else "router"
    assert ops["HEALTHCHECK"].endswith(f'CMD ["loraplex-entrypoint", "health", "{role}"]')
    assert ops["CMD"] == f'["{role}"]'
    if image == "router":
        assert ops["EXPOSE"].split() == [str(DEFAULTS.port), str(DEFAULTS.grpc_port)]
        assert "LORAPLEX_HOSTNAME=0.0.0.0" in ops["ENV"]


def test_the_embedded_model_cache_follows_loraplex_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LORAPLEX_CACHE=/data/loraplex puts the converted embedded model on the model volume."""
    from loraplex.shard.embedded import default_cache_root

    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    assert default_cache_root() == tmp_path / "cache"


# ---- shutdown ------------------------------------------------------------------------------------------


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return float(match[1])


def test_stop_grace_periods_cover_the_drains_at_the_code_default() -> None:
    """compose stops the router, then the shards, each with its own period; the kubelet gives the pod one period
    for the router's drain and then the shard sidecar's."""
    drain = RouterSettings().drain_timeout
    assert drain == shard_parser().get_default("drain_timeout") == DRAIN_TIMEOUT
    services = compose_config()["services"]
    assert seconds(services["router"]["stop_grace_period"]) >= drain + SERVER_STOP_GRACE
    assert seconds(services["shards"]["stop_grace_period"]) >= stop_grace(drain)
    values = load_values(CHART / "values.yaml")
    assert values["serving"]["drainTimeout"] == drain
    assert values["terminationGracePeriodSeconds"] >= 2 * drain + SERVER_STOP_GRACE
