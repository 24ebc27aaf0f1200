"""The backend interface: how the driver starts replicas, talks to them and hears back.

A backend knows processes (or actors), never blocks or scheduling policy: the driver turns
the scheduler's actions into `start`/`send`/`stop` calls and feeds what `receive` returns
back to the scheduler as events.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..messages import Order, WorkerLost, WorkerMessage, WorkerSpec

__all__ = ["Backend", "WorkerLost"]


class Backend(ABC):
    """Start, talk to and stop workers; one instance per job."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec

    @abstractmethod
    def start(self, worker: int) -> None:
        """Start worker `worker` (asynchronously: it reports WorkerReady when loaded)."""

    @abstractmethod
    def send(self, worker: int, message: Order) -> None:
        """Deliver a message; a worker that is gone is reported by `receive`, not here. Safe
        to call from another thread than the one in `receive` (serving sends from its event
        loop while a receiver thread waits)."""

    @abstractmethod
    def receive(self, timeout: float) -> list[WorkerMessage]:
        """Messages and losses (`WorkerLost`) that arrived, waiting at most `timeout` s for the first."""

    @abstractmethod
    def stop(self, worker: int) -> None:
        """Stop a worker; no more messages from it are reported. A local worker is sent
        `StopWorker` and exits after the block or batch it is running (`close` kills it if it
        does not exit promptly); a Ray actor is killed at once (`ray.kill`), its running call
        abandoned. Either way a stopped worker's unfinished blocks are the scheduler's to
        assign again."""

    def unready_reason(self) -> str | None:
        """Why no worker has become ready, when the backend can tell (e.g. nowhere to place it)."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Stop every worker, forcibly if it does not exit promptly."""
