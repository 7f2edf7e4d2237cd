"""The embedded SmolLM2: converted from its GGUF once, reloaded from the cache, and it knows Paris."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.shard.embedded import _DONE_MARKER, embedded_model_dir
from loraplex.shard.runner import build_runner


@pytest.mark.slow
def test_converts_once_reloads_from_cache_and_answers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model_dir = embedded_model_dir(tmp_path, progress=False)
    assert (model_dir / "model.safetensors").is_file() and (model_dir / _DONE_MARKER).is_file()
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert embedded_model_dir(tmp_path, progress=False) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not converted again

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    runner = build_runner(model_dir, kv_blocks=64, block_size=16)
    answer = tokenizer.decode(runner.generate_greedy([(ids, None)], 16)[0])
    assert "Paris" in answer, answer
