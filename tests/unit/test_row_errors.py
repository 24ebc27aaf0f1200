"""Errors about rows: carried as data (kind and fatality kept across processes), mapped by
`run_block` to the block rows at fault, and named compactly as the input's absolute rows."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from distinfer.data.sources import open_source
from distinfer.errors import ErrorInfo, ModelInputError, RowsError
from distinfer.models.base import Batches, Column, Runner, StageTimer, run_block
from distinfer.worker.replica import describe_rows, name_rows
from distinfer.worker.stage_links import StageFailed, run_stage


class _Sorted(Runner):
    """Sorts rows by value, largest first (as text models sort by length); refuses negative
    values (a ValueError) and zeros (a ModelInputError naming the row of the batch)."""

    input_names = ("x",)

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        x = np.asarray(inputs["x"])
        if (x > 100).any():
            raise ModelInputError("too large", row=int(np.flatnonzero(x > 100)[0]))
        order = np.argsort(-x, kind="stable")
        return Batches([x[order[i : i + batch_size]] for i in range(0, len(x), batch_size)], order)

    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        if (batch < 0).any():
            raise ValueError("negative")
        if (batch == 0).any():
            raise ModelInputError("zero", row=int(np.flatnonzero(batch == 0)[0]))
        return {"y": batch * 2}


def test_run_block_names_the_block_rows_of_the_failed_micro_batch() -> None:
    x = np.array([5, 9, 1, 7, -3, 8, 2, 6], dtype=np.int64)  # sorted: 9 8 7 6 | 5 2 1 -3
    with pytest.raises(RowsError) as caught:
        run_block(_Sorted(), {"x": x}, 4, StageTimer())
    assert caught.value.batch == 1 and caught.value.rows == (0, 6, 2, 4)
    assert caught.value.error.kind == "ValueError" and not caught.value.error.fatal
    x[4] = 0  # named by the forward: that row alone
    with pytest.raises(RowsError) as caught:
        run_block(_Sorted(), {"x": x}, 4, StageTimer())
    assert caught.value.rows == (4,) and caught.value.error.kind == "ModelInputError" and caught.value.error.fatal
    x[3] = 101  # named by the preparer: a block row already
    with pytest.raises(RowsError) as caught:
        run_block(_Sorted(), {"x": x}, 4, StageTimer())
    assert caught.value.rows == (3,) and caught.value.error.message == "too large"
    assert run_block(_Sorted(), {"x": np.array([3, 1, 2])}, 2, StageTimer())["y"].tolist() == [6, 2, 4]


def test_rows_errors_keep_their_error_across_processes() -> None:
    try:
        raise ModelInputError("bad", row=3)
    except ModelInputError as exc:
        failure = RowsError.caught(exc, 2)
    assert (failure.batch, failure.row, failure.rows) == (2, 3, ())
    assert failure.error.kind == "ModelInputError" and failure.error.fatal and "raise ModelInputError" in \
        failure.error.traceback
    back = pickle.loads(pickle.dumps(failure.with_message("x.npy row 7: bad", (7,))))
    assert isinstance(back, RowsError) and back.rows == (7,) and str(back) == "x.npy row 7: bad"
    assert ErrorInfo.from_exception(back) == back.error
    assert pickle.loads(pickle.dumps(ModelInputError("m", row=4))).row == 4


def test_a_stage_passes_a_failure_on_without_computing() -> None:
    def stage(x: Any) -> Any:
        if x < 0:
            raise KeyError("negative")
        return x + 1

    assert run_stage(stage, 1, 0) == 2
    failed = run_stage(stage, -1, 4)
    assert isinstance(failed, StageFailed) and failed.stage == 4 and failed.error.kind == "KeyError"
    assert run_stage(stage, failed, 6) is failed
    assert failed.raised(3).batch == 3 and not failed.raised(3).error.fatal


def test_rows_are_named_compactly() -> None:
    assert name_rows([137]) == "row 137"
    assert name_rows([141, 130, 131, 132, 133, 134, 135, 136, 137]) == "rows 130-137, 141"
    assert name_rows(range(0, 30, 2)) == "rows 0, 2, 4, 6, 8, 10, ... (15 rows)"
    assert name_rows([4, 5], "line") == "lines 4-5"


def test_rows_are_described_in_the_input_file(tmp_path: Path) -> None:
    text = tmp_path / "in.txt"
    text.write_text("a\nb\nc\nd\n")
    assert describe_rows(open_source(str(text)), [1, 2]) == "in.txt rows 1-2 (lines 2-3)"
    npy = tmp_path / "in.npy"
    np.save(npy, np.zeros((4, 2), np.float32))
    assert describe_rows(open_source(str(npy)), [3]) == "in.npy row 3"


class _Counted(_Sorted):
    """_Sorted, counting how often each value went through the forward."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        for v in np.asarray(batch).tolist():
            self.seen[v] = self.seen.get(v, 0) + 1
        return super().forward(batch)


def test_isolation_finds_each_bad_row_once_and_computes_good_rows_little_more() -> None:
    from distinfer.worker.quarantine import TooManyBadRows, run_isolating

    x = np.arange(1, 65, dtype=np.int64)
    x[5], x[22], x[40] = -1, 0, 101  # the forward raises for a batch; names the row; the preparer names it
    runner = _Counted()
    got = run_isolating(runner, {"x": x}, 8, StageTimer(), limit=3)
    assert [(r, stage, e.kind) for r, stage, e in got.bad] == [
        (5, "model", "ValueError"), (22, "model", "ModelInputError"), (40, "preprocess", "ModelInputError")]
    good = [r for r in range(64) if r not in (5, 22, 40)]
    assert got.rows.tolist() == good and got.outputs["y"].tolist() == (2 * x[good]).tolist()
    # the first try stopped at the preparer; then each batch once, and the failing batches split:
    # a row outside a failing batch runs once, one inside it at most 1 + log2(8) times
    # sorted largest first, the bad values -1 and 0 share the last batch with 1 to 5
    assert all(runner.seen[int(v)] == 1 for v in x[good] if v > 5), runner.seen
    assert max(runner.seen.values()) <= 4 and sum(runner.seen.values()) <= 61 + 2 * 3 * 8
    with pytest.raises(TooManyBadRows) as caught:
        run_isolating(_Counted(), {"x": x}, 8, StageTimer(), limit=2)
    assert caught.value.limit == 2


def test_read_isolation_leaves_out_unreadable_lines(tmp_path: Path) -> None:
    from distinfer.data.sources import plan_blocks
    from distinfer.worker.quarantine import read_isolating

    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": 1}\n{"text": "c"}\nnot json\n{"text": "\xff"}\n{"text": "f"}\n')
    source = open_source(str(path))
    (block,) = plan_blocks(source, 6, 6)
    columns, kept, found = read_isolating(source, block, ["text"], limit=5)
    assert columns == {"text": ["a", "c", "f"]} and kept == [0, 2, 5]
    bad = {b.row: b for b in found}
    assert sorted(bad) == [1, 3, 4] and all(b.stage == "read" for b in found)
    assert bad[1].message.startswith("rows.jsonl line 2 field 'text' is a number") and bad[3].value == "not json"
    assert "line 5 is not valid JSON (not UTF-8)" in bad[4].message


def test_a_csv_record_that_is_not_utf8_is_that_rows_error_not_the_blocks(tmp_path: Path) -> None:
    from distinfer.data.sources import plan_blocks, read_block
    from distinfer.errors import InputError
    from distinfer.worker.quarantine import read_isolating

    path = tmp_path / "rows.csv"
    path.write_bytes(b"text,n\nalpha,1\nbe\xfft\xa0a,2\ngamma,3\n\xc3delta,4\n")  # records 2 and 4 broken
    source = open_source(str(path))
    assert "n" in source.numeric  # the broken records do not make a number column text
    (block,) = plan_blocks(source, 4, 4)
    columns, kept, found = read_isolating(source, block, ["text", "n"], limit=5)
    assert kept == [0, 2] and columns["text"] == ["alpha", "gamma"] and list(columns["n"]) == [1, 3]
    assert [(b.row, b.stage) for b in found] == [(1, "read"), (3, "read")]
    assert found[0].message == "rows.csv record 2 is not valid UTF-8; re-encode the file as UTF-8"
    with pytest.raises(InputError, match=r"^rows.csv record 2 is not valid UTF-8") as caught:
        read_block(source, block, ["text"])  # no allowance: the first bad row, named
    assert caught.value.row == 1
