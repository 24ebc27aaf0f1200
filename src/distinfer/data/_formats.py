"""Per-format opening (columns and row count, by streaming) and reading of one block.

Line formats read exactly their block's byte range; Parquet decodes the row group holding the
block (cached, since a worker's consecutive blocks often share one); .npy slices a memory map,
or reads the block's byte range of a remote file. Paths may be URLs (see `_storage`).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import functools
import io
import itertools
import json
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distinfer.data._columns import Column, arrow_column, csv_column, json_column, parse_numbers
from distinfer.data._scan import count_ends, count_records, record_offsets
from distinfer.data._spec import SourceSpec, changed, describe_row, name_of
from distinfer.data._storage import locate
from distinfer.data.blocks import Block
from distinfer.errors import InputError

__all__ = ["OPENERS", "group_bounds", "raw_row", "read_rows"]

_SAMPLE_BYTES = 1 << 20
_UNDECODED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by surrogateescape


class _Rows:
    """Names the rows a reader kept (`kept`: block-relative indices) in messages, and keeps
    the first row it named: the one a row's error is about, since every such message names
    its bad row first ("data.jsonl line 13 is not valid JSON"). A column-wide message names
    rows with `describe_row` instead, so that no row is blamed for it."""

    def __init__(self, spec: SourceSpec, block: Block, kept: Sequence[int]) -> None:
        self.spec, self.block, self.kept = spec, block, kept
        self.first: int | None = None

    def __call__(self, i: int) -> str:
        row = self.block.start + self.kept[i]
        if self.first is None:
            self.first = row
        return describe_row(self.spec, row)

    def quiet(self, i: int) -> str:
        """Row `i` named without blaming it (a message about the whole column)."""
        return describe_row(self.spec, self.block.start + self.kept[i])
Opened = tuple[tuple[str, ...], int, tuple[str, ...]]  # columns, rows, numeric CSV columns


def _read_bytes(path: str, start: int, stop: int) -> bytes:
    data = locate(path).read(start, stop)
    # a UTF-8 byte order mark is not part of the first row
    return data[len(codecs.BOM_UTF8):] if start == 0 and data.startswith(codecs.BOM_UTF8) else data


def _json_reason(exc: ValueError) -> str:
    # the decoder's own "line 1 column 7" would contradict our file line number
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    return "not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)


def _open_text(path: str) -> Opened:
    return ("text",), count_records(path, quoted=False)[0], ()


def _open_listing(path: str) -> Opened:
    return ("path",), count_records(path, quoted=False)[0], ()


def _open_jsonl(path: str) -> Opened:
    rows = count_records(path, quoted=False)[0]
    with locate(path).open() as f:
        for number, line in enumerate(f, 1):
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            if line.strip():
                break
        else:
            if rows:
                raise InputError(f"{name_of(path)} line 1 is blank; each line must hold one JSON "
                                 "object")
            return (), 0, ()
    try:
        first = json.loads(line)
    except ValueError as exc:
        raise InputError(f"{name_of(path)} line {number} is not valid JSON ({_json_reason(exc)}); "
                         "fix that line") from None
    if not isinstance(first, dict):
        raise InputError(f"{name_of(path)} line {number} is not a JSON object; each line must be "
                         'one object such as {"text": "..."}')
    return tuple(first), rows, ()


def _parse_csv(
    data: bytes, name: str, first_record: int, lenient: bool = False
) -> tuple[list[list[str]], bool]:
    """The records of `data`, and whether some bytes were not UTF-8: an error naming the first
    such record, or (`lenient`) those bytes kept as lone surrogates for the caller to find."""
    try:
        text, broken = data.decode("utf-8"), False
    except UnicodeDecodeError as exc:
        if not lenient:
            record = first_record + count_ends(data[: exc.start], quoted=True)
            where = f"record {record}" if record else "header (line 1)"
            raise InputError(f"{name} {where} is not valid UTF-8; "
                             "re-encode the file as UTF-8") from None
        text, broken = data.decode("utf-8", errors="surrogateescape"), True
    try:
        return list(csv.reader(io.StringIO(text, newline=""))), broken
    except csv.Error as exc:
        raise InputError(f"{name} near record {first_record} cannot be parsed as CSV ({exc}); "
                         "check its quoting") from None


def _open_csv(path: str) -> Opened:
    name = name_of(path)
    records, open_quote = count_records(path, quoted=True)
    if not records:
        raise InputError(f"{name} is empty; a CSV input needs a header row naming its columns")
    if open_quote:
        where = f"record {records - 1}" if records > 1 else "the header"
        raise InputError(f'{name} ends inside a quoted field that starts in {where}; close the '
                         'quote, and write a quote inside a field as ""')
    header_end = next(record_offsets(path, [1], quoted=True))
    header, _ = _parse_csv(_read_bytes(path, 0, header_end), name, 0)
    columns = tuple(header[0]) if header else ()
    if not any(columns):
        raise InputError(f"{name} has an empty header row (line 1); the first line must name "
                         "the columns")
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise InputError(f"{name} header names column '{repeated[0]}' more than once; "
                         "rename it so each column has its own name")
    # decide each column's type once, from the first rows, so every block agrees
    size = locate(path).stat().size
    data = _read_bytes(path, header_end, min(header_end + _SAMPLE_BYTES, size))
    cut = header_end + len(data) < size
    if cut:
        data = data[: data.rfind(b"\n") + 1]  # never split a UTF-8 character
    sample, broken = _parse_csv(data, name, 1, lenient=True)  # a record not UTF-8 is that row's error
    sample = [r for r in sample[: -1 if cut else None] if len(r) == len(columns)
              and not (broken and any(_UNDECODED.search(field) for field in r))]  # fmt: skip
    numeric = tuple(c for j, c in enumerate(columns)
                    if sample and parse_numbers([r[j] for r in sample]) is not None)
    return columns, records - 1, numeric


@contextlib.contextmanager
def _parquet(path: str) -> Iterator[pq.ParquetFile]:
    where = locate(path)
    if where.local:
        with pq.ParquetFile(path) as file:
            yield file
    else:  # pre-buffering joins a row group's column chunks into few requests
        with where.open(random_access=True) as raw, pq.ParquetFile(raw, pre_buffer=True) as file:
            yield file


def _open_parquet(path: str) -> Opened:
    try:
        with _parquet(path) as file:
            return tuple(file.schema_arrow.names), file.metadata.num_rows, ()
    except pa.ArrowException as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{name_of(path)} is not a readable Parquet file ({reason}); "
                         "check --input or --input-format") from None


def _not_npy(path: str, reason: object) -> InputError:
    return InputError(f"{name_of(path)} is not a readable .npy array ({reason}); "
                      "save it with numpy.save, without object dtype")


def _open_npy(path: str) -> Opened:
    if locate(path).local:
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, EOFError) as exc:
            raise _not_npy(path, exc) from None
        if not isinstance(array, np.ndarray):
            raise InputError(f"{name_of(path)} is not a single .npy array; save it with numpy.save")
        shape = array.shape
    else:
        shape = _npy_header(path)[2]
    if not shape:
        raise InputError(f"{name_of(path)} holds a single value (a 0-d array); it needs one row "
                         "per input along its first axis")
    return ("array",), int(shape[0]), ()


NpyLayout = tuple[int, np.dtype[Any], tuple[int, ...]]  # data offset, dtype, shape


@functools.lru_cache(maxsize=4)
def _npy_layout(path: str, mtime_ns: int, version: str) -> NpyLayout:
    return _npy_header(path)  # once per worker, not once per block


def _npy_header(path: str) -> NpyLayout:
    """Where a remote .npy file's rows start, their dtype and the shape, from the header alone."""
    where = locate(path)
    head = where.read(0, 4096)
    try:
        if len(head) >= 12:  # the header's length is in bytes 8-9 (version 1) or 8-11
            wide = head[6] >= 2
            length = (12 + int.from_bytes(head[8:12], "little") if wide
                      else 10 + int.from_bytes(head[8:10], "little"))
            if length > len(head):
                head = where.read(0, length)
        f = io.BytesIO(head)
        magic = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if magic == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(f)
    except (ValueError, EOFError) as exc:
        raise _not_npy(path, exc) from None
    if dtype.hasobject:
        raise _not_npy(path, "it holds Python objects")
    if fortran and len(shape) > 1:
        raise InputError(f"{name_of(path)} is stored in Fortran order, which cannot be read by "
                         "rows from remote storage; save numpy.ascontiguousarray(array) instead")
    offset = f.tell()
    if where.stat().size < offset + int(np.prod(shape)) * dtype.itemsize:
        raise _not_npy(path, "the file is shorter than its header says")
    return offset, dtype, tuple(int(n) for n in shape)


OPENERS: dict[str, Callable[[str], Opened]] = {
    "text": _open_text, "jsonl": _open_jsonl, "csv": _open_csv,
    "parquet": _open_parquet, "npy": _open_npy, "images": _open_listing,
}


@functools.lru_cache(maxsize=1)
def group_bounds(path: str, mtime_ns: int, version: str = "") -> tuple[int, ...]:
    with _parquet(path) as file:
        sizes = (file.metadata.row_group(g).num_rows for g in range(file.num_row_groups))
        return tuple(itertools.accumulate(sizes, initial=0))


def _lines(spec: SourceSpec, block: Block) -> list[bytes]:
    lines = _read_bytes(spec.path, block.byte_start, block.byte_stop).split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    if len(lines) != block.rows:
        raise changed(spec)
    return lines


def _read_text(spec: SourceSpec, block: Block, columns: list[str], where: _Rows) -> dict[str, Column]:
    texts: list[str] = []
    lines = _lines(spec, block)
    for i, line in enumerate(lines[k] for k in where.kept):
        try:
            texts.append(line.removesuffix(b"\r").decode("utf-8"))
        except UnicodeDecodeError:
            raise InputError(f"{where(i)} is not valid UTF-8 text; "
                             "re-encode the file as UTF-8") from None
    return {spec.columns[0]: texts} if columns else {}


def _read_jsonl(spec: SourceSpec, block: Block, columns: list[str], where: _Rows) -> dict[str, Column]:
    values: dict[str, list[Any]] = {c: [] for c in columns}
    lines = _lines(spec, block)
    for i, line in enumerate(lines[k] for k in where.kept):
        if not line.strip():
            raise InputError(f"{where(i)} is blank; each line must hold one JSON object "
                             "(remove blank lines)")
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{where(i)} is not valid JSON ({_json_reason(exc)}); "
                             "fix that line") from None
        if not isinstance(row, dict):
            raise InputError(f"{where(i)} is not a JSON object; each line must be one object "
                             'such as {"text": "..."}')
        for column in columns:
            if column not in row:
                raise InputError(f"{where(i)} has no field '{column}'; every line needs the "
                                 "fields picked with --column")
            values[column].append(row[column])
    return {c: json_column(v, c, where) for c, v in values.items()}


def _read_csv(spec: SourceSpec, block: Block, columns: list[str], where: _Rows) -> dict[str, Column]:
    data = _read_bytes(spec.path, block.byte_start, block.byte_stop)
    records, broken = _parse_csv(data, name_of(spec.path), block.start + 1, lenient=True)
    if len(records) != block.rows:
        raise InputError(f"{describe_row(spec, block.start)} to {block.stop} do not parse as "
                         f"{block.rows} records; check their quoting (a stray quote or carriage return)")
    records = [records[k] for k in where.kept]
    for i, record in enumerate(records):
        if broken and any(_UNDECODED.search(field) for field in record):  # that record, not the block
            raise InputError(f"{where(i)} is not valid UTF-8; re-encode the file as UTF-8")
        if len(record) != len(spec.columns):
            raise InputError(f"{where(i)} has {len(record)} fields but the header has "
                             f"{len(spec.columns)}; fix that record (blank lines are not allowed)")
    index = {c: j for j, c in enumerate(spec.columns)}
    return {c: csv_column([r[index[c]] for r in records], c in spec.numeric, c, where)
            for c in columns}


@functools.lru_cache(maxsize=1)
def _row_group(path: str, mtime_ns: int, version: str, group: int, columns: tuple[str, ...]) -> Any:
    # consecutive blocks of one worker often share a row group: decode it once
    with _parquet(path) as file:
        return file.read_row_group(group, columns=list(columns))


def _read_parquet(spec: SourceSpec, block: Block, columns: list[str], where: _Rows) -> dict[str, Column]:
    bounds = group_bounds(spec.path, spec.mtime_ns, spec.version)
    pieces = []
    for group, (first, stop) in enumerate(itertools.pairwise(bounds)):
        if first < block.stop and block.start < stop:
            table = _row_group(spec.path, spec.mtime_ns, spec.version, group, tuple(columns))
            low, high = max(first, block.start), min(stop, block.stop)
            pieces.append(table.slice(low - first, high - low))
    table = pa.concat_tables(pieces)
    if len(where.kept) < block.rows:
        table = table.take(pa.array(where.kept, type=pa.int64()))
    return {c: arrow_column(table.column(c), c, where) for c in columns}


def _read_npy(spec: SourceSpec, block: Block, columns: list[str], where: _Rows) -> dict[str, Column]:
    if not columns:
        return {}
    if len(where.kept) < block.rows:
        whole = _read_npy(spec, block, columns, _Rows(spec, block, range(block.rows)))["array"]
        return {"array": np.asarray(whole)[np.asarray(where.kept, dtype=np.int64)]}
    if locate(spec.path).local:
        array = np.load(spec.path, mmap_mode="r", allow_pickle=False)
        return {"array": np.array(array[block.start : block.stop])}
    offset, dtype, shape = _npy_layout(spec.path, spec.mtime_ns, spec.version)
    row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
    data = locate(spec.path).read(offset + block.start * row_bytes, offset + block.stop * row_bytes)
    if len(data) != block.rows * row_bytes:
        raise changed(spec)
    rows = np.frombuffer(data, dtype).reshape(block.rows, *shape[1:])
    return {"array": rows.copy()}  # writable, like a slice of a local file


_READERS: dict[str, Callable[[SourceSpec, Block, list[str], _Rows], dict[str, Column]]] = {
    "text": _read_text, "jsonl": _read_jsonl, "csv": _read_csv,
    "parquet": _read_parquet, "npy": _read_npy, "images": _read_text,  # a listing: a path per line
}


def read_rows(
    spec: SourceSpec, block: Block, columns: list[str], skip: Collection[int] = ()
) -> dict[str, Column]:
    """The block's rows but those in `skip` (block-relative), per column. An error about one
    row is an `InputError` whose `row` is that row (absolute)."""
    where = _Rows(spec, block, [k for k in range(block.rows) if k not in skip] if skip else range(block.rows))
    try:
        return _READERS[spec.format](spec, block, columns, where)
    except InputError as exc:
        if exc.row is None and where.first is not None:
            exc.row = where.first
        raise


def raw_row(spec: SourceSpec, block: Block, row: int) -> str:
    """A line format's raw line of absolute row `row` (undecodable bytes replaced), for the
    record of a bad row; "" for other formats."""
    if spec.format not in ("text", "jsonl", "images"):
        return ""
    line = _lines(spec, block)[row - block.start]
    return line.removesuffix(b"\r").decode("utf-8", errors="replace")
