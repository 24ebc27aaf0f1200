"""Deciding which worker runs which block, and keeping workers alive: pure state machines
shared by all backends (the supervisor also by the server)."""

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
from distinfer.scheduling.supervisor import NotReady, Retired, Supervision, Supervisor, SupervisorConfig

__all__ = [
    "Action",
    "Assign",
    "BlockDone",
    "BlockFailed",
    "BlockStarted",
    "Cancel",
    "Event",
    "Finish",
    "NotReady",
    "Retired",
    "Scheduler",
    "SchedulerConfig",
    "StartWorker",
    "StopWorker",
    "Supervision",
    "Supervisor",
    "SupervisorConfig",
    "Tick",
    "WorkerFailed",
    "WorkerLost",
    "WorkerReady",
]
