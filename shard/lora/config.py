"""PEFT LoRA configuration: parsed, checked against what loraplex supports, resolved per module."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.shard.lora.patterns import PATTERN_SECONDS, PatternError, check_patterns, match_names
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

    def resolve(self, num_layers: int, timeout: float = PATTERN_SECONDS) -> dict[tuple[int, str], tuple[int, float]]:
        """The modules PEFT adapts, ``(layer, projection) -> (rank, scaling)``, with its rules for
        ``target_modules``, ``layers_to_transform`` and the patterns; regular expressions are matched in at
        most ``timeout`` seconds (``shard/lora/patterns.py``), else the adapter is refused."""
        modules = [(layer, proj) for layer in range(num_layers) for proj in PROJECTIONS]
        names = [f"model.layers.{layer}.{PROJECTIONS[proj].module}.{proj}" for layer, proj in modules]
        others = [name for other in _OTHER_MODULES for name in (f"model.{other}", other)]
        target = self.target_modules if isinstance(self.target_modules, str) else None
        rank_keys, alpha_keys = list(self.rank_pattern), list(self.alpha_pattern)
        try:
            found = match_names([*names, *others], target, rank_keys, alpha_keys, timeout)
        except PatternError as exc:
            raise AdapterError(exc.kind, str(exc)) from exc
        if found.target is not None:
            hit = [name for name, ok in zip(others, found.target[len(names) :], strict=True) if ok]
            if hit:
                raise AdapterError(
                    "unsupported_target",
                    f"target_modules matches {hit[-1]!r}; only {', '.join(PROJECTIONS)} can be adapted",
                )
        out: dict[tuple[int, str], tuple[int, float]] = {}
        for i, (layer, proj) in enumerate(modules):
            if not self._targets(names[i], layer, None if found.target is None else found.target[i]):
                continue
            r = self.rank_pattern[rank_keys[found.rank[i]]] if found.rank[i] >= 0 else self.r
            alpha = self.alpha_pattern[alpha_keys[found.alpha[i]]] if found.alpha[i] >= 0 else self.lora_alpha
            out[(layer, proj)] = (r, alpha / math.sqrt(r) if self.use_rslora else alpha / r)
        return out

    def _targets(self, name: str, layer: int, regex_match: bool | None) -> bool:
        """PEFT's ``check_target_module_exists``: a string is a full match; a list entry is the name or its
        dotted suffix, and only a suffix match is then restricted to ``layers_to_transform``."""
        if regex_match is not None:
            return regex_match
        if name in self.target_modules:
            return True
        if not any(name.endswith(f".{t}") for t in self.target_modules):
            return False
        return self.layers_to_transform is None or layer in self.layers_to_transform


def _check_targets(targets: Any) -> tuple[str, ...] | str:
    if targets == "all-linear":
        return tuple(PROJECTIONS)
    if isinstance(targets, str):
        # Compiled and matched later, in bounded time (``LoraConfig.resolve``): here only its size is checked.
        _checked("target_modules", [targets])
        return targets
    if not isinstance(targets, list | tuple) or not targets:
        raise AdapterError("bad_config", "target_modules must be a non-empty list or a regular expression")
    _checked("target_modules", list(targets))
    bad = [t for t in targets if not isinstance(t, str) or t.rsplit(".", 1)[-1] not in PROJECTIONS]
    if bad:
        raise AdapterError(
            "unsupported_target",
            f"target_modules {bad} do not exist in this architecture; supported: {', '.join(PROJECTIONS)}",
        )
    return tuple(targets)


def _checked(where: str, patterns: list[Any]) -> None:
    try:
        check_patterns(where, patterns)
    except PatternError as exc:
        raise AdapterError(exc.kind, str(exc)) from exc


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
    _checked("rank_pattern", list(rank_pattern))
    _checked("alpha_pattern", list(alpha_pattern))
    targets = _check_targets(raw.get("target_modules"))
    if isinstance(targets, str) and layers is not None:
        raise AdapterError(
            "bad_config", "layers_to_transform cannot be used when target_modules is a regular expression (as in PEFT)"
        )
    try:
        ranks = {str(k): int(v) for k, v in rank_pattern.items()}
        alphas = {str(k): float(v) for k, v in alpha_pattern.items()}
    except (TypeError, ValueError) as exc:
        raise AdapterError("bad_config", f"rank_pattern values must be integers, alpha_pattern numbers: {exc}") from exc
    if any(v < 1 for v in ranks.values()):
        raise AdapterError("bad_config", "rank_pattern ranks must be at least 1")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=targets,
        layers_to_transform=tuple(int(x) for x in layers) if layers is not None else None,
        rank_pattern=ranks,
        alpha_pattern=alphas,
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
