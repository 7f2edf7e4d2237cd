"""Adapter ids as hostile input, broken adapters on demand, tenant isolation and the admin token."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from loraplex.proto.v1 import generate_pb2 as pb
from loraplex.proto.v1 import generate_pb2_grpc as pb_grpc
from tests.factories import tiny_served_model, write_raw_adapter
from tests.servers import Server, start_server

ADMIN = "admin-secret-0001"
KEY_A, KEY_B, KEY_ALL = "key-team-a-0001", "key-team-b-0001", "key-everything-1"
TENANTS = {
    "tenants": [
        {"name": "team-a", "keys": [KEY_A], "adapters": ["team-a/*", "shared"], "base": True},
        {"name": "team-b", "keys": [KEY_B], "adapters": ["team-b/*"], "base": False},
        {"name": "all", "keys": [KEY_ALL], "adapters": ["*"]},
    ]
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    top = tmp_path_factory.mktemp("security")
    model_dir = top / "model"
    tiny_served_model(model_dir)
    root = top / "adapters"
    for name in ("team-a/one", "team-a/two", "team-b/one", "shared", "good"):
        write_raw_adapter(root / name, model_dir, rank=4, seed=len(name))
    _broken_adapters(root / "broken", model_dir)
    # Outside the root: a valid adapter that would answer 200 if any id reached it, and a FIFO that
    # would block (and show a reader) if anything ever opened it.
    canary = write_raw_adapter(top / "canary", model_dir, rank=2, seed=99)
    fifo_dir = top / "fifo-canary"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "adapter_config.json")
    os.mkfifo(fifo_dir / "adapter_model.safetensors")
    (root / "link-out").symlink_to(canary, target_is_directory=True)
    (root / "link-fifo").symlink_to(fifo_dir, target_is_directory=True)
    inner = root / "file-link"
    inner.mkdir()
    shutil.copy(root / "good" / "adapter_config.json", inner / "adapter_config.json")
    (inner / "adapter_model.safetensors").symlink_to(canary / "adapter_model.safetensors")
    keys = top / "keys.yaml"
    keys.write_text(json.dumps(TENANTS))
    preloaded = write_raw_adapter(top / "startup" / "preloaded", model_dir, rank=8, seed=5)
    server = start_server(
        top,
        model_dir,
        {"preloaded": preloaded},
        "--api-keys-file",
        str(keys),
        "--admin-token",
        ADMIN,
        "--metrics-adapter-labels",  # ids in /metrics under tenancy only when asked for (test_per_adapter_metrics)
        shard_args=("--adapter-dirs", str(root), "--max-lora-rank", "16"),
    )
    yield dict(server=server, root=root, top=top, fifo=fifo_dir, model_dir=model_dir)
    server.stop()


def _broken_adapters(base: Path, model_dir: Path) -> None:
    good = write_raw_adapter(base / "template", model_dir, rank=4)
    corrupt = shutil.copytree(good, base / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x07" * 300)
    truncated = shutil.copytree(good, base / "truncated")
    data = (good / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    pickle_only = shutil.copytree(good, base / "pickle-only")
    (pickle_only / "adapter_model.safetensors").rename(pickle_only / "adapter_model.bin")
    wrong = base / "wrong-shape"
    shutil.copytree(good, wrong)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    write_raw_adapter(base / "over-rank", model_dir, rank=32)


def _generate(server: Server, adapter: str | None, key: str | None = KEY_ALL, **extra: Any) -> httpx.Response:
    params: dict[str, Any] = {"max_new_tokens": 4, **extra}
    if adapter is not None:
        params["adapter_id"] = adapter
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        server.url + "/generate", json={"inputs": "hello world", "parameters": params}, headers=headers, timeout=60
    )


HOSTILE_IDS = [
    "../canary",
    "../../canary",
    "..",
    ".",
    "/etc/passwd",
    "//etc/passwd",
    "good/../../canary",
    "good/./adapter",
    "link-out",
    "link-out/../good",
    "link-fifo",
    "file-link",
    "good\x00",
    "\x00../canary",
    "file:///etc/passwd",
    "http://example.com/adapter",
    "hf://org/model",
    "C:\\canary",
    "..\\canary",
    "good\\..\\..\\canary",
    "%2e%2e/canary",
    "..%2fcanary",
    "a" * 300,
    "a/" * 40 + "b",
    "ｇｏｏｄ",  # fullwidth letters that NFKC would turn into "good"
    "..／canary",  # fullwidth solidus
    "\u2025/canary",  # two-dot leader
    "good\u202e",
    " good",
    "good ",
    "~/canary",
    "$HOME/canary",
    ".hidden",
    "-rf",
    "good//",
    "team-a//one",
    "\\\\server\\share",
    "broken/template/adapter_config.json",
]


def test_hostile_ids_are_404_and_nothing_outside_the_root_is_opened(world: dict[str, Any]) -> None:
    server = world["server"]
    assert len(HOSTILE_IDS) >= 30
    for adapter in HOSTILE_IDS:
        resp = _generate(server, adapter)
        assert resp.status_code == 404, (adapter, resp.text)
        assert resp.json()["error_type"] == "adapter_not_found"
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for adapter in HOSTILE_IDS[:12]:
        resp = httpx.post(server.url + "/adapters", json={"id": adapter}, headers=admin, timeout=30)
        assert resp.status_code == 404, (adapter, resp.text)
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        for adapter in HOSTILE_IDS[:8]:
            request = pb.GenerateRequest(inputs="hi", parameters=pb.Parameters(adapter_id=adapter, max_new_tokens=2))
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(request, metadata=[("authorization", f"Bearer {KEY_ALL}")], timeout=30)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # No reader ever opened the FIFOs (opening a FIFO's write end without a reader fails with ENXIO).
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with pytest.raises(OSError) as fifo:
            os.open(world["fifo"] / name, os.O_WRONLY | os.O_NONBLOCK)
        assert fifo.value.errno == errno.ENXIO
    listed = httpx.get(server.url + "/adapters", headers=admin, timeout=30).json()["adapters"]
    assert not any("canary" in a["id"] or a["id"].startswith("link") for a in listed)
    assert _generate(server, "good").status_code == 200  # still serving


@pytest.mark.parametrize(
    ("adapter", "words"),
    [
        ("broken/corrupt", "corrupt or truncated"),
        ("broken/truncated", "corrupt or truncated"),
        ("broken/pickle-only", "pickle"),
        ("broken/wrong-shape", "do not fit rank 8"),
        ("broken/over-rank", "above the limit of 16"),
    ],
)
def test_broken_adapter_on_demand_gets_a_specific_error_while_others_stream(
    world: dict[str, Any], adapter: str, words: str
) -> None:
    server = world["server"]
    streamed: dict[str, Any] = {}

    def stream() -> None:
        body = {
            "inputs": "the quick brown fox",
            "parameters": {"adapter_id": "good", "max_new_tokens": 40, "details": True},
        }
        headers = {"Authorization": f"Bearer {KEY_ALL}"}
        with httpx.stream("POST", server.url + "/generate_stream", json=body, headers=headers, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data:")]
        streamed["last"] = json.loads(lines[-1].removeprefix("data:"))

    runner = threading.Thread(target=stream)
    runner.start()
    resp = _generate(server, adapter)
    runner.join(60)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error_type"] == "adapter_invalid" and words in resp.json()["error"]
    # The running stream was not disturbed: it ended normally, with its full text.
    assert streamed["last"]["details"]["finish_reason"] in ("length", "eos_token")
    assert streamed["last"]["generated_text"] is not None
    assert _generate(server, "good").status_code == 200


def test_tenants_see_and_use_only_their_adapters_over_http(world: dict[str, Any]) -> None:
    server = world["server"]
    for path in ("/generate", "/v1/completions"):
        assert httpx.post(server.url + path, json={"inputs": "x", "prompt": "x"}, timeout=30).status_code == 401
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
    wrong_key = _generate(server, "team-a/one", key="not-a-real-key")
    assert wrong_key.status_code == 401
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200  # probes carry no key
    assert httpx.get(server.url + "/metrics", timeout=30).status_code == 200

    assert _generate(server, "team-a/one", key=KEY_A).status_code == 200
    assert _generate(server, "shared", key=KEY_A).status_code == 200
    assert _generate(server, None, key=KEY_A).status_code == 200
    forbidden = _generate(server, "team-b/one", key=KEY_A)
    missing = _generate(server, "team-b/nothing", key=KEY_A)
    assert forbidden.status_code == missing.status_code == 404
    assert forbidden.json() == {"error": "adapter 'team-b/one' not found", "error_type": "adapter_not_found"}
    assert missing.json() == {"error": "adapter 'team-b/nothing' not found", "error_type": "adapter_not_found"}
    base_for_b = _generate(server, None, key=KEY_B)
    assert base_for_b.status_code == 403 and base_for_b.json()["error_type"] == "forbidden"
    assert _generate(server, "team-b/one", key=KEY_B).status_code == 200

    models_a = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30)
    ids_a = {m["id"] for m in models_a.json()["data"]}
    assert {"team-a/one", "team-a/two", "shared"} <= ids_a and not any(i.startswith("team-b") for i in ids_a)
    assert "good" not in ids_a
    models_b = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY_B}"}, timeout=30)
    assert {m["id"] for m in models_b.json()["data"]} == {"team-b/one"}  # no base for team-b


def test_tenants_over_the_openai_client(world: dict[str, Any]) -> None:
    server = world["server"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY_A, max_retries=0)
    done = client.completions.create(model="team-a/two", prompt="hello", max_tokens=3)
    assert done.choices[0].text is not None and done.usage is not None and done.usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="team-b/one", prompt="hello", max_tokens=3)
    assert {m.id for m in client.models.list()} >= {"team-a/one", "shared"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong-key-000", max_retries=0).models.list()


def test_tenants_over_grpc(world: dict[str, Any]) -> None:
    server = world["server"]
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.TextGenerationStub(channel)

        def generate(adapter: str, key: str | None) -> pb.GenerateResponse:
            request = pb.GenerateRequest(inputs="hi", parameters=pb.Parameters(adapter_id=adapter, max_new_tokens=2))
            metadata = [("authorization", f"Bearer {key}")] if key else []
            return stub.Generate(request, metadata=metadata, timeout=30)

        assert generate("team-a/one", KEY_A).generated_text is not None
        for adapter, key, code in [
            ("team-a/one", None, grpc.StatusCode.UNAUTHENTICATED),
            ("team-b/one", KEY_A, grpc.StatusCode.NOT_FOUND),
            ("", KEY_B, grpc.StatusCode.PERMISSION_DENIED),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                generate(adapter, key)
            assert info.value.code() == code, (adapter, key)
        listed = stub.ListAdapters(pb.ListAdaptersRequest(), metadata=[("authorization", f"Bearer {KEY_B}")])
        assert [a.id for a in listed.adapters] == ["team-b/one"]
        for call, request in [
            (stub.LoadAdapter, pb.LoadAdapterRequest(id="good")),
            (stub.UnloadAdapter, pb.UnloadAdapterRequest(id="good")),
        ]:
            for metadata in ([], [("authorization", f"Bearer {KEY_ALL}")]):
                with pytest.raises(grpc.RpcError) as info:
                    call(request, metadata=metadata, timeout=30)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        loaded = stub.LoadAdapter(
            pb.LoadAdapterRequest(id="team-a/two"), metadata=[("authorization", f"Bearer {ADMIN}")], timeout=30
        )
        assert loaded.adapter.tier in ("host", "device") and loaded.adapter.rank == 4


@pytest.mark.parametrize("path", ["/adapters", "/admin/adapters"])  # SPEC §4's path and the kept alias
def test_admin_api_needs_the_admin_token(world: dict[str, Any], path: str) -> None:
    server = world["server"]
    url = server.url + path
    for headers in ({}, {"Authorization": f"Bearer {KEY_ALL}"}, {"Authorization": "Bearer wrong"}):
        assert httpx.post(url, json={"id": "good"}, headers=headers, timeout=30).status_code == 401
        assert httpx.delete(url + "/good", headers=headers, timeout=30).status_code == 401
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert httpx.get(url, headers=headers, timeout=30).status_code == 401
    admin = {"Authorization": f"Bearer {ADMIN}"}
    loaded = httpx.post(url, json={"id": "team-a/one"}, headers=admin, timeout=30).json()
    assert loaded["tier"] in ("host", "device") and loaded["rank"] == 4 and loaded["bytes"] > 0
    assert set(loaded["targets"]) == {"q_proj", "v_proj"}
    listing = {a["id"]: a for a in httpx.get(url, headers=admin, timeout=30).json()["adapters"]}
    assert listing["broken/corrupt"]["tier"] == "disk" and listing["team-a/one"]["tier"] in ("host", "device")
    assert httpx.delete(url + "/team-a/one", headers=admin, timeout=30).status_code == 200
    listing = {a["id"]: a for a in httpx.get(url, headers=admin, timeout=30).json()["adapters"]}
    assert listing["team-a/one"]["tier"] == "disk"
    assert httpx.delete(url + "/team-a/one", headers=admin, timeout=30).status_code == 404  # not loaded now
    # Paths never travel over the network: the id resolves under the roots.
    with_path = httpx.post(url, json={"id": "good", "path": "/etc"}, headers=admin, timeout=30)
    assert with_path.status_code == 422 and "path" in with_path.json()["error"]


@pytest.mark.parametrize("path", ["/adapters", "/admin/adapters"])
def test_a_tenant_key_lists_its_own_adapters_only(world: dict[str, Any], path: str) -> None:
    server = world["server"]

    def listed(key: str) -> set[str]:
        resp = httpx.get(server.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert resp.status_code == 200, resp.text
        return {a["id"] for a in resp.json()["adapters"]}

    team_a, team_b, everything = listed(KEY_A), listed(KEY_B), listed(KEY_ALL)
    assert {"team-a/one", "team-a/two", "shared"} <= team_a and not any(i.startswith("team-b") for i in team_a)
    assert "good" not in team_a
    assert team_b == {"team-b/one"}
    assert {"team-a/one", "team-b/one", "good"} <= everything


def test_per_adapter_metrics(world: dict[str, Any]) -> None:
    server = world["server"]
    for _ in range(2):
        assert _generate(server, "team-a/two", key=KEY_A).status_code == 200
    text = httpx.get(server.url + "/metrics", timeout=30).text
    for pattern in (
        r'^loraplex_adapter_requests_total\{adapter="team-a/two"\} ([0-9.]+)$',
        r'^loraplex_adapter_tokens_total\{adapter="team-a/two"\} ([0-9.]+)$',
        r'^loraplex_adapter_load_seconds\{adapter="team-a/two"\} ([0-9.e-]+)$',
        r'^loraplex_adapter_tier\{adapter="team-a/two",tier="(?:host|device)"\} (1\.0)$',
    ):
        match = re.search(pattern, text, re.M)
        assert match and float(match[1]) > 0, pattern
    assert float(re.findall(r'^loraplex_adapter_requests_total\{adapter="team-a/two"\} ([0-9.]+)$', text, re.M)[0]) >= 2


def test_preloaded_and_on_demand_adapters_coexist(world: dict[str, Any]) -> None:
    server = world["server"]
    both = [_generate(server, name) for name in ("preloaded", "team-a/two", "preloaded")]
    assert [r.status_code for r in both] == [200, 200, 200]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    listing = {a["id"]: a for a in httpx.get(server.url + "/adapters", headers=admin, timeout=30).json()["adapters"]}
    assert listing["preloaded"]["rank"] == 8 and listing["preloaded"]["tier"] in ("host", "device")
    assert listing["preloaded"]["requests"] >= 2
