"""The router's KV arithmetic in blocks: rounding, growth, optimistic admission, newest-first preemption."""

from __future__ import annotations

import pytest

from loraplex.router.kv_budget import Admission, KvBudget


def test_blocks_round_up_to_whole_blocks() -> None:
    kv = KvBudget(block_size=8, num_blocks=10)
    assert [kv.blocks(n) for n in (0, 1, 7, 8, 9, 16, 17)] == [0, 1, 1, 1, 2, 2, 3]
    assert kv.tokens == 80
    # The bug this replaces: 3 requests of 5 + 14 tokens are 57 tokens (< 64) but 2 blocks of 16 each.
    assert 3 * KvBudget(16, 4).worst_case(5, 14) == 6 > 4


def test_a_running_sequence_needs_the_blocks_of_its_length_for_the_next_step() -> None:
    kv = KvBudget(block_size=8, num_blocks=10)
    # After a prefill of 8 tokens the sequence is 9 long (first token pending): the next step writes token 9.
    assert kv.next_step([9]) == 2
    assert kv.next_step([8, 8, 17]) == 1 + 1 + 3


def test_admission_counts_the_prompt_and_its_first_step() -> None:
    kv = KvBudget(block_size=8, num_blocks=4)
    admission = Admission(kv, [8])  # one running sequence: 1 block now
    assert admission.used == 1
    assert admission.fits(15)  # 15 + 1 tokens: 2 blocks, 3 in all
    admission.take(15)
    assert admission.used == 3
    assert admission.fits(7) and not admission.fits(8)  # 8 + 1 tokens would need 2 blocks of the 1 left


def test_victims_are_the_newest_until_the_rest_fits() -> None:
    kv = KvBudget(block_size=8, num_blocks=5)
    running = [(3, 9), (1, 17), (7, 9), (5, 8)]  # next step: 2 + 3 + 2 + 1 = 8 blocks
    assert kv.victims(running) == [7, 5]  # newest first: 8 - 2 - 1 = 5 fits
    assert kv.victims([(1, 17), (2, 16)]) == []  # 3 + 2 fits exactly


def test_the_oldest_is_never_a_victim() -> None:
    kv = KvBudget(block_size=4, num_blocks=2)
    assert kv.victims([(9, 20)]) == []  # it fits alone by construction (the router checks at start-up)
    assert kv.victims([(2, 8), (1, 8)]) == [2]


def test_a_budget_needs_a_block() -> None:
    with pytest.raises(ValueError):
        KvBudget(block_size=16, num_blocks=0)
