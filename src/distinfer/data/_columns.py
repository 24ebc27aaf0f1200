"""Turning a block's raw values into the columns a model takes: list[str] or one stacked array.

Strings stay Python strings (tokenizers want them); numbers and equal-length (nested) lists of
numbers become one ndarray with the rows along axis 0; objects and lists of objects (a chat's
messages) become their JSON text, one string per row. Anything else is an `InputError` that
names the row (through `where`, which describes row i of the block) and the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from distinfer.errors import InputError

__all__ = ["Column", "Where", "arrow_column", "csv_column", "json_column", "parse_numbers"]

Column = list[str] | npt.NDArray[Any]
Where = Callable[[int], str]


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "string"
    if isinstance(value, (bool, int, float)):
        return "number"
    if isinstance(value, list):
        return "list"
    return "null" if value is None else "object"


def _is_structured(value: Any) -> bool:
    """An object, or a list of objects (a chat), not a list of numbers or strings."""
    if isinstance(value, dict):
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _values(shape: tuple[int, ...]) -> str:
    return f"{shape[0]} values" if len(shape) == 1 else f"shape {shape}"


def _stack_error(values: list[Any], field: str, where: Where) -> InputError:
    """Find the first row that keeps `values` from stacking into one numeric array."""
    first: tuple[int, ...] | None = None
    for i, value in enumerate(values):
        try:
            array = np.asarray(value)
        except (ValueError, OverflowError):
            return InputError(f"{where(i)} field '{field}' is a ragged nested list; "
                              "the rows must have equal length")
        if array.dtype.kind not in "biuf":
            return InputError(f"{where(i)} field '{field}' holds something other than "
                              "numbers in its list; lists must hold only numbers")
        if first is None:
            first = array.shape
        elif array.shape != first:
            return InputError(f"{where(i)} field '{field}' has {_values(array.shape)} but "
                              f"{where(0)} has {_values(first)}; the rows must have equal length")
    return InputError(f"{where(0)} field '{field}': the rows cannot be stacked into one array")


def json_column(values: list[Any], field: str, where: Where) -> Column:
    """Strings → list[str]; numbers or equal-length lists of numbers → int64/float64 array."""
    if all(isinstance(v, str) for v in values):
        return list(values)
    if any(_is_structured(v) for v in values):  # a chat's messages, say: kept as JSON text
        return [v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values]
    first = _kind(values[0])
    for i, value in enumerate(values):
        kind = _kind(value)
        if kind not in ("string", "number", "list"):
            raise InputError(f"{where(i)} field '{field}' is {kind}; it must be a string, "
                             "a number or a list of numbers")
        if kind != first:
            raise InputError(f"{where(i)} field '{field}' is a {kind} but {where(0)} has a "
                             f"{first}; every row must hold the same kind of value")
    try:
        array = np.asarray(values)
    except (ValueError, OverflowError):
        raise _stack_error(values, field, where) from None
    if array.dtype.kind in "biu":
        return array.astype(np.int64, copy=False)
    if array.dtype.kind == "f":
        return array.astype(np.float64, copy=False)
    raise _stack_error(values, field, where)


def parse_numbers(values: list[str]) -> npt.NDArray[Any] | None:
    """int64 if every value is an integer, else float64 if every value is a number, else None."""
    try:
        return np.array([int(v) for v in values], dtype=np.int64)
    except (ValueError, OverflowError):
        pass
    try:
        return np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        return None


def csv_column(values: list[str], numeric: bool, field: str, where: Where) -> Column:
    """A CSV column read as numbers when its first rows are numbers, else as strings."""
    if not numeric:
        return values
    array = parse_numbers(values)
    if array is not None:
        return array
    bad = next(i for i, v in enumerate(values) if parse_numbers([v]) is None)
    raise InputError(f"{where(bad)} field '{field}' is {values[bad]!r}, not a number, but the "
                     "column's first rows are numbers; fix or remove that value")


def _arrow_numeric(array: Any, rows: npt.NDArray[Any], field: str, where: Where) -> Any:
    """`array` as numpy; element i belongs to block row rows[i] (for messages)."""
    kind = array.type
    if array.null_count:
        bad = int(rows[np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0]])
        raise InputError(f"{where(bad)} field '{field}' is null or holds nulls; "
                         "fill or drop the missing values")
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return array.to_numpy(zero_copy_only=False)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        width = int(lengths[0]) if len(lengths) else 0
        ragged = np.flatnonzero(lengths != width)
        if len(ragged):
            bad = int(rows[ragged[0]])
            raise InputError(f"{where(bad)} field '{field}' has {lengths[ragged[0]]} values "
                             f"but {where(int(rows[0]))} has {width}; "
                             "the rows must have equal length")
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
        inner = _arrow_numeric(array.flatten(), rows[parents], field, where)
        return inner.reshape(len(array), width, *inner.shape[1:])
    name = getattr(where, "quiet", where)  # the whole column's type: no row to blame
    raise InputError(f"{name(int(rows[0]) if len(rows) else 0)} field '{field}' has type "
                     f"{kind}, which distinfer cannot feed to a model; "
                     "pick a string, numeric or list-of-numbers column")


def arrow_column(array: Any, field: str, where: Where) -> Column:
    """A pyarrow (chunked) array → list[str] for strings, an object array of bytes for binary
    values (images), else a stacked numpy array."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    kind = array.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        if array.null_count:
            bad = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"{where(bad)} field '{field}' is null; "
                             "fill or drop the missing values")
        strings: list[str] = array.to_pylist()
        return strings
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):  # image files' bytes
        if array.null_count:
            bad = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"{where(bad)} field '{field}' is null; fill or drop the missing values")
        blobs = np.empty(len(array), dtype=object)
        blobs[:] = array.to_pylist()
        return blobs
    return _arrow_numeric(array, np.arange(len(array)), field, where)  # type: ignore[no-any-return]
