"""``loraplex-generate``: one chat prompt through the shard runtime in-process, with or without an adapter."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loraplex.shard.checkpoint import CheckpointError, resolve_model_dir
from loraplex.shard.config import ModelConfigError
from loraplex.shard.embedded import EmbeddedModelError, embedded_model_dir
from loraplex.shard.lora.config import AdapterError
from loraplex.shard.lora.store import AdapterStore
from loraplex.shard.runner import build_runner, parse_dtype


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraplex-generate", description=__doc__)
    p.add_argument("prompt", help="the user message")
    p.add_argument("--model-id", default=None, help="checkpoint directory or hub id (default: embedded SmolLM2)")
    p.add_argument("--adapter", default=None, metavar="DIR", help="a PEFT LoRA adapter directory to apply")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from transformers import AutoTokenizer

        model_dir = resolve_model_dir(args.model_id) if args.model_id else embedded_model_dir()
        runner = build_runner(model_dir, dtype=parse_dtype(args.dtype, "cpu"), kv_blocks=256)
        adapter = None
        if args.adapter:
            store = AdapterStore(runner.model.config, dtype=runner.model.dtype)
            adapter = store.load(Path(args.adapter).name, Path(args.adapter))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        messages = [{"role": "user", "content": args.prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    except (CheckpointError, ModelConfigError, EmbeddedModelError, AdapterError, ValueError) as exc:
        print(f"loraplex-generate: {exc}", file=sys.stderr)
        return 2
    out = runner.generate_greedy([(ids, adapter)], args.max_new_tokens)[0]
    eos = set(runner.model.config.eos_token_ids)
    cut = next((i for i, t in enumerate(out) if t in eos), len(out))
    print(tokenizer.decode(out[:cut]))
    return 0
