"""Request validation with TGI's rules and messages; the result is what the scheduler and shards need."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

from loraplex.common.sampling import SamplingParams
from loraplex.router.settings import RouterSettings

DEFAULT_MAX_NEW_TOKENS = 100


class ValidationError(ValueError):
    """A request TGI would answer with 422 ``validation``."""


@dataclass(frozen=True)
class GenerateParameters(SamplingParams):
    """Validated parameters of one generation request: the sampling knobs, then the rest of TGI's and OpenAI's."""

    adapter_id: str = ""
    max_new_tokens: int | None = None  # None: up to DEFAULT_MAX_NEW_TOKENS, within max_total_tokens
    stop: tuple[str, ...] = ()
    return_full_text: bool = False
    truncate: int | None = None
    details: bool = False
    top_n_tokens: int = 0
    decoder_input_details: bool = False
    ignore_eos: bool = False  # vLLM's: EOS ends nothing (min_tokens, the other one, is a sampling knob)
    extra: dict[str, Any] = field(default_factory=dict)


# What the shard protocol's fields hold (proto/loraplex/shard/v1/shard.proto): a value past them would fail
# while the scheduler builds a batch, and with it every request in that batch, so each is refused here.
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
I32_MAX = 2**31 - 1  # TGI's top_k is an i32
FLOAT32_MAX = 3.4028234663852886e38
# Below this temperature every draw is the argmax but for exact ties, while logits / temperature overflow
# float32 from about 1e-37 on; so smaller (positive) temperatures are raised to it rather than refused,
# TGI's clients sending tiny temperatures to mean "greedy".
MIN_TEMPERATURE = 1e-4
# Penalties past these scale scores by more than 10^4, which overflows float32 for large logits and means
# nothing more than "never" or "always" anyway.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-4, 1e4


def _number(params: dict[str, Any], name: str, kind: type) -> Any:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"`{name}` must be a number")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():  # NaN and infinities included
            raise ValidationError(f"`{name}` must be an integer")
        return int(value)
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:  # the wire's floats are 32-bit
        raise ValidationError(f"`{name}` must be a finite number within a 32-bit float's range")
    return float(value)


def _at_most(name: str, value: int, limit: int) -> int:
    if value > limit:
        raise ValidationError(f"`{name}` must be <= {limit}. Given: {value}")
    return value


def validate_parameters(params: dict[str, Any], settings: RouterSettings) -> GenerateParameters:
    """TGI's checks, in TGI's words, on the ``parameters`` object of a request."""
    if not isinstance(params, dict):
        raise ValidationError("`parameters` must be an object")
    out: dict[str, Any] = {}
    if (v := _number(params, "temperature", float)) is not None:
        if v <= 0:
            raise ValidationError("`temperature` must be strictly positive")
        out["temperature"] = max(v, MIN_TEMPERATURE)
    if (v := _number(params, "repetition_penalty", float)) is not None:
        if v <= 0:
            raise ValidationError("`repetition_penalty` must be strictly positive")
        if not MIN_REPETITION_PENALTY <= v <= MAX_REPETITION_PENALTY:
            raise ValidationError(
                f"`repetition_penalty` must be >= {MIN_REPETITION_PENALTY} and <= {MAX_REPETITION_PENALTY:g}. "
                f"Given: {v}"
            )
        out["repetition_penalty"] = v
    if (v := _number(params, "frequency_penalty", float)) is not None:
        if not -2.0 <= v <= 2.0:
            raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
        out["frequency_penalty"] = v
    for name in ("top_p", "typical_p"):
        if (v := _number(params, name, float)) is not None:
            if not 0.0 < v < 1.0:
                raise ValidationError(f"`{name}` must be > 0.0 and < 1.0")
            out[name] = v
    if (v := _number(params, "top_k", int)) is not None:
        if v <= 0:
            raise ValidationError("`top_k` must be strictly positive")
        out["top_k"] = _at_most("top_k", v, I32_MAX)
    if (v := _number(params, "max_new_tokens", int)) is not None:
        if v <= 0:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        out["max_new_tokens"] = _at_most("max_new_tokens", v, U32_MAX)
    if (v := _number(params, "truncate", int)) is not None:
        if not 0 < v <= settings.max_input_tokens:
            raise ValidationError(
                f"`truncate` must be strictly positive and less than {settings.max_input_tokens}. Given: {v}"
            )
        out["truncate"] = v
    if (v := _number(params, "top_n_tokens", int)) is not None:
        if not 0 <= v <= settings.max_top_n_tokens:
            raise ValidationError(f"`top_n_tokens` must be >= 0 and <= {settings.max_top_n_tokens}. Given: {v}")
        out["top_n_tokens"] = v
    if (v := _number(params, "seed", int)) is not None:
        if not 0 <= v <= U64_MAX:
            raise ValidationError("`seed` must be >= 0 and < 2^64")
        out["seed"] = v
    if (v := _number(params, "min_tokens", int)) is not None:
        if v < 0:
            raise ValidationError("`min_tokens` must be >= 0")
        _at_most("min_tokens", v, U32_MAX)
        if v > out.get("max_new_tokens", v):
            raise ValidationError(f"`min_tokens` must be <= `max_new_tokens`. Given: {v} and {out['max_new_tokens']}")
        out["min_tokens"] = v
    best_of = _number(params, "best_of", int)
    if best_of is not None and best_of != 1:
        raise ValidationError("`best_of` is not supported by loraplex; use separate requests")
    from loraplex.router.grammar import tgi_grammar  # here: that module builds on this one's ValidationError

    out["grammar_type"], out["grammar"] = tgi_grammar(params.get("grammar"))
    stop = params.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ValidationError("`stop` must be a list of strings")
    if len(stop) > settings.max_stop_sequences:
        raise ValidationError(f"`stop` supports up to {settings.max_stop_sequences} stop sequences. Given: {len(stop)}")
    out["stop"] = tuple(s for s in stop if s)
    for name in ("do_sample", "return_full_text", "details", "decoder_input_details", "ignore_eos"):
        value = params.get(name)
        if value is not None:
            if not isinstance(value, bool):
                raise ValidationError(f"`{name}` must be a boolean")
            out[name] = value
    adapter = params.get("adapter_id")
    if adapter is not None and not isinstance(adapter, str):
        raise ValidationError("`adapter_id` must be a string")
    out["adapter_id"] = adapter or ""
    if out["grammar_type"] and (out.get("ignore_eos") or out.get("min_tokens")):
        # The EOS is what says a constrained answer is complete: it can be neither ignored nor held back.
        raise ValidationError("`grammar` cannot be combined with `ignore_eos` or `min_tokens`")
    result = GenerateParameters(**out)
    if result.sampling and "seed" not in out:
        result = GenerateParameters(**{**out, "seed": random.getrandbits(63)})
    return result


def check_lengths(input_len: int, params: GenerateParameters, settings: RouterSettings) -> int:
    """The request's max_new_tokens after TGI's length checks (inputs already truncated)."""
    if input_len == 0:
        raise ValidationError("`inputs` cannot be empty")
    if input_len > settings.max_input_tokens:
        raise ValidationError(f"`inputs` must have less than {settings.max_input_tokens} tokens. Given: {input_len}")
    if params.max_new_tokens is None:
        max_new = max(1, min(DEFAULT_MAX_NEW_TOKENS, settings.max_total_tokens - input_len))
        if params.min_tokens <= max_new:
            return max_new
        # The default gives way to a larger min_tokens, within max_total_tokens like an explicit max_new_tokens.
        name, max_new = "min_tokens", params.min_tokens
    else:
        name, max_new = "max_new_tokens", params.max_new_tokens
    if input_len + max_new > settings.max_total_tokens:
        raise ValidationError(
            f"`inputs` tokens + `{name}` must be <= {settings.max_total_tokens}. "
            f"Given: {input_len} `inputs` tokens and {max_new} `{name}`"
        )
    return max_new


def unicode_problem(value: Any, where: str = "the request body") -> str | None:
    """Why ``value`` (a parsed JSON body, keys included) is not valid Unicode text, or None when it is.

    JSON can spell a lone surrogate ("\\ud800"); Python keeps it in a str, but no tokenizer, template or UTF-8
    encoder takes it, so it is refused here, before the request touches any of them.
    """
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:  # no recursion: the body may be as deep as the JSON parser allowed
        item, path = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as exc:
                    bad = ord(item[exc.start])
                    return f"{path} is not valid Unicode: it holds a lone surrogate (U+{bad:04X})"
        elif isinstance(item, dict):
            for key, inner in item.items():
                stack.append((key, f"a key of {path}"))
                named = path == where and isinstance(key, str) and key.isascii()  # the message must encode too
                stack.append((inner, f"`{key}`" if named else path))
        elif isinstance(item, list):
            stack.extend((inner, path) for inner in item)
    return None


def chat_messages(raw: Any) -> list[dict[str, str]]:
    """OpenAI ``messages`` as the chat template gets them: ``role`` and ``content``, both strings.

    ``content`` may be OpenAI's content parts: the text parts are joined (as TGI does); any other part is
    refused, this server's models taking text only. Other keys are dropped: templates see checked strings only.
    """
    if not isinstance(raw, list) or not raw or not all(isinstance(m, dict) for m in raw):
        raise ValidationError("`messages` must be a non-empty list of objects")
    out = []
    for i, message in enumerate(raw):
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValidationError(f"`messages[{i}].role` must be a non-empty string")
        content = message.get("content")
        calls = message.get("tool_calls")
        if content is None and isinstance(calls, list):  # an earlier tool call: the template sees it as its JSON
            functions = [c.get("function") for c in calls if isinstance(c, dict)]
            content = json.dumps([{"name": f.get("name"), "arguments": f.get("arguments")} for f in functions if f])
        out.append({"role": role, "content": _content(content, f"messages[{i}].content")})
    return out


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValidationError(f"`{where}` must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            shown = f"of type {ascii(kind)[:40]}" if isinstance(kind, str) else "without a type"
            raise ValidationError(f"`{where}[{j}]`: this model takes text only; content parts {shown} are refused")
        text = part.get("text")
        if not isinstance(text, str):
            raise ValidationError(f"`{where}[{j}].text` must be a string")
        texts.append(text)
    return "".join(texts)
