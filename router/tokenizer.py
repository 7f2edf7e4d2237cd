"""Tokenization and chat templates with the ``tokenizers`` library and Jinja, so that torch is never imported."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class TemplateFailure(ValueError):
    """The chat template refused the messages (a ``raise_exception`` in the template, or a template error)."""


@dataclass(frozen=True)
class Offsets:
    id: int
    text: str
    start: int
    stop: int


def _raise(message: str) -> None:
    raise TemplateFailure(message)


class TextTokenizer:
    """The model's tokenizer plus its chat template, read from the checkpoint directory."""

    def __init__(self, directory: Path) -> None:
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        self.tokenizer = Tokenizer.from_file(str(path))
        config: dict[str, Any] = {}
        if (directory / "tokenizer_config.json").is_file():
            config = json.loads((directory / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text()
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.add_bos = bool(config.get("add_bos_token", False))
        self._template = None
        if isinstance(template, str):
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(template)
        self.special_ids = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        if self.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def offsets(self, text: str) -> list[Offsets]:
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return [Offsets(i, text[a:b], a, b) for i, (a, b) in zip(enc.ids, enc.offsets, strict=True)]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        text: str = self.tokenizer.decode(ids, skip_special_tokens=skip_special)
        return text

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id], skip_special=False)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        if self._template is None:
            raise TemplateFailure("this model has no chat template; use /generate or /v1/completions")
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True, bos_token=self.bos_token, eos_token=self.eos_token
            )
        except TemplateFailure:
            raise
        except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as exc:
            # The messages are checked strings, so a template that breaks on them refuses them (a role it does
            # not know, a dict lookup it expects): the caller's request, not the server, is what fails.
            raise TemplateFailure(f"chat template failed: {exc}") from exc


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value or ""
