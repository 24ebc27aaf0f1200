"""Input sources: planning plus reading every block must give back exactly the file's rows."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distinfer.data import (
    Block,
    SourceSpec,
    _formats,
    _scan,
    block_sizes,
    describe_row,
    open_source,
    plan_blocks,
    read_block,
)
from distinfer.errors import ConfigError, InputError

PLANS = [(1, 1), (2, 1), (3, 2), (8, 1), (1000, 500)]


def write(path: Path, content: str | bytes) -> str:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def read_all(spec: SourceSpec, block_size: int, min_block_size: int,
             columns: list[str]) -> dict[str, Any]:
    """Plan, check the plan covers every row once, and concatenate every block's columns."""
    blocks = plan_blocks(spec, block_size, min_block_size)
    assert [b.id for b in blocks] == list(range(len(blocks)))
    assert [b.start for b in blocks] == [0, *(b.stop for b in blocks)][: len(blocks)]
    assert sum(b.rows for b in blocks) == spec.num_rows
    if spec.format in ("text", "jsonl", "csv") and blocks:
        assert [b.byte_start for b in blocks[1:]] == [b.byte_stop for b in blocks[:-1]]
        assert blocks[-1].byte_stop == spec.size_bytes
    out: dict[str, Any] = {c: [] for c in columns}
    for block in blocks:
        for column, values in read_block(spec, block, columns).items():
            assert len(values) == block.rows
            out[column].append(values)
    return {c: _concat(parts) for c, parts in out.items()}


def _concat(parts: list[Any]) -> Any:
    if parts and isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return [value for part in parts for value in part]


def text_rows(content: str) -> list[str]:
    if not content:
        return []
    lines = content.split("\n")
    if content.endswith("\n"):
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


# --- block_sizes -----------------------------------------------------------------------------


def test_block_sizes_ramps_up_and_down() -> None:
    assert block_sizes(100, 16, 2) == [2, 4, 8, 15, 15, 14, 14, 14, 8, 4, 2]
    assert block_sizes(0, 16, 2) == []
    assert block_sizes(1, 16, 2) == [1]
    assert block_sizes(5, 8, 8) == [5]
    assert block_sizes(20, 4, 4) == [4] * 5


@pytest.mark.parametrize(("args", "match"), [((10, 4, 0), "min_block_size"),
                                             ((10, 2, 4), "block_size"),
                                             ((-1, 4, 2), "num_rows")])
def test_block_sizes_rejects_bad_arguments(args: tuple[int, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        block_sizes(*args)


@given(st.integers(0, 100_000), st.integers(1, 5000), st.integers(1, 5000))
def test_block_sizes_properties(num_rows: int, block_size: int, min_block_size: int) -> None:
    block_size = max(block_size, min_block_size)
    sizes = block_sizes(num_rows, block_size, min_block_size)
    assert sum(sizes) == num_rows
    assert all(1 <= s <= block_size for s in sizes)
    assert sizes == block_sizes(num_rows, block_size, min_block_size)
    ramp: list[int] = []
    size = min_block_size
    while len(sizes) > 2 * len(ramp) + 1 and size < block_size and sizes[len(ramp)] == size:
        ramp.append(size)
        size *= 2
    # The innermost step may be shared with the middle (e.g. 256, 512, 511, 256 for 513-row blocks).
    if ramp and sizes[: len(ramp)] != sizes[len(sizes) - len(ramp):][::-1]:
        ramp.pop()
    assert sizes[: len(ramp)] == sizes[len(sizes) - len(ramp):][::-1]
    middle = sizes[len(ramp): len(sizes) - len(ramp)]
    assert not middle or max(middle) - min(middle) <= 1
    if num_rows >= 2 * min_block_size and block_size > min_block_size:
        assert sizes[0] == sizes[-1] == min_block_size


# --- text --------------------------------------------------------------------------------------


TEXTS = ["a\nb\nc\n", "a\nb\nc", "a\r\nbb\r\nccc", "\n\nx\n\n", "", "\n", "one", "é\n日本\r\n\n"]


@pytest.mark.parametrize("content", TEXTS)
@pytest.mark.parametrize(("block_size", "min_block_size"), PLANS)
def test_text_round_trip(tmp_path: Path, content: str, block_size: int,
                         min_block_size: int) -> None:
    spec = open_source(write(tmp_path / "data.txt", content))
    assert (spec.format, spec.columns) == ("text", ("text",))
    assert spec.num_rows == len(text_rows(content))
    assert read_all(spec, block_size, min_block_size, ["text"]) == {"text": text_rows(content)}


def test_text_byte_order_mark_is_not_data(tmp_path: Path) -> None:
    spec = open_source(write(tmp_path / "data.txt", b"\xef\xbb\xbfhi\nyo\n"))
    assert read_all(spec, 1, 1, ["text"]) == {"text": ["hi", "yo"]}


def test_text_bad_utf8_names_line(tmp_path: Path) -> None:
    spec = open_source(write(tmp_path / "data.txt", b"ok\nfine\nbad \xff\n"))
    with pytest.raises(InputError, match=r"data\.txt line 3 is not valid UTF-8"):
        read_all(spec, 8, 1, ["text"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(st.sampled_from('ab,"\r é'), max_size=6), max_size=30),
       st.booleans(), st.integers(1, 9), st.integers(1, 4))
def test_text_and_csv_across_chunk_boundaries(lines: list[str], trailing: bool, chunk: int,
                                              block_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        patch.setattr(_scan, "CHUNK_BYTES", chunk)
        content = "\n".join(lines) + ("\n" if trailing and lines else "")
        spec = open_source(write(Path(tmp) / "data.txt", content))
        assert read_all(spec, block_size, 1, ["text"]) == {"text": text_rows(content)}
        # the same strings as a CSV column, quoted by the csv module where needed
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(["s", "n"])
        writer.writerows([line, i] for i, line in enumerate(lines))
        spec = open_source(write(Path(tmp) / "data.csv", buffer.getvalue()))
        got = read_all(spec, block_size, 1, ["s", "n"])
        assert got["s"] == lines
        assert list(got["n"]) == list(range(len(lines)))


# --- jsonl -------------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "id": i, "score": i / 2, "vec": [i, i + 0.5],
             "grid": [[i, 1], [2, 3]]} for i in range(11)]
    content = "\r\n".join(json.dumps(r) for r in rows)  # no trailing newline, CRLF endings
    spec = open_source(write(tmp_path / "data.jsonl", content))
    assert spec.columns == ("text", "id", "score", "vec", "grid")
    for block_size, min_block_size in PLANS:
        got = read_all(spec, block_size, min_block_size, ["text", "id", "vec", "grid", "score"])
        assert got["text"] == [r["text"] for r in rows]
        assert got["id"].dtype == np.int64
        assert got["id"].tolist() == list(range(11))
        assert got["score"].dtype == got["vec"].dtype == np.float64
        assert got["vec"].tolist() == [r["vec"] for r in rows]
        assert got["grid"].shape == (11, 2, 2)


def test_jsonl_empty_file(tmp_path: Path) -> None:
    spec = open_source(write(tmp_path / "data.ndjson", ""))
    assert (spec.format, spec.num_rows, spec.columns) == ("jsonl", 0, ())
    assert plan_blocks(spec, 4, 1) == []


@pytest.mark.parametrize(("content", "column", "match"), [
    ('{"text": "a"}\n{"text": "b"}\n{"txt": "c"}\n', "text",
     r"data\.jsonl line 3 has no field 'text'; every line needs the fields picked with --column"),
    ('{"text": "a"}\n{"text": "b"\n', "text",
     r"data\.jsonl line 2 is not valid JSON \(Expecting ',' delimiter at column 13\)"),
    ('{"text": "a"}\n\n{"text": "b"}\n', "text", r"data\.jsonl line 2 is blank"),
    ('{"text": "a"}\n[1, 2]\n', "text", r"data\.jsonl line 2 is not a JSON object"),
    ('{"v": [1, 2]}\n{"v": [1, 2, 3]}\n', "v",
     r"data\.jsonl line 2 field 'v' has 3 values but data\.jsonl line 1 has 2 values; "
     r"the rows must have equal length"),
    ('{"v": [[1], [2, 3]]}\n', "v", r"data\.jsonl line 1 field 'v' is a ragged nested list"),
    ('{"v": 1}\n{"v": "x"}\n', "v", r"data\.jsonl line 2 field 'v' is a string but data\.jsonl "
     r"line 1 has a number"),
    ('{"v": 1}\n{"v": null}\n', "v", r"data\.jsonl line 2 field 'v' is null"),
    ('{"v": ["a", "b"]}\n', "v", r"data\.jsonl line 1 field 'v' holds something other than"),
])
def test_jsonl_row_errors(tmp_path: Path, content: str, column: str, match: str) -> None:
    spec = open_source(write(tmp_path / "data.jsonl", content))
    with pytest.raises(InputError, match=match):
        read_all(spec, 8, 8, [column])  # one block: blocks are checked one at a time


@pytest.mark.parametrize(("content", "match"), [
    ('\n\n[1]\n', r"data\.jsonl line 3 is not a JSON object"),
    ('{"a": \n', r"data\.jsonl line 1 is not valid JSON"),
    ('\n \n', r"data\.jsonl line 1 is blank"),
])
def test_jsonl_open_errors(tmp_path: Path, content: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        open_source(write(tmp_path / "data.jsonl", content))


def test_unknown_column(tmp_path: Path) -> None:
    spec = open_source(write(tmp_path / "data.jsonl", '{"text": "a", "id": 1}\n'))
    message = "input 'data.jsonl' has no column 'txt' (available: text, id); pick one with --column"
    with pytest.raises(InputError) as info:
        read_block(spec, plan_blocks(spec, 1, 1)[0], ["txt"])
    assert str(info.value) == message


# --- csv ---------------------------------------------------------------------------------------


CSV = 'id,text,score\r\n1,"a, b",0.5\r\n2,"say ""hi""",1\r\n3,"two\nlines",2.5\r\n4,,3\r\n5,plain,4'


@pytest.mark.parametrize(("block_size", "min_block_size"), PLANS)
def test_csv_round_trip(tmp_path: Path, block_size: int, min_block_size: int) -> None:
    spec = open_source(write(tmp_path / "data.csv", CSV))
    assert (spec.columns, spec.num_rows, spec.numeric) == (("id", "text", "score"), 5,
                                                           ("id", "score"))
    got = read_all(spec, block_size, min_block_size, ["text", "id", "score"])
    expected = list(csv.reader(io.StringIO(CSV, newline="")))[1:]
    assert got["text"] == [r[1] for r in expected]
    assert got["id"].dtype == np.int64
    assert got["id"].tolist() == [1, 2, 3, 4, 5]
    assert got["score"].dtype == np.float64
    assert got["score"].tolist() == [0.5, 1, 2.5, 3, 4]


def test_csv_header_only_and_fewer_rows_than_min(tmp_path: Path) -> None:
    spec = open_source(write(tmp_path / "data.csv", "a,b\n"))
    assert (spec.num_rows, plan_blocks(spec, 10, 5)) == (0, [])
    spec = open_source(write(tmp_path / "two.csv", "a,b\nx,y\nz,w\n"))
    assert plan_blocks(spec, 10, 5) == [Block(0, 0, 2, 4, 12)]
    assert read_all(spec, 10, 5, ["a", "b"]) == {"a": ["x", "z"], "b": ["y", "w"]}


def test_csv_column_type_is_decided_once(tmp_path: Path) -> None:
    # a numeric-looking text in a text column stays a string in its own block
    spec = open_source(write(tmp_path / "data.csv", "t\nhello\n42\n"))
    assert spec.numeric == ()
    assert read_all(spec, 1, 1, ["t"]) == {"t": ["hello", "42"]}


@pytest.mark.parametrize(("content", "match"), [
    ("", r"data\.csv is empty; a CSV input needs a header row"),
    ("\nx\n", r"data\.csv has an empty header row \(line 1\)"),
    ("a,a\n1,2\n", r"data\.csv header names column 'a' more than once"),
    ('a\n1\n"open\n', r"data\.csv ends inside a quoted field that starts in record 2"),
])
def test_csv_open_errors(tmp_path: Path, content: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        open_source(write(tmp_path / "data.csv", content))


@pytest.mark.parametrize(("content", "match"), [
    ("a,b\n1,2\n3\n", r"data\.csv record 2 has 1 fields but the header has 2"),
    ("a,b\n1,2\n\n3,4\n", r"data\.csv record 2 has 0 fields .*blank lines are not allowed"),
    ("a,b\n1,x\n2,y\nnope,z\n", r"data\.csv record 3 field 'a' is 'nope', not a number"),
    ("a,b\n1,x\n2,\xff\n", r"data\.csv record 2 is not valid UTF-8"),
])
def test_csv_row_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str,
                        match: str) -> None:
    monkeypatch.setattr(_formats, "_SAMPLE_BYTES", 8)  # column types from the first rows only
    path = write(tmp_path / "data.csv", content.encode("latin-1"))
    with pytest.raises(InputError, match=match):
        read_all(open_source(path), 8, 1, ["a", "b"])


# --- parquet -----------------------------------------------------------------------------------


def parquet_table(n: int) -> pa.Table:
    return pa.table({
        "text": [f"row {i}" for i in range(n)],
        "id": pa.array(range(n), pa.int32()),
        "emb": pa.array([[i, -i, 0.5] for i in range(n)], pa.list_(pa.float32())),
        "fixed": pa.array([[i, i] for i in range(n)], pa.list_(pa.int64(), 2)),
        "nested": pa.array([[[i, 1], [2, 3]] for i in range(n)], pa.list_(pa.list_(pa.float64()))),
        "cat": pa.array([["x", "y"][i % 2] for i in range(n)]).dictionary_encode(),
    })


@pytest.mark.parametrize(("block_size", "min_block_size"), PLANS)
def test_parquet_round_trip(tmp_path: Path, block_size: int, min_block_size: int) -> None:
    table = parquet_table(23)
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=5)
    spec = open_source(str(tmp_path / "data.parquet"))
    assert (spec.format, spec.num_rows, spec.columns) == ("parquet", 23, tuple(table.column_names))
    for block in plan_blocks(spec, block_size, min_block_size):
        assert block.start // 5 == (block.stop - 1) // 5, "a block crosses a row group"
    got = read_all(spec, block_size, min_block_size, list(table.column_names))
    assert got["text"] == table.column("text").to_pylist()
    assert got["id"].dtype == np.int32
    assert got["id"].tolist() == list(range(23))
    assert got["emb"].dtype == np.float32
    assert got["emb"].tolist() == table.column("emb").to_pylist()
    assert got["fixed"].tolist() == table.column("fixed").to_pylist()
    assert got["nested"].shape == (23, 2, 2)
    assert got["nested"].tolist() == table.column("nested").to_pylist()
    assert got["cat"] == table.column("cat").to_pylist()


@pytest.mark.parametrize(("column", "match"), [
    (pa.array(["a", None, "c"]), r"data\.parquet row 1 field 'c' is null"),
    (pa.array([1.0, 2.0, None]), r"data\.parquet row 2 field 'c' is null"),
    (pa.array([[1], [2, 3], [4]]), r"data\.parquet row 1 field 'c' has 2 values but "
     r"data\.parquet row 0 has 1; the rows must have equal length"),
    (pa.array([[1], [None], [4]]), r"data\.parquet row 1 field 'c' is null or holds nulls"),
    (pa.array([1, 2, 3], pa.timestamp("s")), r"field 'c' has type timestamp\[ms\], which "
     r"distinfer cannot feed to a model"),
])
def test_parquet_row_errors(tmp_path: Path, column: pa.Array, match: str) -> None:
    pq.write_table(pa.table({"c": column}), tmp_path / "data.parquet")
    spec = open_source(str(tmp_path / "data.parquet"))
    with pytest.raises(InputError, match=match):
        read_all(spec, 3, 3, ["c"])


def test_parquet_not_parquet(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"data\.pq is not a readable Parquet file"):
        open_source(write(tmp_path / "data.pq", "not parquet at all"))


# --- npy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (7, 3), (7, 2, 2), (0, 3), (1, 4)])
@pytest.mark.parametrize(("block_size", "min_block_size"), PLANS)
def test_npy_round_trip(tmp_path: Path, shape: tuple[int, ...], block_size: int,
                        min_block_size: int) -> None:
    array = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    np.save(tmp_path / "data.npy", array)
    spec = open_source(str(tmp_path / "data.npy"))
    assert (spec.columns, spec.num_rows) == (("array",), shape[0])
    got = read_all(spec, block_size, min_block_size, ["array"])
    if shape[0]:
        np.testing.assert_array_equal(got["array"], array)
        assert got["array"].dtype == np.float32


@pytest.mark.parametrize(("content", "match"), [
    (None, r"data\.npy holds a single value \(a 0-d array\)"),
    (b"garbage", r"data\.npy is not a readable \.npy array"),
])
def test_npy_errors(tmp_path: Path, content: bytes | None, match: str) -> None:
    if content is None:
        np.save(tmp_path / "data.npy", np.float32(3))
    else:
        write(tmp_path / "data.npy", content)
    with pytest.raises(InputError, match=match):
        open_source(str(tmp_path / "data.npy"))


# --- open_source, describe_row, changes --------------------------------------------------------


def test_open_source_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"input file '.*x\.jsonl' does not exist; check --input"):
        open_source(str(tmp_path / "x.jsonl"))
    with pytest.raises(InputError, match=r"input directory '.*' holds no image files .*; give an input file, or a directory or glob of images"):
        open_source(str(tmp_path))
    with pytest.raises(InputError, match=r"data\.log' has an unknown suffix '\.log'; name its "
                       r"format with --input-format \(text, jsonl, csv, parquet, npy, images\)"):
        open_source(write(tmp_path / "data.log", "a\n"))
    with pytest.raises(ConfigError, match=r"--input-format 'xml' is unknown"):
        open_source(str(tmp_path / "data.log"), "xml")
    assert open_source(str(tmp_path / "data.log"), "text").num_rows == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_open_source_unreadable(tmp_path: Path) -> None:
    path = write(tmp_path / "data.txt", "a\n")
    os.chmod(path, 0)
    with pytest.raises(InputError, match=r"data\.txt' cannot be read"):
        open_source(path)


def test_describe_row() -> None:
    def spec(name: str, fmt: str) -> SourceSpec:
        return SourceSpec(f"/d/{name}", fmt, (), 100, 0, 0)

    assert describe_row(spec("data.jsonl", "jsonl"), 12) == "data.jsonl line 13"
    assert describe_row(spec("data.txt", "text"), 0) == "data.txt line 1"
    assert describe_row(spec("data.csv", "csv"), 0) == "data.csv record 1"
    assert describe_row(spec("data.parquet", "parquet"), 12) == "data.parquet row 12"
    assert describe_row(spec("data.npy", "npy"), 12) == "data.npy row 12"


def test_changed_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "data.txt", "a\nb\n")
    spec = open_source(path)
    blocks = plan_blocks(spec, 1, 1)
    write(tmp_path / "data.txt", "a\nbc\n")
    with pytest.raises(InputError, match="changed since the job was planned"):
        read_block(spec, blocks[1], ["text"])


def test_spec_and_blocks_pickle(tmp_path: Path) -> None:
    spec = open_source(write(tmp_path / "data.txt", "a\nb\n"))
    blocks = plan_blocks(spec, 1, 1)
    assert pickle.loads(pickle.dumps((spec, blocks))) == (spec, blocks)
    assert os.path.isabs(spec.path)
