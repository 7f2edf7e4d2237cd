"""A generation request from admission to its last event: what the scheduler queues, batches and answers."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from loraplex.router.detokenize import TextStream
from loraplex.router.events import EndEvent, Event, TokenInfo
from loraplex.router.validation import GenerateParameters


class Overloaded(RuntimeError):
    """More requests than --max-concurrent-requests are in flight."""


@dataclass(eq=False)
class InFlightRequest:
    """One request, queued or running; its client reads ``events`` until an end or an error."""

    input_ids: list[int]
    params: GenerateParameters
    max_new_tokens: int
    id: int = 0
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)
    tokens: list[TokenInfo] = field(default_factory=list)
    top_tokens: list[list[TokenInfo]] = field(default_factory=list)
    prefill: list[TokenInfo] = field(default_factory=list)
    stream: TextStream = field(default_factory=TextStream)  # the generated text, grown token by token
    cancelled: bool = False
    finished: bool = False
    released: bool = False
    end: EndEvent | None = None
    queued_at: float = field(default_factory=time.monotonic)
    last_token_at: float = 0.0
    tenant: str = ""  # the name of the API key's tenant ("" without tenancy)
    preemptions: int = 0  # times its KV blocks were taken back for older requests (it was recomputed)
    cached_tokens: int = 0  # prompt tokens the shards found in their prefix cache (first prefill's count)
    # Chunked prefill, as the router sees it (docs/serving.md): whether the prompt still runs (no token yet),
    # the prompt tokens the shards are expected to compute still, those sent so far, and those expected cached.
    prefilling: bool = False
    prompt_left: int = 0
    prompt_sent: int = 0
    prompt_cached: int = 0
    prefix_hashes: list[int] = field(default_factory=list)  # the prompt's full blocks (router/prefix_estimate.py)

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def prompt_ids(self) -> list[int]:
        """What a prefill runs: the input, and after a preemption the tokens generated so far."""
        return self.input_ids + self.generated if self.generated else self.input_ids

    @property
    def length(self) -> int:
        """Tokens of the sequence on the shard: input and generated (the newest not run yet)."""
        return len(self.input_ids) + len(self.generated)
