"""What a request in flight yields to its client: tokens as they come, then one end or one error."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenInfo:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass(frozen=True)
class TokenEvent:
    index: int
    token: TokenInfo
    top_tokens: list[TokenInfo]


@dataclass(frozen=True)
class EndEvent:
    generated_text: str
    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[TokenInfo]
    tokens: list[TokenInfo]
    top_tokens: list[list[TokenInfo]]
    # Prompt tokens whose KV came from the shards' prefix cache (OpenAI's usage.prompt_tokens_details).
    cached_tokens: int = 0


@dataclass(frozen=True)
class ErrorEvent:
    message: str
    error_type: str = "generation"


Event = TokenEvent | EndEvent | ErrorEvent
