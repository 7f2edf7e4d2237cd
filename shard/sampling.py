"""Next-token choice per request: min_tokens, penalties, temperature, top-k/top-p/typical-p, seeded draws, logprobs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from loraplex.common.sampling import SamplingParams
from loraplex.shard.grammar import GrammarCompiler, GrammarMatcher, mask_logits


def finite_scores(scores: torch.Tensor) -> torch.Tensor:
    """One row of scores that a softmax can take: NaN becomes -inf and, where some scores are +inf (a penalty or
    temperature overflowed float32, or the model's logits did), those alone remain, tied at 0.

    A NaN reaching ``torch.multinomial`` raises, and the shard would fail the whole batch for one request.
    """
    if bool(torch.isfinite(scores).all()):
        return scores
    top = scores == float("inf")
    if bool(top.any()):
        return torch.zeros_like(scores).masked_fill(~top, -float("inf"))
    return scores.masked_fill(scores.isnan(), -float("inf"))


class TokenChooser:
    """One request's sampler; its own seeded generator makes a seed's output independent of the batch.

    ``eos_ids`` are the model's end-of-sequence tokens: they cannot be chosen until ``params.min_tokens``
    tokens have been (vLLM's min_tokens), so the answer is never cut short by an early EOS.

    A request with a grammar (``params.grammar_type``) gets a matcher from ``grammars``: only the tokens it allows
    can be chosen, the EOS only once the output is complete (``choose_tokens``).
    """

    def __init__(
        self,
        params: SamplingParams,
        top_n: int = 0,
        eos_ids: Iterable[int] = (),
        device: torch.device | str = "cpu",
        grammars: GrammarCompiler | None = None,
    ) -> None:
        self.params = params
        self.top_n = top_n
        self.eos_ids = sorted(set(eos_ids))
        self.generated = 0  # tokens chosen so far (the prefill's included)
        self.generator: torch.Generator | None = None
        if params.sampling:  # on the logits' device: torch.multinomial refuses a generator of another device
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.grammar: GrammarMatcher | None = None
        if params.grammar_type:
            if grammars is None:
                raise ValueError("this shard has no tokenizer to enforce grammars with")
            self.grammar = grammars.matcher(params.grammar_type, params.grammar)
        self.grammars = grammars

    def resume(self, generated_ids: Sequence[int], vocab_size: int) -> None:
        """Put a fresh sampler where it would be after choosing ``generated_ids`` (its min_tokens count, its
        seeded generator's draws): a preempted request's recomputation then chooses what it would have chosen
        uninterrupted. ``torch.multinomial`` takes the same generator state whatever the probabilities are
        (``tests/shard/test_preemption_sampling.py``)."""
        self.generated += len(generated_ids)
        if self.grammar is not None:
            self.grammar.replay(generated_ids)
        if self.generator is None:
            return
        uniform = torch.ones(vocab_size, device=self.generator.device)
        for _ in generated_ids:
            torch.multinomial(uniform, 1, generator=self.generator)

    @property
    def holds_eos(self) -> bool:
        """The next token may not be an EOS: fewer than min_tokens chosen yet."""
        return bool(self.eos_ids) and self.generated < self.params.min_tokens

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (one row) with the EOS ids at -inf while min_tokens is not reached; otherwise unchanged."""
        if not self.holds_eos:
            return logits
        ids = [i for i in self.eos_ids if i < logits.shape[-1]]
        if len(ids) == logits.shape[-1]:  # nothing else could be chosen: better an EOS than a NaN draw
            return logits
        logits = logits.clone()
        logits[ids] = -float("inf")
        return logits

    def process(self, logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
        """Penalties and temperature applied to one row of float32 logits (a new tensor)."""
        p = self.params
        logits = self.mask(logits).clone()
        if p.penalised and token_ids:
            ids = torch.tensor(token_ids, dtype=torch.long, device=logits.device)
            if p.repetition_penalty != 1.0:
                seen = ids.unique()
                score = logits[seen]
                logits[seen] = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
            if p.frequency_penalty != 0.0:
                counts = torch.bincount(ids, minlength=logits.shape[-1]).to(logits.dtype)
                logits -= p.frequency_penalty * counts
        logits = finite_scores(logits)
        if p.sampling and p.temperature != 1.0:
            scaled = logits / p.temperature
            best = logits.max()
            if not bool(torch.isfinite(scaled).all()) and bool(torch.isfinite(best)):
                # A tiny temperature overflowed the best scores to +inf (and the softmax to NaN). With the best
                # score at 0 first, the others only go down, to -inf at worst: the argmax the limit stands for.
                scaled = (logits - best) / p.temperature
            logits = scaled
        return logits

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from processed logits: argmax, or a draw after the top-k/top-p/typical-p filters."""
        p = self.params
        if not p.sampling:
            return int(logits.argmax())
        scores = logits.clone()
        if p.top_k > 0 and p.top_k < scores.shape[-1]:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores[scores < kth] = -float("inf")
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            drop = cum - sorted_scores.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p
            drop[0] = False  # the best token stays, whatever top_p (one too small for float32 is 0)
            scores[order[drop]] = -float("inf")
        if p.typical_p < 1.0:
            logp = scores.log_softmax(-1)
            entropy = -(logp.exp() * logp).nan_to_num().sum()
            shifted = (-logp - entropy).abs()
            order = torch.sort(shifted).indices
            cum = logp[order].exp().cumsum(-1)
            drop = cum - logp[order].exp() >= p.typical_p
            drop[0] = False  # the most typical token stays
            scores[order[drop]] = -float("inf")
        probs = scores.softmax(-1)
        if not bool(torch.isfinite(probs).all()):  # no finite score was left: nothing to draw from
            # The draw is still taken: a resumed sampler (TokenChooser.resume) counts one per token.
            torch.multinomial(torch.ones_like(probs), 1, generator=self.generator)
            return int(logits.argmax())
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _grammar_masked(logits: torch.Tensor, choosers: Sequence[TokenChooser]) -> torch.Tensor:
    rows = [i for i, c in enumerate(choosers) if c.grammar is not None]
    if not rows:
        return logits
    compiler = choosers[rows[0]].grammars
    assert compiler is not None  # a chooser with a grammar has its compiler
    allowed = compiler.allowed([g for i in rows if (g := choosers[i].grammar) is not None], logits.shape[-1])
    return mask_logits(logits, rows, allowed)


@dataclass(frozen=True)
class Choice:
    token_id: int
    logprob: float
    top_tokens: list[tuple[int, float]]


def choose_tokens(
    logits: torch.Tensor, choosers: Sequence[TokenChooser], token_ids: Sequence[Sequence[int]]
) -> list[Choice]:
    """Next token of every row; rows that only want argmax of raw logits take a vectorised path. Rows under a
    grammar first have every token it does not allow masked (their masks computed together), and their matchers
    advance by the chosen token."""
    logits = _grammar_masked(logits, choosers)
    plain = all(not c.params.sampling and not c.params.penalised for c in choosers)
    if plain:
        processed = logits
        if any(c.holds_eos for c in choosers):
            processed = torch.stack([c.mask(row) for c, row in zip(choosers, logits, strict=True)])
        chosen = processed.argmax(-1).tolist()
    else:
        processed = torch.stack([c.process(row, ids) for c, row, ids in zip(choosers, logits, token_ids, strict=True)])
        chosen = [c.choose(row) for c, row in zip(choosers, processed, strict=True)]
    for c, token in zip(choosers, chosen, strict=True):
        c.generated += 1
        if c.grammar is not None:
            c.grammar.advance(token)
    logprobs = processed.log_softmax(-1)
    picked = logprobs[torch.arange(len(chosen)), torch.tensor(chosen)].tolist()
    out = []
    for row, (c, token, lp) in enumerate(zip(choosers, chosen, picked, strict=True)):
        top: list[tuple[int, float]] = []
        if c.top_n:
            values, ids = torch.topk(logprobs[row], c.top_n)
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        out.append(Choice(token, lp, top))
    return out
