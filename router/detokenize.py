"""Incremental detokenization: each new token's text from a short window of ids, never the whole output again."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special: bool = True) -> str: ...


@dataclass
class TextStream:
    """The text of one request's generated tokens, grown one token at a time at a cost that does not depend on
    how long the output already is.

    Decoding a window (TGI's and vLLM's prefix/read offsets): ``ids[prefix:read]`` is text already emitted,
    ``ids[prefix:]`` the same plus the new tokens; the difference of the two decodes is the new text. The
    window keeps the previous emitted token as context, so tokenizers whose decoders depend on a neighbour
    (a SentencePiece leading space, a merged byte sequence) give the same text as decoding everything. A
    window whose text ends in U+FFFD holds an incomplete UTF-8 character (a byte-level or byte-fallback token
    split it): nothing is emitted until the character is complete, and ``finish`` flushes whatever a request
    ends on, so the final text always equals decoding all tokens at once.
    """

    pieces: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    prefix: int = 0
    read: int = 0
    _joined: str = field(default="", init=False, repr=False)
    _joined_pieces: int = field(default=0, init=False, repr=False)

    def push(self, decoder: Decoder, token_id: int) -> str:
        """Append one (non-special) token; the text it completes, possibly empty."""
        self.ids.append(token_id)
        before = decoder.decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        after = decoder.decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        new = after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.pieces.append(new)
        return new

    def finish(self, decoder: Decoder) -> str:
        """Text held back at the end (an incomplete character decodes as U+FFFD, as a whole decode gives it)."""
        if self.read == len(self.ids):
            return ""
        before = decoder.decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        rest = decoder.decode(self.ids[self.prefix :])[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        if rest:
            self.pieces.append(rest)
        return rest

    def recent(self, chars: int) -> str:
        """The last ``chars`` characters of the text (stop sequences are matched here, not in the whole text)."""
        out: list[str] = []
        need = chars
        for piece in reversed(self.pieces):
            if need <= 0:
                break
            out.append(piece[-need:])
            need -= len(piece)
        return "".join(reversed(out))

    @property
    def text(self) -> str:
        if self._joined_pieces != len(self.pieces):  # joined once per read, not once per token
            self._joined = "".join(self.pieces)
            self._joined_pieces = len(self.pieces)
        return self._joined
