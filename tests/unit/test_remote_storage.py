"""Inputs and outputs at fsspec URLs, exercised on fsspec's in-memory filesystem (memory://).

Every format read from a URL must give exactly the rows of the same bytes read from a local
file; the sink must keep its guarantees (whole parts only, resume, refusal) without a rename.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import pickle
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from pyarrow.fs import FSSpecHandler, PyFileSystem

from distinfer.data import (
    MANIFEST,
    Block,
    Manifest,
    SourceSpec,
    _formats,
    _scan,
    block_sizes,
    join_location,
    normalize_location,
    open_source,
    part_name,
    plan_blocks,
    prepare_output,
    read_block,
    remove_temp_parts,
    save_json,
    write_part,
)
from distinfer.errors import InputError, OutputError

JOB: dict[str, Any] = {"model": "minilm", "input": "s3://b/in.jsonl", "rows": 10, "plan": "abc"}
MEMORY: Any = fsspec.filesystem("memory")


@pytest.fixture
def base() -> Iterator[str]:
    """A fresh memory:// folder, removed afterwards (the memory filesystem is process-wide)."""
    folder = f"/t{uuid.uuid4().hex}"
    yield f"memory://{folder}"
    if MEMORY.exists(folder):
        MEMORY.rm(folder, recursive=True)


def put(url: str, content: bytes) -> str:
    MEMORY.pipe_file(url.removeprefix("memory://"), content)
    return url


def read_all(spec: SourceSpec, block_size: int, min_block_size: int,
             columns: list[str]) -> tuple[list[Block], dict[str, Any]]:
    blocks = plan_blocks(spec, block_size, min_block_size)
    assert sum(b.rows for b in blocks) == spec.num_rows
    out: dict[str, list[Any]] = {c: [] for c in columns}
    for block in blocks:
        # what a worker on another machine gets: the pickled spec and block
        worker_spec, worker_block = pickle.loads(pickle.dumps((spec, block)))
        for column, values in read_block(worker_spec, worker_block, columns).items():
            assert len(values) == block.rows
            out[column].append(values)
    return blocks, {c: _concat(parts) for c, parts in out.items()}


def _concat(parts: list[Any]) -> Any:
    if parts and isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return [value for part in parts for value in part]


def _csv(rows: list[list[Any]]) -> bytes:
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue().encode()


def _parquet(n: int) -> bytes:
    table = pa.table({"text": [f"row {i}" for i in range(n)],
                      "emb": pa.array([[i, -i] for i in range(n)], pa.list_(pa.float32(), 2))})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=7)
    return buffer.getvalue()


def _npy(array: np.ndarray[Any, Any], version: tuple[int, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version)
    return buffer.getvalue()


CASES = {
    "text": ("data.txt", "\ufeffone\r\ntwo é\n\nfour".encode(), ["text"]),
    "jsonl": ("data.jsonl", b"".join(json.dumps({"text": f"t{i}", "v": [i, i / 2]}).encode()
                                     + b"\n" for i in range(23)), ["text", "v"]),
    "csv": ("data.csv", _csv([["s", "n"], *[[f'a "{i}"\nb,c', i * 1.5] for i in range(19)]]),
            ["s", "n"]),
    "parquet": ("data.parquet", _parquet(30), ["text", "emb"]),
    "npy": ("data.npy", _npy(np.arange(60, dtype=">f8").reshape(20, 3)), ["array"]),
    "npy-v2": ("data.npy", _npy(np.arange(26, dtype=np.int16).reshape(13, 2), (2, 0)), ["array"]),
    "npy-1d": ("data.npy", _npy(np.arange(9, dtype=np.uint8)), ["array"]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("block_size", "min_block_size", "chunk"), [(4, 1, 5), (1000, 500, None)])
def test_url_reads_the_same_rows_as_a_local_file(
    base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, block_size: int,
    min_block_size: int, chunk: int | None,
) -> None:
    if chunk is not None:  # record ends found across many small chunks of the stream
        monkeypatch.setattr(_scan, "CHUNK_BYTES", chunk)
    name, content, columns = CASES[case]
    local = tmp_path / name
    local.write_bytes(content)
    url = put(f"{base}/{name}", content)
    remote, expected = open_source(url), open_source(str(local))
    assert remote.path == url and remote.mtime_ns > 0
    assert (remote.format, remote.columns, remote.num_rows, remote.size_bytes, remote.numeric) == (
        expected.format, expected.columns, expected.num_rows, expected.size_bytes, expected.numeric)
    blocks, got = read_all(remote, block_size, min_block_size, columns)
    local_blocks, want = read_all(expected, block_size, min_block_size, columns)
    assert blocks == local_blocks
    for column in columns:
        if isinstance(want[column], np.ndarray):
            np.testing.assert_array_equal(got[column], want[column])
            assert got[column].dtype == want[column].dtype and got[column].flags.writeable
        else:
            assert got[column] == want[column]


def test_blocks_are_read_by_byte_range(base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int | None]] = []
    cat_file = MEMORY.cat_file

    def spy(path: str, start: int | None = None, end: int | None = None, **kw: Any) -> bytes:
        calls.append((start or 0, end))
        return bytes(cat_file(path, start, end, **kw))

    array = np.arange(4000, dtype=np.float32).reshape(1000, 4)
    spec = open_source(put(f"{base}/big.npy", _npy(array)))
    text = open_source(put(f"{base}/big.txt", b"".join(b"line %d\n" % i for i in range(1000))))
    monkeypatch.setattr(MEMORY, "cat_file", spy)
    for source in (spec, text):
        blocks = plan_blocks(source, 100, 100)
        calls.clear()
        column = source.columns[0]
        got = read_block(source, blocks[3], [column])[column]
        assert len(got) == 100
        if source is spec:  # header read once per process, then only the block's rows
            np.testing.assert_array_equal(got, array[300:400])
            header = len(_npy(array)) - array.nbytes
            assert calls[-1] == (header + 300 * 16, header + 400 * 16)
        else:
            assert calls == [(blocks[3].byte_start, blocks[3].byte_stop)]


def test_changed_object_is_refused(base: str) -> None:
    url = put(f"{base}/data.txt", b"a\nb\n")
    spec = open_source(url)
    blocks = plan_blocks(spec, 1, 1)
    time.sleep(0.002)
    put(url, b"a\nc\n")  # same size: only the object's version tells
    with pytest.raises(InputError, match=r"data\.txt' changed since the job was planned"):
        read_block(spec, blocks[1], ["text"])


@pytest.mark.parametrize(("content", "match"), [
    (_npy(np.asfortranarray(np.ones((3, 2)))), r"data\.npy is stored in Fortran order"),
    (_npy(np.array(np.float32(3))), r"data\.npy holds a single value \(a 0-d array\)"),
    (_npy(np.array([{}, None])), r"data\.npy is not a readable \.npy array \(it holds Python objects"),
    (_npy(np.ones((5, 2)))[:-8], r"data\.npy is not a readable \.npy array \(the file is shorter"),
    (b"garbage", r"data\.npy is not a readable \.npy array"),
])
def test_remote_npy_errors(base: str, content: bytes, match: str) -> None:
    with pytest.raises(InputError, match=match):
        open_source(put(f"{base}/data.npy", content))


def _one_line(exc: pytest.ExceptionInfo[InputError] | pytest.ExceptionInfo[OutputError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_url_errors_are_one_line(base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError) as exc:
        open_source("nosuch://bucket/in.jsonl")
    assert "'nosuch://bucket/in.jsonl' uses the storage protocol 'nosuch'" in _one_line(exc)
    with pytest.raises(OutputError) as out_exc:
        prepare_output("nosuch://bucket/out", JOB, [], overwrite=False)
    assert "'nosuch://bucket/out'" in _one_line(out_exc)
    with pytest.raises(InputError, match=r"input file 'memory://.*/x\.jsonl' does not exist"):
        open_source(f"{base}/x.jsonl")
    MEMORY.makedirs(f"{base}/dir.jsonl".removeprefix("memory://"))
    with pytest.raises(InputError, match=r"input 'memory://.*/dir\.jsonl' is a directory"):
        open_source(f"{base}/dir.jsonl")
    monkeypatch.setitem(sys.modules, "fsspec.core", None)  # as if fsspec were not installed
    with pytest.raises(InputError) as exc:
        open_source("s3://bucket/in.jsonl")
    assert _one_line(exc) == ("reading 's3://bucket/in.jsonl' needs fsspec and the filesystem "
                              "package for 's3' (e.g. pip install fsspec s3fs)")
    with pytest.raises(OutputError, match=r"^writing 'gs://b/out' needs fsspec .* gcsfs\)$"):
        write_part("gs://b/out", 0, np.arange(1), {})


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_missing_filesystem_package_is_named() -> None:
    with pytest.raises(InputError) as exc:
        open_source("s3://bucket/in.jsonl")
    assert _one_line(exc) == ("reading 's3://bucket/in.jsonl' needs the filesystem package for "
                              "'s3' (e.g. pip install s3fs)")


def test_file_urls_are_local_paths(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_bytes(b"a\nb\n")
    spec = open_source(f"file://{tmp_path}/data.txt")
    assert spec.path == str(tmp_path / "data.txt") and spec.version == ""
    assert normalize_location(f"file://{tmp_path}/out") == str(tmp_path / "out")
    assert normalize_location("out") == os.path.abspath("out")
    assert normalize_location("s3://b/out/") == "s3://b/out/"
    assert join_location("s3://b/out/", MANIFEST) == "s3://b/out/_manifest.json"
    assert join_location("/x/out", MANIFEST) == "/x/out/_manifest.json"
    out = f"file://{tmp_path}/out"
    prepare_output(out, JOB, [], overwrite=False)
    assert write_part(out, 0, np.arange(2), {}) == str(tmp_path / "out" / part_name(0))


# --- sink --------------------------------------------------------------------------------------


def plan(num_rows: int = 10, block_size: int = 4) -> list[Block]:
    blocks, start = [], 0
    for i, size in enumerate(block_sizes(num_rows, block_size, 1)):
        blocks.append(Block(i, start, start + size))
        start += size
    return blocks


def write_block(out: str, block: Block) -> str:
    rows = np.arange(block.start, block.stop)
    return write_part(out, block.id, rows, {"score": rows.astype(np.float32),
                                            "emb": np.ones((block.rows, 3), np.float16)})


def names(url: str) -> list[str]:
    return sorted(os.path.basename(p) for p in MEMORY.ls(url.removeprefix("memory://"), detail=False))


def test_parts_and_manifest_round_trip(base: str) -> None:
    out, blocks = f"{base}/out/", plan()
    manifest = prepare_output(out, JOB, blocks, overwrite=False)
    assert manifest == Manifest(JOB, len(blocks), {}) and Manifest.load(out) == manifest
    for block in blocks:
        assert write_block(out, block) == f"{base}/out/{part_name(block.id)}"
        manifest.committed[block.id] = block.rows
    manifest.complete = True
    manifest.save(out)
    assert save_json(out, "_report.json", {"rows": 10}, indent=2).endswith("/out/_report.json")
    assert Manifest.load(out) == manifest
    assert names(out) == sorted([MANIFEST, "_report.json", *(part_name(b.id) for b in blocks)])
    filesystem = PyFileSystem(FSSpecHandler(MEMORY))
    table = ds.dataset(out.removeprefix("memory://"), filesystem=filesystem).to_table()
    table = table.sort_by("row")
    assert table.column("row").to_pylist() == list(range(10))
    assert table.column("score").to_pylist() == [float(i) for i in range(10)]
    assert table.schema.field("emb").type == pa.list_(pa.float16(), 3)
    assert prepare_output(out, JOB, blocks, overwrite=False).complete


def test_resume_adopts_orphan_parts(base: str) -> None:
    out, blocks = f"{base}/out", plan()
    manifest = prepare_output(out, JOB, blocks, overwrite=False)
    for block in blocks[:3]:
        write_block(out, block)
    manifest.committed = {0: blocks[0].rows, 4: blocks[4].rows}
    manifest.save(out)
    # blocks 1 and 2: written but never recorded (the driver died) -> adopted from their footer
    # block 3: a part with the wrong number of rows -> deleted; block 4: recorded, gone -> redone
    write_part(out, 3, np.arange(1), {"score": np.zeros(1, np.float32)})
    write_part(out, 99, np.arange(1), {"score": np.zeros(1, np.float32)})
    put(f"{out}/.{part_name(5)}.0123abcd.tmp", b"half a part")
    resumed = prepare_output(out, JOB, blocks, overwrite=False)
    assert resumed.committed == {i: blocks[i].rows for i in range(3)}
    assert Manifest.load(out) == resumed
    assert names(out) == [MANIFEST] + [part_name(i) for i in range(3)]


def test_another_jobs_output_is_refused(base: str) -> None:
    out = f"{base}/out"
    prepare_output(out, JOB, plan(), overwrite=False)
    write_block(out, plan()[0])
    with pytest.raises(OutputError) as exc:
        prepare_output(out, {**JOB, "model": "other"}, plan(), overwrite=False)
    assert f"output directory '{out}' holds another job's output" in _one_line(exc)
    put(f"{out}/notes.txt", b"mine")
    fresh = prepare_output(out, {**JOB, "model": "other"}, plan(), overwrite=True)
    assert fresh.committed == {} and names(out) == [MANIFEST, "notes.txt"]
    put(f"{base}/other/data.csv", b"a\n")
    with pytest.raises(OutputError, match="is not empty and holds no distinfer job"):
        prepare_output(f"{base}/other", JOB, plan(), overwrite=False)
    with pytest.raises(OutputError, match=r"output 'memory://.*/data\.csv' exists and is not a dir"):
        prepare_output(f"{base}/other/data.csv", JOB, plan(), overwrite=False)


def test_a_failed_write_leaves_no_part(base: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def half(table: Any, where: Any, **kw: Any) -> None:
        with open(where, "wb") if isinstance(where, str) else where as f:
            f.write(b"PAR1 and then the disk filled up")
        raise OSError(28, "No space left on device")

    for out in (f"{base}/out", str(tmp_path)):
        prepare_output(out, JOB, plan(), overwrite=False)
        monkeypatch.setattr(pq, "write_table", half)  # as the sink calls it
        with pytest.raises(OutputError, match=r"cannot write '.*part-000000\.parquet' \(No space"):
            write_block(out, plan()[0])
        monkeypatch.undo()
        assert (names(out) if "://" in out else os.listdir(out)) == [MANIFEST]


def test_remove_temp_parts_over_a_url(base: str) -> None:
    out = f"{base}/out"
    for name in [f".{part_name(1)}.ab12.tmp", part_name(1), "x.tmp"]:
        put(f"{out}/{name}", b"")
    remove_temp_parts(out)
    assert names(out) == [part_name(1), "x.tmp"]


def test_remote_parquet_groups_are_cached_per_version(base: str) -> None:
    url = put(f"{base}/data.parquet", _parquet(30))
    spec = open_source(url)
    assert plan_blocks(spec, 100, 100)[0].stop == 7  # a block never spans two row groups
    assert _formats.group_bounds(spec.path, spec.mtime_ns, spec.version) == (0, 7, 14, 21, 28, 30)
