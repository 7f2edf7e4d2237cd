"""One request's own work in a batch step: its shard message, its generated token, when it is done, its end event."""

from __future__ import annotations

from loraplex.common.messages import to_message
from loraplex.proto.shard.v1 import shard_pb2 as pb
from loraplex.router.events import EndEvent, TokenEvent, TokenInfo
from loraplex.router.inflight import InFlightRequest
from loraplex.router.metrics import Metrics
from loraplex.router.tokenizer import TextTokenizer


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


def take_token(
    e: InFlightRequest, g: pb.Generation, now: float, tokenizer: TextTokenizer, eos_ids: set[int], metrics: Metrics
) -> EndEvent | None:
    """One generated token of ``e``: its text, its event and metrics; the end event when it ends the request."""
    if g.prefill_tokens:
        e.prefill = [token_info(tokenizer, t.id, t.logprob) for t in g.prefill_tokens]
    e.prefilling, e.prompt_left = False, 0  # a token: its prompt has all run (maybe ended early by the cache)
    if not e.generated and not e.cached_tokens:
        e.cached_tokens = g.cached_tokens
    if e.generated:
        metrics.inter_token_latency.observe(now - e.last_token_at)
    else:
        metrics.time_to_first_token.observe(now - e.queued_at)
    e.last_token_at = now
    token = token_info(tokenizer, g.token.id, g.token.logprob)
    e.generated.append(token.id)
    if not token.special:  # its text is what it completes (nothing while a character is split across tokens)
        token = TokenInfo(token.id, e.stream.push(tokenizer, token.id), token.logprob, token.special)
    reason = finish_reason(e, token, eos_ids)
    if reason:  # a character left incomplete at the end is text too, as decoding everything gives it
        rest = e.stream.finish(tokenizer)
        if rest and not token.special:  # after a special token it is in generated_text only
            token = TokenInfo(token.id, token.text + rest, token.logprob, token.special)
    tops = [token_info(tokenizer, t.id, t.logprob) for t in g.top_tokens]
    e.tokens.append(token)
    e.top_tokens.append(tops)
    e.events.put_nowait(TokenEvent(len(e.tokens), token, tops))
    metrics.output_tokens.inc()
    metrics.adapter_tokens.labels(e.params.adapter_id or "base").inc()
    return end_event(e, reason) if reason else None


def token_info(tokenizer: TextTokenizer, token_id: int, logprob: float) -> TokenInfo:
    return TokenInfo(token_id, tokenizer.token_text(token_id), logprob, token_id in tokenizer.special_ids)


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
