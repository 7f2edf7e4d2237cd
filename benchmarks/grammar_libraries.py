"""llguidance, xgrammar and outlines-core side by side on SmolLM2's tokenizer: compile time and per-step mask time
for a batch of matchers walking one JSON Schema (random allowed tokens), and which schema features compile.

Run: ``.venv/bin/python benchmarks/grammar_libraries.py [--batch 64] [--steps 40]``; a library that is not
installed is reported as such (xgrammar: ``pip install --no-deps --target /tmp/xgr xgrammar apache-tvm-ffi``
then ``PYTHONPATH=/tmp/xgr``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loraplex.shard.embedded import embedded_model_dir

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "[0-9]{5}"},
            },
            "required": ["city"],
        },
        "status": {"enum": ["active", "inactive", "banned"]},
    },
    "required": ["name", "age", "status"],
}

# One schema per feature: what each library compiles (a refusal is a missing feature, or a slow one).
FEATURES: dict[str, dict[str, Any]] = {
    "nested objects": {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}},
    },
    "arrays min/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "enum": {"enum": ["red", "green", 3]},
    "const": {"const": "fixed"},
    "integer bounds": {"type": "integer", "minimum": -5, "maximum": 1000},
    "number bounds": {"type": "number", "minimum": 0.5, "exclusiveMaximum": 10},
    "optional fields": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "boolean"}}},
    "anyOf": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "oneOf": {"oneOf": [{"type": "string"}, {"type": "null"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]},
    "$ref/$defs": {"$defs": {"p": {"type": "integer"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/p"}}},
    "recursive $ref": {
        "$defs": {"n": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}},
        "$ref": "#/$defs/n",
    },
    "string pattern": {"type": "string", "pattern": "^[a-z]{2,4}-[0-9]+$"},
    "string format date-time": {"type": "string", "format": "date-time"},
    "minLength/maxLength": {"type": "string", "minLength": 2, "maxLength": 5},
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "patternProperties": {"type": "object", "patternProperties": {"^x-": {"type": "string"}}},
    "type list": {"type": ["string", "null"]},
}


class Library(Protocol):
    """One grammar library: compile a schema, make matchers, fill a batch bitmask, advance a matcher."""

    name: str

    def compile(self, schema: dict[str, Any]) -> Any: ...
    def matcher(self, compiled: Any) -> Any: ...
    def fill(self, matchers: list[Any], bitmask: np.ndarray) -> None: ...
    def advance(self, matcher: Any, token: int) -> None: ...
    def finished(self, matcher: Any) -> bool: ...


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, model_dir: Path, vocab: int, eos: int) -> None:
        import llguidance

        self.ll = llguidance
        self.tok = llguidance.LLTokenizer((model_dir / "tokenizer.json").read_text(), n_vocab=vocab, eos_token=eos)
        self.executor = llguidance.LLExecutor()

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        error = self.ll.LLMatcher.validate_grammar(grammar, self.tok)
        if error:
            raise ValueError(error)
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.ll.LLMatcher(self.tok, compiled)

    def fill(self, matchers: list[Any], bitmask: np.ndarray) -> None:
        from llguidance.numpy import fill_next_token_bitmask_par

        fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def advance(self, matcher: Any, token: int) -> None:
        matcher.consume_token(token)

    def finished(self, matcher: Any) -> bool:
        return bool(matcher.is_stopped() or matcher.is_error())


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, model_dir: Path, vocab: int, eos: int) -> None:
        import xgrammar
        from transformers import AutoTokenizer

        self.xg = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(
            AutoTokenizer.from_pretrained(model_dir), vocab_size=vocab, stop_token_ids=[eos]
        )
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.batch = xgrammar.BatchGrammarMatcher()

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema))

    def matcher(self, compiled: Any) -> Any:
        return self.xg.GrammarMatcher(compiled)

    def fill(self, matchers: list[Any], bitmask: np.ndarray) -> None:
        import torch

        self.batch.batch_fill_next_token_bitmask(matchers, torch.from_numpy(bitmask))

    def advance(self, matcher: Any, token: int) -> None:
        matcher.accept_token(token)

    def finished(self, matcher: Any) -> bool:
        return bool(matcher.is_terminated())


class OutlinesCore(Library):
    name = "outlines-core"

    def __init__(self, model_dir: Path, vocab: int, eos: int) -> None:
        import outlines_core
        from tokenizers import Tokenizer

        self.oc = outlines_core
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        decoder = _byte_decoder()
        table: dict[bytes, list[int]] = {}
        for text, i in tok.get_vocab().items():
            if i == eos or i in tok.get_added_tokens_decoder():
                continue
            raw = bytes(decoder[c] for c in text) if all(c in decoder for c in text) else text.encode()
            table.setdefault(raw, []).append(i)
        self.vocab = outlines_core.Vocabulary(eos, table)
        self.eos = eos

    def compile(self, schema: dict[str, Any]) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, matchers: list[Any], bitmask: np.ndarray) -> None:
        for i, m in enumerate(matchers):  # outlines-core has no batch call: one row at a time
            row = bitmask[i]
            m.write_mask_into(row.ctypes.data, row.size, row.itemsize)

    def advance(self, matcher: Any, token: int) -> None:
        matcher.advance(token)

    def finished(self, matcher: Any) -> bool:
        return bool(matcher.is_finished())


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: what the BPE vocabulary's characters stand for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def allowed(bitmask_row: np.ndarray, vocab: int) -> np.ndarray:
    bits = np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(lib: Library, batch: int, steps: int, vocab: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    compile_s, compiled = timed(lambda: lib.compile(SCHEMA))
    matchers = [lib.matcher(compiled) for _ in range(batch)]
    bitmask = np.zeros((batch, (vocab + 31) // 32), dtype=np.int32)
    times = []
    for _ in range(steps):
        elapsed, _ = timed(lambda: lib.fill(matchers, bitmask))
        times.append(elapsed)
        for i, m in enumerate(matchers):
            ids = allowed(bitmask[i], vocab)
            if lib.finished(m) or len(ids) == 0:
                matchers[i] = lib.matcher(compiled)
                continue
            lib.advance(m, int(rng.choice(ids)))
    features = {}
    for name, schema in FEATURES.items():
        try:
            start = time.perf_counter()
            lib.compile(schema)
            features[name] = f"{(time.perf_counter() - start) * 1e3:.0f} ms"
        except Exception as exc:
            features[name] = f"refused: {str(exc).splitlines()[0][:80]}"
    return {
        "library": lib.name,
        "compile_ms": round(compile_s * 1e3, 1),
        "mask_ms_per_step_median": round(statistics.median(times) * 1e3, 3),
        "mask_us_per_sequence": round(statistics.median(times) * 1e6 / batch, 1),
        "features": features,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model_dir = embedded_model_dir()
    config = json.loads((model_dir / "config.json").read_text())
    vocab, eos = int(config["vocab_size"]), int(config["eos_token_id"])
    results = []
    libraries: tuple[type[LLGuidance | XGrammar | OutlinesCore], ...] = (LLGuidance, XGrammar, OutlinesCore)
    for cls in libraries:
        start = time.perf_counter()
        try:
            lib = cls(model_dir, vocab, eos)
        except ImportError as exc:
            results.append({"library": cls.name, "error": f"not installed: {exc}"})
            continue
        result = measure(lib, args.batch, args.steps, vocab, args.seed)
        result["tokenizer_setup_ms"] = round((time.perf_counter() - start) * 1e3, 1)
        results.append(result)
        print(json.dumps(result, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
