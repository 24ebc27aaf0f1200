"""Row-level quarantine: a block's bad rows found and set aside, every other row computed.

With a bad-row allowance (`--max-bad-rows`), a row that fails is isolated, not its block:

* reading: a row the reader cannot decode (`InputError.row`) is left out and the block read
  again without it;
* preprocessing: a row the preparer names (`ModelInputError.row`) is left out and the rest
  prepared again;
* the forward pass: the block is run again one micro-batch at a time; a batch that raises
  is split in two until its bad rows are found (or the error names the row), so a good row
  outside a failing batch is computed once more at most, and one inside it a few more times
  (log2 of the batch size).

Errors that are not about rows are never quarantined: a model that cannot load, a lost
tensor-parallel group, an unusable output. A block with more bad rows than the job allows
raises its first bad row's error, which fails the job as without an allowance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..data.blocks import Block
from ..data.sources import SourceSpec, raw_row, read_block
from ..errors import ErrorInfo, InputError, ModelInputError, RowsError
from ..messages import BadRow
from ..models.base import Batches, Column, Runner, StageTimer, batch_rows, never, prepare_block, run_block

__all__ = [
    "VALUE_CHARS", "Isolated", "Isolator", "TooManyBadRows", "quarantinable", "read_isolating", "row_value",
    "run_isolating",
]  # fmt: skip

#: a bad row's input value is kept cut to this many characters (about 1 kB)
VALUE_CHARS = 1000

#: errors about the job, the model or the machine, never about one row
_NOT_ROWS = frozenset(
    {"ConfigError", "ModelError", "OutputError", "JobFailedError", "WorkersNotReadyError", "GroupLost",
     "MemoryError", "KeyboardInterrupt", "SystemExit"}
)  # fmt: skip


class TooManyBadRows(Exception):
    """A block holds more bad rows than the job allows: `first` is the error of the first."""

    def __init__(self, limit: int, first: ErrorInfo) -> None:
        super().__init__(first.message)
        self.limit = limit
        self.first = first


def quarantinable(error: ErrorInfo) -> bool:
    return error.kind not in _NOT_ROWS


def row_value(inputs: Mapping[str, Column], i: int) -> str:
    parts = []
    for name, column in inputs.items():
        value = column[i]
        text = value if isinstance(value, str) else np.array2string(np.asarray(value), threshold=64)
        parts.append(text if len(inputs) == 1 else f"{name}={text}")
    return "; ".join(parts)[:VALUE_CHARS]


def read_isolating(
    source: SourceSpec, block: Block, columns: Sequence[str], limit: int
) -> tuple[dict[str, Column], list[int], list[BadRow]]:
    """The block's columns without its unreadable rows: (columns, the block-relative rows
    read, the bad rows). More than `limit` bad rows raises the first one's error."""
    skip: set[int] = set()
    bad: list[BadRow] = []
    while True:
        try:
            columns_read = read_block(source, block, columns, skip)
        except InputError as exc:
            if exc.row is None or not block.start <= exc.row < block.stop:
                raise
            if len(bad) >= limit:
                raise TooManyBadRows(limit, ErrorInfo.from_exception(exc)) from None
            value = raw_row(source, block, exc.row)[:VALUE_CHARS]
            bad.append(BadRow(exc.row, "read", "InputError", str(exc), value))
            skip.add(exc.row - block.start)
            continue
        return columns_read, [k for k in range(block.rows) if k not in skip], bad


@dataclass
class Isolated:
    """A block's good rows' outputs (`rows`: their indices among the inputs given, ascending)
    and its bad rows (indices among the inputs given, with the error)."""

    outputs: dict[str, np.ndarray]
    rows: np.ndarray
    bad: list[tuple[int, str, ErrorInfo]]


def _take(inputs: Mapping[str, Column], rows: Sequence[int]) -> dict[str, Column]:
    index = np.asarray(rows, dtype=np.int64)
    return {name: [col[i] for i in rows] if isinstance(col, list) else np.asarray(col)[index]
            for name, col in inputs.items()}  # fmt: skip


class Isolator:
    """Finds the bad rows among `inputs`: `prepare` (the preparer's), `run` (the forward's)."""

    def __init__(self, runner: Runner, inputs: Mapping[str, Column], batch_size: int, limit: int,
                 cancelled: Callable[[], bool] = never) -> None:
        self.runner, self.inputs, self.batch_size, self.limit = runner, inputs, batch_size, limit
        self.cancelled = cancelled
        self.pieces: list[tuple[list[int], dict[str, np.ndarray]]] = []
        self.bad: list[tuple[int, str, ErrorInfo]] = []

    def _mark(self, row: int, stage: str, exc: RowsError | ModelInputError) -> None:
        error = exc.error if isinstance(exc, RowsError) else ErrorInfo.from_exception(exc)
        if not quarantinable(error):
            raise exc
        if len(self.bad) >= self.limit:
            raise TooManyBadRows(self.limit, error) from None
        self.bad.append((row, stage, error))

    def prepare(self, rows: list[int]) -> tuple[Batches | None, list[int]]:
        """`rows` prepared, leaving out (and marking) those the preparer names; the rows kept."""
        rows = list(rows)
        while rows:
            try:
                return prepare_block(self.runner, _take(self.inputs, rows), self.batch_size), rows
            except RowsError as exc:
                if len(exc.rows) != 1 or not 0 <= exc.rows[0] < len(rows):
                    raise
                self._mark(rows.pop(exc.rows[0]), "preprocess", exc)
        return None, rows

    def run(self, rows: list[int], each: bool) -> None:
        """`rows` prepared and run: every batch on its own (`each`), or all at once; a batch
        that fails is split until its bad rows are found."""
        prepared, kept = self.prepare(rows)
        if prepared is None:
            return
        count = len(prepared.batches)
        groups = [[i] for i in range(count)] if each else [list(range(count))]
        for group in groups:
            try:
                results = self.runner.forward_many([prepared.batches[i] for i in group], self.cancelled)
            except RowsError as exc:
                if not quarantinable(exc.error):
                    raise
                if len(group) > 1:  # each batch on its own, to know which ones fail
                    for i in group:
                        self.run([kept[r] for r in batch_rows(prepared, i)], each=True)
                    continue
                self._split([kept[r] for r in batch_rows(prepared, group[0])], exc)
                continue
            for i, result in zip(group, results, strict=True):
                self.pieces.append(([kept[r] for r in batch_rows(prepared, i)], result))

    def _split(self, rows: list[int], exc: RowsError) -> None:
        """A batch of `rows` failed with `exc`: the row it names is bad, else halve it."""
        if exc.row is not None and 0 <= exc.row < len(rows):
            self._mark(rows[exc.row], "model", exc)
            rest = rows[: exc.row] + rows[exc.row + 1 :]
            if rest:
                self.run(rest, each=False)
        elif len(rows) == 1:
            self._mark(rows[0], "model", exc)
        else:
            half = len(rows) // 2
            self.run(rows[:half], each=False)
            self.run(rows[half:], each=False)


def run_isolating(
    runner: Runner, inputs: Mapping[str, Column], batch_size: int, timer: StageTimer, limit: int,
    cancelled: Callable[[], bool] = never,
) -> Isolated:
    """`run_block`, isolating bad rows (see the module docstring): the fast path first, then,
    when a row fails, preparation without the rows the preparer names and every batch on its
    own. More than `limit` bad rows raises the error of the one over the limit."""
    rows = len(next(iter(inputs.values()))) if inputs else 0
    try:
        outputs = run_block(runner, inputs, batch_size, timer, cancelled)
        return Isolated(outputs, np.arange(rows), [])
    except RowsError as exc:
        if not quarantinable(exc.error) or limit <= 0:
            raise
    isolator = Isolator(runner, inputs, batch_size, limit, cancelled)
    isolator.run(list(range(rows)), each=True)
    bad = sorted(isolator.bad, key=lambda b: b[0])
    if not isolator.pieces:
        return Isolated({}, np.zeros(0, dtype=np.int64), bad)
    order = np.concatenate([np.asarray(r, dtype=np.int64) for r, _ in isolator.pieces])
    sort = np.argsort(order, kind="stable")
    names = isolator.pieces[0][1]
    outputs = {name: np.concatenate([p[name] for _, p in isolator.pieces])[sort] for name in names}
    return Isolated(outputs, order[sort], bad)
