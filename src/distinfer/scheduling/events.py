"""What the scheduler is told (events) and what it asks for (actions).

Plain frozen records: every backend (local processes, Ray, the simulator) turns what it
observes into events and carries out the actions, so these types are the whole contract
between a backend and `Scheduler`. Errors travel as `ErrorInfo` so that they can cross a
process boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from distinfer.errors import ErrorInfo

__all__ = [
    "Action",
    "Assign",
    "BlockDone",
    "BlockFailed",
    "BlockStarted",
    "Cancel",
    "Event",
    "Finish",
    "StartWorker",
    "StopWorker",
    "Tick",
    "WorkerFailed",
    "WorkerLost",
    "WorkerReady",
]


# --- events: backend -> scheduler -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """The worker has loaded its model and can take blocks."""

    worker: int


@dataclass(frozen=True, slots=True)
class BlockStarted:
    """The worker began computing the block; from now on the block cannot be stolen."""

    worker: int
    block: int


@dataclass(frozen=True, slots=True)
class BlockDone:
    """The worker finished the block and its output is written."""

    worker: int
    block: int


@dataclass(frozen=True, slots=True)
class BlockFailed:
    """The block raised on the worker; a fatal error fails the job, another is retried."""

    worker: int
    block: int
    error: ErrorInfo


@dataclass(frozen=True, slots=True)
class WorkerLost:
    """The worker's process died or its actor was lost."""

    worker: int
    reason: str


@dataclass(frozen=True, slots=True)
class WorkerFailed:
    """The worker could not start (e.g. the model failed to load)."""

    worker: int
    error: ErrorInfo


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed; lets the scheduler notice timeouts when nothing else happens."""


Event: TypeAlias = WorkerReady | BlockStarted | BlockDone | BlockFailed | WorkerLost | WorkerFailed | Tick


# --- actions: scheduler -> backend ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Assign:
    """Append the block to the worker's queue."""

    worker: int
    block: int


@dataclass(frozen=True, slots=True)
class Cancel:
    """Take a queued block back from the worker; a worker that already started it may finish it."""

    worker: int
    block: int


@dataclass(frozen=True, slots=True)
class StartWorker:
    """Start a replacement worker under this new id."""

    worker: int


@dataclass(frozen=True, slots=True)
class StopWorker:
    """Shut the worker down."""

    worker: int


@dataclass(frozen=True, slots=True)
class Finish:
    """The job is over: `error` is None on success. Always the last action the scheduler emits."""

    error: ErrorInfo | None


Action: TypeAlias = Assign | Cancel | StartWorker | StopWorker | Finish
