"""TGI's sampling knobs, and vLLM's min_tokens, with neutral defaults: what the router checks and the shard applies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GRAMMAR_TYPES = ("json", "regex")
# The longest grammar (a JSON Schema's text, or a pattern) accepted; a longer one is refused before any token.
MAX_GRAMMAR_BYTES = 64 * 1024
# JSON as json.dumps writes it, without free whitespace (which a model, a random one above all, could spend its
# whole budget on); a schema's own "x-guidance" options may still say otherwise.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


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


def llguidance_grammar(grammar_type: str, grammar: str) -> str:
    """The llguidance grammar of a request's ``grammar_type`` and ``grammar``, the same in the router (which checks
    it) and the shard (which enforces it); raises ValueError for a type it does not know or a schema that is not
    a JSON object. A pattern must match the whole output."""
    from llguidance import LLMatcher  # not at import: most users of SamplingParams never need it

    if grammar_type == "json":
        return LLMatcher.grammar_from_json_schema(grammar, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
    if grammar_type == "regex":
        return LLMatcher.grammar_from_regex(grammar)
    raise ValueError(f"unknown grammar type {grammar_type!r}; expected one of {', '.join(GRAMMAR_TYPES)}")
