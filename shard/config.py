"""Model configuration: one dataclass read from a checkpoint's config.json for every supported architecture."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ModelConfigError(ValueError):
    """The checkpoint's configuration is missing, malformed or describes an unsupported model."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything the Llama-family model needs to know about a checkpoint."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else ""
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"unsupported architecture {arch or '(none given)'!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            rope_theta, rope_scaling = _rope(raw)
            sliding = _sliding_window(arch, raw)
            eos = raw.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v biases; Llama/Mistral configs say so explicitly.
                attention_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                sliding_window=sliding,
                eos_token_ids=eos_ids,
                bos_token_id=raw.get("bos_token_id"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ModelConfigError):
                raise
            raise ModelConfigError(f"malformed model config: {exc!r}") from exc

    @classmethod
    def from_dir(cls, path: Path) -> ModelConfig:
        cfg = path / "config.json"
        if not cfg.is_file():
            raise ModelConfigError(f"no config.json in {path}")
        try:
            raw = json.loads(cfg.read_text())
        except json.JSONDecodeError as exc:
            raise ModelConfigError(f"{cfg} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)


def _sliding_window(arch: str, raw: dict[str, Any]) -> int | None:
    """The attention window, as transformers reads it for each architecture (None: full attention)."""
    if arch == "MistralForCausalLM":
        # MistralConfig's own default applies when the key is absent; an explicit null means full attention.
        mistral_window = raw.get("sliding_window", 4096)
        return int(mistral_window) if mistral_window else None
    if arch == "Qwen2ForCausalLM":
        layers = int(raw["num_hidden_layers"])
        if not raw.get("use_sliding_window", False) or int(raw.get("max_window_layers", layers)) >= layers:
            return None
        # Qwen2 slides only on the layers from max_window_layers on; one window for all layers would be wrong.
        raise ModelConfigError(
            "Qwen2 with use_sliding_window: true and max_window_layers below num_hidden_layers "
            "(sliding attention on some layers only) is not supported"
        )
    window = raw.get("sliding_window")
    return int(window) if window else None


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Rope theta and scaling from either the transformers 4 or the transformers 5 layout."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = dict(params)
        theta = float(scaling.pop("rope_theta"))
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = dict(raw.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(f"unsupported rope scaling {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    scaling["rope_type"] = rope_type
    return theta, scaling
