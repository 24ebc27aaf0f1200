"""The request queue of the dynamic batcher: admission, deadlines and batch formation.

Pure bookkeeping, driven by the server's event loop with an injected clock, so the rules
are tested without processes or sockets:

- `admit` refuses a request at once (429 with Retry-After) when the queue holds
  `max_queue` rows, or when its predicted wait (rows ahead of it over the replicas'
  measured rate, plus one batch) already exceeds its deadline;
- `take` forms a batch from the oldest request and the requests after it that can share a
  model call (same inputs and trailing shapes), up to `max_batch` rows;
- a request that expires or whose client left is `drop`ped: it leaves the queue and is
  never computed.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..models.base import Column

__all__ = ["Pending", "RateEstimate", "RequestQueue", "Shed", "merge_inputs", "signature"]


class Shed(Exception):
    """A request answered without being computed: `status` 429, 503 or 504."""

    def __init__(self, status: int, reason: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason  # the metric label: queue_full, deadline, draining, timeout, ...
        self.message = message
        self.retry_after = retry_after


@dataclass(eq=False)
class Pending:
    """One request in the server: queued, then running, then answered."""

    inputs: dict[str, Column]
    rows: int
    arrived: float
    deadline: float
    future: asyncio.Future[dict[str, np.ndarray]]
    key: tuple[Any, ...] = ()
    attempts: int = 0  # batches it was sent in (a lost replica's requests are retried once)
    solo: bool = False  # run alone (its batch failed: find out whether it was the cause)
    state: str = "queued"  # queued, running, dropped, answered
    dispatched: float = 0.0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


def signature(inputs: dict[str, Column]) -> tuple[Any, ...]:
    """What requests must share to go into one model call: input names, dtypes, row shapes."""
    return tuple(
        (name, "text") if isinstance(value, list) else (name, value.dtype.str, value.shape[1:])
        for name, value in sorted(inputs.items())
    )


def merge_inputs(batch: list[Pending]) -> dict[str, Column]:
    """The batch's rows, request after request."""
    first = batch[0].inputs
    merged: dict[str, Column] = {}
    for name, value in first.items():
        if isinstance(value, list):
            texts: list[str] = []
            for p in batch:
                texts.extend(p.inputs[name])
            merged[name] = texts
        else:
            merged[name] = np.concatenate([np.asarray(p.inputs[name]) for p in batch])
    return merged


class RateEstimate:
    """Moving averages of a replica's batch time and rows per second while busy."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.batch_s: float | None = None
        self.rows_per_s: float | None = None

    def add(self, rows: int, seconds: float) -> None:
        if seconds <= 0:
            return
        rate = rows / seconds
        if self.batch_s is None or self.rows_per_s is None:
            self.batch_s, self.rows_per_s = seconds, rate
            return
        self.batch_s += self.weight * (seconds - self.batch_s)
        self.rows_per_s += self.weight * (rate - self.rows_per_s)


class RequestQueue:
    def __init__(self, max_batch: int, max_queue: int) -> None:
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.rows = 0  # rows of queued requests (dropped ones no longer count)
        self._items: deque[Pending] = deque()

    def __len__(self) -> int:
        return sum(1 for p in self._items if p.state == "queued")

    def admit(self, pending: Pending, now: float, rows_per_s: float | None, batch_s: float | None) -> None:
        """Queue `pending`, or raise Shed(429) when it cannot be answered in time."""
        if self.rows + pending.rows > self.max_queue:
            wait = self.rows / rows_per_s if rows_per_s else 1.0
            raise Shed(429, "queue_full", f"the queue is full ({self.rows} rows waiting); retry later",
                       _retry_after(wait))
        if rows_per_s and batch_s is not None:
            predicted = (self.rows + pending.rows) / rows_per_s + batch_s
            if now + predicted > pending.deadline:
                raise Shed(
                    429, "deadline",
                    f"the predicted wait ({predicted * 1e3:.0f} ms) exceeds the request's deadline "
                    f"({max(0.0, pending.deadline - now) * 1e3:.0f} ms left); retry later or allow more time",
                    _retry_after(predicted - (pending.deadline - now)),
                )
        self.push(pending)

    def push(self, pending: Pending) -> None:
        pending.state = "queued"
        self._items.append(pending)
        self.rows += pending.rows

    def push_front(self, pendings: list[Pending]) -> None:
        for p in reversed(pendings):
            p.state = "queued"
            self._items.appendleft(p)
            self.rows += p.rows

    def drop(self, pending: Pending) -> bool:
        """Take a queued request out (expired, or its client left); False if not queued."""
        if pending.state != "queued":
            return False
        pending.state = "dropped"
        self.rows -= pending.rows
        return True

    def oldest(self) -> Pending | None:
        while self._items and self._items[0].state != "queued":
            self._items.popleft()
        return self._items[0] if self._items else None

    def take(self, now: float) -> list[Pending]:
        """The next batch: the oldest request and later ones that fit with it (at most
        `max_batch` rows, except a single larger request, which goes alone)."""
        first = self.oldest()
        if first is None:
            return []
        batch: list[Pending] = []
        rows = 0
        keep: deque[Pending] = deque()
        for p in self._items:
            if p.state != "queued":
                continue
            fits = (
                not batch
                or (p.key == first.key and not p.solo and not first.solo and rows + p.rows <= self.max_batch)
            )
            if fits:
                batch.append(p)
                rows += p.rows
            else:
                keep.append(p)
        self._items = keep
        for p in batch:
            p.state = "running"
            p.dispatched = now
            self.rows -= p.rows
        return batch

    def ready_rows(self) -> int:
        """Rows that could join the oldest request's batch now."""
        first = self.oldest()
        if first is None:
            return 0
        if first.solo:
            return first.rows
        return sum(p.rows for p in self._items if p.state == "queued" and p.key == first.key and not p.solo)


def _retry_after(seconds: float) -> int:
    return max(1, math.ceil(seconds))
