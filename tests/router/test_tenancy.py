"""The API-keys file: SPEC §7's example as written, and every malformed file refused with a specific message."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from loraplex.router.tenancy import TenancyError, Tenants

SPEC_EXAMPLE = """
tenants:
  - name: team-a
    keys: ["key-a-1", "key-a-2"]
    adapters: ["team-a/*", "shared-summarizer"]
    base: true          # may this tenant call the base model without adapter
  - name: team-b
    keys: ["key-b-1"]
    adapters: ["team-b/*"]
"""


def test_the_spec_example_is_accepted_with_a_warning_for_short_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(SPEC_EXAMPLE)
    with caplog.at_level(logging.WARNING, logger="loraplex.router"):
        tenants = Tenants.from_file(path)
    a = tenants.for_authorization("Bearer key-a-2")
    b = tenants.for_authorization("bearer key-b-1")
    assert a is not None and a.name == "team-a" and a.allows("team-a/x") and a.allows("shared-summarizer")
    assert a.allows("")  # base: true
    assert b is not None and b.name == "team-b" and b.allows("team-b/y") and not b.allows("team-a/x")
    assert not b.allows("shared-summarizer")
    assert tenants.for_authorization("Bearer key-a-3") is None
    assert tenants.for_authorization("Basic key-a-1") is None
    assert "team-a, team-b" in caplog.text and "shorter than 16" in caplog.text


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ([], "non-empty `tenants` list"),
        ({"tenants": []}, "non-empty `tenants` list"),
        ({"tenants": ["x"]}, "tenant 0 must be an object"),
        ({"tenants": [{"keys": ["k"]}]}, "tenant 0 needs a `name`"),
        ({"tenants": [{"name": "a"}]}, "tenant 'a' needs `keys`"),
        ({"tenants": [{"name": "a", "keys": [""]}]}, "non-empty strings without spaces"),
        ({"tenants": [{"name": "a", "keys": ["two words"]}]}, "non-empty strings without spaces"),
        ({"tenants": [{"name": "a", "keys": [7]}]}, "non-empty strings without spaces"),
        ({"tenants": [{"name": "a", "keys": ["k1"], "adapters": "x"}]}, "`adapters` must be a list"),
        ({"tenants": [{"name": "a", "keys": ["k1"], "base": "yes"}]}, "`base` must be true or false"),
        (
            {"tenants": [{"name": "a", "keys": ["k1"]}, {"name": "b", "keys": ["k1"]}]},
            "a key of tenant 'b' is also given to 'a'",
        ),
    ],
)
def test_malformed_files_are_refused_specifically(raw: Any, words: str) -> None:
    with pytest.raises(TenancyError, match=None) as err:
        Tenants.from_dict(raw)
    assert words in str(err.value)


def test_unreadable_or_invalid_yaml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TenancyError, match="cannot read"):
        Tenants.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenants: [unclosed")
    with pytest.raises(TenancyError, match="not valid YAML"):
        Tenants.from_file(bad)
