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
