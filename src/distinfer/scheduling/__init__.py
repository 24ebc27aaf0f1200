"""Deciding which worker runs which block: a pure state machine shared by all backends."""

from distinfer.messages import (
    Action,
    Assign,
    BlockDone,
    BlockFailed,
    BlockStarted,
    Cancel,
    Event,
    Finish,
    StartWorker,
    StopWorker,
    Tick,
    WorkerFailed,
    WorkerLost,
    WorkerReady,
)
from distinfer.scheduling.scheduler import Scheduler, SchedulerConfig

__all__ = [
    "Action",
    "Assign",
    "BlockDone",
    "BlockFailed",
    "BlockStarted",
    "Cancel",
    "Event",
    "Finish",
    "Scheduler",
    "SchedulerConfig",
    "StartWorker",
    "StopWorker",
    "Tick",
    "WorkerFailed",
    "WorkerLost",
    "WorkerReady",
]
