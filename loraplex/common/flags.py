"""Command-line flags with environment-variable twins (``--max-input-tokens`` ↔ ``MAX_INPUT_TOKENS``), as TGI has."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn


class FlagParser(argparse.ArgumentParser):
    """Every flag's default comes from its environment twin at parse time; errors are one line, exit 2."""

    def __init__(self, *args: Any, environ: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._environ = environ
        self.env_names: dict[str, str] = {}

    def flag(self, name: str, *, env: str | None = None, **kwargs: Any) -> None:
        env = env or name.lstrip("-").replace("-", "_").upper()
        self.env_names[name] = env
        help_text = kwargs.pop("help", "")
        self.add_argument(name, help=f"{help_text} [env {env}]".strip(), **kwargs)

    def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        environ = os.environ if self._environ is None else self._environ
        for action in self._actions:
            for option in action.option_strings:
                env = self.env_names.get(option)
                # An empty twin is unset, as in TGI: compose and Helm often pass ``VAR=`` for "no value".
                if env and environ.get(env, "").strip():
                    raw = environ[env]
                    if isinstance(action, argparse._StoreTrueAction):
                        action.default = raw.strip().lower() in ("1", "true", "yes", "on")
                    else:
                        try:
                            action.default = action.type(raw) if action.type else raw  # type: ignore[operator]
                        except (TypeError, ValueError):
                            self.error(f"environment variable {env}={raw!r} is not a valid value for {option}")
                        if action.choices is not None and action.default not in action.choices:
                            self.error(f"environment variable {env}={raw!r} is not one of {list(action.choices)}")
        return self.parse_args(argv)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def fail(prog: str, message: str) -> NoReturn:
    """The spec's start-up failure: one clear line on stderr, exit code 2, no traceback."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)
