"""Builders for the tests: tiny random checkpoints of each architecture and PEFT adapters for them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from loraplex.shard.config import ModelConfig

TINY: dict[str, dict[str, Any]] = {
    "llama": dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama_tied_linear": dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=6,
        vocab_size=96,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
    ),
    "mistral": dict(
        model_type="mistral",
        architectures=["MistralForCausalLM"],
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=100,
        max_position_embeddings=256,
        sliding_window=None,
    ),
    # A window shorter than the test prompts, so that a model ignoring it would diverge.
    "mistral_sliding": dict(
        model_type="mistral",
        architectures=["MistralForCausalLM"],
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=256,
        sliding_window=4,
    ),
    # Every projection with a bias (o_proj's included), as Llama's attention_bias and mlp_bias give.
    "llama_biases": dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=256,
        attention_bias=True,
        mlp_bias=True,
    ),
    "qwen2": dict(
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=120,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
}


def tiny_model(directory: Path, kind: str = "llama", seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """Save a random tiny checkpoint of ``kind`` in ``directory``; returns the transformers model (float32)."""
    spec = {**TINY[kind], **overrides}
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, initializer_range=0.08, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # random biases (transformers starts them at zero), so that a missing one would show
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)
    model.eval()
    model.save_pretrained(directory)
    return model


def make_adapter(base: PreTrainedModel, directory: Path, seed: int = 0, **lora: Any) -> Path:
    """Save a PEFT LoRA adapter with random (non-zero) A and B for ``base`` in ``directory``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora)
    peft_model = get_peft_model(_fresh_copy(base), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    peft_model.save_pretrained(directory)
    return directory


def _fresh_copy(model: PreTrainedModel) -> PreTrainedModel:
    copy = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32, attn_implementation="eager")
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def peft_model(base: PreTrainedModel, adapter_dir: Path) -> PreTrainedModel:
    """``base`` with the adapter at ``adapter_dir`` applied by PEFT itself: the oracle."""
    from peft import PeftModel

    return PeftModel.from_pretrained(_fresh_copy(base), str(adapter_dir)).eval()


@torch.no_grad()
def hf_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by full forward passes: no cache, nothing clever, the reference."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of France? Paris is the capital of France.",
    "hello world, answer in json, talk like a pirate, réponds en français",
    "0123456789 {}[]:,\"' !?.-_",
]


def tiny_tokenizer(directory: Path, vocab_size: int = 320) -> dict[str, int]:
    """A byte-level BPE tokenizer with ChatML special tokens, saved like a HF checkpoint's; returns special ids."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": None, "eos_token": "<|im_end|>", "add_bos_token": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return {"eos": tok.token_to_id("<|im_end|>"), "vocab": tok.get_vocab_size()}


def tiny_served_model(directory: Path, kind: str = "llama", seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny random checkpoint with a tokenizer, ready for a shard and a router."""
    ids = tiny_tokenizer(directory)
    return tiny_model(
        directory, kind, seed=seed, vocab_size=max(ids["vocab"], 128), eos_token_id=ids["eos"], **overrides
    )


def write_raw_adapter(
    directory: Path,
    model_dir: Path,
    *,
    rank: int,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    std: float = 0.3,
) -> Path:
    """A PEFT-format adapter for the checkpoint in ``model_dir``, written without PEFT: fast for thousands."""
    from loraplex.bench.adapters import write_adapter
    from loraplex.shard.config import ModelConfig

    config = ModelConfig.from_dir(model_dir)
    return write_adapter(directory, config, rank, targets, seed, std=std)


def attention_config(num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int) -> ModelConfig:
    """A Llama ``ModelConfig`` with just the attention shapes a KV-cache or attention test needs."""
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=32,
        hidden_size=num_heads * head_dim,
        intermediate_size=32,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
