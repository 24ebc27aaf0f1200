"""Where the library's log goes. Library code logs through `logging.getLogger("distinfer")`,
which is silent unless the application sets logging up (the package adds a NullHandler).
The CLI, and every worker process the engine starts, send it to stderr as one
`distinfer: ...` line per record."""

from __future__ import annotations

import logging
import sys

__all__ = ["log", "log_to_stderr"]

log = logging.getLogger("distinfer")


def log_to_stderr(level: int = logging.INFO) -> None:
    """Send the library's records of `level` and above to stderr as `distinfer: ...` lines
    (once per process, however often called)."""
    if not any(getattr(h, "_distinfer_stderr", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("distinfer: %(message)s"))
        handler._distinfer_stderr = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(level)
