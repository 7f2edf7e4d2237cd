"""One request's own work in a batch step: its shard message, when it is done, and its end event."""

from __future__ import annotations

from loraplex.common.messages import to_message
from loraplex.proto.shard.v1 import shard_pb2 as pb
from loraplex.router.events import EndEvent, TokenInfo
from loraplex.router.inflight import InFlightRequest


def shard_request(e: InFlightRequest, chunk: int = 0) -> pb.Request:
    """The request as the shards take it, its first ``chunk`` prompt tokens to run now (0: all of them); raises
    (ValueError, TypeError) when a field does not fit its message."""
    return pb.Request(
        prefill_chunk=chunk,
        id=e.id,
        input_ids=e.prompt_ids,
        adapter_id=e.params.adapter_id,
        sampling=to_message(pb.SamplingParameters, e.params),
        top_n_tokens=e.params.top_n_tokens,
        prefill_logprobs=e.params.decoder_input_details and not e.generated,
        generated_tokens=len(e.generated),
    )


def finish_reason(e: InFlightRequest, token: TokenInfo, eos_ids: set[int]) -> str | None:
    """Why the request ends with ``token`` (already appended), or None while it goes on.

    vLLM's ignore_eos and min_tokens: an EOS ends the answer only after min_tokens other tokens (the shard masks
    it before), a stop sequence from min_tokens on, counted where it ends in this token's text.
    """
    early = len(e.generated) < e.params.min_tokens
    fresh = 0 if token.special else len(token.text)
    if token.id in eos_ids and not e.params.ignore_eos and len(e.generated) > e.params.min_tokens:
        return "eos_token"
    if not early and any(s in e.stream.recent(fresh + len(s) - 1) for s in e.params.stop):
        return "stop_sequence"
    if len(e.generated) >= e.max_new_tokens:
        return "length"
    return None


def end_event(e: InFlightRequest, reason: str) -> EndEvent:
    return EndEvent(
        generated_text=e.text,
        finish_reason=reason,
        generated_tokens=len(e.generated),
        seed=e.params.seed if e.params.sampling else None,
        prefill=e.prefill,
        tokens=e.tokens,
        top_tokens=e.top_tokens,
        cached_tokens=e.cached_tokens,
    )
