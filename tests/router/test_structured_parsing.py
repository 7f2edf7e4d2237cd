"""The router's side of structured output without a server: TGI grammar, response_format and tools parsed into one
grammar, tool calls split (whole and streamed), grammars checked with llguidance and the verdicts cached."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from loraplex.common.sampling import MAX_GRAMMAR_BYTES
from loraplex.router.grammar import (
    GrammarChecker,
    ToolCallStream,
    response_format_grammar,
    split_tool_call,
    tgi_grammar,
    tool_choice,
)
from loraplex.router.settings import RouterSettings
from loraplex.router.validation import ValidationError, validate_parameters
from tests.factories import tiny_tokenizer

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "f", "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "g"}},
]


def test_tgi_grammar_takes_a_schema_object_or_its_text_and_patterns() -> None:
    assert tgi_grammar(None) == ("", "")
    compact = '{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}'
    assert tgi_grammar({"type": "json", "value": SCHEMA}) == ("json", compact)
    assert tgi_grammar({"type": "json", "value": json.dumps(SCHEMA, indent=2)}) == ("json", compact)
    assert tgi_grammar({"type": "regex", "value": "[0-9]+"}) == ("regex", "[0-9]+")


@pytest.mark.parametrize(
    "raw",
    [
        "json",
        {"type": "json"},
        {"type": "json", "value": "{nope"},
        {"type": "json", "value": [1]},
        {"type": "regex", "value": ""},
        {"type": "regex", "value": 5},
        {"type": "lark", "value": "start: 'a'"},
        {"type": "json", "value": SCHEMA, "extra": 1},
        {"type": "json", "value": {"enum": ["x" * 1000] * (MAX_GRAMMAR_BYTES // 1000 + 1)}},
        {"type": "regex", "value": "a" * (MAX_GRAMMAR_BYTES + 1)},
    ],
)
def test_tgi_grammar_refusals_name_the_field(raw: Any) -> None:
    with pytest.raises(ValidationError, match="grammar"):
        tgi_grammar(raw)


def test_validation_sets_the_shard_fields_and_refuses_eos_controls() -> None:
    settings = RouterSettings()
    params = validate_parameters({"grammar": {"type": "regex", "value": "ab"}}, settings)
    assert (params.grammar_type, params.grammar) == ("regex", "ab")
    assert validate_parameters({}, settings).grammar_type == ""
    for extra in ({"ignore_eos": True}, {"min_tokens": 1}):
        with pytest.raises(ValidationError, match="ignore_eos"):
            validate_parameters({"grammar": {"type": "regex", "value": "ab"}, **extra}, settings)


def test_response_format() -> None:
    assert response_format_grammar(None) == ("", "")
    assert response_format_grammar({"type": "text"}) == ("", "")
    assert response_format_grammar({"type": "json_object"}) == ("json", '{"type":"object"}')
    kind, text = response_format_grammar({"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}})
    assert kind == "json" and json.loads(text) == SCHEMA
    for bad in ({"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": SCHEMA}}, {"type": "x"}, 3):
        with pytest.raises(ValidationError, match="response_format"):
            response_format_grammar(bad)


def test_tool_choice_builds_the_call_grammar() -> None:
    assert tool_choice(None, None) is None
    assert (
        tool_choice(TOOLS, "auto") is None and tool_choice(TOOLS, None) is None and tool_choice(TOOLS, "none") is None
    )
    named = tool_choice(TOOLS, {"type": "function", "function": {"name": "f"}})
    assert named is not None and named.names == ("f",)
    assert json.loads(named.grammar)["properties"] == {"name": {"const": "f"}, "arguments": SCHEMA}
    anyone = tool_choice(TOOLS, "required")
    assert anyone is not None and anyone.names == ("f", "g")
    branches = json.loads(anyone.grammar)["anyOf"]
    assert [b["properties"]["name"]["const"] for b in branches] == ["f", "g"]
    assert branches[1]["properties"]["arguments"] == {"type": "object", "properties": {}, "additionalProperties": False}


@pytest.mark.parametrize(
    ("tools", "choice", "words"),
    [
        (None, "required", "needs `tools`"),
        ([], "required", "non-empty"),
        ([{"type": "function"}], "required", "tools[0]"),
        ([{"type": "function", "function": {"name": "f", "parameters": 3}}], "required", "parameters"),
        (TOOLS, {"type": "function", "function": {"name": "h"}}, "not in `tools`"),
        (TOOLS, "always", "tool_choice"),
    ],
)
def test_tool_choice_refusals(tools: Any, choice: Any, words: str) -> None:
    with pytest.raises(ValidationError, match=words.replace("[", r"\[").replace("]", r"\]")):
        tool_choice(tools, choice)


CALL = '{"name": "get_\\"x", "arguments": {"a": {"b": [1, 2]}, "c": "}"}}'


def test_split_tool_call() -> None:
    assert split_tool_call(CALL) == ('get_"x', '{"a": {"b": [1, 2]}, "c": "}"}')
    assert split_tool_call(CALL[:-3]) is None  # cut short: not a call
    assert split_tool_call('{"name": "f", "arguments": {}} trailing') is None


@pytest.mark.parametrize("size", [1, 2, 5, len(CALL)])
def test_streamed_pieces_add_up_to_the_arguments(size: int) -> None:
    stream = ToolCallStream()
    names, pieces = [], []
    for i in range(0, len(CALL), size):
        name, piece = stream.feed(CALL[i : i + size])
        names.append(name)
        pieces.append(piece)
    pieces.append(stream.finish())
    assert [n for n in names if n is not None] == ['get_"x']
    assert "".join(pieces) == split_tool_call(CALL)[1]  # type: ignore[index]


def test_a_stream_cut_before_the_name_gives_nothing() -> None:
    stream = ToolCallStream()
    assert stream.feed('{"name": "f') == (None, "") and stream.finish() == "" and stream.name is None


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory: Path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer(directory)
    return str(Tokenizer.from_file(str(directory / "tokenizer.json")).to_str())


def test_the_checker_refuses_what_llguidance_cannot_compile_and_remembers(tokenizer_json: str) -> None:
    checker = GrammarChecker(tokenizer_json, cache_size=3)
    checker.check("json", json.dumps(SCHEMA))
    checker.check("regex", "[a-z]{2,3}")
    with pytest.raises(ValidationError, match="cannot be compiled"):
        checker.check("regex", "[a-")
    with pytest.raises(ValidationError, match="cannot be compiled"):
        checker.check("json", '{"type": "frobnicate"}')
    assert checker.cached("regex", "[a-") not in (None, "")  # refusals are remembered too
    assert checker.cached("json", json.dumps(SCHEMA)) is None  # the oldest verdict went first
    assert checker.cached("regex", "[a-z]{2,3}") == "" and len(checker._verdicts) == 3
