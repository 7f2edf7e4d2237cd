"""Command-line flags with environment-variable twins (``--max-input-tokens`` ↔ ``MAX_INPUT_TOKENS``), as TGI has."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn


@dataclass(frozen=True)
class Flag:
    """One flag as it was declared, so that another parser can declare it again (the launcher's shard flags)."""

    name: str
    env: str
    dest: str
    kwargs: dict[str, Any] = field(default_factory=dict)


class FlagParser(argparse.ArgumentParser):
    """Every flag's default comes from its environment twin at parse time; errors are one line, exit 2."""

    def __init__(self, *args: Any, environ: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._environ = environ
        self.env_names: dict[str, str] = {}
        self.flags: dict[str, Flag] = {}

    def flag(self, name: str, *, env: str | None = None, **kwargs: Any) -> None:
        env = env or name.lstrip("-").replace("-", "_").upper()
        self.env_names[name] = env
        help_text = kwargs.pop("help", "")
        action = self.add_argument(name, help=f"{help_text} [env {env}]".strip(), **kwargs)
        self.flags[name] = Flag(name, env, action.dest, {**kwargs, "help": help_text})

    def adopt(self, other: FlagParser, exclude: Collection[str] = ()) -> list[str]:
        """Declare ``other``'s flags here too (twin, default, type, help), except ``exclude`` and those this
        parser already has; returns the names it declared."""
        adopted = []
        for name, spec in other.flags.items():
            if name not in exclude and name not in self.flags:
                self.flag(name, env=spec.env, **spec.kwargs)
                adopted.append(name)
        return adopted

    def to_argv(self, args: argparse.Namespace, names: Iterable[str]) -> list[str]:
        """``args``' values of the flags ``names`` as command-line arguments for a parser that has those flags."""
        argv = []
        for name in names:
            value = getattr(args, self.flags[name].dest)
            if self.flags[name].kwargs.get("action") == "store_true":
                argv += [name] if value else []
            elif value is not None:
                argv.append(f"{name}={value}")  # one token: a value may start with "-"
        return argv

    def _apply_environ(self) -> None:
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

    def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        self._apply_environ()
        return self.parse_args(argv)

    def parse_known(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """As ``parse``, leaving alone the arguments of flags this parser does not declare."""
        self._apply_environ()
        return self.parse_known_args(argv)[0]

    def error(self, message: str) -> NoReturn:
        fail(self.prog, message)


def fail(prog: str, message: str) -> NoReturn:
    """The spec's start-up failure: one clear line on stderr, exit code 2, no traceback."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)
