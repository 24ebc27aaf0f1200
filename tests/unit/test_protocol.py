"""KServe v2 REST codec: JSON and binary round trips, tritonclient compatibility, every rejection."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, cast
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distinfer.serving import protocol
from distinfer.serving.protocol import (
    InferRequest,
    ProtocolError,
    TensorMeta,
    datatype_to_numpy,
    encode_infer_response,
    encode_text_response,
    numpy_to_datatype,
    parse_infer_request,
    parse_text_request,
)

TEXT = [TensorMeta("text", "BYTES", (-1, 1))]
NUM = [TensorMeta("x", "FP32", (-1, 3)), TensorMeta("ids", "INT64", (-1, -1))]
OUTS = ["embedding", "tokens"]
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextmanager
def backend(fallback: bool) -> Iterator[None]:
    """Run the codec with orjson, or (`fallback`) as if orjson were not installed."""
    if protocol._orjson is None and not fallback:
        pytest.skip("orjson is not installed")
    with mock.patch.object(protocol, "_orjson", None) if fallback else nullcontext():
        yield


def bytes_tensor(strings: Sequence[str | bytes]) -> bytes:
    encoded = [s.encode() if isinstance(s, str) else s for s in strings]
    return b"".join(struct.pack("<I", len(b)) + b for b in encoded)


def binary_body(doc: dict[str, Any], *chunks: bytes) -> tuple[bytes, int]:
    head = json.dumps(doc).encode()
    return head + b"".join(chunks), len(head)


def parse(doc: Any, metas: Sequence[TensorMeta] = TEXT, outputs: Sequence[str] = OUTS) -> InferRequest:
    return parse_infer_request(json.dumps(doc).encode(), None, metas, outputs)


def text_input(data: Any = None, **extra: Any) -> dict[str, Any]:
    tensor = {"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": ["a", "b"] if data is None else data}
    return {**tensor, **extra}


def decode_response(body: bytes, headers: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A minimal v2 response decoder: (JSON header, {name: array or list of bytes/str})."""
    size = int(headers.get("Inference-Header-Content-Length", len(body)))
    doc = json.loads(body[:size])
    offset, values = size, {}
    for out in doc["outputs"]:
        if "data" in out:
            values[out["name"]] = out["data"]
            continue
        raw = body[offset : offset + out["parameters"]["binary_data_size"]]
        offset += len(raw)
        if out["datatype"] == "BYTES":
            items, pos = [], 0
            while pos < len(raw):
                (n,) = struct.unpack_from("<I", raw, pos)
                items.append(raw[pos + 4 : pos + 4 + n])
                pos += 4 + n
            values[out["name"]] = items
        else:
            dtype = datatype_to_numpy(out["datatype"]).newbyteorder("<")
            values[out["name"]] = np.frombuffer(raw, dtype=dtype).reshape(out["shape"])
    assert offset == len(body)
    return doc, values


# ---------------------------------------------------------------- round trips


def test_json_bytes_request() -> None:
    req = parse({"id": "r1", "inputs": [text_input(["héllo", "wörld ✓"])]})
    assert req.inputs == {"text": ["héllo", "wörld ✓"]}
    assert (req.id, req.rows, req.outputs, req.binary_outputs, req.timeout_s) == ("r1", 2, None, frozenset(), None)


def test_json_numeric_request_flat_and_nested() -> None:
    x = [[1.5, 2.0, -3.25], [0.0, 1e-3, 7.0]]
    for data in (x, [v for row in x for v in row]):
        doc = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": data},
                          {"name": "ids", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, -(2**63)]]}]}
        req = parse(doc, NUM)
        assert req.rows == 2 and list(req.inputs) == ["x", "ids"]
        np.testing.assert_array_equal(req.inputs["x"], np.array(x, dtype=np.float32))
        assert req.inputs["x"].dtype == np.float32  # type: ignore[union-attr]
        np.testing.assert_array_equal(req.inputs["ids"], np.array([[1, 2], [3, -(2**63)]], dtype=np.int64))
        assert req.inputs["ids"].dtype == np.int64  # type: ignore[union-attr]


def test_binary_request_bytes_and_numbers() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    ids = np.array([[5, -1, 2**40]], dtype=np.int64).repeat(2, axis=0)
    doc = {"inputs": [
        {"name": "ids", "shape": [2, 3], "datatype": "INT64", "parameters": {"binary_data_size": ids.nbytes}},
        {"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}},
    ]}
    body, size = binary_body(doc, ids.astype("<i8").tobytes(), x.astype("<f4").tobytes())
    req = parse_infer_request(body, size, NUM, OUTS)
    np.testing.assert_array_equal(req.inputs["x"], x)
    np.testing.assert_array_equal(req.inputs["ids"], ids)
    assert req.inputs["x"].flags.writeable  # type: ignore[union-attr]

    strings = ["", "ünïcode 🙂", "a\x00b"]
    doc = {"inputs": [{"name": "text", "shape": [3, 1], "datatype": "BYTES",
                       "parameters": {"binary_data_size": len(bytes_tensor(strings))}}]}
    req = parse_infer_request(*binary_body(doc, bytes_tensor(strings)), TEXT, OUTS)
    assert req.inputs == {"text": strings} and req.rows == 3


def test_binary_response_round_trip() -> None:
    emb = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    tokens = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int64)
    labels = np.array(["a", "b ✓", ""], dtype=object)
    body, headers = encode_infer_response("m", "1", "r9", {"embedding": emb, "tokens": tokens, "labels": labels},
                                          {"embedding", "labels"})
    assert headers["Content-Type"] == "application/octet-stream"
    doc, values = decode_response(body, headers)
    assert (doc["model_name"], doc["model_version"], doc["id"]) == ("m", "1", "r9")
    np.testing.assert_array_equal(values["embedding"], emb)
    assert values["tokens"] == [1, 2, 3, 4, 5, 6]
    assert values["labels"] == [b"a", "b ✓".encode(), b""]
    assert [o["shape"] for o in doc["outputs"]] == [[3, 4], [3, 2], [3]]
    assert [o["datatype"] for o in doc["outputs"]] == ["FP32", "INT64", "BYTES"]


@pytest.mark.parametrize("fallback", [False, True], ids=["orjson", "stdlib"])
def test_json_response(fallback: bool) -> None:
    arrays: dict[str, Any] = {
        "f32": np.array([[0.1, -2.5], [3.0, 1e30]], dtype=np.float32),
        "f16": np.array([0.5, 1.5], dtype=np.float16),
        "u8": np.array([[0, 255]], dtype=np.uint8),
        "flag": np.array([True, False]),
        "big": np.asfortranarray(np.arange(6, dtype=">i8").reshape(2, 3)),
        "text": np.array([b"x", "y"], dtype=object),
    }
    with backend(fallback):
        body, headers = encode_infer_response("m", "2", None, arrays, ())
    assert headers == {"Content-Type": "application/json"}
    doc = json.loads(body)
    assert "id" not in doc and doc["model_version"] == "2"
    for out in doc["outputs"]:
        arr = arrays[out["name"]]
        assert out["shape"] == list(arr.shape) and out["datatype"] == numpy_to_datatype(arr.dtype)
        if out["name"] == "text":
            assert out["data"] == ["x", "y"]
        else:
            np.testing.assert_array_equal(np.array(out["data"], dtype=arr.dtype), arr.reshape(-1))


def test_text_request_forms() -> None:
    assert parse_text_request(b'{"text": "one"}') == (["one"], True)
    assert parse_text_request(b'"one"') == (["one"], True)
    assert parse_text_request(b'{"text": ["a", "b"]}') == (["a", "b"], False)
    assert parse_text_request(b'["a"]') == (["a"], False)


def test_text_response() -> None:
    outputs = {"embedding": np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32), "label": np.array(["p", "q"]),
               "score": np.array([0.5, 0.25])}
    assert json.loads(encode_text_response("minilm", outputs, single=False)) == {
        "model": "minilm", "outputs": {"embedding": [[1.0, 2.0], [3.0, 4.0]], "label": ["p", "q"], "score": [0.5, 0.25]}}
    assert json.loads(encode_text_response("minilm", outputs, single=True)) == {
        "model": "minilm", "outputs": {"embedding": [1.0, 2.0], "label": "p", "score": 0.5}}


def test_datatypes() -> None:
    for name in ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
                 "FP64"]:
        assert numpy_to_datatype(datatype_to_numpy(name)) == name
    assert datatype_to_numpy("BYTES") == np.dtype(object)
    assert numpy_to_datatype(np.dtype("U3")) == numpy_to_datatype(np.dtype("S3")) == "BYTES"
    assert numpy_to_datatype(np.dtype(">f4")) == "FP32"
    with pytest.raises(ValueError, match="BF17"):
        datatype_to_numpy("BF17")
    with pytest.raises(ValueError, match="complex"):
        numpy_to_datatype(np.dtype(np.complex64))


def test_outputs_binary_and_timeout() -> None:
    doc = {"inputs": [text_input()], "parameters": {"timeout": 2_500_000, "binary_data_output": True},
           "outputs": [{"name": "tokens"}, {"name": "embedding", "parameters": {"binary_data": False}}]}
    req = parse(doc)
    assert req.outputs == ("tokens", "embedding") and req.binary_outputs == {"tokens"}
    assert req.timeout_s == 2.5 and req.binary_default
    doc = {"inputs": [text_input()], "parameters": {"binary_data_output": True, "timeout": 0}}
    req = parse(doc)
    assert req.outputs is None and req.binary_outputs == set(OUTS) and req.timeout_s is None
    req = parse(doc, outputs=[])  # output names not known yet: the app applies binary_default
    assert req.binary_outputs == frozenset() and req.binary_default
    assert parse({"inputs": [text_input()], "outputs": [{"name": "anything"}]}, outputs=[]).outputs == ("anything",)
    assert parse({"inputs": [text_input()], "parameters": {"timeout": 1.5}}).timeout_s == 1.5e-6


# ---------------------------------------------------------------- tritonclient compatibility


def test_tritonclient_request_and_response() -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient
    texts = np.array([["héllo"], ["wörld"], [""]], dtype=object)
    for binary in (True, False):
        tensor = httpclient.InferInput("text", [3, 1], "BYTES")
        tensor.set_data_from_numpy(texts, binary_data=binary)
        outputs = [httpclient.InferRequestedOutput("embedding", binary_data=True),
                   httpclient.InferRequestedOutput("tokens", binary_data=False)]
        body, size = client.generate_request_body([tensor], outputs=outputs, request_id="abc", timeout=1_000_000)
        assert (size is None) != binary
        req = parse_infer_request(body, size, TEXT, OUTS)
        assert req.inputs == {"text": ["héllo", "wörld", ""]} and req.rows == 3
        assert (req.id, req.timeout_s, req.outputs, req.binary_outputs) == ("abc", 1.0, tuple(OUTS), frozenset({"embedding"}))

    tensor = httpclient.InferInput("text", [3, 1], "BYTES")
    tensor.set_data_from_numpy(texts)
    body, size = client.generate_request_body([tensor])  # no outputs: the client asks for all in binary
    req = parse_infer_request(body, size, TEXT, OUTS)
    assert req.outputs is None and req.binary_outputs == set(OUTS)

    emb = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    tokens = np.arange(6, dtype=np.int64).reshape(3, 2)
    labels = np.array(["a", "ü", ""], dtype=object)
    for names in [set(), {"embedding", "labels"}, {"embedding", "tokens", "labels"}]:
        out, headers = encode_infer_response("m", "1", "abc", {"embedding": emb, "tokens": tokens, "labels": labels},
                                             names)
        length = headers.get("Inference-Header-Content-Length")
        result = client.parse_response_body(out, header_length=None if length is None else int(length))
        np.testing.assert_array_equal(result.as_numpy("embedding"), emb)
        np.testing.assert_array_equal(result.as_numpy("tokens"), tokens)
        got = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("labels").tolist()]
        assert got == ["a", "ü", ""] and result.get_response()["id"] == "abc"


# ---------------------------------------------------------------- rejections

BINARY_TEXT = {"name": "text", "shape": [2, 1], "datatype": "BYTES", "parameters": {"binary_data_size": 10}}
CASES: list[tuple[str, Callable[[], tuple[bytes, int | None]], Sequence[TensorMeta], str]] = [
    ("malformed", lambda: (b'{"inputs": [', None), TEXT, "request JSON is not valid JSON: "),
    ("not utf-8", lambda: (b'{"id": "\xff"}', None), TEXT, "not valid"),
    ("deep", lambda: (b"[" * 5000 + b"]" * 5000, None), TEXT, "request JSON"),
    ("not an object", lambda: (b"[1, 2]", None), TEXT, "request JSON must be an object"),
    ("no inputs", lambda: (b'{"id": "a"}', None), TEXT, '"inputs"'),
    ("inputs not a list", lambda: (b'{"inputs": {"text": 1}}', None), TEXT, '"inputs"'),
    ("empty inputs", lambda: (b'{"inputs": []}', None), TEXT, '"inputs"'),
    ("input not object", lambda: (b'{"inputs": [3]}', None), TEXT, "inputs[0] must be an object"),
    ("id not string", lambda: (json.dumps({"id": 5, "inputs": [text_input()]}).encode(), None), TEXT, '"id"'),
    ("parameters", lambda: (json.dumps({"parameters": [], "inputs": [text_input()]}).encode(), None), TEXT,
     "parameters must be a JSON object"),
    *[(f"missing {key}", (lambda key=key: (json.dumps({"inputs": [{k: v for k, v in text_input().items() if k != key}]}).encode(), None)),
       TEXT, f'inputs[0] lacks "{key}"') for key in ("name", "shape", "datatype")],
    ("name not string", lambda: (json.dumps({"inputs": [text_input(name=1)]}).encode(), None), TEXT, "inputs[0].name"),
    ("unknown input", lambda: (json.dumps({"inputs": [text_input(name="txt")]}).encode(), None), TEXT, 'it takes "text"'),
    ("duplicate", lambda: (json.dumps({"inputs": [text_input(), text_input()]}).encode(), None), TEXT, "appears twice"),
    ("missing input", lambda: (json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}).encode(), None),
     NUM, 'inputs lack "ids"'),
    ("datatype", lambda: (json.dumps({"inputs": [text_input(datatype="FP32")]}).encode(), None), TEXT, 'datatype must be "BYTES"'),
    ("shape negative", lambda: (json.dumps({"inputs": [text_input(shape=[-2, 1])]}).encode(), None), TEXT, ".shape must be a list of non-negative"),
    ("shape floats", lambda: (json.dumps({"inputs": [text_input(shape=[2.0, 1])]}).encode(), None), TEXT, ".shape must be"),
    ("shape bool", lambda: (json.dumps({"inputs": [text_input(shape=[True, 1])]}).encode(), None), TEXT, ".shape must be"),
    ("shape string", lambda: (json.dumps({"inputs": [text_input(shape="2,1")]}).encode(), None), TEXT, ".shape must be"),
    ("shape rank", lambda: (json.dumps({"inputs": [text_input(shape=[2])]}).encode(), None), TEXT, "does not fit the model's [-1, 1]"),
    ("shape dim", lambda: (json.dumps({"inputs": [text_input(["a"] * 4, shape=[2, 2])]}).encode(), None), TEXT, "does not fit"),
    ("shape huge", lambda: (json.dumps({"inputs": [{"name": "ids", "shape": [0, 2**62], "datatype": "INT64", "data": []},
                                                   {"name": "x", "shape": [0, 3], "datatype": "FP32", "data": []}]}).encode(), None),
     NUM, "shape is too large"),
    ("batch mismatch", lambda: (json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
                                                       {"name": "ids", "shape": [2, 1], "datatype": "INT64", "data": [1, 2]}]}).encode(), None),
     NUM, "inputs[1] (\"ids\").shape[0] is 2 but earlier inputs have 1"),
    ("data count", lambda: (json.dumps({"inputs": [text_input(["a"])]}).encode(), None), TEXT, "data has 1 values but its shape needs 2"),
    ("data not list", lambda: (json.dumps({"inputs": [text_input("ab")]}).encode(), None), TEXT, "data must be a list"),
    ("non-string BYTES", lambda: (json.dumps({"inputs": [text_input(["a", 1])]}).encode(), None), TEXT, "data element 1 is an integer; BYTES"),
    ("string FP32", lambda: (json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, "2", 3]},
                                                    {"name": "ids", "shape": [1, 1], "datatype": "INT64", "data": [1]}]}).encode(), None),
     NUM, "data element 1 is a string; FP32"),
    ("bool FP32", lambda: (json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, True, 3]},
                                                  {"name": "ids", "shape": [1, 1], "datatype": "INT64", "data": [1]}]}).encode(), None),
     NUM, "data element 1 is a boolean"),
    ("float INT64", lambda: (json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
                                                    {"name": "ids", "shape": [1, 1], "datatype": "INT64", "data": [1.5]}]}).encode(), None),
     NUM, 'inputs[1] ("ids").data element 0 is a number; INT64 data must be integers'),
    ("INT64 range", lambda: (json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
                                                    {"name": "ids", "shape": [1, 1], "datatype": "INT64", "data": [2**63]}]}).encode(), None),
     NUM, "out of range for INT64"),
    ("FP32 range", lambda: (json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 1e39]},
                                                   {"name": "ids", "shape": [1, 1], "datatype": "INT64", "data": [1]}]}).encode(), None),
     NUM, "out of range for FP32"),
    ("no data", lambda: (json.dumps({"inputs": [{k: v for k, v in text_input().items() if k != "data"}]}).encode(), None), TEXT,
     'lacks "data"'),
    ("both", lambda: binary_body({"inputs": [{**BINARY_TEXT, "data": ["a", "b"]}]}, bytes_tensor("ab")), TEXT, "both"),
    ("binary without header", lambda: (json.dumps({"inputs": [BINARY_TEXT]}).encode() + bytes_tensor("ab"), None), TEXT,
     "if binary data follows the JSON, send the Inference-Header-Content-Length header"),
    ("binary size without header", lambda: (json.dumps({"inputs": [BINARY_TEXT]}).encode(), None), TEXT,
     "binary_data_size needs the Inference-Header-Content-Length header"),
    ("binary size type", lambda: binary_body({"inputs": [{**BINARY_TEXT, "parameters": {"binary_data_size": "10"}}]}, bytes_tensor("ab")),
     TEXT, "binary_data_size must be a non-negative integer"),
    ("binary short", lambda: binary_body({"inputs": [BINARY_TEXT]}, bytes_tensor("ab")[:-1]), TEXT, "only 9 bytes"),
    ("binary extra", lambda: binary_body({"inputs": [BINARY_TEXT]}, bytes_tensor("ab") + b"!"), TEXT, "1 bytes follow the last binary input"),
    ("binary count", lambda: binary_body({"inputs": [{**BINARY_TEXT, "parameters": {"binary_data_size": 15}}]}, bytes_tensor("abc")),
     TEXT, "holds 3 BYTES elements but its shape needs 2"),
    ("binary length", lambda: binary_body({"inputs": [BINARY_TEXT]}, struct.pack("<I", 99) + b"abcdef"), TEXT, "needs 99 bytes"),
    ("binary utf-8", lambda: binary_body({"inputs": [BINARY_TEXT]}, bytes_tensor([b"o", b"\xc3"])), TEXT,
     'inputs[0] ("text") BYTES element 1 is not valid UTF-8'),
    ("binary numeric size", lambda: binary_body({"inputs": [
        {"name": "x", "shape": [1, 3], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
        {"name": "ids", "shape": [1, 1], "datatype": "INT64", "data": [1]}]}, b"\0" * 8), NUM, "needs 3 x 4 = 12"),
    ("header too long", lambda: (b"{}", 3), TEXT, "Inference-Header-Content-Length"),
    ("header negative", lambda: (b"{}", -1), TEXT, "Inference-Header-Content-Length"),
    ("header not int", lambda: (b"{}", cast(int, 1.0)), TEXT, "Inference-Header-Content-Length"),
    ("unknown output", lambda: (json.dumps({"inputs": [text_input()], "outputs": [{"name": "emb"}]}).encode(), None), TEXT,
     'outputs[0].name "emb" is not an output of this model; it has "embedding", "tokens"'),
    ("output no name", lambda: (json.dumps({"inputs": [text_input()], "outputs": [{}]}).encode(), None), TEXT, "outputs[0]"),
    ("outputs not list", lambda: (json.dumps({"inputs": [text_input()], "outputs": "tokens"}).encode(), None), TEXT, '"outputs"'),
    ("output twice", lambda: (json.dumps({"inputs": [text_input()], "outputs": [{"name": "tokens"}] * 2}).encode(), None), TEXT,
     "outputs[1].name"),
    ("binary_data type", lambda: (json.dumps({"inputs": [text_input()], "outputs": [{"name": "tokens", "parameters": {"binary_data": 1}}]}).encode(), None),
     TEXT, "outputs[0].parameters.binary_data"),
    ("classification", lambda: (json.dumps({"inputs": [text_input()], "outputs": [{"name": "tokens", "parameters": {"classification": 3}}]}).encode(), None),
     TEXT, "classification is not supported"),
    ("binary_data_output", lambda: (json.dumps({"inputs": [text_input()], "parameters": {"binary_data_output": "yes"}}).encode(), None),
     TEXT, "parameters.binary_data_output"),
    ("shared memory", lambda: (json.dumps({"inputs": [text_input(parameters={"shared_memory_region": "r"})]}).encode(), None), TEXT,
     "shared_memory_region"),
    *[(f"timeout {value!r}", (lambda value=value: (json.dumps({"inputs": [text_input()], "parameters": {"timeout": value}}).encode(), None)),
       TEXT, "parameters.timeout") for value in (-1, "5", True, [1], {"us": 5})],
]


@pytest.mark.parametrize("fallback", [False, True], ids=["orjson", "stdlib"])
@pytest.mark.parametrize(("make", "metas", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rejections(make: Callable[[], tuple[bytes, int | None]], metas: Sequence[TensorMeta], expected: str,
                    fallback: bool) -> None:
    body, header_length = make()
    with backend(fallback), pytest.raises(ProtocolError) as info:
        parse_infer_request(body, header_length, metas, OUTS)
    assert info.value.status == 400
    assert expected in info.value.message and "\n" not in info.value.message
    assert str(info.value) == info.value.message


def test_rejects_lone_surrogate_from_stdlib_json() -> None:
    body = b'{"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": ["ok", "\\ud800"]}]}'
    for fallback in (False, True):
        with backend(fallback), pytest.raises(ProtocolError) as info:
            parse_infer_request(body, None, TEXT, OUTS)
        assert info.value.status == 400 and "not valid" in info.value.message
    with backend(True), pytest.raises(ProtocolError, match=r"data element 1 is not valid UTF-8"):
        parse_infer_request(body, None, TEXT, OUTS)


@pytest.mark.parametrize(("body", "expected"), [
    (b"", "not valid JSON"), (b"{", "not valid JSON"), (b"3", "request body must be a string or a list"),
    (b'{"txt": "a"}', '{"text":'), (b'{"text": 3}', "text must be a string or a list"), (b"[]", "empty list"),
    (b'{"text": []}', "text is an empty list"), (b'["a", 2]', "request body[1] must be a string"),
    (b'{"text": ["a", null]}', "text[1] must be a string, got null"),
])
def test_text_rejections(body: bytes, expected: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_text_request(body)
    assert info.value.status == 400 and expected in info.value.message


# ---------------------------------------------------------------- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)
# plausible requests, so the fuzzing gets past the first checks
tensors = st.fixed_dictionaries(
    {"name": st.sampled_from(["text", "x", "ids", "other"]), "datatype": st.sampled_from(["BYTES", "FP32", "INT64", "BOOL"]),
     "shape": st.lists(st.integers(-1, 3), max_size=3) | json_values},
    optional={"data": st.lists(json_values, max_size=6), "parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-1, 40)})},
)
requests = st.fixed_dictionaries(
    {"inputs": st.lists(tensors, max_size=3) | json_values},
    optional={"id": json_values, "parameters": st.fixed_dictionaries({}, optional={"timeout": json_values, "binary_data_output": json_values}),
              "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(OUTS) | json_values}), max_size=3) | json_values},
)


def check_parse(body: bytes, header_length: int | None) -> None:
    for metas in (TEXT, NUM):
        try:
            req = parse_infer_request(body, header_length, metas, OUTS)
        except ProtocolError as e:
            assert e.status == 400 and e.message and "\n" not in e.message
        else:
            assert set(req.inputs) == {m.name for m in metas}


@FUZZ
@given(body=st.binary(max_size=200), header_length=st.none() | st.integers(-2, 210), fallback=st.booleans())
def test_fuzz_bytes(body: bytes, header_length: int | None, fallback: bool) -> None:
    with backend(fallback):
        check_parse(body, header_length)


@FUZZ
@given(doc=requests | json_values, tail=st.binary(max_size=40), binary=st.booleans(), fallback=st.booleans())
def test_fuzz_json(doc: Any, tail: bytes, binary: bool, fallback: bool) -> None:
    head = json.dumps(doc).encode()
    with backend(fallback):
        check_parse(head + tail if binary else head, len(head) if binary else None)


@FUZZ
@given(body=st.binary(max_size=100) | json_values.map(lambda v: json.dumps(v).encode()), fallback=st.booleans())
def test_fuzz_text(body: bytes, fallback: bool) -> None:
    with backend(fallback):
        try:
            texts, single = parse_text_request(body)
        except ProtocolError as e:
            assert e.status == 400 and "\n" not in e.message
        else:
            assert texts and all(isinstance(t, str) for t in texts) and (len(texts) == 1 or not single)


@FUZZ
@given(data=st.data(), rows=st.integers(1, 8), k=st.integers(0, 4), binary=st.booleans())
def test_valid_requests_round_trip(data: st.DataObject, rows: int, k: int, binary: bool) -> None:
    metas = [TensorMeta("text", "BYTES", (-1,)), TensorMeta("x", "FP32", (-1, k))]
    texts = data.draw(st.lists(st.text(), min_size=rows, max_size=rows))
    values = data.draw(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False),
                                min_size=rows * k, max_size=rows * k))
    x = np.array(values, dtype=np.float32).reshape(rows, k)
    text_tensor: dict[str, Any] = {"name": "text", "shape": [rows], "datatype": "BYTES"}
    x_tensor: dict[str, Any] = {"name": "x", "shape": [rows, k], "datatype": "FP32"}
    if binary:
        encoded = bytes_tensor(texts)
        doc = {"inputs": [{**text_tensor, "parameters": {"binary_data_size": len(encoded)}},
                          {**x_tensor, "parameters": {"binary_data_size": x.nbytes}}]}
        body, header_length = binary_body(doc, encoded, x.astype("<f4").tobytes())
    else:
        nested = data.draw(st.booleans())
        doc = {"inputs": [{**text_tensor, "data": texts},
                          {**x_tensor, "data": x.tolist() if nested else [float(v) for v in x.reshape(-1)]}]}
        body, header_length = json.dumps(doc).encode(), None
    req = parse_infer_request(body, header_length, metas, [])
    assert req.rows == rows and req.inputs["text"] == texts
    np.testing.assert_array_equal(req.inputs["x"], x)
    out, headers = encode_infer_response("m", "1", None, {"x": x, "text": np.array(texts, dtype=object)},
                                         {"x", "text"} if binary else ())
    _, decoded = decode_response(out, headers)
    np.testing.assert_array_equal(np.asarray(decoded["x"], dtype=np.float32).reshape(rows, k), x)
    assert [v.decode() if isinstance(v, bytes) else v for v in decoded["text"]] == texts


@pytest.mark.parametrize("fallback", [False, True], ids=["orjson", "stdlib"])
@pytest.mark.parametrize("value", [b"1" + b"0" * 5000, b"1" + b"0" * 400, b"1e999", b"NaN", b"-Infinity"])
@pytest.mark.parametrize("field", ["FP32", "INT64", "timeout"])
def test_big_numbers_and_non_finite(value: bytes, field: str, fallback: bool) -> None:
    ids = b'{"name": "ids", "shape": [1, 1], "datatype": "INT64", "data": [%s]}' % (value if field == "INT64" else b"1")
    x = b'{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, %s]}' % (value if field == "FP32" else b"3")
    params = b'{"timeout": %s}' % value if field == "timeout" else b"{}"
    body = b'{"parameters": %s, "inputs": [%s, %s]}' % (params, x, ids)
    with backend(fallback):
        try:
            req = parse_infer_request(body, None, NUM, OUTS)
        except ProtocolError as e:  # orjson rejects all of these as JSON; the stdlib reads most
            assert e.status == 400 and ("not valid JSON" in e.message or field in e.message), e.message
        else:  # a float input keeps an infinity or NaN as sent
            assert fallback and field == "FP32" and value in (b"1e999", b"NaN", b"-Infinity")
            assert not np.isfinite(req.inputs["x"][0, 2])  # type: ignore[call-overload]
