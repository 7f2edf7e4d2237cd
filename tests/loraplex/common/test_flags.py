"""Flags and their environment twins: the twin is the default, an empty twin is unset, bad twins fail as flags do."""

from __future__ import annotations

import pytest

from loraplex.common.flags import FlagParser


def _parser(environ: dict[str, str]) -> FlagParser:
    p = FlagParser(prog="demo", environ=environ)
    p.flag("--max-input-tokens", type=int, default=1024)
    p.flag("--dtype", default="auto", choices=["auto", "float32"])
    p.flag("--json-output", action="store_true")
    p.flag("--model-id", default="")
    return p


def test_the_twin_is_the_default_and_the_flag_wins() -> None:
    env = {"MAX_INPUT_TOKENS": "64", "DTYPE": "float32", "JSON_OUTPUT": "true", "MODEL_ID": "m"}
    args = _parser(env).parse([])
    assert (args.max_input_tokens, args.dtype, args.json_output, args.model_id) == (64, "float32", True, "m")
    assert _parser(env).parse(["--max-input-tokens", "7"]).max_input_tokens == 7


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_twin_is_unset(empty: str) -> None:
    env = {"MAX_INPUT_TOKENS": empty, "DTYPE": empty, "JSON_OUTPUT": empty, "MODEL_ID": empty}
    args = _parser(env).parse([])
    assert (args.max_input_tokens, args.dtype, args.json_output, args.model_id) == (1024, "auto", False, "")


@pytest.mark.parametrize(
    ("env", "words"),
    [({"MAX_INPUT_TOKENS": "many"}, "MAX_INPUT_TOKENS='many'"), ({"DTYPE": "int3"}, "DTYPE='int3' is not one of")],
)
def test_a_bad_twin_is_one_line_exit_2(env: dict[str, str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        _parser(env).parse([])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_adopted_flags_keep_twin_default_type_and_help() -> None:
    source = _parser({})
    source.flag("--block-size", env="KV_BLOCK_SIZE", type=int, default=16, help="tokens a block")
    target = FlagParser(prog="other", environ={"KV_BLOCK_SIZE": "32"})
    target.flag("--model-id", default="x")
    adopted = target.adopt(source, exclude={"--dtype"})
    assert adopted == ["--max-input-tokens", "--json-output", "--block-size"]  # --model-id: already here
    assert target.get_default("model_id") == "x" and "--dtype" not in target.flags
    assert target.flags["--block-size"].env == "KV_BLOCK_SIZE"
    assert target.flags["--block-size"].kwargs["help"] == "tokens a block"
    assert target.parse([]).block_size == 32


def test_values_go_back_to_argv_that_the_parser_reads_the_same() -> None:
    p = _parser({"MAX_INPUT_TOKENS": "64"})
    args = p.parse(["--json-output", "--model-id=-odd"])
    argv = p.to_argv(args, p.flags)
    assert argv == ["--max-input-tokens=64", "--dtype=auto", "--json-output", "--model-id=-odd"]
    assert _parser({}).parse(argv) == args
    assert p.to_argv(p.parse([]), ["--json-output"]) == []


def test_parse_known_leaves_other_flags_alone() -> None:
    args = _parser({"DTYPE": "float32"}).parse_known(["--other", "1", "--max-input-tokens", "8"])
    assert (args.dtype, args.max_input_tokens) == ("float32", 8)
