"""Grammars in the shard's sampler: whatever the logits (random ones, a random model's), the output is valid and ends
only when complete; a resumed request's matcher continues where it was; masks never touch unconstrained rows."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer

from loraplex.shard.grammar import GrammarCompiler, GrammarError
from loraplex.shard.runner import SequenceState, build_runner
from loraplex.shard.sampling import SamplingParams, TokenChooser, choose_tokens
from tests.factories import tiny_served_model

_INT = {"type": "integer", "minimum": -50, "maximum": 50}
_POINT = {
    "type": "object",
    "properties": {"x": _INT, "y": _INT},
    "required": ["x", "y"],
    "additionalProperties": False,
}
# Ten schemas whose every value is bounded, so that even a random model finishes them within a few dozen tokens.
SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "profile": {
                        "type": "object",
                        "properties": {"nick": {"type": "string", "maxLength": 5}, "active": {"type": "boolean"}},
                        "required": ["nick", "active"],
                        "additionalProperties": False,
                    },
                },
                "required": ["id", "profile"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "array": {"type": "array", "items": _INT, "minItems": 1, "maxItems": 4},
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L", 42]}},
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 10},
            "ratio": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.25},
        },
        "required": ["count", "ratio"],
        "additionalProperties": False,
    },
    "optional": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 9},
            "note": {"type": "string", "maxLength": 4},
            "ok": {"type": "boolean"},
        },
        "required": ["id"],
        "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {"value": {"anyOf": [_INT, {"type": "string", "maxLength": 3}, {"type": "null"}]}},
        "required": ["value"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"k": {"enum": ["a", "b"]}, "v": {"type": "boolean"}},
            "required": ["k", "v"],
            "additionalProperties": False,
        },
        "maxItems": 3,
    },
    "const_and_pattern": {
        "type": "object",
        "properties": {"version": {"const": 1}, "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}},
        "required": ["version", "code"],
        "additionalProperties": False,
    },
    "refs": {
        "$defs": {"point": _POINT},
        "type": "object",
        "properties": {
            "start": {"$ref": "#/$defs/point"},
            "end": {"$ref": "#/$defs/point"},
            "label": {"type": ["string", "null"], "maxLength": 3},
        },
        "required": ["start", "end", "label"],
        "additionalProperties": False,
    },
}
REGEXES = [r"[0-9]{3}-[a-z]{2}", r"(yes|no|maybe)", r"[A-F0-9]{4}( [A-F0-9]{4}){0,2}"]
GREEDY = SamplingParams()
SEEDED = SamplingParams(do_sample=True, seed=5, temperature=1.3, top_k=50, repetition_penalty=1.1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("grammar-model")
    tiny_served_model(directory)
    return directory


@pytest.fixture(scope="module")
def compiler(model_dir: Path) -> GrammarCompiler:
    config = json.loads((model_dir / "config.json").read_text())
    return GrammarCompiler.from_dir(model_dir, config["vocab_size"], [config["eos_token_id"]])


def _params(base: SamplingParams, kind: str, grammar: str) -> SamplingParams:
    return SamplingParams(**{**base.__dict__, "grammar_type": kind, "grammar": grammar})


def _walk(compiler: GrammarCompiler, params: SamplingParams, seed: int, steps: int = 120) -> tuple[list[int], bool]:
    """Tokens chosen from random logits under the grammar; True when an EOS ended them."""
    gen = torch.Generator().manual_seed(seed)
    eos = compiler.eos_ids
    chooser = TokenChooser(params, eos_ids=eos, grammars=compiler)
    tokens: list[int] = []
    for _ in range(steps):
        logits = torch.randn(1, compiler.vocab_size, generator=gen) * 4
        logits[0, eos] += 3.0  # a model eager to stop: the EOS must still wait for a complete output
        token = choose_tokens(logits, [chooser], [tokens])[0].token_id
        if token in eos:
            return tokens, True
        tokens.append(token)
    return tokens, False


def _text(model_dir: Path, tokens: list[int]) -> str:
    return str(Tokenizer.from_file(str(model_dir / "tokenizer.json")).decode(tokens))


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_random_logits_give_valid_json(
    compiler: GrammarCompiler, model_dir: Path, name: str, sampling: SamplingParams
) -> None:
    schema = SCHEMAS[name]
    for seed in range(3):
        tokens, ended = _walk(compiler, _params(sampling, "json", json.dumps(schema)), seed)
        assert ended, f"{name}: no EOS within the budget"
        jsonschema.validate(json.loads(_text(model_dir, tokens)), schema)


@pytest.mark.parametrize("pattern", REGEXES)
def test_random_logits_fully_match_a_pattern(compiler: GrammarCompiler, model_dir: Path, pattern: str) -> None:
    for seed in range(3):
        tokens, ended = _walk(compiler, _params(SEEDED, "regex", pattern), seed)
        assert ended and re.fullmatch(pattern, _text(model_dir, tokens))


def test_no_eos_before_the_output_is_complete(compiler: GrammarCompiler) -> None:
    """Logits that want nothing but EOS still give the three digits first."""
    eos = compiler.eos_ids
    chooser = TokenChooser(_params(GREEDY, "regex", "[0-9]{3}"), eos_ids=eos, grammars=compiler)
    chosen: list[int] = []
    for _ in range(6):
        logits = torch.zeros(1, compiler.vocab_size)
        logits[0, eos] = 100.0
        chosen.append(choose_tokens(logits, [chooser], [chosen])[0].token_id)
        if chosen[-1] in eos:
            break
    assert chosen[-1] in eos and 2 <= len(chosen) <= 4  # one to three digit tokens, then the EOS


def test_unconstrained_rows_are_untouched(compiler: GrammarCompiler, model_dir: Path) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, compiler.vocab_size)
    plain = [TokenChooser(GREEDY), TokenChooser(GREEDY)]
    constrained = TokenChooser(_params(GREEDY, "regex", "x+"), eos_ids=compiler.eos_ids, grammars=compiler)
    choices = choose_tokens(logits, [plain[0], constrained, plain[1]], [[], [], []])
    assert [choices[0].token_id, choices[2].token_id] == logits[[0, 2]].argmax(-1).tolist()
    assert set(_text(model_dir, [choices[1].token_id])) == {"x"}


def test_a_resumed_matcher_continues_where_it_was(compiler: GrammarCompiler) -> None:
    params = _params(SEEDED, "json", json.dumps(SCHEMAS["nested"]))
    whole, _ = _walk(compiler, params, seed=9)
    resumed = TokenChooser(params, eos_ids=compiler.eos_ids, grammars=compiler)
    resumed.resume(whole[:5], compiler.vocab_size)
    walked = TokenChooser(params, eos_ids=compiler.eos_ids, grammars=compiler)
    start = TokenChooser(params, eos_ids=compiler.eos_ids, grammars=compiler)
    assert resumed.grammar and walked.grammar and start.grammar
    for t in whole[:5]:
        walked.grammar.advance(t)
    masks = compiler.allowed([resumed.grammar, walked.grammar, start.grammar], compiler.vocab_size)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


@pytest.mark.parametrize(
    ("kind", "grammar"),
    [("regex", "[a-"), ("json", '{"type": "frobnicate"}'), ("json", "not json"), ("xml", "<a/>")],
)
def test_bad_grammars_raise(compiler: GrammarCompiler, kind: str, grammar: str) -> None:
    with pytest.raises(GrammarError):
        compiler.matcher(kind, grammar)


def test_the_cache_is_bounded_and_keyed_by_content(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    small = GrammarCompiler.from_dir(model_dir, config["vocab_size"], [config["eos_token_id"]], cache_size=2)
    for pattern in ["a+", "b+", "c+", "a+"]:
        small.matcher("regex", pattern)
    assert list(small._cache) == [("regex", "c+"), ("regex", "a+")]


def test_a_random_model_mixed_batch(model_dir: Path, compiler: GrammarCompiler) -> None:
    """The real model, one batch: two rows under schemas, one under a pattern, one free; the free row's tokens are
    what it chooses alone."""
    runner = build_runner(model_dir, kv_blocks=64, block_size=8)
    eos = compiler.eos_ids
    grammars = [
        ("json", json.dumps(SCHEMAS["nested"])),
        ("regex", REGEXES[0]),
        ("", ""),
        ("json", json.dumps(SCHEMAS["refs"])),
    ]
    choosers = [
        TokenChooser(_params(GREEDY, k, g) if k else GREEDY, eos_ids=eos, grammars=compiler) for k, g in grammars
    ]
    prompt = [5, 9, 2, 7]
    seqs = [SequenceState(i, list(prompt), None) for i in range(len(choosers))]
    outputs: list[list[int]] = [[] for _ in choosers]
    logits = runner.prefill(seqs)
    live = list(range(len(seqs)))
    for _ in range(80):
        picks = choose_tokens(logits, [choosers[i] for i in live], [outputs[i] for i in live])
        for i, p in zip(live, picks, strict=True):
            seqs[i].token_ids.append(p.token_id)
            outputs[i].append(p.token_id)
        live = [i for i in live if outputs[i][-1] not in eos]
        if not live:
            break
        logits = runner.decode([seqs[i] for i in live])
    for (kind, grammar), out in zip(grammars, outputs, strict=True):
        if not kind:
            continue
        assert out[-1] in eos
        text = _text(model_dir, out[:-1])
        if kind == "json":
            jsonschema.validate(json.loads(text), json.loads(grammar))
        else:
            assert re.fullmatch(grammar, text)
    alone = build_runner(model_dir, kv_blocks=64, block_size=8)
    seq = SequenceState(0, list(prompt), None)
    solo = TokenChooser(GREEDY)
    row = alone.prefill([seq])
    free: list[int] = []
    while len(free) < len(outputs[2]):
        free.append(choose_tokens(row, [solo], [free])[0].token_id)
        seq.token_ids.append(free[-1])
        row = alone.decode([seq])
    assert free == outputs[2]
