"""Workloads: prompts of an exact token length, adapter popularity, arrival times."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer

Popularity = Literal["identical", "uniform", "zipf", "distinct"]
POPULARITIES: tuple[Popularity, ...] = ("identical", "uniform", "zipf", "distinct")


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: tuple[int, ...]


@dataclass(frozen=True)
class BenchRequest:
    index: int
    prompt: Prompt
    adapter: str | None
    max_new_tokens: int


def adapter_indices(
    count: int, num_adapters: int, popularity: Popularity, seed: int = 0, zipf_s: float = 1.1
) -> list[int | None]:
    """Which adapter (0 … num_adapters-1) each of ``count`` requests uses; ``None`` everywhere without adapters.

    identical: all use adapter 0; uniform: drawn uniformly; zipf: adapter k drawn with weight 1/(k+1)^s;
    distinct: request i uses adapter i mod num_adapters (so each its own when count <= num_adapters).
    """
    if num_adapters <= 0:
        return [None] * count
    rng = random.Random(seed)
    if popularity == "identical":
        return [0] * count
    if popularity == "distinct":
        return [i % num_adapters for i in range(count)]
    if popularity == "uniform":
        return [rng.randrange(num_adapters) for _ in range(count)]
    if popularity == "zipf":
        weights = [1.0 / (k + 1) ** zipf_s for k in range(num_adapters)]
        picks: list[int | None] = list(rng.choices(range(num_adapters), weights=weights, k=count))
        return picks
    raise ValueError(f"unknown popularity {popularity!r}; choose from {', '.join(POPULARITIES)}")


def poisson_arrivals(count: int, rate: float, seed: int = 0) -> list[float]:
    """Arrival offsets (seconds) of a Poisson process of ``rate`` requests/s; all zero for an infinite rate."""
    if rate <= 0 or math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(t)
    return out


class PromptMaker:
    """Prompts of exactly N tokens: space-separated words that are each one token of the model's tokenizer."""

    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        special = set(self.tokenizer.get_added_tokens_decoder())
        words = []
        for _token, token_id in sorted(self.tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            if token_id in special:
                continue
            text = self.tokenizer.decode([token_id])
            if len(text) < 2 or not text.startswith(" ") or not text[1:].isalpha():
                continue
            if self.tokenizer.encode(text, add_special_tokens=False).ids == [token_id]:
                words.append(text)
        if len(words) < 8:
            raise ValueError("the tokenizer has too few single-token words to build prompts")
        self.words = words

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids

    def prompt(self, length: int, seed: int) -> Prompt:
        rng = random.Random(seed)
        text = "".join(rng.choice(self.words) for _ in range(length))
        ids = self.encode(text)
        if len(ids) != length:  # never seen, but a tokenizer may merge across words
            raise ValueError(f"prompt of {length} words tokenized to {len(ids)} tokens")
        return Prompt(text, tuple(ids))


def build_requests(
    prompts: Sequence[Prompt], adapters: Sequence[str | None], max_new_tokens: int
) -> list[BenchRequest]:
    """One request per adapter slot, cycling through the prompt pool."""
    return [BenchRequest(i, prompts[i % len(prompts)], adapter, max_new_tokens) for i, adapter in enumerate(adapters)]
