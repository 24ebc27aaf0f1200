"""KServe v2 / Open Inference Protocol codec (REST), with Triton's binary-data extension.

Pure functions, no I/O: the HTTP app hands over the body bytes and gets arrays back, or a
`ProtocolError` whose `status` and one-line `message` go straight into the reply.

A request (`POST /v2/models/{model}/infer`) is JSON::

    {"id": "r1", "parameters": {"timeout": 2000000, "binary_data_output": false},
     "inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": ["a", "b"]}],
     "outputs": [{"name": "embedding", "parameters": {"binary_data": true}}]}

`data` is row-major, flat or nested. With the header `Inference-Header-Content-Length: N` the
body's first N bytes are that JSON, and an input may carry `"parameters": {"binary_data_size": n}`
instead of `data`: its n bytes follow the JSON, in input order; numbers raw little-endian
row-major, BYTES a little-endian uint32 length then the bytes, per element. A response uses the
same layout for outputs sent in binary.

Timeout units: tritonclient 2.73 (`tritonclient/http/_utils.py`, `_get_inference_request`) copies
`infer(..., timeout=t)` unchanged into `parameters["timeout"]`; its docstring (`_client.py`,
`generate_request_body`) says "The timeout value for the request, in microseconds", as does
Triton's `tritonserver.h` (`TRITONSERVER_InferenceRequestSetTimeoutMicroseconds`, where 0 means
no timeout). So `parameters.timeout` is read as microseconds, and 0 as no timeout.
"""

from __future__ import annotations

import importlib
import json
import math
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

Array = NDArray[Any]

try:
    _orjson: Any = importlib.import_module("orjson")
except ImportError:  # orjson comes with the serve extra; the stdlib keeps this module importable
    _orjson = None

__all__ = ["InferRequest", "ProtocolError", "TensorMeta", "datatype_to_numpy", "encode_infer_response",
           "encode_text_response", "numpy_to_datatype", "parse_infer_request", "parse_text_request"]

_NUMERIC = {"BOOL": "b1", "UINT8": "u1", "UINT16": "u2", "UINT32": "u4", "UINT64": "u8", "INT8": "i1",
            "INT16": "i2", "INT32": "i4", "INT64": "i8", "FP16": "f2", "FP32": "f4", "FP64": "f8"}
_BY_KIND = {code: name for name, code in _NUMERIC.items()}
_ORJSON_NUMPY = {"b1", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f4", "f8"}  # not f2, not 0-d
_MAX_ELEMENTS = 2**50  # numpy cannot even describe a larger (empty) array
_ALLOWED: dict[str, tuple[set[type], str]] = {"O": ({str}, "strings"), "b": ({bool}, "true/false"),
                                              "i": ({int}, "integers"), "u": ({int}, "integers"),
                                              "f": ({int, float}, "numbers")}


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """A model input or output: v2 datatype name and shape (-1: any size; dim 0 is the batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class ProtocolError(Exception):
    """A request the protocol rejects: HTTP `status` and a one-line `message` for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A parsed infer request; `inputs` follow the model's input order."""

    id: str | None
    inputs: dict[str, list[str] | Array]
    rows: int
    outputs: tuple[str, ...] | None
    binary_outputs: frozenset[str]
    timeout_s: float | None
    # parameters.binary_data_output as sent: the app applies it to every output when `outputs`
    # is None and the model's output names were not known at parse time (binary_outputs empty).
    binary_default: bool = False


def datatype_to_numpy(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of a v2 datatype; BYTES maps to object (its values are str or bytes)."""
    if datatype == "BYTES":
        return np.dtype(object)
    if datatype not in _NUMERIC:
        raise ValueError(f"unknown v2 datatype {datatype!r}; known: BYTES, {', '.join(_NUMERIC)}")
    return np.dtype(_NUMERIC[datatype])


def numpy_to_datatype(dtype: np.dtype[Any]) -> str:
    """The v2 datatype of a numpy dtype (object, str and bytes arrays are BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OUS":
        return "BYTES"
    name = _BY_KIND.get(f"{dtype.kind}{dtype.itemsize}")
    if name is None:
        raise ValueError(f"numpy dtype {dtype} has no v2 datatype; use one of {', '.join(_NUMERIC)}")
    return name


def _bad(message: str) -> ProtocolError:
    return ProtocolError(400, message)


def _q(value: str) -> str:
    """`value` JSON-quoted (so one line) and shortened, for messages."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:56] + '..."'


def _kind(value: object) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _loads(data: bytes, what: str, hint: str = "") -> Any:
    try:
        return _orjson.loads(data) if _orjson is not None else json.loads(data)
    except json.JSONDecodeError as e:  # orjson.JSONDecodeError subclasses it
        raise _bad(f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}{hint}") from None
    except UnicodeDecodeError as e:
        raise _bad(f"{what} is not valid UTF-8 at byte {e.start}") from None
    except RecursionError:
        raise _bad(f"{what} nests too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise _bad(f"{what} is not valid JSON: {' '.join(str(e).split())}") from None


def _dumps(value: Any) -> bytes:
    if _orjson is not None:
        return bytes(_orjson.dumps(value, option=_orjson.OPT_SERIALIZE_NUMPY))
    return json.dumps(value, separators=(",", ":"), default=lambda a: a.tolist()).encode()


def _object(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{field} must be a JSON object, got {_kind(value)}")
    return value


def _check_utf8(strings: list[str], field: str) -> None:
    """Reject strings with lone surrogates (JSON escapes can make them; they are not UTF-8)."""
    try:
        "".join(strings).encode()
    except UnicodeEncodeError:
        k = next(k for k, s in enumerate(strings) if s.encode(errors="ignore").decode() != s)
        raise _bad(f"{field} element {k} is not valid UTF-8 (lone surrogate); send valid Unicode") from None


def _timeout(value: Any) -> float | None:
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf:
            return value / 1_000_000 or None  # tritonclient sends microseconds; 0 means no timeout
    except OverflowError:  # an integer beyond float range
        pass
    raise _bad(f"parameters.timeout must be a number of microseconds >= 0 (0: none), got {_kind(value)}")


def _flatten(data: list[Any]) -> list[Any]:
    """Row-major values of a possibly nested list, without recursion."""
    if list not in set(map(type, data)):
        return data
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            out.append(value)
        else:
            stack.pop()
    return out


def _from_json(where: str, datatype: str, count: int, data: Any) -> list[str] | Array:
    if not isinstance(data, list):
        raise _bad(f"{where}.data must be a list, got {_kind(data)}")
    flat = _flatten(data)
    if len(flat) != count:
        raise _bad(f"{where}.data has {len(flat)} values but its shape needs {count}")
    dtype = datatype_to_numpy(datatype)
    allowed, want = _ALLOWED[dtype.kind]
    if not set(map(type, flat)) <= allowed:
        k, bad = next((k, v) for k, v in enumerate(flat) if type(v) not in allowed)
        raise _bad(f"{where}.data element {k} is {_kind(bad)}; {datatype} data must be {want}")
    if datatype == "BYTES":
        _check_utf8(flat, f"{where}.data")
        return flat
    if dtype.kind in "iu" and flat:
        info = np.iinfo(dtype)
        low, high = min(flat), max(flat)
        if low < info.min or high > info.max:
            value = low if low < info.min else high
            raise _bad(f"{where}.data has {value}, out of range for {datatype} [{info.min}, {info.max}]")
    if dtype.kind != "f":
        return np.array(flat, dtype=dtype)
    try:
        wide = np.array(flat, dtype=np.float64)
    except OverflowError:
        raise _bad(f"{where}.data has an integer too large for {datatype}") from None
    with np.errstate(over="ignore"):
        arr = wide.astype(dtype)
    if np.any(np.isinf(arr) & np.isfinite(wide)):
        raise _bad(f"{where}.data has a value out of range for {datatype}")
    return arr


def _from_binary(where: str, datatype: str, count: int, chunk: memoryview) -> list[str] | Array:
    if datatype != "BYTES":
        dtype = datatype_to_numpy(datatype)
        if len(chunk) != count * dtype.itemsize:
            raise _bad(f"{where}.parameters.binary_data_size is {len(chunk)}; its shape needs {count} x "
                       f"{dtype.itemsize} = {count * dtype.itemsize} bytes")
        if dtype.kind == "b":
            return np.frombuffer(chunk, dtype=np.uint8).astype(bool)
        return np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).astype(dtype)
    out: list[str] = []
    pos, end = 0, len(chunk)
    while pos < end and len(out) <= count:
        if pos + 4 > end:
            raise _bad(f"{where} binary BYTES element {len(out)} lacks its 4-byte length")
        (length,) = struct.unpack_from("<I", chunk, pos)
        pos += 4
        if pos + length > end:
            raise _bad(f"{where} binary BYTES element {len(out)} needs {length} bytes, {end - pos} left")
        try:
            out.append(str(chunk[pos : pos + length], "utf-8"))
        except UnicodeDecodeError:
            raise _bad(f"{where} BYTES element {len(out)} is not valid UTF-8") from None
        pos += length
    if len(out) != count:
        raise _bad(f"{where} binary data holds {'more than ' if pos < end else ''}{len(out)} BYTES "
                   f"elements but its shape needs {count}")
    return out


def _shape(where: str, raw: Any, meta: TensorMeta) -> list[int]:
    if not isinstance(raw, list) or not all(type(d) is int and d >= 0 for d in raw):
        raise _bad(f"{where}.shape must be a list of non-negative integers like [2, 384]")
    model = list(meta.shape)
    if len(raw) != len(model) or any(m not in (-1, d) for m, d in zip(model[1:], raw[1:], strict=True)):
        raise _bad(f"{where}.shape {_q(str(raw))[1:-1]} does not fit the model's {model} (-1: any size)")
    if math.prod(d for d in raw if d) > _MAX_ELEMENTS:
        raise _bad(f"{where}.shape is too large")
    return raw


def parse_infer_request(body: bytes, header_length: int | None, inputs: Sequence[TensorMeta],
                        outputs: Sequence[str]) -> InferRequest:
    """Parse and check an infer request against the model's `inputs` and `outputs` (empty: unknown)."""
    tail = memoryview(b"")
    if header_length is not None:
        if type(header_length) is not int or not 0 <= header_length <= len(body):
            raise _bad(f"Inference-Header-Content-Length must be 0 to {len(body)}, the body size")
        body, tail = body[:header_length], memoryview(body)[header_length:]
    doc = _loads(body, "request JSON", "" if header_length is not None else
                 "; if binary data follows the JSON, send the Inference-Header-Content-Length header")
    if not isinstance(doc, dict):
        raise _bad(f'request JSON must be an object with "inputs", got {_kind(doc)}')
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad(f'"id" must be a string, got {_kind(request_id)}')
    params = _object(doc.get("parameters"), "parameters")
    timeout_s = _timeout(params["timeout"]) if params.get("timeout") is not None else None
    binary_all = params.get("binary_data_output", False)
    if not isinstance(binary_all, bool):
        raise _bad("parameters.binary_data_output must be true or false")
    items = doc.get("inputs")
    if not isinstance(items, list) or not items:
        raise _bad('"inputs" must be a non-empty list of {"name", "shape", "datatype", "data"} objects')
    metas = {meta.name: meta for meta in inputs}
    found: dict[str, list[str] | Array] = {}
    rows: int | None = None
    offset = 0
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _bad(f"inputs[{i}] must be an object, got {_kind(item)}")
        for key, kind in (("name", "a string"), ("shape", "a list"), ("datatype", "a string")):
            if key not in item:
                raise _bad(f'inputs[{i}] lacks "{key}" ({kind})')
        name = item["name"]
        if not isinstance(name, str):
            raise _bad(f"inputs[{i}].name must be a string, got {_kind(name)}")
        if name not in metas:
            raise _bad(f"inputs[{i}].name {_q(name)} is not an input of this model; it takes "
                       f"{', '.join(map(_q, metas))}")
        if name in found:
            raise _bad(f"inputs[{i}].name {_q(name)} appears twice; send each input once")
        meta, where = metas[name], f"inputs[{i}] ({_q(name)})"
        if item["datatype"] != meta.datatype:
            raise _bad(f'{where}.datatype must be "{meta.datatype}"')
        shape = _shape(where, item["shape"], meta)
        if rows is not None and shape[0] != rows:
            raise _bad(f"{where}.shape[0] is {shape[0]} but earlier inputs have {rows}; send equal batches")
        rows, count = shape[0], math.prod(shape)
        tensor_params = _object(item.get("parameters"), f"{where}.parameters")
        if "shared_memory_region" in tensor_params:
            raise _bad(f"{where}.parameters.shared_memory_region: shared memory is not supported; send data")
        size = tensor_params.get("binary_data_size")
        if size is not None and "data" in item:
            raise _bad(f'{where} has both "data" and parameters.binary_data_size; send one')
        if size is None:
            if "data" not in item:
                raise _bad(f'{where} lacks "data" (or parameters.binary_data_size for binary data)')
            value = _from_json(where, meta.datatype, count, item["data"])
        else:
            if header_length is None:
                raise _bad(f"{where}.parameters.binary_data_size needs the Inference-Header-Content-Length "
                           "header")
            if type(size) is not int or size < 0:
                raise _bad(f"{where}.parameters.binary_data_size must be a non-negative integer")
            if offset + size > len(tail):
                raise _bad(f"{where}.parameters.binary_data_size is {size} bytes but only "
                           f"{len(tail) - offset} bytes of binary data are left")
            value = _from_binary(where, meta.datatype, count, tail[offset : offset + size])
            offset += size
        found[name] = value if isinstance(value, list) else value.reshape(shape)
    missing = [name for name in metas if name not in found]
    if missing:
        raise _bad(f"inputs lack {', '.join(map(_q, missing))}; the model needs all of them")
    if offset != len(tail):
        raise _bad(f"{len(tail) - offset} bytes follow the last binary input; check binary_data_size")
    names, binary = _requested_outputs(doc.get("outputs"), outputs, binary_all)
    assert rows is not None
    return InferRequest(request_id, {name: found[name] for name in metas}, rows, names, binary, timeout_s,
                        binary_all)


def _requested_outputs(raw: Any, known: Sequence[str], binary_all: bool
                       ) -> tuple[tuple[str, ...] | None, frozenset[str]]:
    if raw is None or raw == []:
        return None, frozenset(known if binary_all else ())
    if not isinstance(raw, list):
        raise _bad(f'"outputs" must be a list of {{"name": ...}} objects, got {_kind(raw)}')
    names: list[str] = []
    binary: set[str] = set()
    for j, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            raise _bad(f'outputs[{j}] must be an object with a string "name"')
        if known and name not in known:
            raise _bad(f"outputs[{j}].name {_q(name)} is not an output of this model; it has "
                       f"{', '.join(map(_q, known))}")
        if name in names:
            raise _bad(f"outputs[{j}].name {_q(name)} appears twice; ask for each output once")
        params = _object(item.get("parameters"), f"outputs[{j}].parameters")
        if "classification" in params:
            raise _bad(f"outputs[{j}].parameters.classification is not supported; ask for the raw output")
        wanted = params.get("binary_data", binary_all)
        if not isinstance(wanted, bool):
            raise _bad(f"outputs[{j}].parameters.binary_data must be true or false")
        names.append(name)
        if wanted:
            binary.add(name)
    return tuple(names), frozenset(binary)


def _jsonable(arr: Array) -> Any:
    """`arr` as a value `_dumps` writes as (nested) JSON lists: BYTES as strings."""
    if arr.dtype.kind in "OUS":
        values = arr.reshape(-1).tolist()
        strings = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]
        return np.array(strings, dtype=object).reshape(arr.shape).tolist()
    if _orjson is None or arr.ndim == 0 or f"{arr.dtype.kind}{arr.dtype.itemsize}" not in _ORJSON_NUMPY:
        return arr.tolist()
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))


def _raw(arr: Array) -> bytes:
    if arr.dtype.kind not in "OUS":
        return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
    parts: list[bytes] = []
    for value in arr.reshape(-1).tolist():
        data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
        parts += (struct.pack("<I", len(data)), data)
    return b"".join(parts)


def encode_infer_response(model: str, version: str, request_id: str | None, outputs: Mapping[str, Array],
                          binary: Collection[str]) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers; outputs named in `binary` go as raw data."""
    header: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id is not None:
        header["id"] = request_id
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, value in outputs.items():
        arr = np.asarray(value)
        entry: dict[str, Any] = {"name": name, "datatype": numpy_to_datatype(arr.dtype),
                                 "shape": list(arr.shape)}
        if name in binary:
            chunks.append(_raw(arr))
            entry["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            entry["data"] = _jsonable(arr.reshape(-1))
        entries.append(entry)
    header["outputs"] = entries
    head = _dumps(header)
    if not any(name in binary for name in outputs):
        return head, {"Content-Type": "application/json"}
    return b"".join([head, *chunks]), {"Inference-Header-Content-Length": str(len(head)),
                                       "Content-Type": "application/octet-stream"}


def parse_text_request(body: bytes) -> tuple[list[str], bool]:
    """Texts of `{"text": "one"}`, `{"text": ["a", "b"]}`, `["a", "b"]` or `"one"`; True: one string."""
    doc = _loads(body, "request body")
    field = "request body"
    if isinstance(doc, dict):
        if "text" not in doc:
            raise _bad('request body must be {"text": "..."} or {"text": ["...", ...]} (or a string or list)')
        doc, field = doc["text"], "text"
    if isinstance(doc, str):
        _check_utf8([doc], field)
        return [doc], True
    if not isinstance(doc, list):
        raise _bad(f"{field} must be a string or a list of strings, got {_kind(doc)}")
    if not doc:
        raise _bad(f"{field} is an empty list; send at least one string")
    for k, text in enumerate(doc):
        if not isinstance(text, str):
            raise _bad(f"{field}[{k}] must be a string, got {_kind(text)}")
    _check_utf8(doc, field)
    return doc, False


def encode_text_response(model: str, outputs: Mapping[str, Array], single: bool) -> bytes:
    """JSON `{"model": ..., "outputs": {name: rows}}`; with `single`, each output is its row 0."""
    rows = {name: _jsonable(np.asarray(np.asarray(value)[0] if single else value))
            for name, value in outputs.items()}
    return _dumps({"model": model, "outputs": rows})
