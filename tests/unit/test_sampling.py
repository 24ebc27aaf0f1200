"""Sampling is a pure function of the candidates, the parameters, the seed and the position."""

from __future__ import annotations

import numpy as np
import torch

from distinfer.models.llm.sampling import SamplingParams, choose, merge_candidates, top_candidates, uniform


def test_the_uniform_number_depends_on_seed_and_position_only() -> None:
    draws = [uniform(7, p) for p in range(2000)]
    assert draws == [uniform(7, p) for p in range(2000)]
    assert all(0 <= u < 1 for u in draws)
    assert abs(np.mean(draws) - 0.5) < 0.03 and len(set(draws)) == 2000
    assert uniform(8, 0) != uniform(7, 0)


def test_candidates_split_over_ranks_merge_to_the_whole_vocabularys() -> None:
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    logits[1, 10] = logits[1, 900] = 50.0  # a tie across the halves: the lower id first
    whole = top_candidates(logits, 8)
    halves = [top_candidates(logits[:, :500], 8), top_candidates(logits[:, 500:], 8, offset=500)]
    merged = merge_candidates(halves, 8)
    assert torch.equal(whole[1], merged[1]) and torch.equal(whole[0], merged[0])
    assert merged[1][1, :2].tolist() == [10, 900]


def test_greedy_top_k_top_p_and_min_p() -> None:
    values = np.array([5.0, 4.0, 3.0, 1.0, 0.0], dtype=np.float32)
    ids = np.array([40, 41, 42, 43, 44])
    assert choose(values, ids, SamplingParams(), 3) == 40
    picks = {choose(values, ids, SamplingParams(temperature=1.0, top_k=2, seed=s), 0) for s in range(300)}
    assert picks == {40, 41}
    # p(40) = 0.66 > 0.5: top_p 0.5 keeps it alone
    assert {choose(values, ids, SamplingParams(temperature=1.0, top_p=0.5, seed=s), 0) for s in range(100)} == {40}
    # min_p 0.3: 41 (e^-1 = 0.37 of the best) stays, 42 (0.14) goes
    kept = {choose(values, ids, SamplingParams(temperature=1.0, min_p=0.3, seed=s), 0) for s in range(300)}
    assert kept == {40, 41}
    wide = {choose(values, ids, SamplingParams(temperature=5.0, seed=s), 0) for s in range(300)}
    assert wide == set(ids.tolist())


def test_out_of_range_parameters_are_named() -> None:
    assert SamplingParams(temperature=-1).problem() == "temperature must be >= 0, got -1"
    assert "top_k must be between 0" in (SamplingParams(top_k=65).problem() or "")
    assert "top_p must be in (0, 1]" in (SamplingParams(top_p=0).problem() or "")
    assert SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05).problem() is None
