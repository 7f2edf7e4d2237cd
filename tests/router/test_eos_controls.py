"""vLLM's ignore_eos and min_tokens end to end, and chat templates that refuse, on a model whose EOS comes first."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
import torch
from tokenizers import Tokenizer

from loraplex.proto.v1 import generate_pb2 as pb
from loraplex.proto.v1 import generate_pb2_grpc as pb_grpc
from tests.factories import tiny_served_model
from tests.servers import Server, start_server

# Like the tests' ChatML template, but it refuses what real templates refuse: an unknown role, and roles that
# do not alternate user/assistant.
STRICT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['user', 'assistant'] %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def eos_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A tiny model whose greedy choice is EOS at every step, with "the" second best."""
    root = tmp_path_factory.mktemp("early-eos")
    model_dir = root / "model"
    model = tiny_served_model(model_dir)
    word = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode("the").ids[0]
    with torch.no_grad():
        # One residual dimension far above the rest: after the final norm the hidden state points along it,
        # so lm_head's column there decides every step, whatever the prompt: EOS first, "the" second.
        model.model.embed_tokens.weight[:, 0] += 50.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[model.config.eos_token_id, 0] = 2.0
        model.lm_head.weight[word, 0] = 1.0
    model.save_pretrained(model_dir)
    (model_dir / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    srv = start_server(root, model_dir, {})
    yield srv
    srv.stop()


def _completion(server: Server, **body: Any) -> dict[str, Any]:
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hello world", **body}, timeout=60)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def _streamed_usage(server: Server, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The usage and finish_reason of a streamed OpenAI answer (both arrive with its last chunk)."""
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert all("error" not in c for c in chunks), chunks
    return chunks[-1]["usage"], chunks[-1]["choices"][0]["finish_reason"]


def test_the_model_stops_at_once_without_the_controls(eos_server: Server) -> None:
    out = _completion(eos_server, max_tokens=16)
    assert out["usage"]["completion_tokens"] == 1 and out["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("max_tokens", [1, 7, 16])
def test_ignore_eos_gives_exactly_max_tokens_on_every_api(eos_server: Server, max_tokens: int) -> None:
    out = _completion(eos_server, max_tokens=max_tokens, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == max_tokens and out["choices"][0]["finish_reason"] == "length"
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "ignore_eos": True}
    r = httpx.post(eos_server.url + "/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == max_tokens, r.text
    usage, finish = _streamed_usage(eos_server, "/v1/chat/completions", chat)
    assert "cached_tokens" in usage.pop("prompt_tokens_details")  # the second call may find the prompt cached
    assert (usage, finish) == (
        {"prompt_tokens": r.json()["usage"]["prompt_tokens"], "completion_tokens": max_tokens,
         "total_tokens": r.json()["usage"]["total_tokens"]},
        "length",
    )  # fmt: skip
    params = {"max_new_tokens": max_tokens, "ignore_eos": True, "details": True}
    tgi = httpx.post(eos_server.url + "/generate", json={"inputs": "hello", "parameters": params}, timeout=60)
    assert tgi.json()["details"]["generated_tokens"] == max_tokens, tgi.text
    assert tgi.json()["details"]["finish_reason"] == "length"
    with grpc.insecure_channel(eos_server.grpc_address) as channel:
        request = pb.GenerateRequest(
            inputs="hello", parameters=pb.Parameters(max_new_tokens=max_tokens, ignore_eos=True, details=True)
        )
        reply = pb_grpc.TextGenerationStub(channel).Generate(request, timeout=60)
    assert reply.details.generated_tokens == max_tokens and reply.details.finish_reason == "length"


@pytest.mark.parametrize("min_tokens", [1, 5, 12])
def test_min_tokens_keeps_eos_from_ending_the_answer_early(eos_server: Server, min_tokens: int) -> None:
    out = _completion(eos_server, max_tokens=20, min_tokens=min_tokens)
    assert out["usage"]["completion_tokens"] >= min_tokens, out
    assert out["choices"][0]["finish_reason"] == "stop"  # and once it may, EOS ends it
    usage, finish = _streamed_usage(
        eos_server, "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "min_tokens": min_tokens},
    )  # fmt: skip
    assert usage["completion_tokens"] >= min_tokens and finish == "stop"
    params = {"max_new_tokens": 20, "min_tokens": min_tokens, "details": True}
    tgi = httpx.post(eos_server.url + "/generate", json={"inputs": "hello", "parameters": params}, timeout=60)
    details = tgi.json()["details"]
    assert details["generated_tokens"] >= min_tokens and details["finish_reason"] == "eos_token", details
    # min_tokens equal to max_tokens: the whole budget, ended by length.
    full = _completion(eos_server, max_tokens=min_tokens, min_tokens=min_tokens)
    assert full["usage"]["completion_tokens"] == min_tokens and full["choices"][0]["finish_reason"] == "length"


def test_stop_sequences_wait_for_min_tokens_too(server: Server) -> None:
    """On the shared random model: a stop sequence its first token already writes ends nothing before min_tokens."""

    def generate(**params: Any) -> dict[str, Any]:
        body = {"inputs": "hello world", "parameters": {"ignore_eos": True, "details": True, **params}}
        r = httpx.post(server.url + "/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    first = next(t["text"] for t in generate(max_new_tokens=8)["details"]["tokens"] if t["text"].strip())
    stopped = generate(max_new_tokens=8, stop=[first])
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    held = generate(max_new_tokens=8, stop=[first], min_tokens=6)
    assert held["details"]["generated_tokens"] >= 6, held
    if held["details"]["finish_reason"] == "stop_sequence":  # a later occurrence, ending in the last token
        assert held["generated_text"].endswith(first) or first in held["details"]["tokens"][-1]["text"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 1.5}, "min_tokens"),
        ({"min_tokens": 400}, "min_tokens"),  # past max_total_tokens, with max_tokens left to its default
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_bad_controls_are_422_in_each_apis_shape(eos_server: Server, body: dict[str, Any], words: str) -> None:
    r = httpx.post(eos_server.url + "/v1/completions", json={"prompt": "hi", **body}, timeout=30)
    assert r.status_code == 422 and words in r.json()["error"]["message"], r.text
    params = {("max_new_tokens" if k == "max_tokens" else k): v for k, v in body.items()}
    r = httpx.post(eos_server.url + "/generate", json={"inputs": "hi", "parameters": params}, timeout=30)
    assert r.status_code == 422 and words in r.json()["error"] and r.json()["error_type"] == "validation", r.text


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "roles must alternate"),
        ([{"role": "assistant", "content": "a"}], "roles must alternate"),
        ([{"role": "wizard", "content": "a"}], "unknown role: wizard"),
    ],
)
def test_a_template_that_refuses_is_422_with_its_message(
    eos_server: Server, messages: list[dict[str, str]], words: str, stream: bool
) -> None:
    body = {"messages": messages, "max_tokens": 2, "stream": stream}
    r = httpx.post(eos_server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error", error


@pytest.mark.parametrize("min_tokens", [1, 5, 12])
def test_the_sampler_masks_eos_until_min_tokens(eos_server: Server, min_tokens: int) -> None:
    """EOS is the model's favourite at every step: with it masked, the second best ("the") fills min_tokens."""
    params = {"max_new_tokens": 20, "min_tokens": min_tokens, "details": True}
    r = httpx.post(eos_server.url + "/generate", json={"inputs": "hello", "parameters": params}, timeout=60)
    details = r.json()["details"]
    assert [t["text"] for t in details["tokens"][:min_tokens]] == ["the"] * min_tokens, details
    assert details["generated_tokens"] == min_tokens + 1 and details["finish_reason"] == "eos_token"
    assert r.json()["generated_text"] == "the" * min_tokens
