"""TGI's grammar, OpenAI's response_format and tools as one grammar, compiled as the shards will before any token."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llguidance

from loraplex.common.sampling import GRAMMAR_TYPES, MAX_GRAMMAR_BYTES, llguidance_grammar
from loraplex.router.validation import ValidationError

# Grammars the router has checked, by content: a client repeating its schema pays the compile once. Refusals are
# kept too (their message), so that a client repeating a pathological schema cannot make the router compile it
# again and again.
CHECK_CACHE_SIZE = 1024
# Tool calls are generated as this object; the arguments are streamed as the text after its prefix.
_TOOL_CALL_PREFIX = re.compile(r'\{"name": "((?:[^"\\]|\\.)*)", "arguments": ')


def tgi_grammar(raw: Any) -> tuple[str, str]:
    """TGI's ``parameters.grammar`` (``{"type": "json", "value": <schema>}`` or ``{"type": "regex", "value":
    "<pattern>"}``) as (grammar type, grammar text); ``None`` is no grammar."""
    if raw is None:
        return "", ""
    if not isinstance(raw, dict) or set(raw) - {"type", "value"}:
        raise ValidationError('`grammar` must be an object {"type": "json" | "regex", "value": ...}')
    kind, value = raw.get("type"), raw.get("value")
    if kind not in GRAMMAR_TYPES:
        raise ValidationError(f"`grammar.type` must be one of {', '.join(GRAMMAR_TYPES)}")
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise ValidationError("`grammar.value` must be a non-empty regular expression for type regex")
        return "regex", _bounded(value)
    return "json", schema_text(value, "grammar.value")


def schema_text(schema: Any, where: str) -> str:
    """A JSON Schema (an object, or its JSON text) as the compact JSON text the shards get."""
    if isinstance(schema, str):
        if len(schema.encode()) > MAX_GRAMMAR_BYTES:
            raise ValidationError(f"`{where}` is longer than {MAX_GRAMMAR_BYTES} bytes")
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise ValidationError(f"`{where}` is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise ValidationError(f"`{where}` must be a JSON Schema object")
    return _bounded(json.dumps(schema, separators=(",", ":"), ensure_ascii=False), where)


def _bounded(text: str, where: str = "grammar.value") -> str:
    if len(text.encode()) > MAX_GRAMMAR_BYTES:
        raise ValidationError(f"`{where}` is longer than {MAX_GRAMMAR_BYTES} bytes")
    return text


def response_format_grammar(raw: Any) -> tuple[str, str]:
    """OpenAI's ``response_format``: ``text`` (none), ``json_object`` (any JSON object) or ``json_schema``."""
    if raw is None:
        return "", ""
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "text":
        return "", ""
    if kind == "json_object":
        return "json", '{"type":"object"}'
    if kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ValidationError("`response_format.json_schema` must be an object with a `name` and a `schema`")
        # `strict` or not, the schema is enforced: a grammar never gives a near miss.
        return "json", schema_text(spec.get("schema", {"type": "object"}), "response_format.json_schema.schema")
    raise ValidationError("`response_format.type` must be one of text, json_object, json_schema")


@dataclass(frozen=True)
class ToolChoice:
    """The tools a request forces a call to: the grammar of the call, generated as ``{"name", "arguments"}``."""

    names: tuple[str, ...]
    grammar: str


def tool_choice(tools: Any, choice: Any) -> ToolChoice | None:
    """OpenAI's ``tools`` and ``tool_choice``: ``"required"`` or a named function constrain the answer to a call
    (to any of the tools, or to the named one); ``"none"``, ``"auto"`` or no choice leave the answer free text."""
    if tools is None:
        if choice not in (None, "none"):
            raise ValidationError("`tool_choice` needs `tools`")
        return None
    if not isinstance(tools, list) or not tools:
        raise ValidationError("`tools` must be a non-empty list")
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValidationError(f'`tools[{i}]` must be {{"type": "function", "function": {{"name": ...}}}}')
        params = fn.get("parameters", {"type": "object", "properties": {}, "additionalProperties": False})
        if not isinstance(params, dict):
            raise ValidationError(f"`tools[{i}].function.parameters` must be a JSON Schema object")
        functions[fn["name"]] = params
    if choice in (None, "auto", "none"):
        return None
    if choice == "required":
        names = list(functions)
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise ValidationError(f"`tool_choice` names {ascii(name)[:80]}, which is not in `tools`")
        names = [name]
    else:
        raise ValidationError('`tool_choice` must be "none", "auto", "required" or {"type": "function", ...}')
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": n}, "arguments": functions[n]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for n in names
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return ToolChoice(tuple(names), schema_text(schema, "tools"))


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def split_tool_call(text: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a generated call, or None when the text is not a whole call (cut short)."""
    match = _TOOL_CALL_PREFIX.match(text)
    if match is None or not text.endswith("}"):
        return None
    try:
        json.loads(text)
    except ValueError:
        return None
    return json.loads(f'"{match.group(1)}"'), text[match.end() : -1]


class ToolCallStream:
    """Turns a generated call's text, as it streams, into the function name (once known) and argument pieces.

    The last character seen is held back: it may be the closing brace of the call object, not the arguments'.
    """

    def __init__(self) -> None:
        self.text = ""
        self.name: str | None = None
        self._start = 0
        self._sent = 0

    def feed(self, piece: str) -> tuple[str | None, str]:
        """The name if it became known with this piece (else None), and the argument text now safe to send."""
        self.text += piece
        named = None
        if self.name is None:
            match = _TOOL_CALL_PREFIX.match(self.text)
            if match is None:
                return None, ""
            self.name = named = json.loads(f'"{match.group(1)}"')
            self._start = self._sent = match.end()
        ready = self.text[self._sent : len(self.text) - 1]
        self._sent += len(ready)
        return named, ready

    def finish(self) -> str:
        """The argument text not sent yet, without the call's closing brace."""
        if self.name is None:
            return ""
        rest = self.text[self._sent : len(self.text) - 1] if self.text.endswith("}") else self.text[self._sent :]
        self._sent += len(rest)
        return rest


class GrammarChecker:
    """Compiles grammars as the shards will (same library, same tokenizer) and remembers the verdicts."""

    def __init__(self, tokenizer_json: str, cache_size: int = CHECK_CACHE_SIZE) -> None:
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json)
        self.cache_size = cache_size
        self._verdicts: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, grammar_type: str, grammar: str) -> str | None:
        """The error message ("" when it compiles) of a grammar checked before, else None."""
        with self._lock:
            verdict = self._verdicts.get((grammar_type, grammar))
            if verdict is not None:
                self._verdicts.move_to_end((grammar_type, grammar))
            return verdict

    def check(self, grammar_type: str, grammar: str) -> None:
        """Raises ValidationError with llguidance's message when the grammar does not compile."""
        verdict = self.cached(grammar_type, grammar)
        if verdict is None:
            try:
                matcher = llguidance.LLMatcher(self.tokenizer, llguidance_grammar(grammar_type, grammar), log_level=0)
                verdict = matcher.get_error() if matcher.is_error() else ""
            except Exception as exc:  # whatever llguidance raises, the grammar is the caller's to fix
                verdict = str(exc) or "invalid grammar"
            with self._lock:
                self._verdicts[(grammar_type, grammar)] = verdict
                while len(self._verdicts) > self.cache_size:
                    self._verdicts.popitem(last=False)
        if verdict:
            raise ValidationError(f"`grammar` cannot be compiled: {verdict[:500]}")


_CHECKERS: weakref.WeakKeyDictionary[Any, GrammarChecker] = weakref.WeakKeyDictionary()
_CHECKERS_LOCK = threading.Lock()


def checker_for(tokenizer: Any) -> GrammarChecker:
    """The checker of a ``tokenizers.Tokenizer`` (the router's), built once: llguidance's view of the vocabulary
    takes a few hundred milliseconds to make."""
    with _CHECKERS_LOCK:
        checker = _CHECKERS.get(tokenizer)
        if checker is None:
            checker = _CHECKERS[tokenizer] = GrammarChecker(tokenizer.to_str())
        return checker


async def check_grammar(tokenizer: Any, grammar_type: str, grammar: str) -> None:
    """``GrammarChecker.check`` off the event loop unless its verdict is cached (a compile may take a while)."""
    if not grammar_type:
        return
    known = _CHECKERS.get(tokenizer)
    if known is not None and known.cached(grammar_type, grammar) is not None:
        known.check(grammar_type, grammar)
        return
    await asyncio.to_thread(lambda: checker_for(tokenizer).check(grammar_type, grammar))


async def check_parameters(service: Any, params: Any) -> None:
    """The request's grammar checked against the router's tokenizer (the shards'); raises ValidationError."""
    if params.grammar_type:
        await check_grammar(service.vocabulary, params.grammar_type, params.grammar)
