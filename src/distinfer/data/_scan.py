"""Streaming scan of line-based files for record ends, without loading the file.

A record ends at a newline; in CSV only at a newline outside a quoted field. A newline is
outside quotes when an even number of quote characters precede it in the file (a doubled
quote inside a field adds two, so parity still works). Chunks with no quote character take a
fast path (`bytes.count`); the others are scanned with numpy, never a per-byte Python loop.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from distinfer.data._storage import locate
from distinfer.errors import InputError

__all__ = ["CHUNK_BYTES", "count_ends", "count_records", "record_offsets"]

CHUNK_BYTES = 4 << 20
_NEWLINE = ord("\n")
_QUOTE = ord('"')


def _ends_in(chunk: bytes, odd: bool, quoted: bool) -> tuple[npt.NDArray[Any], bool]:
    """Offsets in `chunk` just past each record end, and whether a quote is open after it."""
    data = np.frombuffer(chunk, np.uint8)
    newlines = np.flatnonzero(data == _NEWLINE)
    if not quoted or b'"' not in chunk:
        return (newlines[:0] if odd else newlines) + 1, odd
    # uint8 wraps at 256, which keeps the parity we need while using one byte per byte
    quotes = np.cumsum(data == _QUOTE, dtype=np.uint8)
    outside = ((quotes[newlines] + int(odd)) & 1) == 0
    return newlines[outside] + 1, bool((int(quotes[-1]) + odd) & 1)


def _count_in(chunk: bytes, odd: bool, quoted: bool) -> tuple[int, bool]:
    if not quoted or b'"' not in chunk:
        return (0 if odd else chunk.count(b"\n")), odd
    ends, odd = _ends_in(chunk, odd, quoted)
    return len(ends), odd


def _chunks(path: str) -> Iterator[tuple[int, bytes]]:
    with locate(path).open() as f:
        offset = 0
        while chunk := f.read(CHUNK_BYTES):
            yield offset, chunk
            offset += len(chunk)


def count_ends(data: bytes, quoted: bool) -> int:
    """Number of record ends in `data`, which starts outside any quoted field."""
    return _count_in(data, False, quoted)[0]


def count_records(path: str, quoted: bool) -> tuple[int, bool]:
    """(records in the file, whether it ends inside a quoted field).

    A last record without a trailing newline counts; a trailing newline adds no empty record.
    """
    ended, odd, last = 0, False, b"\n"
    for _, chunk in _chunks(path):
        count, odd = _count_in(chunk, odd, quoted)
        ended += count
        last = chunk[-1:]
    return ended + (odd or last != b"\n"), odd


def record_offsets(path: str, targets: Iterable[int], quoted: bool) -> Iterator[int]:
    """For each record index in `targets` (non-decreasing), the byte offset where it starts.

    The index one past the last record gives the file size, so consecutive targets delimit
    byte ranges holding whole records.
    """
    pending = iter(targets)
    target = next(pending, None)
    while target == 0:
        yield 0
        target = next(pending, None)
    ended, odd, size, last = 0, False, 0, b"\n"
    for offset, chunk in _chunks(path):
        if target is None:
            return
        size, last = offset + len(chunk), chunk[-1:]
        before, ends = odd, None
        if quoted and b'"' in chunk:  # the slow path: find the ends once, count them
            ends, odd = _ends_in(chunk, before, quoted)
            count = len(ends)
        else:
            count, odd = _count_in(chunk, before, quoted)
        if target <= ended + count:
            if ends is None:
                ends, _ = _ends_in(chunk, before, quoted)
            while target is not None and target <= ended + count:
                yield offset + int(ends[target - ended - 1])
                target = next(pending, None)
        ended += count
    while target is not None:
        if target != ended + 1 or (last == b"\n" and not odd):
            name = os.path.basename(path)
            raise InputError(f"input file '{name}' changed while it was read; restart the job")
        yield size
        target = next(pending, None)
