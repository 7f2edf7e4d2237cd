"""The adapter id syntax: plain relative names only, whatever the encoding tricks."""

from __future__ import annotations

import pytest

from loraplex.common.adapter_ids import MAX_ADAPTER_ID_LENGTH, adapter_id_problem


@pytest.mark.parametrize(
    "adapter_id",
    [
        "a",
        "pirate",
        "team-a/summarizer",
        "org/model_v2.1",
        "a/b/c/d",
        "x" * 128 + "/" + "y" * (MAX_ADAPTER_ID_LENGTH - 129),
    ],
)
def test_plain_ids_are_accepted(adapter_id: str) -> None:
    assert adapter_id_problem(adapter_id) is None


@pytest.mark.parametrize(
    ("adapter_id", "words"),
    [
        ("", "empty"),
        ("x" * (MAX_ADAPTER_ID_LENGTH + 1), "longer than"),
        ("..", "letters, digits"),
        ("a/../b", "letters, digits"),
        ("/abs", "letters, digits"),
        ("a//b", "letters, digits"),
        ("a/", "letters, digits"),
        (".hidden", "letters, digits"),
        ("a\x00b", "letters, digits"),
        ("a\\b", "letters, digits"),
        ("c:x", "letters, digits"),
        ("https://x", "letters, digits"),
        ("ａｂ", "letters, digits"),
        ("a b", "letters, digits"),
        ("-x", "letters, digits"),
        ("a.", "end with"),
        ("a/b.", "end with"),
    ],
)
def test_everything_else_is_refused_with_a_reason(adapter_id: str, words: str) -> None:
    problem = adapter_id_problem(adapter_id)
    assert problem is not None and words in problem
