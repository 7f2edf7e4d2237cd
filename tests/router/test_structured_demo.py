"""The demo ``json`` adapter on SmolLM2 under OpenAI's ``response_format`` json_schema: the README's example."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from loraplex.shard.embedded import embedded_model_dir
from tests.servers import start_server

DEMO = Path(__file__).resolve().parents[2] / "demo" / "adapters"
SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
    "additionalProperties": False,
}


@pytest.mark.slow
def test_the_json_adapter_answers_the_schema(tmp_path: Path) -> None:
    server = start_server(tmp_path, embedded_model_dir(), {"json": DEMO / "json"})
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        fmt: Any = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
        answers = {}
        for model in ("json", "base"):
            resp = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "What colour is the sea?"}],
                max_tokens=40,
                temperature=0,
                response_format=fmt,
            )
            answers[model] = (resp.choices[0].message.content or "", resp.choices[0].finish_reason)
        text, finish = answers["json"]
        assert finish == "stop" and json.loads(text) == {"question": "colour of the sea", "answer": "blue"}
        text, finish = answers["base"]  # the base model never learnt the shape: the grammar gives it
        assert finish == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
    finally:
        server.stop()
