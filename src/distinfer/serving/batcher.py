"""The request queue of the dynamic batcher: admission, deadlines and batch formation.

Pure bookkeeping, driven by the server's event loop with an injected clock, so the rules
are tested without processes or sockets:

- `admit` refuses a request at once (429 with Retry-After) when the queue holds
  `max_queue` rows, or when its predicted answer time (`predict_finish`: the batches ahead
  of it handed to replicas as they free up, costed in characters at the replicas' measured
  rate) already passes its
  deadline less a 25 % margin;
- `take` forms a batch from the oldest request and the requests after it that can share a
  model call (same inputs and trailing shapes), up to `max_batch` rows;
- a request that expires or whose client left is `drop`ped: it leaves the queue and is
  never computed.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..models.base import Column, concat_columns

#: The share of a request's time left that admission keeps free beyond the predicted wait.
DEADLINE_MARGIN = 0.25

#: A row's cost beyond its characters (special tokens, per-row work), in characters. Costs
#: in characters make a batch of long sentences predictably slower than one of short ones.
ROW_WORK = 16.0

__all__ = ["Pending", "RateEstimate", "RequestQueue", "Shed", "merge_inputs", "predict_finish", "row_size",
           "signature"]


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
    size: float = 0.0  # characters per row for text (what padding depends on), else 0

    @property
    def work(self) -> float:
        """What the request costs a replica, in characters (plus a fixed share per row)."""
        return self.rows * (self.size + ROW_WORK)
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


def row_size(inputs: dict[str, Column]) -> float:
    """Characters per row of a request's text inputs (0 for arrays)."""
    texts = [t for value in inputs.values() if isinstance(value, list) for t in value]
    return sum(map(len, texts)) / len(texts) if texts else 0.0


def merge_inputs(batch: list[Pending]) -> dict[str, Column]:
    """The batch's rows, request after request."""
    return concat_columns([p.inputs for p in batch])


class RateEstimate:
    """A moving average of a replica's work (see `Pending.work`) per second, as measured
    from sending a batch to its answer."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.per_s: float | None = None

    def add(self, work: float, seconds: float) -> None:
        if seconds <= 0 or work <= 0:
            return
        rate = work / seconds
        self.per_s = rate if self.per_s is None else self.per_s + self.weight * (rate - self.per_s)


class RequestQueue:
    def __init__(self, max_batch: int, max_queue: int) -> None:
        self.max_batch = max_batch
        self.group_lengths = True  # False: the model does not pay for padding, so batches go in arrival order
        self.max_queue = max_queue
        self.rows = 0  # rows of queued requests (dropped ones no longer count)
        self.work = 0.0  # their work
        self._items: deque[Pending] = deque()

    def __len__(self) -> int:
        return sum(1 for p in self._items if p.state == "queued")

    def admit(self, pending: Pending, now: float, free_at: list[float] | None = None,
              work_per_s: float | None = None) -> None:
        """Queue `pending`, or raise Shed(429) when it cannot be answered in time. `free_at`:
        when each ready replica can take a batch; `work_per_s`: one replica's measured rate."""
        if self.rows + pending.rows > self.max_queue:
            wait = self.work / (work_per_s * len(free_at)) if work_per_s and free_at else 1.0
            raise Shed(429, "queue_full", f"the queue is full ({self.rows} rows waiting); retry later",
                       _retry_after(wait))
        if free_at and work_per_s:
            finish = predict_finish(now, free_at, self.rows, self.work, pending.rows, pending.work,
                                    self.max_batch, work_per_s)
            # room for the answer's way back and for estimates that lag a rising load
            margin = max(0.005, DEADLINE_MARGIN * (pending.deadline - now))
            if finish > pending.deadline - margin:
                raise Shed(
                    429, "deadline",
                    f"the predicted wait ({(finish - now) * 1e3:.0f} ms) exceeds the request's deadline "
                    f"({max(0.0, pending.deadline - now) * 1e3:.0f} ms left); retry later or allow more time",
                    _retry_after(finish - pending.deadline),
                )
        self.push(pending)

    def push(self, pending: Pending) -> None:
        pending.state = "queued"
        self._items.append(pending)
        self.rows += pending.rows
        self.work += pending.work

    def push_front(self, pendings: list[Pending]) -> None:
        for p in reversed(pendings):
            p.state = "queued"
            self._items.appendleft(p)
            self.rows += p.rows
            self.work += p.work

    def drop(self, pending: Pending) -> bool:
        """Take a queued request out (expired, or its client left); False if not queued."""
        if pending.state != "queued":
            return False
        pending.state = "dropped"
        self.rows -= pending.rows
        self.work -= pending.work
        return True

    def oldest(self) -> Pending | None:
        while self._items and self._items[0].state != "queued":
            self._items.popleft()
        return self._items[0] if self._items else None

    def take(self, now: float, urgent_before: float = -math.inf) -> list[Pending]:
        """The next batch: the oldest request and later ones that can share its model call
        (at most `max_batch` rows; a larger request goes alone). When more wait than fit,
        those whose deadline comes before `urgent_before` go first, then (`group_lengths`)
        the ones nearest the oldest in row size, from the oldest `2 x max_batch` rows: a
        batch of similar lengths pads little; otherwise in arrival order."""
        first = self.oldest()
        if first is None:
            return []
        window: list[Pending] = []
        rows = 0
        if not first.solo:
            for p in self._items:
                if p is first or p.state != "queued" or p.solo or p.key != first.key:
                    continue
                if rows >= 2 * self.max_batch:
                    break
                window.append(p)
                rows += p.rows
        if first.rows + rows > self.max_batch:
            if self.group_lengths:
                window.sort(key=lambda p: (p.deadline >= urgent_before, abs(p.size - first.size)))
            else:  # stable: arrival order within each
                window.sort(key=lambda p: p.deadline >= urgent_before)
        chosen = {id(first)}
        rows = first.rows
        for p in window:
            if rows + p.rows <= self.max_batch:
                chosen.add(id(p))
                rows += p.rows
        batch = [p for p in self._items if id(p) in chosen]
        self._items = deque(p for p in self._items if id(p) not in chosen and p.state == "queued")
        for p in batch:
            p.state = "running"
            p.dispatched = now
            self.rows -= p.rows
            self.work -= p.work
        if not self.rows:
            self.work = 0.0  # no float drift once empty
        return batch

    def ready_rows(self) -> int:
        """Rows that could join the oldest request's batch now."""
        first = self.oldest()
        if first is None:
            return 0
        if first.solo:
            return first.rows
        return sum(p.rows for p in self._items if p.state == "queued" and p.key == first.key and not p.solo)


def predict_finish(now: float, free_at: list[float], ahead_rows: int, ahead_work: float, rows: int,
                   work: float, max_batch: int, work_per_s: float) -> float:
    """When a request (`rows`, `work`) behind `ahead_rows` queued rows would be answered:
    full batches go, in order, to whichever replica frees first (a replica takes one batch at
    a time, at `work_per_s`), the request's own batch last."""
    free = sorted(max(now, t) for t in free_at)
    per_row = ahead_work / ahead_rows if ahead_rows else 0.0
    while True:
        start = heapq.heappop(free)
        if ahead_rows == 0 or ahead_rows + rows <= max_batch:
            return start + (ahead_rows * per_row + work) / work_per_s
        batch = min(max_batch, ahead_rows)
        ahead_rows -= batch
        heapq.heappush(free, start + batch * per_row / work_per_s)


def _retry_after(seconds: float) -> int:
    return max(1, math.ceil(seconds))
