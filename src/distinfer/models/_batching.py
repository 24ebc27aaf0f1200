"""Token sequences of different lengths → padded batches with little padding.

Rows are sorted longest first and cut into batches of at most `batch_size` rows; a batch is
also cut short when the next row is much shorter than the batch's longest (see
`PAD_TOLERANCE`). Results are put back in input order by `run_block` through `order`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .base import Batches

__all__ = ["PAD_TOLERANCE", "padded_batches"]

# A batch is cut short when the next (shorter) row is more than this share shorter than the
# batch's longest row. With rows sorted by length this keeps padding small even in small
# blocks, where a fixed batch of 64 would span very different lengths. On one CPU thread
# a batch of 8-16 rows runs as fast per row as one of 64 (measured: 256-row blocks went
# from 127 to 155 rows/s); a GPU wants fuller batches, so it tolerates more padding.
PAD_TOLERANCE = {"cpu": 0.05, "cuda": 0.25}
_MIN_BUCKET = 8


def length_buckets(
    order: np.ndarray, lengths: np.ndarray, batch_size: int, tolerance: float
) -> list[np.ndarray]:
    """Split rows (sorted longest first) into batches of at most `batch_size` rows."""
    buckets: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        width = lengths[order[start]]
        stop = min(start + batch_size, n)
        floor = width * (1.0 - tolerance)
        cut = start + _MIN_BUCKET
        while cut < stop and lengths[order[cut]] >= floor:
            cut += 1
        stop = min(stop, max(cut, start + 1))
        buckets.append(order[start:stop])
        start = stop
    return buckets


def padded_batches(
    ids: Sequence[Sequence[int] | np.ndarray], batch_size: int, device_type: str,
    mask_dtype: torch.dtype = torch.long, tolerance: float | None = None,
) -> Batches:
    """Batches of (token ids [B, T] int64, mask [B, T]) with rows right-padded with 0.

    `tolerance` overrides the device's `PAD_TOLERANCE` (1.0: never cut a batch by length)."""
    lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
    order = np.argsort(-lengths, kind="stable")
    if tolerance is None:
        tolerance = PAD_TOLERANCE.get(device_type, 0.25)
    batches = []
    for chosen in length_buckets(order, lengths, batch_size, tolerance):
        width = int(lengths[chosen[0]])
        tokens = np.zeros((len(chosen), width), dtype=np.int64)
        mask = np.zeros((len(chosen), width), dtype=np.bool_)
        for row, i in enumerate(chosen):
            n = int(lengths[i])
            tokens[row, :n] = ids[i]
            mask[row, :n] = True
        batches.append((torch.from_numpy(tokens), torch.from_numpy(mask).to(mask_dtype)))
    return Batches(batches, order)
