"""Protobuf messages to and from dataclasses, field by field by name, for the types whose names agree."""

from __future__ import annotations

import inspect
from typing import Any, TypeVar

from google.protobuf.message import Message

M = TypeVar("M", bound=Message)
T = TypeVar("T")


def to_message(cls: type[M], source: object, **overrides: Any) -> M:
    """A ``cls`` message whose every field is ``source``'s attribute of that name, or its value in ``overrides``.
    A field ``source`` lacks raises AttributeError: a field added to the message is never silently left unset."""
    names = [f.name for f in cls.DESCRIPTOR.fields if f.name not in overrides]
    return cls(**{name: getattr(source, name) for name in names}, **overrides)


def from_message(cls: type[T], message: Message, **overrides: Any) -> T:
    """A ``cls`` (a dataclass) whose fields are the message's of the same name, or their values in ``overrides``;
    fields the message does not declare keep their defaults."""
    declared = {f.name for f in message.DESCRIPTOR.fields}
    names = [name for name in inspect.signature(cls).parameters if name in declared and name not in overrides]
    return cls(**{name: getattr(message, name) for name in names}, **overrides)
