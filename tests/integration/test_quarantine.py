"""Row-level quarantine (`--max-bad-rows`): a bad row is set aside, not its block. Poison rows
of each kind (undecodable text, a wrong-shaped array row, a token id out of range, a row whose
forward raises) under data, pipeline and tensor strategies: only those rows are in
DIR/_errors/, each once with its stage and reason; every other row equals the model's own
output; the limit is enforced, and a resumed job neither loses nor retries the rows set aside
(unless asked)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from poison_family import MARK, POISON_MODEL, register

import distinfer
from distinfer.errors import JobFailedError
from distinfer.models import parse_model
from distinfer.models.base import StageTimer, run_block

register()

BATCH = 16
BLOCK = 64


def table(out: Path) -> dict[str, np.ndarray]:
    t = ds.dataset(str(out)).to_table().sort_by("row")
    return {name: np.asarray(t.column(name).to_pylist()) for name in t.column_names}


def errors(out: Path) -> list[dict[str, Any]]:
    t = ds.dataset(str(out / "_errors")).to_table().sort_by("row")
    return t.to_pylist()  # type: ignore[no-any-return]


def reference(inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """decoder-tiny over `inputs` in this process (poison-tiny is decoder-tiny otherwise)."""
    spec = parse_model("decoder-tiny")
    return run_block(spec.family.runner(spec, 1, "cpu"), inputs, BATCH, StageTimer())


def assert_rows_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray], rows: list[int]) -> None:
    np.testing.assert_array_equal(got["row"], rows)
    for name, value in want.items():
        torch.testing.assert_close(torch.tensor(got[name].astype(value.dtype)), torch.tensor(value), atol=1e-4,
                                   rtol=1e-4)


@pytest.fixture
def poisoned(tmp_path: Path, corpus_lines: list[str]) -> tuple[Path, list[str], dict[int, str]]:
    """192 verses (three 64-row blocks); line 6 is not UTF-8, rows 70 and 150 hold the mark
    that poison-tiny's forward refuses (raised for the whole batch, naming no row)."""
    texts = [line.replace(MARK, "") for line in corpus_lines[:192]]
    texts[70] = f"{texts[70]} {MARK} poisoned"
    texts[150] = f"{MARK}{texts[150]}"
    lines = [t.encode() for t in texts]
    lines[5] = b"caf\xe9 \xff not UTF-8"
    path = tmp_path / "poisoned.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    bad = {5: "read", 70: "model", 150: "model"}
    return path, texts, bad


@pytest.mark.parametrize(
    "layout",
    [{"strategy": "data", "workers": 2}, {"strategy": "pipeline", "stages": 2, "workers": 1},
     {"strategy": "tensor", "tensor_parallel": 2, "workers": 1}],
    ids=["data", "pipeline", "tensor"],
)  # fmt: skip
def test_only_the_bad_rows_are_set_aside_and_the_rest_equals_the_model(
    poisoned: tuple[Path, list[str], dict[int, str]], tmp_path: Path, layout: dict[str, Any]
) -> None:
    path, texts, bad = poisoned
    out = tmp_path / "out"
    report = distinfer.run(model=POISON_MODEL, input=str(path), output=str(out), batch_size=BATCH,
                           block_size=BLOCK, min_block_size=BLOCK, threads_per_worker=1,
                           max_bad_rows=3, **layout)  # fmt: skip
    good = [r for r in range(192) if r not in bad]
    assert_rows_equal(table(out), reference({"text": [texts[r] for r in good]}), good)
    found = errors(out)
    assert [(e["row"], e["stage"]) for e in found] == sorted(bad.items())
    read, first, second = found
    assert read["error_type"] == "InputError" and "not valid UTF-8" in read["message"]
    assert read["message"].startswith("poisoned.txt line 6 ") and "not UTF-8" in read["input"]
    for e, row in ((first, 70), (second, 150)):
        assert e["error_type"] == "ModelInputError" and "marked character" in e["message"]
        assert e["message"].startswith(f"poisoned.txt row {row} (line {row + 1}): ") and MARK in e["input"]
    assert report.bad_rows == 3 and "3 bad row(s) set aside" in report.summary()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] and manifest["bad_rows"] == {"0": [5], "1": [70], "2": [150]}
    saved = json.loads((out / "_report.json").read_text())
    assert saved["bad_rows"] == 3 and saved["bad_reasons"][0].startswith("poisoned.txt line 6 ")


def test_over_the_limit_fails_then_a_resume_keeps_the_work_and_the_rows_set_aside(
    poisoned: tuple[Path, list[str], dict[int, str]], tmp_path: Path
) -> None:
    path, texts, bad = poisoned
    out = tmp_path / "out"
    options = dict(model=POISON_MODEL, input=str(path), output=str(out), batch_size=BATCH, block_size=BLOCK,
                   min_block_size=BLOCK, workers=1, threads_per_worker=1, strategy="data")
    with pytest.raises(JobFailedError, match=r"^3 bad rows, over --max-bad-rows 2 \(2 rows\); the first: "
                                             r"poisoned\.txt line 6 is not valid UTF-8"):
        distinfer.run(**options, max_bad_rows=2)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert not manifest["complete"] and sorted(manifest["committed"]) == ["0", "1", "2"]
    report = distinfer.run(**options, max_bad_rows="2%")  # 3 rows of 192: resumed, nothing to redo
    assert report.rows == 0 and report.rows_resumed == 192 and report.bad_rows == 3
    assert [e["row"] for e in errors(out)] == sorted(bad)
    # --retry-bad-rows runs the blocks that set rows aside again: the same rows fail again
    again = distinfer.run(**options, max_bad_rows=3, retry_bad_rows=True)
    assert again.rows == 192 and again.bad_rows == 3 and [e["row"] for e in errors(out)] == sorted(bad)
    good = [r for r in range(192) if r not in bad]
    assert_rows_equal(table(out), reference({"text": [texts[r] for r in good]}), good)


def test_without_an_allowance_the_first_bad_row_fails_the_job(
    poisoned: tuple[Path, list[str], dict[int, str]], tmp_path: Path
) -> None:
    path, _, _ = poisoned
    with pytest.raises(distinfer.DistinferError, match=r"poisoned\.txt line 6 is not valid UTF-8"):
        distinfer.run(model=POISON_MODEL, input=str(path), output=str(tmp_path / "out"), workers=1,
                      block_size=BLOCK, min_block_size=BLOCK, strategy="data")
    assert not (tmp_path / "out" / "_errors").exists()


def test_token_ids_out_of_range_and_a_ragged_array_row(tmp_path: Path) -> None:
    ids = np.random.default_rng(0).integers(1, 200, (130, 12)).astype(np.int64)
    ids[37, 4] = 10**6  # past the vocabulary: the preparer names the row
    ids[100, 0] = -1  # padding followed by ids: the preparer names the row
    path = tmp_path / "ids.npy"
    np.save(path, ids)
    out = tmp_path / "out"
    distinfer.run(model="decoder-tiny", input=str(path), output=str(out), workers=1, batch_size=BATCH,
                  block_size=BLOCK, min_block_size=BLOCK, strategy="data", max_bad_rows="5%")
    good = [r for r in range(130) if r not in (37, 100)]
    assert_rows_equal(table(out), reference({"text": ids[good]}), good)
    found = errors(out)
    assert [(e["row"], e["stage"], e["error_type"]) for e in found] == [
        (37, "preprocess", "ModelInputError"), (100, "preprocess", "ModelInputError")]  # fmt: skip
    assert found[0]["message"].startswith("ids.npy row 37: ") and "1000000" in found[0]["input"], found[0]
    # a list column with one row shorter than the others: that row is unreadable
    clean = ids[40:80]
    rows = [list(map(int, r)) for r in clean]
    rows[9] = rows[9][:5]
    pq.write_table(pa.table({"ids": rows}), tmp_path / "ids.parquet")
    out = tmp_path / "ragged"
    distinfer.run(model="decoder-tiny", input=str(tmp_path / "ids.parquet"), output=str(out), workers=1,
                  batch_size=BATCH, block_size=BLOCK, strategy="data", max_bad_rows=1)
    good = [r for r in range(40) if r != 9]
    assert_rows_equal(table(out), reference({"text": clean[good]}), good)
    (only,) = errors(out)
    assert only["row"] == 9 and only["stage"] == "read" and "has 5 values" in only["message"]
