"""Token choice: greedy, penalties, top-k / top-p / typical-p filters, seeded draws, logprobs."""

from __future__ import annotations

import math

import torch

from loraplex.shard.sampling import SamplingParams, TokenChooser, choose_tokens


def _logits() -> torch.Tensor:
    return torch.tensor([2.0, 1.5, 1.0, 0.5, -1.0, -3.0])


def test_greedy_rows_take_the_argmax_with_logprobs_and_top_tokens() -> None:
    logits = torch.stack([_logits(), _logits().flip(0)])
    out = choose_tokens(logits, [TokenChooser(SamplingParams(), top_n=2), TokenChooser(SamplingParams())], [[], []])
    assert [c.token_id for c in out] == [0, 5]
    assert math.isclose(out[0].logprob, float(_logits().log_softmax(-1)[0]), rel_tol=1e-6)
    assert [t for t, _ in out[0].top_tokens] == [0, 1] and out[1].top_tokens == []


def test_top_k_and_top_p_never_draw_outside_their_set() -> None:
    for params, allowed in (
        (SamplingParams(do_sample=True, top_k=2, seed=3), {0, 1}),
        (SamplingParams(do_sample=True, top_p=0.5, seed=3), {0, 1}),
        (SamplingParams(do_sample=True, typical_p=0.3, seed=3), {0, 1, 2}),
    ):
        chooser = TokenChooser(params)
        drawn = {chooser.choose(chooser.process(_logits(), [])) for _ in range(200)}
        assert drawn <= allowed and len(drawn) >= 1, (params, drawn)
    wide = TokenChooser(SamplingParams(do_sample=True, temperature=5.0, seed=1))
    assert len({wide.choose(wide.process(_logits(), [])) for _ in range(300)}) >= 5


def test_same_seed_same_draws_and_different_seed_differs() -> None:
    def draws(seed: int) -> list[int]:
        c = TokenChooser(SamplingParams(do_sample=True, temperature=2.0, seed=seed))
        return [c.choose(c.process(_logits(), [])) for _ in range(40)]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)


def test_repetition_and_frequency_penalties_push_seen_tokens_down() -> None:
    rep = TokenChooser(SamplingParams(repetition_penalty=10.0))
    assert rep.choose(rep.process(_logits(), [0, 0])) == 1
    freq = TokenChooser(SamplingParams(frequency_penalty=0.4))
    processed = freq.process(_logits(), [0, 0, 1])
    assert torch.allclose(processed[:2], torch.tensor([1.2, 1.1])) and processed[2] == 1.0
    negative = TokenChooser(SamplingParams(repetition_penalty=2.0)).process(_logits(), [5])
    assert negative[5] == -6.0  # negative scores are multiplied, as in transformers


def _steps(chooser: TokenChooser, rows: int) -> list[int]:
    """Tokens ``chooser`` picks over ``rows`` steps whose logits make token 0 (the EOS here) the favourite."""
    return [choose_tokens(_logits().unsqueeze(0), [chooser], [[]])[0].token_id for _ in range(rows)]


def test_min_tokens_masks_eos_until_reached_on_every_path() -> None:
    for params in (
        SamplingParams(min_tokens=3),  # the vectorised argmax path
        SamplingParams(min_tokens=3, repetition_penalty=1.2),  # the per-row path
        SamplingParams(min_tokens=3, do_sample=True, top_k=1, seed=1),  # a draw that can only pick the favourite
    ):
        assert _steps(TokenChooser(params, eos_ids=[0]), 5) == [1, 1, 1, 0, 0], params
    assert _steps(TokenChooser(SamplingParams(min_tokens=3)), 2) == [0, 0]  # no EOS ids known: nothing to mask
    assert _steps(TokenChooser(SamplingParams(), eos_ids=[0]), 2) == [0, 0]  # min_tokens 0: EOS at once


def test_min_tokens_masks_every_eos_id_and_only_its_own_row() -> None:
    held = TokenChooser(SamplingParams(min_tokens=2), top_n=2, eos_ids=[0, 1, 999])  # ids past the vocab: ignored
    free = TokenChooser(SamplingParams(), eos_ids=[0, 1])
    out = choose_tokens(torch.stack([_logits(), _logits()]), [held, free], [[], []])
    assert [c.token_id for c in out] == [2, 0]
    assert [t for t, _ in out[0].top_tokens] == [2, 3]  # the masked EOS ids have probability 0
    assert math.isclose(out[0].logprob, float(_logits()[2:].log_softmax(-1)[0]), rel_tol=1e-6)
    assert held.generated == free.generated == 1
    assert _steps(held, 2) == [2, 0]  # its second token is still held; from the third on EOS may come


def test_min_tokens_never_masks_the_whole_vocabulary() -> None:
    only_eos = TokenChooser(SamplingParams(min_tokens=5), eos_ids=range(6))
    assert _steps(only_eos, 1) == [0]  # an EOS rather than a draw from nothing


INF = float("inf")


def _one(params: SamplingParams, logits: torch.Tensor, seen: list[int] | None = None) -> tuple[int, float]:
    chooser = TokenChooser(params)
    (choice,) = choose_tokens(logits.unsqueeze(0), [chooser], [seen or []])
    return choice.token_id, choice.logprob


def test_a_tiny_temperature_is_the_argmax_not_a_nan_draw() -> None:
    logits = torch.tensor([30.0, 50.0, 49.0, -10.0])
    for temperature in (1e-38, 1e-30, 1e-45):  # 50 / 1e-38 overflows float32
        for seed in range(5):
            token, logprob = _one(SamplingParams(temperature=temperature, seed=seed), logits)
            assert token == 1 and logprob == 0.0, (temperature, seed, token, logprob)


def test_a_tiny_repetition_penalty_prefers_the_seen_positive_tokens_without_nan() -> None:
    logits = torch.tensor([5.0, 10.0, 20.0, -3.0, 1e-3])
    for seed in range(10):
        params = SamplingParams(do_sample=True, repetition_penalty=1e-38, seed=seed)
        token, logprob = _one(params, logits, seen=[0, 1, 3])
        assert token in (0, 1) and math.isfinite(logprob), (seed, token)  # 5 / 1e-38 and 10 / 1e-38 are +inf
    token, _ = _one(SamplingParams(repetition_penalty=1e-38), logits, seen=[0, 1, 3])  # greedy too
    assert token in (0, 1)


def test_non_finite_logits_never_reach_the_draw() -> None:
    nan = float("nan")
    sampled = SamplingParams(do_sample=True, top_k=3, top_p=0.9, typical_p=0.9, temperature=0.7, seed=1)
    cases = [
        (torch.tensor([1.0, nan, 2.0, nan]), {0, 2}),  # NaN scores are never chosen
        (torch.tensor([1.0, INF, 2.0, INF]), {1, 3}),  # +inf ones always are
        (torch.tensor([-INF, 3.0, -INF, -INF]), {1}),
    ]
    for logits, allowed in cases:
        for params in (sampled, SamplingParams(do_sample=True, seed=2), SamplingParams(do_sample=True, seed=3)):
            drawn = {_one(params, logits)[0] for _ in range(20)}
            assert drawn <= allowed, (logits, params, drawn)
    for hopeless in (torch.full((4,), nan), torch.full((4,), -INF)):  # nothing to draw from: no exception
        token, _ = _one(sampled, hopeless)
        assert 0 <= token < 4


def test_the_fallback_takes_a_draw_as_a_resumed_sampler_counts_one() -> None:
    params = SamplingParams(do_sample=True, seed=7)
    hopeless, plain = TokenChooser(params), TokenChooser(params)
    hopeless.choose(torch.full((4,), -INF))
    plain.choose(torch.zeros(4))
    assert hopeless.generator is not None and plain.generator is not None
    assert torch.equal(hopeless.generator.get_state(), plain.generator.get_state())


def test_top_p_and_typical_p_too_small_for_float32_keep_the_best_token() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0])
    for params in (SamplingParams(top_p=1e-46, seed=1), SamplingParams(typical_p=1e-46, seed=1)):
        assert {_one(params, logits)[0] for _ in range(10)} == {1}, params
