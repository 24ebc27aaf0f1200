"""Exception types a caller may catch, and the error record that crosses process boundaries.

Every error a user can cause (bad input, unknown model, unusable output directory) is a
`DistinferError` subclass whose message is one line that names what is wrong and what to do.
The CLI prints that line and exits non-zero; `--debug` adds the traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ConfigError",
    "DistinferError",
    "ErrorInfo",
    "InputError",
    "JobFailedError",
    "ModelError",
    "ModelInputError",
    "OutputError",
]


class DistinferError(Exception):
    """Base class of the errors distinfer reports to its user."""


class ConfigError(DistinferError):
    """An option or a job file is missing, unknown or out of range."""


class InputError(DistinferError):
    """The input data cannot be read: missing file, unknown column, malformed row."""


class ModelError(DistinferError):
    """The model cannot be found or loaded."""


class ModelInputError(DistinferError):
    """The input rows do not fit what the model expects (names, dtype, shape)."""


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
        fatal = isinstance(exc, DistinferError)
        return cls(type(exc).__name__, str(exc) or type(exc).__name__, fatal, traceback)

    def to_exception(self) -> DistinferError:
        """The `DistinferError` to raise in the driver for this error."""
        cls = _KINDS.get(self.kind)
        if cls is not None:
            return cls(self.message)
        return JobFailedError(f"{self.kind}: {self.message}")
