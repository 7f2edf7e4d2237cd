"""Workloads: popularity shapes, Poisson arrivals, prompts of an exact token length."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

import pytest

from loraplex.bench.workload import PromptMaker, adapter_indices, build_requests, poisson_arrivals
from tests.factories import tiny_tokenizer


def test_identical_and_distinct() -> None:
    assert adapter_indices(50, 10, "identical") == [0] * 50
    assert adapter_indices(64, 64, "distinct") == list(range(64))
    assert adapter_indices(10, 4, "distinct") == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert adapter_indices(5, 0, "zipf") == [None] * 5


def test_uniform_is_flat() -> None:
    counts = Counter(adapter_indices(20_000, 10, "uniform", seed=3))
    assert set(counts) == set(range(10))
    expected = 2000
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001


def test_zipf_follows_a_power_law() -> None:
    n, s = 1000, 1.1
    picks = adapter_indices(50_000, n, "zipf", seed=5, zipf_s=s)
    counts = Counter(picks)
    harmonic = sum(1 / (k + 1) ** s for k in range(n))
    for rank in (0, 1, 4, 9):  # the head: each within 5 % of its expected share
        assert counts[rank] / len(picks) == pytest.approx(1 / (rank + 1) ** s / harmonic, rel=0.05)
    assert counts[0] > counts[1] > counts[4] > counts[9] > counts[99]
    # the suite's shape: 128 requests over 1,000 adapters hit many adapters once, a few often
    few = Counter(adapter_indices(128, n, "zipf", seed=2, zipf_s=s))
    assert 50 < len(few) < 128 and max(few.values()) > 10


def test_same_seed_same_workload() -> None:
    assert adapter_indices(100, 50, "zipf", seed=1) == adapter_indices(100, 50, "zipf", seed=1)
    assert adapter_indices(100, 50, "zipf", seed=1) != adapter_indices(100, 50, "zipf", seed=2)


def test_poisson_arrivals_have_the_rate() -> None:
    times = poisson_arrivals(20_000, rate=8.0, seed=1)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert statistics.mean(gaps) == pytest.approx(1 / 8.0, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(1 / 8.0, rel=0.05)  # exponential: sd = mean
    assert poisson_arrivals(3, rate=0) == [0.0, 0.0, 0.0]


def test_prompts_have_the_exact_length(tmp_path: Path) -> None:
    tiny_tokenizer(tmp_path)
    maker = PromptMaker(tmp_path)
    for seed in range(5):
        prompt = maker.prompt(40, seed)
        assert len(prompt.ids) == 40
        assert maker.encode(prompt.text) == list(prompt.ids)
    assert maker.prompt(40, 1) == maker.prompt(40, 1)
    assert maker.prompt(40, 1) != maker.prompt(40, 2)
    reqs = build_requests([maker.prompt(8, 0), maker.prompt(8, 1)], ["a", None, "b"], 5)
    assert [r.prompt for r in reqs] == [maker.prompt(8, 0), maker.prompt(8, 1), maker.prompt(8, 0)]
    assert [(r.index, r.adapter, r.max_new_tokens) for r in reqs] == [(0, "a", 5), (1, None, 5), (2, "b", 5)]
