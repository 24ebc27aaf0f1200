"""The serving core: requests in, batches out to the least-loaded ready replica, answers back.

Everything here runs on the server's event loop; the replicas' answers arrive through
`ReplicaPool`. A replica runs one batch at a time, so while all are busy requests gather
in the queue and the next free replica takes as many as fit (dynamic batching); when a
replica is idle the oldest request waits at most `max_queue_delay_ms` for company. When a
full batch is waiting and no replica is idle, it goes to the pipe of the replica that will
free first, so replicas never idle between batches under load.

The replicas' life cycle is the batch engine's `Supervisor` (scheduling/supervisor.py): a
replica that cannot start is stopped at once and replaced unless its error is fatal, a lost
one is replaced (at most --max-restarts over the server's life, none while draining), every
start is timed (--start-timeout), and no replica ready for that long fails the server. A
timer on the loop, armed at the supervisor's next deadline, feeds it `Tick`s.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import numpy as np

from .. import messages as msg
from ..backends.base import Backend
from ..errors import ErrorInfo
from ..logs import log
from ..models.base import Column, TensorInfo
from ..scheduling.supervisor import NotReady, Retired, Supervision, Supervisor, SupervisorConfig
from .batcher import Pending, RateEstimate, RequestQueue, Shed, merge_inputs, row_size, signature
from .config import ServeConfig
from .metrics import ServerMetrics
from .pool import Items, ReplicaPool

__all__ = ["BatchError", "InferenceServer"]


class BatchError(Exception):
    """The model failed on a request's rows (`error.kind` ModelInputError: the rows' fault)."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass
class _Replica:
    worker: int
    ready: bool = False
    batches: dict[int, tuple[list[Pending], float]] = field(default_factory=dict)  # id -> requests, sent at
    rate: RateEstimate = field(default_factory=RateEstimate)
    pid: int = 0
    last_done: float = 0.0  # when its last answer arrived


class InferenceServer:
    def __init__(self, config: ServeConfig, backend: Backend, metrics: ServerMetrics, name: str,
                 kind: str) -> None:
        self.config = config
        self.name = name
        self.kind = kind
        self.metrics = metrics
        self.loop = asyncio.get_running_loop()
        self.queue = RequestQueue(config.max_batch_size, config.max_queue)
        self.pool = ReplicaPool(backend, self.loop, self._on_items)
        # The supervisor's live replicas (warming up or ready), in start order.
        self.replicas: dict[int, _Replica] = {w: self._new_replica(w) for w in range(config.replicas)}
        self.supervisor = Supervisor(
            self.replicas, SupervisorConfig(config.max_restarts, config.start_timeout_s), self.loop.time()
        )
        self._timer: asyncio.TimerHandle | None = None
        self.inputs: tuple[TensorInfo, ...] = ()
        self.outputs: tuple[TensorInfo, ...] = ()
        self.started = False  # every first replica warm (or unusable)
        self.draining = False
        self.failed: str | None = None  # why the server cannot serve at all
        self.stopped = asyncio.Event()  # set on failure: the process should exit
        self._settled: set[int] = set()
        self._next_batch = 0
        self._wake = asyncio.Event()
        self._delay_s = config.max_queue_delay_ms / 1e3
        self.deadline_s = config.deadline_s
        self._task: asyncio.Task[None] | None = None

    def _new_replica(self, worker: int) -> _Replica:
        return _Replica(worker)

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.supervisor.start(self.loop.time())
        self.pool.start(list(self.replicas))
        self._task = self.loop.create_task(self._dispatch_loop())
        self._arm()

    @property
    def restarts(self) -> int:
        """Replacement replicas started so far."""
        return self.supervisor.restarts_used

    def ready_count(self) -> int:
        return sum(1 for r in self.replicas.values() if r.ready)

    def is_ready(self) -> bool:
        return self.started and not self.draining and self.failed is None and self.ready_count() > 0

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests; let queued and running ones finish, for at most `timeout_s`."""
        self.draining = True
        self._wake.set()
        deadline = self.loop.time() + timeout_s
        while (self.queue.oldest() is not None or self._running()) and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        gone = Shed(503, "draining", "the server shut down before answering; retry on another one")
        while (p := self.queue.oldest()) is not None:
            self.queue.drop(p)
            self._answer(p, gone)
        for replica in self.replicas.values():
            for batch, _ in replica.batches.values():
                for p in batch:
                    if p.state == "running":
                        self._answer(p, gone)

    def _running(self) -> bool:
        return any(r.batches for r in self.replicas.values())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._timer is not None:
            self._timer.cancel()
        self.pool.close()

    # -- requests --------------------------------------------------------------------------

    def submit(self, inputs: dict[str, Column], rows: int, timeout_s: float | None) -> Pending:
        """Queue a request or raise Shed (503 not ready or draining, 429 full or too late)."""
        if not self.is_ready():
            raise self.not_ready()
        now = self.loop.time()
        timeout = timeout_s if timeout_s is not None else self.deadline_s
        pending = Pending(inputs, rows, now, now + timeout, self.loop.create_future(), signature(inputs),
                          row_size(inputs))
        free_at, rate = self._capacity()
        self.queue.admit(pending, now, free_at, rate)
        pending.timer = self.loop.call_at(pending.deadline, self._expire, pending)
        self.metrics.queue_depth.set(self.queue.rows)
        self._wake.set()
        return pending

    async def result(self, pending: Pending) -> dict[str, np.ndarray]:
        """The request's outputs; raises Shed (504) or BatchError. A cancelled wait (the
        client went away) takes the request out of the queue."""
        try:
            return await pending.future
        except asyncio.CancelledError:
            if self.queue.drop(pending):
                self.metrics.shed.inc(model=self.name, reason="disconnected")
            pending.state = "answered"
            if pending.timer is not None:
                pending.timer.cancel()
            raise

    def not_ready(self) -> Shed:
        if self.draining:
            return Shed(503, "draining", "the server is shutting down; retry on another one", 1)
        return Shed(503, "not_ready", "the server is not ready (replicas warming up or lost); retry later", 1)

    def _rate(self) -> float | None:
        """One replica's work per second: the mean of the ready replicas' measured rates (None
        before any batch was measured)."""
        rates = [r.rate.per_s for r in self.replicas.values() if r.ready and r.rate.per_s]
        return sum(rates) / len(rates) if rates else None

    def _capacity(self) -> tuple[list[float], float | None]:
        """When each ready replica can take its next batch, and `_rate()`."""
        rate = self._rate()
        if rate is None:
            return [], None
        now = self.loop.time()
        free_at = []
        for r in self.replicas.values():
            if not r.ready:
                continue
            end = now
            for batch, sent in r.batches.values():  # in the order sent; each starts when the last ends
                end = max(end, sent) + sum(p.work for p in batch) / rate
            free_at.append(max(now, end))
        return free_at, rate

    def _expire(self, pending: Pending) -> None:
        if pending.state == "queued":
            self.queue.drop(pending)
            self._answer(pending, Shed(504, "timeout", "the request's deadline passed while it waited; "
                                                       "it was not computed"))
        elif pending.state == "running":
            self._answer(pending, Shed(504, "timeout", "the request's deadline passed while it ran"))

    def _answer(self, pending: Pending, result: dict[str, np.ndarray] | BaseException) -> None:
        pending.state = "answered"
        if pending.timer is not None:
            pending.timer.cancel()
        if pending.future.done():
            return
        if isinstance(result, BaseException):
            pending.future.set_exception(result)
        else:
            pending.future.set_result(result)

    # -- batching --------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            self._wake.clear()
            delay = self._dispatch()
            if delay is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)

    def _dispatch(self) -> float | None:
        """Send every batch that can go now; the seconds until the oldest request's delay
        runs out when it waits for company, else None."""
        while True:
            first = self.queue.oldest()
            if first is None:
                return None
            full = self.queue.ready_rows() >= self.queue.max_batch
            ready = [r for r in self.replicas.values() if r.ready]
            free = [r for r in ready if not r.batches]
            if not free and full:
                # A full batch waits in a busy replica's pipe, so that replica starts it the
                # moment it is done instead of idling while this loop hears and answers.
                free = [r for r in ready if len(r.batches) == 1]
            if not free:
                return None
            now = self.loop.time()
            age = now - first.arrived
            if not full and age < self._delay_s and not self.draining:
                return self._delay_s - age
            # a request that would miss its deadline if left for the batch after this one goes now
            rate = self._rate()
            row_work = self.queue.work / max(self.queue.rows, 1)
            full_batch_s = self.queue.max_batch * row_work / rate if rate else 0.0
            batch = self.queue.take(now, urgent_before=now + 2 * full_batch_s)
            replica = min(free, key=self._busy_until)
            self._send(replica, batch, now)

    def _busy_until(self, replica: _Replica) -> float:
        """Least loaded first: an idle replica, else the one whose batch was sent first."""
        return min((sent for _, sent in replica.batches.values()), default=0.0)

    def _send(self, replica: _Replica, batch: list[Pending], now: float) -> None:
        batch_id = self._next_batch
        self._next_batch += 1
        replica.batches[batch_id] = (batch, now)
        for p in batch:
            p.attempts += 1
            self.metrics.queue_time.observe(now - p.arrived, model=self.name)
        self.metrics.batch_size.observe(sum(p.rows for p in batch), model=self.name)
        self.metrics.queue_depth.set(self.queue.rows)
        self.pool.send(replica.worker, msg.InferBatch(batch_id, merge_inputs(batch)))

    # -- what the replicas say -------------------------------------------------------------

    def _on_items(self, items: Items) -> None:
        for item in items:
            if isinstance(item, msg.BatchDone):
                self._done(item)
            elif isinstance(item, msg.BatchFailed):
                self._failed(item)
            elif isinstance(item, msg.WorkerReady):
                self._ready(item)
            elif isinstance(item, msg.WorkerFailed):
                self._unusable(item)
            elif isinstance(item, msg.WorkerLost):
                self._gone(item)
            elif isinstance(item, msg.TokenPieces):
                self._pieces(item)
        self.metrics.replicas_ready.set(self.ready_count())
        self._wake.set()

    def _pieces(self, item: msg.TokenPieces) -> None:
        """A text-generation replica's report (serving/generation.py)."""

    def _take_batch(self, worker: int, batch_id: int) -> tuple[list[Pending], float]:
        """The batch's requests and the seconds the replica spent on it: from its sending,
        or from the answer to the batch before it when it waited in the replica's pipe."""
        replica = self.replicas.get(worker)
        entry = replica.batches.pop(batch_id, None) if replica is not None else None
        if replica is None or entry is None:
            return [], 0.0  # the replica was lost meanwhile: its requests were retried
        now = self.loop.time()
        batch, sent = entry
        started = max(sent, replica.last_done)
        replica.last_done = now
        return batch, now - started

    def _done(self, item: msg.BatchDone) -> None:
        batch, elapsed = self._take_batch(item.worker, item.batch_id)
        replica = self.replicas.get(item.worker)
        if replica is not None:  # as this server sees it: messages and contention included
            replica.rate.add(sum(p.work for p in batch), elapsed)
        self.metrics.replica_busy.inc(item.busy_s, replica=str(item.worker))
        start = 0
        for p in batch:
            if p.state == "running":
                self._answer(p, {k: v[start : start + p.rows] for k, v in item.outputs.items()})
            start += p.rows

    def _failed(self, item: msg.BatchFailed) -> None:
        batch = [p for p in self._take_batch(item.worker, item.batch_id)[0] if p.state == "running"]
        if len(batch) > 1:  # find the request at fault: each runs alone once more
            for p in batch:
                p.solo = True
                p.attempts -= 1
            self.queue.push_front(batch)
            return
        for p in batch:
            self._answer(p, BatchError(item.error))

    def _ready(self, item: msg.WorkerReady) -> None:
        replica = self.replicas.get(item.worker)
        if replica is None or replica.ready:
            return  # retired meanwhile (stopped), or said twice
        self._supervise(self.supervisor.handle(item, self.loop.time()))
        replica.ready, replica.pid = True, item.pid
        if not self.inputs:
            self.inputs, self.outputs = item.inputs, item.outputs
            self.queue.group_lengths = item.pads_batches
        _log(f"replica {item.worker} ready (pid {item.pid} on {item.host}, warm after {item.load_s:.1f} s)")
        self._settle(item.worker)

    def _unusable(self, item: msg.WorkerFailed) -> None:
        self._supervise(self.supervisor.handle(item, self.loop.time(), replace=not self.draining))

    def _gone(self, item: msg.WorkerLost) -> None:
        self._supervise(self.supervisor.handle(item, self.loop.time(), replace=not self.draining))

    def tick(self, now: float | None = None) -> None:
        """Feed the supervisor the time (start timeouts). The loop's timer calls this at the
        supervisor's next deadline; a test may pass a later `now` instead of waiting."""
        self._supervise(self.supervisor.handle(msg.Tick(), self.loop.time() if now is None else now,
                                               replace=not self.draining))
        self.metrics.replicas_ready.set(self.ready_count())
        self._wake.set()

    def _on_timer(self, deadline: float) -> None:
        self._timer = None
        # call_at may run a hair early (the clock's resolution): the deadline has come.
        self.tick(max(self.loop.time(), deadline))

    def _arm(self) -> None:
        """(Re)arm the timer at the supervisor's next deadline (none once failed or draining:
        start timeouts no longer matter then, and a due NotReady would fire again at once)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.supervisor.next_deadline()
        if deadline is not None and self.failed is None and not self.draining:
            self._timer = self.loop.call_at(deadline, self._on_timer, deadline)

    def _supervise(self, outcomes: list[Supervision]) -> None:
        """Carry out the supervisor's actions and outcomes, in order."""
        for outcome in outcomes:
            if isinstance(outcome, msg.StopWorker):
                self.pool.stop(outcome.worker)
            elif isinstance(outcome, Retired):
                self._retired(outcome)
            elif isinstance(outcome, msg.StartWorker):
                self.replicas[outcome.worker] = self._new_replica(outcome.worker)
                self.pool.replace(outcome.worker)
            elif isinstance(outcome, NotReady) and not self.draining and self.failed is None:
                self._fail(self.pool.backend.unready_reason() or (
                    f"no replica was warm after {outcome.timeout_s:.0f} s (--start-timeout)"))
        self._arm()

    def _retired(self, out: Retired) -> None:
        """A replica left (lost, could not start, or timed out): retry its requests elsewhere."""
        replica = self.replicas.pop(out.worker, None)
        if out.error is not None:
            _log(f"replica {out.worker} could not start: {out.error.message}")
        elif out.timed_out:
            _log(f"replica {out.worker} was not warm {self.config.start_timeout_s:.0f} s after its start "
                 "(--start-timeout); stopped")
        else:
            _log(f"replica lost: {out.reason}")
        retry: list[Pending] = []
        for batch, _ in (replica.batches.values() if replica is not None else ()):
            for p in batch:
                if p.state != "running":
                    continue
                if p.attempts >= 2:
                    self._answer(p, Shed(503, "replica_lost", "the replicas running this request were lost "
                                                              "twice; retry later"))
                else:
                    retry.append(p)
        self.queue.push_front(retry)
        self._settle(out.worker)
        if out.replacement is None and not self.replicas:
            if out.error is not None:
                self._fail(f"no replica could start: {out.error.message}")
            else:
                self._fail(f"every replica was lost and no replacement is allowed (--max-restarts "
                           f"{self.config.max_restarts}): {out.reason}")

    def _settle(self, worker: int) -> None:
        self._settled.add(worker)
        if not self.started and all(w in self._settled for w in range(self.config.replicas)):
            self.started = bool(self.ready_count())
            if self.started:
                _log(f"ready: {self.ready_count()} of {self.config.replicas} replicas of {self.name} warm")

    def _fail(self, reason: str) -> None:
        self.failed = reason
        self.stopped.set()


def _log(text: str) -> None:
    log.info(text)
