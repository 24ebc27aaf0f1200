"""Choosing the next token: greedy, or sampled with temperature, top-k, top-p and min-p.

Sampling sees each sequence's `CANDIDATES` best-scored tokens, not the whole vocabulary: that
is what a tensor-parallel group exchanges (each rank its slice's best, merged on rank 0)
instead of the full logits, and every strategy samples from the same candidates, so the
same seed gives the same text whatever the strategy. The probability left outside the
candidates is dropped (for a 262k vocabulary it is negligible whenever sampling is sane;
`top_k` above `CANDIDATES` is refused).

A sampled token is a pure function of (the candidates, the row's parameters, the row's seed,
the token's position): the uniform number comes from a hash of the seed and the position,
not from a random stream shared by the batch, so a row gives the same text whatever worker,
batch or strategy ran it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...messages import SAMPLING_CANDIDATES, sampling_problem

__all__ = ["CANDIDATES", "SamplingParams", "candidates_for", "choose", "merge_candidates", "order_candidates",
           "top_candidates", "uniform"]

CANDIDATES = SAMPLING_CANDIDATES  # tokens per sequence that sampling considers


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: all candidates
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def problem(self) -> str | None:
        """Why these parameters are out of range (None: fine)."""
        return sampling_problem(self.temperature, self.top_k, self.top_p, self.min_p)


def candidates_for(sampling: list[tuple[SamplingParams, int]]) -> int:
    """How many candidates a step needs: one when every sequence is greedy."""
    return 1 if all(p.greedy for p, _ in sampling) else CANDIDATES


def top_candidates(logits: torch.Tensor, k: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` best (score, token id) of each row, best first; ids shifted by `offset` (a
    rank's first vocabulary id). Equal scores are ordered by id, for the same order anywhere."""
    values, ids = torch.topk(logits, min(k, logits.shape[-1]), dim=-1)
    return order_candidates(values, ids + offset)


def merge_candidates(
    parts: list[tuple[torch.Tensor, torch.Tensor]], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` best of several ranks' candidates (each row's union)."""
    values = torch.cat([v for v, _ in parts], dim=-1)
    ids = torch.cat([i for _, i in parts], dim=-1)
    values, ids = order_candidates(values, ids)
    return values[:, :k], ids[:, :k]


def order_candidates(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (score, id) pairs by score, best first, then by id."""
    by_id = torch.argsort(ids, dim=-1, stable=True)
    values, ids = values.gather(-1, by_id), ids.gather(-1, by_id)
    by_value = torch.argsort(values, dim=-1, descending=True, stable=True)
    return values.gather(-1, by_value), ids.gather(-1, by_value)


_MASK64 = (1 << 64) - 1


def uniform(seed: int, position: int) -> float:
    """A number in [0, 1) that depends only on (seed, position): SplitMix64 of both."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


def choose(values: np.ndarray, ids: np.ndarray, params: SamplingParams, position: int) -> int:
    """The next token of one sequence from its candidates (best first)."""
    if params.greedy:
        return int(ids[0])
    logits = values.astype(np.float64) / params.temperature
    if params.top_k:
        logits = logits[: params.top_k]
    probs = np.exp(logits - logits[0])
    probs /= probs.sum()
    keep = len(probs)
    if params.min_p > 0:
        keep = min(keep, int(np.count_nonzero(probs >= params.min_p * probs[0])))
    if params.top_p < 1:
        cumulative = np.cumsum(probs)
        keep = min(keep, int(np.searchsorted(cumulative, params.top_p * cumulative[-1])) + 1)
    probs = probs[: max(keep, 1)]
    cdf = np.cumsum(probs)
    u = uniform(params.seed, position) * cdf[-1]
    return int(ids[min(int(np.searchsorted(cdf, u, side="right")), len(probs) - 1)])
