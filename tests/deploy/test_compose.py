"""compose.yaml: Debian's `docker-compose config` (1.29) accepts it as documented and refuses broken copies."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.support import COMPOSE_FILE, ROOT, compose_config, published, run_compose_config


def test_defaults_bring_up_router_and_shards_on_the_gpus() -> None:
    config = compose_config()
    shards, router = config["services"]["shards"], config["services"]["router"]
    assert set(config["services"]) == {"shards", "router"}

    devices = shards["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert shards["environment"]["DEVICE"] == "cuda"
    assert shards["shm_size"] == "8gb"

    # The router starts only once every rank answers its health check.
    assert router["depends_on"] == {"shards": {"condition": "service_healthy"}}
    assert shards["healthcheck"]["test"] == ["CMD", "loraplex-entrypoint", "health", "shards"]
    assert router["healthcheck"]["test"] == ["CMD", "loraplex-entrypoint", "health", "router"]

    # No MODEL_ID: empty, which the entry point drops, so the shards fall back to the embedded model.
    assert shards["environment"]["MODEL_ID"] == ""
    assert shards["environment"]["LORAPLEX_CACHE"] == "/data/loraplex"
    assert shards["environment"]["HF_HOME"] == "/data/hf"

    # Named volumes: the model cache (read-only for the router, which reads the tokenizer), the adapters,
    # and the sockets the shards listen on.
    assert set(config["volumes"]) == {"model-cache", "adapters", "sockets"}
    assert "model-cache:/data:rw" in shards["volumes"]
    assert "adapters:/adapters:ro" in shards["volumes"]
    assert "model-cache:/data:ro" in router["volumes"]
    assert "sockets:/run/loraplex:rw" in shards["volumes"] and "sockets:/run/loraplex:rw" in router["volumes"]
    assert shards["environment"]["SHARD_SOCKET_DIR"] == router["environment"]["SHARD_SOCKET_DIR"] == "/run/loraplex"

    # Loopback only by default: without a keys file the server is open to whoever reaches it (SPEC §7).
    assert published(router) == {("127.0.0.1", 8080, 8080), ("127.0.0.1", 50051, 50051)}
    assert "ports" not in shards  # the shards take no requests from clients
    assert shards["restart"] == router["restart"] == "unless-stopped"


def test_containers_run_read_only_without_capabilities_and_write_only_to_volumes_and_tmp() -> None:
    config = compose_config()
    for name, service in config["services"].items():
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"] and "cap_add" not in service, name
        assert service["security_opt"] == ["no-new-privileges:true"], name
        # CuPy's kernel cache and the ranks' rendezvous file (under TMPDIR, unset: /tmp).
        assert service["tmpfs"] == ["/tmp"], name
    shards = config["services"]["shards"]
    assert shards["environment"]["HF_HOME"].startswith("/data/")
    assert shards["environment"]["LORAPLEX_CACHE"].startswith("/data/")
    assert "model-cache:/data:rw" in shards["volumes"]


def test_loraplex_bind_opens_the_ports_to_the_network() -> None:
    router = compose_config({"LORAPLEX_BIND": "0.0.0.0", "GRPC_PORT": "50052"})["services"]["router"]
    assert published(router) == {("0.0.0.0", 8080, 8080), ("0.0.0.0", 50052, 50051)}


def test_every_setting_comes_from_the_environment() -> None:
    env = {
        "NUM_SHARD": "2",
        "MODEL_ID": "Qwen/Qwen2.5-7B-Instruct",
        "LORA_ADAPTERS": "sql=/adapters/sql",
        "MAX_INPUT_TOKENS": "3000",
        "MAX_TOTAL_TOKENS": "4096",
        "API_KEYS_FILE": "/etc/loraplex/api-keys.yaml",
        "PORT": "9000",
        "MODEL_VOLUME": "/srv/models",
        "LORAPLEX_TAG": "0.2.0",
        "LORAPLEX_REPOSITORY": "registry.example.com/ml",
    }
    config = compose_config(env)
    shards, router = config["services"]["shards"], config["services"]["router"]
    assert shards["environment"]["NUM_SHARD"] == router["environment"]["NUM_SHARD"] == "2"
    assert shards["environment"]["MODEL_ID"] == "Qwen/Qwen2.5-7B-Instruct"
    assert shards["environment"]["LORA_ADAPTERS"] == "sql=/adapters/sql"
    assert router["environment"]["MAX_INPUT_TOKENS"] == "3000"
    assert router["environment"]["API_KEYS_FILE"] == "/etc/loraplex/api-keys.yaml"
    assert published(router) == {("127.0.0.1", 9000, 8080), ("127.0.0.1", 50051, 50051)}
    assert "/srv/models:/data:rw" in shards["volumes"]
    assert shards["image"] == "registry.example.com/ml/shard:0.2.0"
    assert router["image"] == "registry.example.com/ml/router:0.2.0"


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[key]
        node[last] = value

    return mutate


BROKEN = {
    "unknown depends_on condition": (
        _set("services.router.depends_on.shards.condition", "service_ready"),
        "service_ready",
    ),
    "misspelt service key": (_set("services.shards.healthchek", {"test": ["CMD", "true"]}), "healthchek"),
    "dependency on a missing service": (
        _set("services.router.depends_on", {"shard": {"condition": "service_healthy"}}),
        "shard",
    ),
    "GPU count of the wrong type": (
        _set("services.shards.deploy.resources.reservations.devices", [{"driver": "nvidia", "count": 1.5}]),
        "count",
    ),
    "undeclared named volume": (_set("services.router.volumes", ["weights:/data:ro"]), "weights"),
}


def test_an_unbroken_copy_passes_the_same_way(tmp_path: Path) -> None:
    """The control for the test below: the YAML round trip alone changes nothing compose cares about."""
    copy = tmp_path / "compose.yaml"
    copy.write_text(yaml.safe_dump(yaml.safe_load(COMPOSE_FILE.read_text()), sort_keys=False))
    result = run_compose_config(copy, project_dir=ROOT)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == compose_config()


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_copy_is_refused(case: str, tmp_path: Path) -> None:
    mutate, named = BROKEN[case]
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    mutate(doc)
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(doc, sort_keys=False))
    # The project directory stays the repository, so that only the mutation differs from the real file.
    result = run_compose_config(broken, project_dir=ROOT)
    assert result.returncode != 0, f"{case} was accepted:\n{result.stdout}"
    assert named in result.stderr, result.stderr
