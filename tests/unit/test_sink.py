"""Output sink: parts read back as one Parquet data set; the manifest makes a job resumable."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from distinfer.data import (
    MANIFEST,
    REPORT,
    Block,
    Manifest,
    block_sizes,
    part_name,
    prepare_output,
    remove_temp_parts,
    write_part,
)
from distinfer.errors import OutputError

JOB: dict[str, Any] = {"model": "minilm", "input": "/data/in.jsonl", "size": 10, "mtime": 1,
                       "column": "text", "plan": "abc"}


def plan(num_rows: int = 10, block_size: int = 4, min_block_size: int = 1) -> list[Block]:
    blocks, start = [], 0
    for i, size in enumerate(block_sizes(num_rows, block_size, min_block_size)):
        blocks.append(Block(i, start, start + size))
        start += size
    return blocks


def write_block(out: Path, block: Block) -> str:
    rows = np.arange(block.start, block.stop)
    return write_part(str(out), block.id, rows, {"score": rows.astype(np.float32)})


def test_part_name() -> None:
    assert part_name(12) == "part-000012.parquet"
    assert part_name(1234567) == "part-1234567.parquet"


def test_parts_read_back_as_one_table(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [np.array([3, 4, 5]), np.array([0, 1, 2])]
    outputs = []
    for block_id, index in enumerate(rows):
        output = {"label": index * 10, "prob": rng.random(3).astype(np.float32),
                  "emb": rng.random((3, 4)).astype(np.float32),
                  "attn": rng.random((3, 2, 3)), "name": np.array([f"n{i}" for i in index])}
        outputs.append(output)
        path = write_part(str(tmp_path), block_id, index, output)
        assert path == str(tmp_path / part_name(block_id))
        assert pq.ParquetFile(path).num_row_groups == 1
    (tmp_path / MANIFEST).write_text("{}")
    (tmp_path / REPORT).write_text("{}")
    table = ds.dataset(str(tmp_path)).to_table().sort_by("row")
    assert table.column_names == ["row", "label", "prob", "emb", "attn", "name"]
    assert table.schema.field("row").type == pa.int64()
    assert table.schema.field("prob").type == pa.float32()
    assert table.schema.field("emb").type == pa.list_(pa.float32(), 4)
    assert table.schema.field("attn").type == pa.list_(pa.list_(pa.float64(), 3), 2)
    assert table.column("row").to_pylist() == list(range(6))
    merged = {k: np.concatenate([outputs[1][k], outputs[0][k]]) for k in outputs[0]}
    for name, values in merged.items():
        assert table.column(name).to_pylist() == values.tolist()
    assert len(pd.read_parquet(str(tmp_path))) == 6
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_write_part_twice_gives_the_same_file(tmp_path: Path) -> None:
    block = Block(7, 0, 3)
    first = Path(write_block(tmp_path, block)).read_bytes()
    assert Path(write_block(tmp_path, block)).read_bytes() == first
    assert sorted(os.listdir(tmp_path)) == [part_name(7)]


def test_write_part_refuses_unstorable_outputs(tmp_path: Path) -> None:
    rows = np.arange(2)
    with pytest.raises(OutputError, match="model output 'row' clashes"):
        write_part(str(tmp_path), 0, rows, {"row": rows})
    with pytest.raises(OutputError, match="model output 'e' has an empty dimension"):
        write_part(str(tmp_path), 0, rows, {"e": np.zeros((2, 0))})


def test_manifest_save_and_load(tmp_path: Path) -> None:
    assert Manifest.load(str(tmp_path)) is None
    manifest = Manifest(JOB, 5, {3: 10, 0: 2})
    manifest.save(str(tmp_path))
    manifest.complete = True
    manifest.save(str(tmp_path))  # replaces the first one
    assert Manifest.load(str(tmp_path)) == Manifest(JOB, 5, {0: 2, 3: 10}, True)
    assert os.listdir(tmp_path) == [MANIFEST]


@pytest.mark.parametrize("content", ["{not json", "[]", '{"job": {}, "blocks": 1}',
                                     '{"job": 1, "blocks": 1, "committed": {}, "complete": false}'])
def test_manifest_corrupt(tmp_path: Path, content: str) -> None:
    (tmp_path / MANIFEST).write_text(content)
    with pytest.raises(OutputError, match=r"_manifest\.json.*use --overwrite"):
        Manifest.load(str(tmp_path))


def test_prepare_fresh_output_creates_parents(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    manifest = prepare_output(str(out), JOB, plan(), overwrite=False)
    assert manifest == Manifest(JOB, len(plan()), {})
    assert Manifest.load(str(out)) == manifest
    (out / ".DS_Store").write_text("")  # invisible to Parquet readers: no reason to refuse
    prepare_output(str(out), JOB, plan(), overwrite=False)


def test_prepare_output_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match=r"output '.*out' exists and is not a directory"):
        prepare_output(str(tmp_path / "out"), JOB, plan(), overwrite=False)


def test_prepare_output_refuses_another_job(tmp_path: Path) -> None:
    blocks = plan()
    prepare_output(str(tmp_path), JOB, blocks, overwrite=False)
    write_block(tmp_path, blocks[0])
    (tmp_path / "notes.txt").write_text("mine")
    other = {**JOB, "model": "bert"}
    with pytest.raises(OutputError) as info:
        prepare_output(str(tmp_path), other, blocks, overwrite=False)
    assert str(info.value) == (
        f"output directory '{tmp_path}' holds another job's output (model minilm, input "
        "/data/in.jsonl); use --overwrite to replace it or choose another --output")
    manifest = prepare_output(str(tmp_path), other, blocks, overwrite=True)
    assert (manifest.job, manifest.committed) == (other, {})
    assert sorted(os.listdir(tmp_path)) == [MANIFEST, "notes.txt"]


def test_prepare_output_refuses_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a\n")
    with pytest.raises(OutputError, match=r"'.*' is not empty and holds no distinfer job; "
                       r"choose an empty or new --output"):
        prepare_output(str(tmp_path), JOB, plan(), overwrite=False)
    prepare_output(str(tmp_path), JOB, plan(), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == [MANIFEST, "data.csv"]


def test_prepare_output_refuses_parts_without_manifest(tmp_path: Path) -> None:
    write_block(tmp_path, plan()[0])
    with pytest.raises(OutputError, match=r"holds distinfer files but no _manifest\.json"):
        prepare_output(str(tmp_path), JOB, plan(), overwrite=False)


def test_prepare_output_corrupt_manifest(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text("{")
    with pytest.raises(OutputError, match="cannot be read"):
        prepare_output(str(tmp_path), JOB, plan(), overwrite=False)
    assert prepare_output(str(tmp_path), JOB, plan(), overwrite=True).committed == {}


def test_resume_reconciles_parts_with_the_manifest(tmp_path: Path) -> None:
    blocks = plan()
    out = str(tmp_path)
    manifest = prepare_output(out, JOB, blocks, overwrite=False)
    for block in blocks[:3]:
        write_block(tmp_path, block)
    manifest.committed = {0: blocks[0].rows, 1: blocks[1].rows, 4: blocks[4].rows}
    manifest.save(out)
    # block 2: renamed into place but never recorded (the driver died) -> adopted
    # block 3: a part with the wrong number of rows -> deleted
    # block 4: recorded but its file is gone -> dropped, to be recomputed
    # block 99: not in the plan -> deleted; and a stale temporary part -> deleted
    write_part(out, 3, np.arange(1), {"score": np.zeros(1, np.float32)})
    write_part(out, 99, np.arange(1), {"score": np.zeros(1, np.float32)})
    (tmp_path / f".{part_name(5)}.0123abcd.tmp").write_bytes(b"half a part")
    resumed = prepare_output(out, JOB, blocks, overwrite=False)
    assert resumed.committed == {i: blocks[i].rows for i in range(3)}
    assert Manifest.load(out) == resumed
    assert sorted(os.listdir(tmp_path)) == [MANIFEST] + [part_name(i) for i in range(3)]


def test_resume_keeps_a_complete_job(tmp_path: Path) -> None:
    blocks = plan(3, 4, 4)
    manifest = prepare_output(str(tmp_path), JOB, blocks, overwrite=False)
    write_block(tmp_path, blocks[0])
    manifest.committed, manifest.complete = {0: 3}, True
    manifest.save(str(tmp_path))
    assert prepare_output(str(tmp_path), JOB, blocks, overwrite=False).complete
    assert not prepare_output(str(tmp_path), JOB, blocks, overwrite=True).complete


def test_job_is_compared_as_json(tmp_path: Path) -> None:
    job = {**JOB, "columns": ("text",)}  # a tuple reads back as a list
    prepare_output(str(tmp_path), job, plan(), overwrite=False)
    assert prepare_output(str(tmp_path), job, plan(), overwrite=False).job == json.loads(
        json.dumps(job))


def test_remove_temp_parts_keeps_other_files(tmp_path: Path) -> None:
    names = [f".{part_name(1)}.ab12.tmp", f".{MANIFEST}.cd34.tmp", part_name(1), "x.tmp", ".keep"]
    for name in names:
        (tmp_path / name).write_text("")
    remove_temp_parts(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(names[2:])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(OutputError, match="is not writable"):
            prepare_output(str(tmp_path), JOB, plan(), overwrite=False)
    finally:
        os.chmod(tmp_path, 0o700)
