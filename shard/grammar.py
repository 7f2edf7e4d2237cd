"""Structured output in the shard: one llguidance matcher per constrained request, masks filled for a batch at once."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import llguidance
import numpy as np
import torch
from llguidance.torch import fill_next_token_bitmask_par

from loraplex.common.sampling import llguidance_grammar

log = logging.getLogger("loraplex.shard")

# Compiled grammars kept per shard (least recently used dropped first); a hit costs a matcher copy (microseconds)
# where a compile costs about a millisecond for a small schema, and up to seconds for a pathological one.
GRAMMAR_CACHE_SIZE = 256


class GrammarError(ValueError):
    """A grammar llguidance cannot compile (the router refuses these first, with the same library and rules)."""


class GrammarMatcher:
    """Where one request stands in its grammar: the tokens it may take next, advanced by each one chosen."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_ids: Sequence[int]) -> None:
        self.matcher = matcher
        self.eos_ids = list(eos_ids)

    def advance(self, token_id: int) -> None:
        # A token outside the mask cannot be chosen; if one were (a bug), the matcher goes into its error state and
        # the next mask allows only the EOS: the request ends rather than run on unconstrained.
        if not self.matcher.consume_token(token_id):
            log.error("grammar matcher refused token %d: %s", token_id, self.matcher.get_error())

    def replay(self, token_ids: Sequence[int]) -> None:
        """Advance by tokens chosen before (a preempted request's recomputation)."""
        for t in token_ids:
            self.advance(t)


class GrammarCompiler:
    """The model's tokenizer as llguidance sees it, and the grammars compiled for it, cached by content."""

    def __init__(
        self, tokenizer_json: str, vocab_size: int, eos_ids: Sequence[int], cache_size: int = GRAMMAR_CACHE_SIZE
    ) -> None:
        self.vocab_size = vocab_size
        self.eos_ids = list(eos_ids)
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=self.eos_ids or None)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self.executor = llguidance.LLExecutor()

    @classmethod
    def from_dir(
        cls, model_dir: Path, vocab_size: int, eos_ids: Sequence[int], cache_size: int = GRAMMAR_CACHE_SIZE
    ) -> GrammarCompiler:
        """From the checkpoint's ``tokenizer.json`` (the one the router tokenizes with)."""
        return cls((model_dir / "tokenizer.json").read_text(), vocab_size, eos_ids, cache_size)

    def matcher(self, grammar_type: str, grammar: str) -> GrammarMatcher:
        """A fresh matcher at the grammar's start; raises GrammarError when it does not compile."""
        key = (grammar_type, grammar)
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
        if template is None:
            try:
                source = llguidance_grammar(grammar_type, grammar)
            except ValueError as exc:
                raise GrammarError(str(exc)) from exc
            template = llguidance.LLMatcher(self.tokenizer, source)  # drops the GIL while it compiles
            if template.is_error():
                raise GrammarError(template.get_error())
            with self._lock:
                self._cache[key] = template
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return GrammarMatcher(template.deep_copy(), self.eos_ids)

    def allowed(self, matchers: Sequence[GrammarMatcher], vocab: int) -> torch.Tensor:
        """Each matcher's next-token mask as a bool tensor (``len(matchers)`` x ``vocab``, CPU), computed in
        llguidance's thread pool for the whole batch; ids past the tokenizer's vocabulary are never allowed."""
        words = (max(vocab, self.vocab_size) + 31) // 32
        bitmask = torch.zeros((len(matchers), words), dtype=torch.int32)
        fill_next_token_bitmask_par(self.executor, [(m.matcher, i) for i, m in enumerate(matchers)], bitmask)
        # numpy's unpackbits is one pass over the bytes (tenths of a millisecond at 64 x 49k); torch's shifts and
        # masks over a broadcast [n, words, 32] take tens of times longer on the CPU.
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")[:, :vocab]
        allowed = torch.from_numpy(np.ascontiguousarray(bits)).view(torch.bool)
        for row, m in enumerate(matchers):
            if m.matcher.is_error():  # nothing valid can follow: end the request with an EOS
                allowed[row] = False
                allowed[row, [e for e in m.eos_ids if e < vocab]] = True
        return allowed


def shard_grammars(model_dir: Path, vocab_size: int, eos_ids: Sequence[int]) -> GrammarCompiler | None:
    """The shard's compiler, from the checkpoint's tokenizer; None for a checkpoint without one (grammar requests
    are then refused by the router, which needs that tokenizer too)."""
    if not (model_dir / "tokenizer.json").is_file():
        return None
    return GrammarCompiler.from_dir(model_dir, vocab_size, eos_ids)


def mask_logits(logits: torch.Tensor, rows: Sequence[int], allowed: torch.Tensor) -> torch.Tensor:
    """``logits`` (a batch) with every token the grammars do not allow at -inf in ``rows`` (a new tensor)."""
    allowed = allowed.to(logits.device, non_blocking=True)
    if len(rows) == logits.shape[0]:  # every row constrained: one pass, no copy of the logits first
        return torch.where(allowed, logits, -float("inf"))
    out = logits.clone()
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    out[index] = torch.where(allowed, out[index], -float("inf"))
    return out
