"""glm4.engine.sampling on hand-made logits: the penalties and top-k / top-p do exactly what they promise.

repetition_penalty follows HF (over prompt and output: positive logits divided, negative ones multiplied);
presence and frequency penalties follow OpenAI (over the output only: logit - frequency * count - presence *
[count > 0]); top-k keeps the k best, top-p the smallest set of best tokens whose mass reaches p.
"""

from __future__ import annotations

import math

import pytest
import torch

from glm4.engine.base import SamplingParams
from glm4.engine.sampling import apply_penalties, restrict_top_k_top_p

NEG_INF = float("-inf")


def penalized(logits: list[float], prompt: list[int], output: list[int], **params) -> list[float]:
    row = torch.tensor(logits)
    return apply_penalties(row, SamplingParams(**params), torch.tensor(prompt, dtype=torch.long),
                           torch.tensor(output, dtype=torch.long)).tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    # token 0 in the prompt, token 1 in the output, 2 and 3 never seen
    assert penalized([2.0, -1.0, 0.5, 3.0], prompt=[0], output=[1], repetition_penalty=2.0) == [1.0, -2.0, 0.5, 3.0]


def test_repetition_penalty_counts_a_token_once_however_often_it_was_seen():
    assert penalized([4.0, 1.0], prompt=[0, 0], output=[0, 0, 0], repetition_penalty=2.0) == [2.0, 1.0]


def test_presence_and_frequency_penalties_subtract_per_output_occurrence():
    # output: token 2 twice, token 3 once; token 0 only in the prompt (OpenAI's penalties ignore the prompt)
    logits = [1.0, 1.0, 1.0, 1.0]
    assert penalized(logits, prompt=[0], output=[2, 2, 3], presence_penalty=0.5) == [1.0, 1.0, 0.5, 0.5]
    assert penalized(logits, prompt=[0], output=[2, 2, 3], frequency_penalty=0.25) == [1.0, 1.0, 0.5, 0.75]
    assert penalized(logits, prompt=[0], output=[2, 2, 3], presence_penalty=0.5, frequency_penalty=0.25) == \
        [1.0, 1.0, 0.0, 0.25]


def test_negative_presence_penalty_favours_repeats():
    assert penalized([0.0, 0.0], prompt=[], output=[1], presence_penalty=-1.0) == [0.0, 1.0]


def test_penalties_with_nothing_generated_change_nothing_but_repetition_over_the_prompt():
    assert penalized([1.0, 2.0], prompt=[1], output=[], presence_penalty=2.0, frequency_penalty=2.0) == [1.0, 2.0]
    assert penalized([1.0, 2.0], prompt=[1], output=[], repetition_penalty=4.0) == [1.0, 0.5]


def test_all_penalties_together_apply_repetition_first():
    # repetition (x2 over prompt+output), then presence 1 and frequency 0.5 over the output [1, 1]
    assert penalized([4.0, 4.0, 4.0], prompt=[0], output=[1, 1], repetition_penalty=2.0, presence_penalty=1.0,
                     frequency_penalty=0.5) == [2.0, 0.0, 4.0]


def kept(logits: list[list[float]], top_k: list[int], top_p: list[float]) -> list[dict[int, float]]:
    """Per row: token id → probability after the restriction (tokens cut away are left out)."""
    restricted, order = restrict_top_k_top_p(torch.tensor(logits), top_k, top_p)
    probabilities = torch.softmax(restricted, dim=-1)
    rows = []
    for i in range(len(logits)):
        ids = order[i].tolist() if order is not None else list(range(len(logits[i])))
        rows.append({token: p for token, p in zip(ids, probabilities[i].tolist()) if p > 0})
    return rows


def logits_for(probabilities: list[float]) -> list[float]:
    return [math.log(p) for p in probabilities]


def test_no_restriction_returns_the_logits_untouched():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    restricted, order = restrict_top_k_top_p(logits, [0], [1.0])
    assert order is None and restricted is logits


def test_top_k_keeps_the_k_best_and_renormalizes():
    (row,) = kept([logits_for([0.1, 0.4, 0.3, 0.2])], top_k=[2], top_p=[1.0])
    assert row.keys() == {1, 2}
    assert row[1] == pytest.approx(0.4 / 0.7) and row[2] == pytest.approx(0.3 / 0.7)


def test_top_k_of_one_is_greedy_and_at_least_the_vocabulary_is_off():
    assert kept([[0.0, 5.0, 1.0]], top_k=[1], top_p=[1.0]) == [{1: 1.0}]
    (row,) = kept([logits_for([0.2, 0.5, 0.3])], top_k=[3], top_p=[1.0])
    assert row == pytest.approx({0: 0.2, 1: 0.5, 2: 0.3})


def test_top_p_keeps_the_smallest_set_of_best_tokens_reaching_p():
    probabilities = logits_for([0.05, 0.5, 0.15, 0.3])  # best first: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    (row,) = kept([probabilities], top_k=[0], top_p=[0.75])  # 0.5 < 0.75, 0.5 + 0.3 reaches it
    assert row == pytest.approx({1: 0.5 / 0.8, 3: 0.3 / 0.8})
    (row,) = kept([probabilities], top_k=[0], top_p=[0.9])  # 0.8 < 0.9: token 2 is needed too
    assert row == pytest.approx({1: 0.5 / 0.95, 3: 0.3 / 0.95, 2: 0.15 / 0.95})


def test_top_p_stops_at_the_token_whose_mass_reaches_p_exactly():
    (row,) = kept([[0.0, 0.0, 0.0, 0.0]], top_k=[0], top_p=[0.5])  # 0.25 + 0.25 = 0.5 exactly: two tokens, not three
    assert len(row) == 2 and all(p == 0.5 for p in row.values())


def test_top_p_always_keeps_the_best_token():
    (row,) = kept([logits_for([0.6, 0.4])], top_k=[0], top_p=[0.1])
    assert row == {0: 1.0}


def test_top_k_and_top_p_together_and_per_row():
    logits = [logits_for([0.4, 0.3, 0.2, 0.1]), logits_for([0.1, 0.2, 0.3, 0.4]), logits_for([0.25] * 4)]
    first, second, third = kept(logits, top_k=[2, 0, 2], top_p=[0.55, 0.5, 1.0])
    assert first == {0: 1.0}  # top-p runs on what top-k left, renormalized: 0.4 / 0.7 = 0.57 already reaches 0.55
    assert second == pytest.approx({3: 0.4 / 0.7, 2: 0.3 / 0.7})  # p only
    assert len(third) == 2 and sum(third.values()) == pytest.approx(1.0)  # k only, ties: any two
