"""`make run` on this checkout serves SmolLM2 + the demo adapters, and they answer as the README shows."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient

from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
# The embedded model's public id (/info, /v1/models, OpenAI's `model`): its hub name, not its cache path.
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def make_run_dtype() -> str | None:
    """The dtype `make run` should pick here: DTYPE if set, bfloat16 where the CPU has native bfloat16; None
    where the flag's `auto` decides (its choice depends on the device)."""
    if os.environ.get("DTYPE", "").strip():
        return os.environ["DTYPE"].strip()
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else None


def readme_answers() -> list[tuple[str, str, str]]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- demo-answers:start -->")[1].split("<!-- demo-answers:end -->")[0]
    rows = [r.strip().strip("|").split(" | ") for r in block.strip().splitlines()[2:]]
    return [(m.strip(), q.strip(), a.strip()) for m, q, a in rows]


@pytest.mark.slow
def test_make_run_serves_the_demo_adapters_as_the_readme_says(tmp_path: Path) -> None:
    rows = readme_answers()
    assert {m for m, _, _ in rows} == {"base", "pirate", "french", "json"}
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "PORT": str(port), "GRPC_PORT": str(grpc_port)}
    log = tmp_path / "make-run.log"
    proc = subprocess.Popen(
        ["make", "run"], cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        hub = InferenceClient(base_url=url)
        oai = openai.OpenAI(base_url=url + "/v1", api_key="none")
        info = httpx.get(url + "/info", timeout=30).json()
        assert info["model_id"] == EMBEDDED_ID
        if (dtype := make_run_dtype()) is not None:
            assert info["model_dtype"] == dtype
        listed = [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]]
        assert listed[0] == EMBEDDED_ID and {"pirate", "french", "json"} <= set(listed)
        for model, question, answer in rows:
            messages = [{"role": "user", "content": question}]
            name = None if model == "base" else model
            via_hub = hub.chat_completion(messages, model=name, max_tokens=40).choices[0].message.content
            via_openai = oai.chat.completions.create(model=model, messages=messages, max_tokens=40)
            body = {"model": model, "messages": messages, "max_tokens": 40}
            via_curl = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
            assert via_hub == via_openai.choices[0].message.content == via_curl["choices"][0]["message"]["content"]
            assert via_hub == answer, (model, via_hub)
            if model == "base":  # the base model by its public id: the same answer, and the answer names it
                by_id = oai.chat.completions.create(model=EMBEDDED_ID, messages=messages, max_tokens=40)
                assert (by_id.model, by_id.choices[0].message.content) == (EMBEDDED_ID, answer)
        french = hub.text_generation("What is 2 plus 2?", adapter_id="french", max_new_tokens=20, details=True)
        assert french.details is not None and french.details.generated_tokens > 0
        assert re.search(r"[a-z]", french.generated_text)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
