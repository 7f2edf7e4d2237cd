"""KV-cache arithmetic in the shard's blocks, for admission and preemption: pure bookkeeping, no gRPC."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class KvBudget:
    """The blocks the router may fill on the shards, and their size in tokens.

    A sequence of ``length`` tokens (prompt + generated, the newest one not run yet) holds
    ``blocks(length - 1)`` blocks and needs ``blocks(length)`` for its next step: that is what the shard's
    runner allocates (``shard/runner.py``), so the router's count is exact, not an estimate.
    """

    block_size: int
    num_blocks: int

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.num_blocks < 1:
            raise ValueError("the KV budget needs at least one block of at least one token")

    @property
    def tokens(self) -> int:
        """The budget as TGI's ``max_batch_total_tokens``."""
        return self.num_blocks * self.block_size

    def blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def worst_case(self, input_tokens: int, max_new_tokens: int) -> int:
        """The most blocks a request ever holds (an upper bound: its last token is never run)."""
        return self.blocks(input_tokens + max_new_tokens)

    def next_step(self, lengths: Iterable[int]) -> int:
        """Blocks that running sequences of these lengths hold once their next step has run."""
        return sum(self.blocks(n) for n in lengths)

    def victims(self, running: Sequence[tuple[int, int]]) -> list[int]:
        """Ids of the sequences ``(id, length)`` to preempt, newest (highest id) first, so that the others'
        next step fits. The oldest is never a victim: it fits alone, so the batch always makes progress."""
        need = self.next_step(n for _, n in running)
        if need <= self.num_blocks:  # every step but under pressure: no sort
            return []
        order = sorted(running)
        out = []
        while need > self.num_blocks and len(order) > 1:
            rid, length = order.pop()
            need -= self.blocks(length)
            out.append(rid)
        return out


class Admission:
    """One admission pass: running sequences' next step, plus each new prompt's prefill and first step.

    Optimistic, as vLLM is: a request is admitted when its next step fits, not its whole ``max_new_tokens``;
    when growth later outruns the cache the newest sequences are preempted (``KvBudget.victims``), never
    failed.
    """

    def __init__(self, budget: KvBudget, running_lengths: Iterable[int]) -> None:
        self.budget = budget
        self.used = budget.next_step(running_lengths)

    def fits(self, prompt_tokens: int) -> bool:
        return self.used + self.budget.blocks(prompt_tokens + 1) <= self.budget.num_blocks

    def take(self, prompt_tokens: int) -> None:
        self.used += self.budget.blocks(prompt_tokens + 1)
