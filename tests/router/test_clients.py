"""Real clients against the real router: huggingface_hub's InferenceClient and the openai package."""

from __future__ import annotations

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient

from tests.servers import Server


def _tgi(server: Server, prompt: str, adapter: str | None, n: int = 8) -> str:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": n, "adapter_id": adapter}}
    r = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["generated_text"])


def test_inference_client_text_generation_details_and_stream(server: Server) -> None:
    client = InferenceClient(base_url=server.url)
    adapter = server.adapters[1]
    out = client.text_generation("hello world", adapter_id=adapter, max_new_tokens=6, details=True)
    assert out.details is not None
    assert out.details.generated_tokens == len(out.details.tokens) > 0
    assert out.details.finish_reason in ("length", "eos_token")
    assert out.generated_text == _tgi(server, "hello world", adapter, 6)
    assert out.generated_text != _tgi(server, "hello world", None, 6)  # the adapter is really applied

    chunks = list(
        client.text_generation("hello world", adapter_id=adapter, max_new_tokens=6, stream=True, details=True)
    )
    assert chunks[-1].generated_text == out.generated_text
    assert [c.token.id for c in chunks] == [t.id for t in out.details.tokens]
    assert chunks[-1].details is not None and chunks[-1].details.generated_tokens == len(chunks)


def test_inference_client_chat_completion(server: Server) -> None:
    client = InferenceClient(base_url=server.url)
    resp = client.chat_completion([{"role": "user", "content": "what is the capital?"}], max_tokens=5)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason in ("length", "stop")
    assert resp.usage.completion_tokens <= 5
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat_completion(
            [{"role": "user", "content": "what is the capital?"}], max_tokens=5, stream=True
        )
    )
    assert streamed == resp.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_openai_chat_and_completions_with_adapter(server: Server, stream: bool) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    adapter = server.adapters[2]
    messages = [{"role": "user", "content": "hello"}]
    if stream:
        chat = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(model=adapter, messages=messages, max_tokens=6, stream=True)
        )
        text = "".join(
            c.choices[0].text
            for c in client.completions.create(model=adapter, prompt="the quick", max_tokens=6, stream=True)
        )
    else:
        resp = client.chat.completions.create(model=adapter, messages=messages, max_tokens=6)
        chat = resp.choices[0].message.content or ""
        assert resp.model == adapter
        text = client.completions.create(model=adapter, prompt="the quick", max_tokens=6).choices[0].text
    assert text == _tgi(server, "the quick", adapter, 6)
    prompt = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    expected = httpx.post(
        server.url + "/generate",
        json={"inputs": prompt, "parameters": {"max_new_tokens": 6, "adapter_id": adapter}},
        timeout=60,
    ).json()["generated_text"]
    assert chat == expected.split("<|im_end|>")[0] or chat == expected


def test_openai_models_lists_base_and_adapters(server: Server) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    ids = [m.id for m in client.models.list()]
    assert set(server.adapters) <= set(ids)
    assert len(ids) == len(server.adapters) + 1


def test_openai_unknown_model_is_404_never_the_base(server: Server) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "x"}])
    for base_name in ("tgi", "base", server.url):  # the names that do mean the base model
        r = client.completions.create(model=base_name, prompt="the quick", max_tokens=4)
        assert r.choices[0].text == _tgi(server, "the quick", None, 4)
