"""The LM head's best candidates in float32, found at bfloat16 speed.

Scoring the 262k-token vocabulary is most of a float32 decode step (Gemma 3 270M: 168M of
its 268M multiply-adds per token). A bfloat16 matrix product of the same size runs about 3x
faster on CPUs with bfloat16 instructions, but its scores are rounded, and greedy decoding
must pick exactly the float32 argmax. `ScreenedHead` gets both:

1. score every row with a bfloat16 copy of the head (`rough`), and take the `k + SCREEN`
   best rows of each sequence;
2. score those rows again in float32 from the float32 head (exact, as the full product
   would), and keep the `k` best;
3. prove that no row left out could have beaten the k-th: a left-out row's rough score is
   at most T (the last screened row's), and its float32 score differs from its rough score
   by at most `2^-7 |T| + (2^-7 + 2^-12) * max_row_norm * |h|` (both operands rounded to
   bfloat16, relative error 2^-8 each, products summed in float32, the output rounded to
   bfloat16; Cauchy-Schwarz bounds the sum of |w||h| of any row by its norm times |h|).
   When the k-th float32 score is not above that bound, the sequence is scored in full
   float32 instead, so the result is always the float32 head's.

The float32 head is kept anyway (it is the tied embedding table); the bfloat16 copy adds half
its size again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sampling import order_candidates, top_candidates

__all__ = ["SCREEN", "ScreenedHead"]

SCREEN = 64  # rows screened beyond the k wanted
_REL = 2.0**-7  # the bfloat16 output's rounding, with room
_DOT = 2.0**-7 + 2.0**-12  # rounded operands, float32 sums, with room


class ScreenedHead:
    """Candidates of a float32 head `weight` [rows, hidden] (see the module docstring)."""

    def __init__(self, weight: torch.Tensor) -> None:
        assert weight.dtype == torch.float32
        self.weight = weight
        self.rough = weight.to(torch.bfloat16)
        self.max_norm = float(weight.norm(dim=1).max()) if len(weight) else 0.0
        self.screened = self.fallbacks = 0  # sequences, and those scored in full

    def candidates(self, h: torch.Tensor, k: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The `k` best (float32 score, token id + offset) of each row of `h`, best first."""
        h = h.float()
        width = min(k + SCREEN, self.weight.shape[0])
        if width == self.weight.shape[0]:
            return top_candidates(F.linear(h, self.weight), k, offset)
        rough = F.linear(h.to(torch.bfloat16), self.rough)
        r_values, rows = torch.topk(rough, width, dim=-1)
        exact = torch.bmm(self.weight[rows], h[:, :, None])[:, :, 0]  # [S, width]
        values, order = torch.topk(exact, k, dim=-1)
        ids = rows.gather(-1, order)
        floor = r_values[:, -1].float()
        bound = floor + _REL * floor.abs() + _DOT * self.max_norm * h.norm(dim=-1)
        doubtful = (values[:, -1] <= bound).nonzero()[:, 0]
        self.screened += len(h)
        if len(doubtful):
            self.fallbacks += len(doubtful)
            v, i = torch.topk(F.linear(h[doubtful], self.weight), k, dim=-1)
            values[doubtful], ids[doubtful] = v, i
        return order_candidates(values, ids + offset)
