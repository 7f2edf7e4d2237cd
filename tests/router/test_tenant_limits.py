"""Against a running server with tenancy: per-tenant request limits, /metrics naming no adapter to scrapers,
and public gRPC messages bounded by --max-body-bytes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from loraplex.proto.v1 import generate_pb2 as pb
from loraplex.proto.v1 import generate_pb2_grpc as pb_grpc
from tests.servers import Server, start_server

KEY_A, KEY_B = "key-limits-team-a-01", "key-limits-team-b-01"
MAX_BODY = 65536


@pytest.fixture(scope="module")
def limited(served_model: tuple[Path, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model_dir, adapters = served_model
    root = tmp_path_factory.mktemp("limits")
    keys = root / "keys.yaml"
    tenants = [
        {"name": "team-a", "keys": [KEY_A], "adapters": ["team-0/*"]},
        {"name": "team-b", "keys": [KEY_B], "adapters": ["team-1/*"]},
    ]
    keys.write_text(json.dumps({"tenants": tenants}))
    subset = {name: path for name, path in adapters.items() if name.startswith(("team-0/", "team-1/"))}
    server = start_server(
        root,
        model_dir,
        subset,
        "--api-keys-file",
        str(keys),
        "--max-concurrent-requests-per-tenant",
        "1",
        "--max-body-bytes",
        str(MAX_BODY),
        "--max-total-tokens",  # room for a stream long enough to be running still while the others are asked
        "8000",
    )
    yield server
    server.stop()


def _adapter(server: Server, team: int) -> str:
    return next(a for a in server.adapters if a.startswith(f"team-{team}/"))


def _generate(server: Server, key: str, adapter: str, max_new: int = 2) -> httpx.Response:
    body = {"inputs": "hello", "parameters": {"max_new_tokens": max_new, "adapter_id": adapter}}
    return httpx.post(server.url + "/generate", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_metrics_scraped_without_a_key_name_no_adapter(limited: Server) -> None:
    a, b = _adapter(limited, 0), _adapter(limited, 1)
    assert _generate(limited, KEY_A, a).status_code == 200
    assert _generate(limited, KEY_B, b).status_code == 200
    text = httpx.get(limited.url + "/metrics", timeout=30).text  # no key: scrapers carry none
    assert "team-0/" not in text and "team-1/" not in text
    counted = 'loraplex_adapter_requests_total{adapter="adapter"}'
    served = [line for line in text.splitlines() if line.startswith(counted)]
    assert served and float(served[0].rsplit(" ", 1)[1]) >= 2
    assert 'loraplex_adapters_loaded{tier="' in text


def test_a_tenant_at_its_limit_gets_429_while_another_is_served(limited: Server) -> None:
    a, b = _adapter(limited, 0), _adapter(limited, 1)
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 7000, "ignore_eos": True, "adapter_id": a}}
    headers = {"Authorization": f"Bearer {KEY_A}"}
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", limited.url + "/generate_stream", json=body, headers=headers) as stream,
    ):
        assert stream.status_code == 200
        lines = stream.iter_lines()  # kept: a dropped iterator closes the response, which cancels the request
        assert next(line for line in lines if line.startswith("data:"))  # team-a's one request is running
        second = _generate(limited, KEY_A, a)
        assert second.status_code == 429 and second.json()["error_type"] == "overloaded"
        assert _generate(limited, KEY_B, b).status_code == 200  # team-b is not held back by team-a's limit
    # The stream is gone (its slot freed at the next step): team-a is served again.
    for _ in range(50):
        retry = _generate(limited, KEY_A, a)
        if retry.status_code != 429:
            break
    assert retry.status_code == 200, retry.text


def test_public_grpc_messages_are_bounded_by_max_body_bytes(limited: Server) -> None:
    metadata = (("authorization", f"Bearer {KEY_A}"),)
    with grpc.insecure_channel(limited.grpc_address) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        small = stub.Tokenize(pb.TokenizeRequest(inputs="hello " * 2000), metadata=metadata, timeout=30)
        assert len(small.tokens) > 100
        with pytest.raises(grpc.RpcError) as refused:
            stub.Tokenize(pb.TokenizeRequest(inputs="x" * (MAX_BODY + 1)), metadata=metadata, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
