"""PEFT's regular expressions (``target_modules``, ``rank_pattern``, ``alpha_pattern``) matched in bounded time."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

# Honest patterns are module names or short expressions (``.*\.(q_proj|v_proj)``); a key per module of a
# 80-layer model is 560 keys. Anything far beyond is refused before any matching.
MAX_PATTERN_CHARS = 256
MAX_PATTERN_KEYS = 4096
# Wall-clock budget for matching one adapter's patterns against the model's module names. Python's ``re``
# backtracks (``(.|.)*X`` takes minutes on one module name) and holds the GIL while it does, so a pattern
# that is not plain text is never matched in the shard's process: a child process does it and is killed
# when the budget runs out.
PATTERN_SECONDS = 2.0
_PLAIN = re.compile(r"[A-Za-z0-9_.\-]+")  # no quantifier, group or alternation: ``.`` is the only wildcard
_CHILD_MEMORY = 1 << 30


class PatternError(ValueError):
    """A pattern refused or that could not be matched in time; ``kind`` as ``AdapterError``'s."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# The child: stdin JSON in, stdout JSON out; PEFT's own expressions (peft.utils.other.get_pattern_key and
# match_target_against_key), compiled once.
_CHILD = r"""
import json, re, sys
job = json.load(sys.stdin)
try:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (job["memory"], job["memory"]))
except Exception:
    pass
out, compiled, where = {}, {}, "target_modules"
try:
    target = re.compile(job["target"]) if job["target"] is not None else None
    for where in ("rank_pattern", "alpha_pattern"):
        compiled[where] = [re.compile(rf"(.*\.)?({key})$") for key in job[where]]
except re.error as exc:
    json.dump({"error": where, "message": str(exc)}, sys.stdout)
    sys.exit(0)
if target is not None:
    out["target"] = [bool(target.fullmatch(name)) for name in job["names"]]
for where, patterns in compiled.items():
    out[where] = [next((i for i, p in enumerate(patterns) if p.match(name)), -1) for name in job["names"]]
json.dump(out, sys.stdout)
"""


@dataclass(frozen=True)
class Matches:
    """Per name: whether the string ``target_modules`` fully matches it (None: no string target) and the
    index of the first ``rank_pattern`` / ``alpha_pattern`` key that matches it (-1: none)."""

    target: list[bool] | None
    rank: list[int]
    alpha: list[int]


def check_patterns(where: str, patterns: Sequence[object]) -> None:
    """Refuse patterns that are not strings, too long or too many, before anything matches them."""
    if len(patterns) > MAX_PATTERN_KEYS:
        raise PatternError("unsafe_pattern", f"{where} has {len(patterns)} keys; at most {MAX_PATTERN_KEYS} are read")
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise PatternError("bad_config", f"{where} keys must be non-empty strings, got {pattern!r}")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise PatternError(
                "unsafe_pattern",
                f"{where} pattern of {len(pattern)} characters; at most {MAX_PATTERN_CHARS} are accepted",
            )


def _plain_at(pattern: str, name: str, end: int) -> bool:
    """``pattern`` (plain: ``.`` is any character) matches ``name[end - len(pattern):end]``."""
    start = end - len(pattern)
    return start >= 0 and all(p == "." or p == c for p, c in zip(pattern, name[start:end], strict=True))


def _plain_fullmatch(pattern: str, name: str) -> bool:
    return len(pattern) == len(name) and _plain_at(pattern, name, len(name))


def _plain_suffix(key: str, name: str) -> bool:
    """PEFT's ``re.match(rf"(.*\\.)?({key})$", name)`` for a plain key: the key has a fixed length, so it
    matches the end of the name, preceded by nothing or by a dot."""
    start = len(name) - len(key)
    return _plain_at(key, name, len(name)) and (start == 0 or name[start - 1] == ".")


def match_names(
    names: Sequence[str],
    target: str | None,
    rank_keys: Sequence[str],
    alpha_keys: Sequence[str],
    timeout: float = PATTERN_SECONDS,
) -> Matches:
    """Match every pattern against every name with PEFT's semantics, in at most ``timeout`` seconds.

    Plain patterns (letters, digits, ``_``, ``-``, ``.``) cannot backtrack and are matched here; any other
    pattern sends the whole job to a child process, killed at the deadline (``pattern_timeout``).
    """
    patterns = [*([target] if target is not None else []), *rank_keys, *alpha_keys]
    if all(_PLAIN.fullmatch(p) for p in patterns):
        return Matches(
            [_plain_fullmatch(target, n) for n in names] if target is not None else None,
            [next((i for i, k in enumerate(rank_keys) if _plain_suffix(k, n)), -1) for n in names],
            [next((i for i, k in enumerate(alpha_keys) if _plain_suffix(k, n)), -1) for n in names],
        )
    job = {
        "names": list(names),
        "target": target,
        "rank_pattern": list(rank_keys),
        "alpha_pattern": list(alpha_keys),
        "memory": _CHILD_MEMORY,
    }
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _CHILD],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=max(0.05, timeout),
            check=False,
        )
    except subprocess.TimeoutExpired:  # run() has killed the child
        raise PatternError(
            "pattern_timeout",
            f"matching target_modules / rank_pattern / alpha_pattern against the model's {len(names)} module names "
            f"took over {timeout:.1f} s (a backtracking regular expression); use module names or simple patterns",
        ) from None
    try:
        out = json.loads(done.stdout)
    except json.JSONDecodeError:
        problem = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise PatternError("unsafe_pattern", f"the patterns could not be matched: {problem[0][:200]}") from None
    if "error" in out:
        raise PatternError("bad_config", f"{out['error']} is not a valid regular expression: {out['message']}")
    return Matches(out.get("target"), out["rank_pattern"], out["alpha_pattern"])
