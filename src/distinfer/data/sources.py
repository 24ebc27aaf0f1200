"""Input sources: open a file cheaply in the driver, plan blocks, read one block in a worker.

The driver never loads the data set: `open_source` reads metadata and counts rows by streaming,
`plan_blocks` streams once more to find each block's byte range (line formats) and returns
only small `Block` records. A worker's `read_block` seeks to its own range and parses nothing
else, so memory per process is one block whatever the file size.

An input may be a local path or a URL such as s3://bucket/data.jsonl (any protocol fsspec knows,
with its package installed): workers on other machines read their blocks from it by byte range.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
from collections.abc import Collection, Sequence

from distinfer.data._columns import Column
from distinfer.data._formats import OPENERS, group_bounds, raw_row, read_rows
from distinfer.data._listing import is_image_input, list_images
from distinfer.data._scan import record_offsets
from distinfer.data._spec import SourceSpec, changed, describe_row, name_of
from distinfer.data._storage import Stat, is_url, locate, normalize_location
from distinfer.data._storage import reason as _reason
from distinfer.data.blocks import Block, block_sizes
from distinfer.errors import ConfigError, InputError

__all__ = [
    "FORMATS",
    "SourceSpec",
    "check_columns",
    "describe_row",
    "open_images",
    "open_source",
    "plan_blocks",
    "raw_row",
    "read_block",
]

FORMATS = ("text", "jsonl", "csv", "parquet", "npy", "images")
_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl",
             ".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".npy": "npy"}


def open_source(path: str, format: str | None = None) -> SourceSpec:
    """Check `path`, detect or check its format, and count its rows by streaming."""
    if format is not None and format not in FORMATS:
        raise ConfigError(f"--input-format '{format}' is unknown; use one of {', '.join(FORMATS)}")
    if format is None and is_image_input(path):
        return open_images(path)[0]
    full = normalize_location(path)
    try:
        info = locate(full).stat()
    except FileNotFoundError:
        raise InputError(f"input file '{path}' does not exist; check --input") from None
    except OSError as exc:
        raise InputError(f"input file '{path}' cannot be read ({_reason(exc)}); "
                         "check --input") from None
    if info.is_dir:
        raise InputError(f"input '{path}' is a directory; give one file with --input")
    suffix = os.path.splitext(full.split("?")[0] if is_url(full) else full)[1].lower()
    format = format or _SUFFIXES.get(suffix)
    if format is None:
        raise InputError(f"input file '{path}' has an unknown suffix '{suffix}'; name its format "
                         f"with --input-format ({', '.join(FORMATS)})")
    try:
        columns, rows, numeric = OPENERS[format](full)
    except OSError as exc:
        raise InputError(f"input file '{path}' cannot be read ({_reason(exc)}); "
                         "check its permissions") from None
    return SourceSpec(full, format, columns, rows, info.size, info.mtime_ns, numeric, info.version)


def open_images(path: str) -> tuple[SourceSpec, int]:
    """An image directory or glob (see `_listing`), listed into a temporary file removed when
    this process exits: the source reading that listing, and the files skipped (not images
    by their suffix)."""
    tmp, listed, skipped = list_images(path)
    atexit.register(_remove_quietly, tmp)
    info = os.stat(tmp)
    return SourceSpec(tmp, "images", ("path",), listed, info.st_size, info.st_mtime_ns), skipped


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def _stat(spec: SourceSpec) -> Stat:
    try:
        return locate(spec.path).stat()
    except OSError as exc:
        raise InputError(f"input file '{spec.path}' cannot be read any more ({_reason(exc)}); "
                         "restore it and restart the job") from None


def _check_unchanged(spec: SourceSpec) -> None:
    info = _stat(spec)
    if (info.size, info.mtime_ns, info.version) != (spec.size_bytes, spec.mtime_ns, spec.version):
        raise changed(spec)


def plan_blocks(spec: SourceSpec, block_size: int, min_block_size: int) -> list[Block]:
    """Blocks covering every row once, in order; byte ranges found by one streaming pass."""
    sizes = block_sizes(spec.num_rows, block_size, min_block_size)
    bounds = list(itertools.accumulate(sizes, initial=0))
    if not sizes:
        return []
    _check_unchanged(spec)
    if spec.format == "parquet":
        # a block never spans two row groups, so a worker decodes at most one group for it
        bounds = sorted(set(bounds) | set(group_bounds(spec.path, spec.mtime_ns, spec.version)))
    if spec.format in ("parquet", "npy"):
        return [Block(i, a, b) for i, (a, b) in enumerate(itertools.pairwise(bounds))]
    skip = 1 if spec.format == "csv" else 0  # the header record
    offsets = record_offsets(spec.path, (skip + b for b in bounds), spec.format == "csv")
    pairs = zip(itertools.pairwise(bounds), itertools.pairwise(offsets), strict=True)
    return [Block(i, a, b, x, y) for i, ((a, b), (x, y)) in enumerate(pairs)]


def check_columns(spec: SourceSpec, columns: Sequence[str]) -> None:
    """InputError naming the first of `columns` that `spec` does not have."""
    for column in columns:
        if column not in spec.columns:
            available = ", ".join(spec.columns) or "none"
            raise InputError(f"input '{name_of(spec.path)}' has no column '{column}' "
                             f"(available: {available}); pick one with --column")


def read_block(
    spec: SourceSpec, block: Block, columns: Sequence[str], skip: Collection[int] = ()
) -> dict[str, Column]:
    """The requested columns of `block`'s rows only, each a list[str] or an ndarray; the
    block-relative rows in `skip` left out. An error about one row names it (`InputError.row`)."""
    check_columns(spec, columns)
    _check_unchanged(spec)
    try:
        return read_rows(spec, block, list(columns), skip)
    except OSError as exc:
        raise InputError(f"input file '{spec.path}' cannot be read ({_reason(exc)}); "
                         "check that it is still there and readable") from None
