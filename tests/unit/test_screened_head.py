"""The screened LM head (bfloat16 scores, float32 rescoring, a proven bound) gives exactly the
float32 head's candidates, falling back to full float32 where the bound cannot prove it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distinfer.models.llm.head import ScreenedHead
from distinfer.models.llm.sampling import top_candidates


def _exact(weight: torch.Tensor, h: torch.Tensor, k: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    return top_candidates(F.linear(h, weight), k, offset)


@pytest.mark.parametrize("k", [1, 64])
def test_candidates_equal_the_float32_heads(k: int) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(20_000, 64, generator=g)
    h = torch.randn(16, 64, generator=g) * 3
    head = ScreenedHead(weight)
    values, ids = head.candidates(h, k, offset=1000)
    want_values, want_ids = _exact(weight, h, k, 1000)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(values, want_values, rtol=1e-5, atol=1e-5)  # summed in another order
    assert head.screened == 16


def test_rows_too_close_for_bfloat16_are_scored_in_full() -> None:
    """Rows that differ below bfloat16's resolution: the screen cannot prove its pick, so it
    scores those sequences in float32, and the answer is still the float32 head's."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 32, generator=g)
    weight = base + 1e-4 * torch.randn(5_000, 32, generator=g)
    h = torch.randn(4, 32, generator=g)
    head = ScreenedHead(weight)
    _, ids = head.candidates(h, 1)
    assert head.fallbacks == 4
    assert torch.equal(ids, _exact(weight, h, 1, 0)[1])


def test_a_head_smaller_than_the_screen_is_scored_in_full() -> None:
    weight = torch.randn(40, 8)
    h = torch.randn(3, 8)
    _, ids = ScreenedHead(weight).candidates(h, 5, offset=7)
    assert torch.equal(ids, _exact(weight, h, 5, 7)[1])
