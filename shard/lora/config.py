"""PEFT LoRA configuration: parsed, checked against what loraplex supports, resolved per module."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.shard.projections import PROJECTIONS

# Modules that exist in the architecture but that a LoRA adapter may not target here.
_OTHER_MODULES = (
    "embed_tokens",
    "lm_head",
    "norm",
    "input_layernorm",
    "post_attention_layernorm",
    "rotary_emb",
)


CONFIG_FILE = "adapter_config.json"


class AdapterError(ValueError):
    """An adapter that cannot be served; ``kind`` names the reason in one stable word."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class LoraConfig:
    """The parts of ``adapter_config.json`` that decide how the adapter's weights are applied."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    layers_to_transform: tuple[int, ...] | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    def rank_and_scale(self, module: str) -> tuple[int, float]:
        """Rank and scaling of one module (``model.layers.3.self_attn.q_proj``), honouring the patterns."""
        r = int(self.rank_pattern[key]) if (key := _pattern_key(self.rank_pattern, module)) else self.r
        alpha = float(self.alpha_pattern[key]) if (key := _pattern_key(self.alpha_pattern, module)) else self.lora_alpha
        scale = alpha / math.sqrt(r) if self.use_rslora else alpha / r
        return r, scale

    def transforms_layer(self, layer: int) -> bool:
        return self.layers_to_transform is None or layer in self.layers_to_transform


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """First pattern that matches the end of the module name on a dot boundary (PEFT's rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _check_targets(targets: Any) -> tuple[str, ...] | str:
    if targets == "all-linear":
        return tuple(PROJECTIONS)
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise AdapterError("bad_config", f"target_modules is not a valid regular expression: {exc}") from exc
        for other in _OTHER_MODULES:
            if pattern.fullmatch(f"model.{other}") or pattern.fullmatch(other):
                raise AdapterError(
                    "unsupported_target",
                    f"target_modules matches {other!r}; only {', '.join(PROJECTIONS)} can be adapted",
                )
        return targets
    if not isinstance(targets, list | tuple) or not targets:
        raise AdapterError("bad_config", "target_modules must be a non-empty list or a regular expression")
    bad = [t for t in targets if not isinstance(t, str) or t.rsplit(".", 1)[-1] not in PROJECTIONS]
    if bad:
        raise AdapterError(
            "unsupported_target",
            f"target_modules {bad} do not exist in this architecture; supported: {', '.join(PROJECTIONS)}",
        )
    return tuple(targets)


def parse_config(raw: dict[str, Any]) -> LoraConfig:
    """Validate a PEFT config dict; every unsupported feature is refused with its own ``kind``."""
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError("unsupported_config", f"peft_type {peft_type!r} is not supported; only LORA is")
    if raw.get("use_dora"):
        raise AdapterError("dora", "DoRA adapters (use_dora: true) are not supported")
    if raw.get("modules_to_save"):
        raise AdapterError(
            "modules_to_save",
            f"modules_to_save {raw['modules_to_save']} is not supported: it replaces base weights per adapter",
        )
    if raw.get("bias", "none") != "none" or raw.get("lora_bias"):
        raise AdapterError("bias", f"bias training (bias: {raw.get('bias')!r}) is not supported; use bias: none")
    for unsupported in (
        "layer_replication",
        "trainable_token_indices",
        "target_parameters",
        "use_qalora",
        "alora_invocation_tokens",  # activated LoRA: applies only after an invocation sequence
        "arrow_config",
        "use_bdlora",
    ):
        if raw.get(unsupported):
            raise AdapterError("unsupported_config", f"{unsupported} is not supported")
    try:
        r = int(raw["r"])
        alpha = float(raw.get("lora_alpha", 8))
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterError("bad_config", f"adapter_config.json needs an integer r: {exc!r}") from exc
    if r < 1:
        raise AdapterError("bad_config", f"rank r must be at least 1, got {r}")
    # PEFT treats an absent, null or empty list alike: every layer.
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    layers = layers or None
    if layers is not None and (not isinstance(layers, list) or not all(isinstance(x, int) for x in layers)):
        raise AdapterError("bad_config", f"layers_to_transform must be an integer or a list of integers: {layers!r}")
    rank_pattern = raw.get("rank_pattern") or {}
    alpha_pattern = raw.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise AdapterError("bad_config", "rank_pattern and alpha_pattern must be objects")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=_check_targets(raw.get("target_modules")),
        layers_to_transform=tuple(int(x) for x in layers) if layers is not None else None,
        rank_pattern={str(k): int(v) for k, v in rank_pattern.items()},
        alpha_pattern={str(k): float(v) for k, v in alpha_pattern.items()},
    )


def read_config(directory: Path) -> LoraConfig:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterError("not_found", f"no adapter_config.json in adapter directory {directory.name!r}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError("corrupt", f"adapter_config.json is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise AdapterError("corrupt", "adapter_config.json must hold a JSON object")
    return parse_config(raw)
