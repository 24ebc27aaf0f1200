"""The description of one input file that travels to worker processes, and row naming.

Kept apart from the readers so that both `sources` and `_formats` can use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from distinfer.errors import InputError

__all__ = ["SourceSpec", "changed", "describe_row", "name_of"]


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """What a worker needs to read blocks of one input file; small and picklable.

    `path` is an absolute local path or a URL every worker can reach. `numeric` lists the CSV
    columns whose first rows all parse as numbers: they are read as arrays in every block, so a
    column's type never changes from one block to the next.
    """

    path: str
    format: str
    columns: tuple[str, ...]
    num_rows: int
    size_bytes: int
    mtime_ns: int
    numeric: tuple[str, ...] = ()
    version: str = ""  # what identifies a remote object's version (its ETag, ...); "" if local


def name_of(path: str) -> str:
    return os.path.basename(path.split("?")[0] if "://" in path else path)


def describe_row(spec: SourceSpec, row: int) -> str:
    """Where a row is, for messages: "data.jsonl line 13", "data.csv record 13", "x.npy row 12".

    CSV records are counted 1-based after the header; a line number would be wrong as soon as
    a quoted field holds a newline.
    """
    if spec.format == "images":  # the row's path is in its error's message
        return f"image {row}"
    if spec.format in ("text", "jsonl"):
        return f"{name_of(spec.path)} line {row + 1}"
    if spec.format == "csv":
        return f"{name_of(spec.path)} record {row + 1}"
    return f"{name_of(spec.path)} row {row}"


def changed(spec: SourceSpec) -> InputError:
    return InputError(f"input file '{spec.path}' changed since the job was planned; "
                      "restart the job so it is planned again")
