"""Exception types a caller may catch, and the error record that crosses process boundaries.

Every error a user can cause (bad input, unknown model, unusable output directory) is a
`DistinferError` subclass whose message is one line that names what is wrong and what to do.
The CLI prints that line and exits non-zero; `--debug` adds the traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from traceback import format_exc
from typing import Any

__all__ = [
    "ConfigError",
    "DistinferError",
    "ErrorInfo",
    "InputError",
    "JobFailedError",
    "ModelError",
    "ModelInputError",
    "OutputError",
    "RowsError",
    "WorkersNotReadyError",
]


class DistinferError(Exception):
    """Base class of the errors distinfer reports to its user."""


class ConfigError(DistinferError):
    """An option or a job file is missing, unknown or out of range."""


class InputError(DistinferError):
    """The input data cannot be read: missing file, unknown column, malformed row.

    `row`: the input's absolute row (0-based) when the error is about that one row, so that a
    job with a bad-row allowance (`--max-bad-rows`) can set it aside and read the rest."""

    def __init__(self, message: str = "", *, row: int | None = None) -> None:
        super().__init__(message)
        self.row = row


class ModelError(DistinferError):
    """The model cannot be found or loaded."""


class ModelInputError(DistinferError):
    """The input rows do not fit what the model expects (names, dtype, shape).

    `row`: when the error is about one row, its 0-based index among the rows the raising code
    was given (a block for a preparer, a micro-batch for a forward); the message then need not
    name it: the worker names the input's absolute row (`RowsError`)."""

    def __init__(self, message: str = "", *, row: int | None = None) -> None:
        super().__init__(message)
        self.row = row


class OutputError(DistinferError):
    """The output directory cannot be used (another job's output, not writable)."""


class JobFailedError(DistinferError):
    """The job could not finish: workers kept dying or a block kept failing."""


_KINDS: dict[str, type[DistinferError]] = {
    cls.__name__: cls
    for cls in (
        ConfigError,
        InputError,
        ModelError,
        ModelInputError,
        OutputError,
        JobFailedError,
    )
}


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An exception turned into data so that it can cross a process boundary intact.

    `kind` is the exception class name; `fatal` errors (bad input, bad model) fail the job at
    once, since running the block again elsewhere would fail the same way.
    """

    kind: str
    message: str
    fatal: bool
    traceback: str = ""

    @classmethod
    def from_exception(cls, exc: BaseException, traceback: str = "") -> ErrorInfo:
        if isinstance(exc, RowsError):  # the error it carries, kind and fatality kept
            return exc.error
        fatal = isinstance(exc, DistinferError)
        return cls(type(exc).__name__, str(exc) or type(exc).__name__, fatal, traceback)

    def to_exception(self) -> DistinferError:
        """The `DistinferError` to raise in the driver for this error."""
        cls = _KINDS.get(self.kind)
        if cls is not None:
            return cls(self.message)
        return JobFailedError(f"{self.kind}: {self.message}")


class RowsError(Exception):
    """A model failed on some rows, with that failure as data (`error`), so that it crosses the
    processes of a replica group (pipeline stages, tensor-parallel ranks) intact: its kind and
    fatality are kept (`ErrorInfo.from_exception` gives `error` back), a ModelInputError stays one.

    Where it failed, as far as known: `batch`, the index of the micro-batch in the list given to
    `Runner.forward_many`; `row`, the row within that micro-batch (a `ModelInputError.row`);
    `rows`, the block rows at fault, 0-based, once `run_block` knows them. The worker turns
    `rows` into the input's absolute rows, named once in `error.message`."""

    def __init__(self, error: ErrorInfo, *, batch: int | None = None, row: int | None = None,
                 rows: tuple[int, ...] = ()) -> None:
        super().__init__(error.message)
        self.error = error
        self.batch = batch
        self.row = row
        self.rows = rows

    def __reduce__(self) -> tuple[Any, ...]:
        return _rows_error, (self.error, self.batch, self.row, self.rows)

    @classmethod
    def caught(cls, exc: BaseException, batch: int | None = None) -> RowsError:
        """`exc`, just caught (its traceback is taken now), as a RowsError of micro-batch `batch`."""
        if isinstance(exc, RowsError):
            if exc.batch is not None or batch is None:
                return exc
            return cls(exc.error, batch=batch, row=exc.row, rows=exc.rows)
        row = exc.row if isinstance(exc, ModelInputError) else None
        return cls(ErrorInfo.from_exception(exc, format_exc()), batch=batch, row=row)

    def with_message(self, message: str, rows: tuple[int, ...] | None = None) -> RowsError:
        return RowsError(replace(self.error, message=message), batch=self.batch, row=self.row,
                         rows=self.rows if rows is None else rows)


def _rows_error(error: ErrorInfo, batch: int | None, row: int | None, rows: tuple[int, ...]) -> RowsError:
    return RowsError(error, batch=batch, row=row, rows=rows)


class WorkersNotReadyError(JobFailedError):
    """No worker (replica) became ready within the start timeout: the model does not load, or
    the cluster cannot place a worker."""


_KINDS[WorkersNotReadyError.__name__] = WorkersNotReadyError
