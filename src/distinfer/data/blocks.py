"""Blocks: the unit of work a job is split into, and the sizes of its plan.

A job's input is cut into consecutive row ranges. Sizes ramp up at the start so the first
results (and the first errors) come quickly, stay at `block_size` in the middle for throughput,
and ramp down at the end so the last blocks spread over all workers instead of one straggler
holding the job. `block_sizes` is pure, so a resumed job re-creates exactly the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Block", "block_size_counts", "block_sizes"]


@dataclass(frozen=True, slots=True)
class Block:
    """Rows `start` to `stop` (exclusive) of the input; line formats also carry byte offsets."""

    id: int
    start: int
    stop: int
    byte_start: int = -1
    byte_stop: int = -1

    @property
    def rows(self) -> int:
        return self.stop - self.start


def block_sizes(num_rows: int, block_size: int, min_block_size: int) -> list[int]:
    """Sizes of consecutive blocks covering `num_rows` rows: ramp up, plateau, mirrored ramp down.

    The ramp is min, 2*min, 4*min, ... below `block_size`, taken from both ends while enough rows
    remain; the rows left in the middle are split into near-equal blocks of at most
    `block_size`, so no block is a tiny leftover.
    """
    counts = block_size_counts(num_rows, block_size, min_block_size)
    return [size for size, count in counts for _ in range(count)]


def block_size_counts(num_rows: int, block_size: int, min_block_size: int) -> list[tuple[int, int]]:
    """`block_sizes` run-length encoded, in order: (size, count) pairs, so that a planner can
    reason over a billion rows' blocks without listing them."""
    if min_block_size < 1:
        raise ValueError(f"min_block_size must be at least 1, got {min_block_size}")
    if block_size < min_block_size:
        raise ValueError(
            f"block_size ({block_size}) must be at least min_block_size ({min_block_size})"
        )
    if num_rows < 0:
        raise ValueError(f"num_rows must not be negative, got {num_rows}")
    ramp: list[tuple[int, int]] = []
    remaining = num_rows
    size = min_block_size
    while size < block_size and remaining >= 2 * size:
        ramp.append((size, 1))
        remaining -= 2 * size
        size *= 2
    count = -(-remaining // block_size)
    middle: list[tuple[int, int]] = []
    if count:
        quotient, extra = divmod(remaining, count)
        middle = [(quotient + 1, extra), (quotient, count - extra)]
    return ramp + [m for m in middle if m[1]] + ramp[::-1]
