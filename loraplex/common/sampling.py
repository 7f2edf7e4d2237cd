"""TGI's sampling knobs, and vLLM's min_tokens, with neutral defaults: what the router checks and the shard applies."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """The defaults are greedy decoding; any warper (temperature, top_k, top_p, typical_p) implies sampling,
    as in TGI."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    seed: int = 0
    # Until this many tokens are generated the shard masks the EOS ids (vLLM's min_tokens); 0: no floor.
    min_tokens: int = 0
    # Structured output: "" (none), "json" (grammar: a JSON Schema) or "regex" (grammar: a pattern).
    grammar_type: str = ""
    grammar: str = ""

    @property
    def sampling(self) -> bool:
        warped = self.temperature != 1.0 or self.top_k > 0 or self.top_p < 1.0 or self.typical_p < 1.0
        return self.do_sample or warped

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
