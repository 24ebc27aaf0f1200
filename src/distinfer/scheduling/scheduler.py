"""The job scheduler: a deterministic state machine that hands blocks of rows to workers.

Design
------
`Scheduler` does no I/O, starts no thread and reads no clock: a backend feeds it events
(`handle(event, now)`) and carries out the actions it returns, in order. The local process
backend, the Ray backend and the simulator all drive this one class, so a scheduling bug can
be reproduced from a list of events alone, and the same list always yields the same actions.

* Pull, not push: a worker holds at most `prefetch` blocks (the running one included). It is
  topped up when it becomes ready and each time it finishes a block, so fast workers come
  back more often and get more blocks; speeds balance without being measured. The queued
  blocks behind the running one hide the round trip between a worker and the driver.
* Tail stealing: once nothing is pending, a worker whose queue runs empty takes the last
  not-started block from the worker with the most not-started rows queued (`Cancel` to the
  victim, `Assign` to the thief). A block whose `BlockStarted` was seen is never stolen.
  A victim may have started the block before the `Cancel` reached it; both copies may then
  run, and the first `BlockDone` wins: block output is idempotent, so a duplicate costs time,
  never correctness. `steal=False` turns stealing off (the simulator shows what it is worth).
* Speculation at the tail (`speculation=True`; `distinfer run` turns it on, `--speculation
  off`): once `speculation_quantile` of the blocks are done, a ready worker left with
  nothing (nothing pending, nothing to steal) runs a copy of a running block when that
  block is slow, its worker taking over `speculation_multiplier` times the typical time for
  its rows (the median per-row time of the finished blocks), by its measured rate or by the
  time it has already run, and when the copy is expected to end first (at the idle worker's
  rate). Of several, the block expected to end last. The first `BlockDone` commits; the
  other copy gets a `Cancel` (a worker honours it between blocks; a running copy ends and
  its duplicate output is dropped). Spark's defaults (since 4.0): multiplier 3, quantile
  0.9. `speculation_stats` counts blocks speculated, copies that won, and the worker-seconds
  the losers spent. Rates come from the times of the events (`now`): a worker's rows over
  the seconds from each `BlockStarted` to its `BlockDone`. An idle worker looks again at
  every `Tick` (a block may have turned late since: its worker stopped), and
  `next_speculation_check()` says when that can next happen, for a driver that ticks rarely.
* Workers' life cycle is the `Supervisor`'s (supervisor.py, shared with the server): ready,
  unusable (`WorkerFailed`: stopped at once, replaced unless fatal; a fatal one fails the job
  with its error), lost (replaced), fresh ids (max id ever + 1), at most `max_restarts`
  replacements per job, and each replacement's own start timeout. The scheduler keeps one
  queue per live worker, mirroring the supervisor's books, and turns its outcomes into block
  moves and `Finish`.
* Failures: blocks queued on a lost worker return to the front of the pending order (they are
  the oldest work). A block that was in flight on `max_block_attempts` lost workers, or
  failed that often, is taken to be what kills them and fails the job instead of killing every
  replacement (no replacement is started for that loss).
* Start timeout: no worker ready for `start_timeout_s`, measured from `start()` and again from
  any loss that leaves no worker ready (so that a replacement gets the whole timeout to load
  its model), fails the job with a `WorkersNotReadyError`. A replacement still loading
  `start_timeout_s` after its start is stopped and replaced; the first workers are covered by
  the job's clock alone (`time_first_starts=False`): a job with a ready worker never stops
  a slow first one.

Worked example (prefetch=2, blocks {0: 100, 1: 100, 2: 100, 3: 50}, workers [0, 1])::

    start()                    -> []
    WorkerReady(0)             -> Assign(0, 0), Assign(0, 1)
    WorkerReady(1)             -> Assign(1, 2), Assign(1, 3)       # nothing left pending
    BlockStarted(0, 0); BlockStarted(1, 2)
    WorkerLost(1, "killed")    -> StartWorker(2)                   # 2 and 3 pending again;
                                                                   # block 2 attempts = 1
    BlockDone(0, 0)            -> Assign(0, 2)                     # queue 0: [1, 2]
    WorkerReady(2)             -> Assign(2, 3)
    BlockStarted(0, 1)
    BlockDone(2, 3)            -> Cancel(0, 2), Assign(2, 2)       # steal: 2 not started on 0
    BlockStarted(2, 2)
    BlockDone(0, 1)            -> []                               # nothing left to steal
    BlockDone(2, 2)            -> StopWorker(0), StopWorker(2), Finish(None)

Cost: an event on the common path (`BlockDone` and the `Assign` topping the queue up) is a
few dict/deque operations. Stealing finds its victim in a lazy max-heap of (not-started rows,
start order) built when the first worker runs dry with nothing pending; an entry is an upper
bound, checked against the victim's queue when it reaches the top, so a steal costs
O(log workers) amortised, not a scan. A block going back to pending drops the heap (it is
rebuilt at the next steal). Failures still scan the workers (`_spread`), once per loss.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from distinfer.errors import ErrorInfo
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
from distinfer.scheduling.supervisor import NotReady, Retired, Supervision, Supervisor, SupervisorConfig

__all__ = ["Running", "Scheduler", "SchedulerConfig", "SpeculationStats", "pick_speculation"]


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Knobs of the scheduler; the defaults suit a job of minutes to hours."""

    prefetch: int = 2
    """Blocks queued per worker, the running one included (>= 1)."""
    max_restarts: int = 3
    """Replacement workers started over the whole job (>= 0)."""
    max_block_attempts: int = 3
    """A block in flight on this many lost workers (or failing this often) fails the job."""
    start_timeout_s: float = 600.0
    """No worker ready for this long (since start, or since a loss left none) fails the job;
    a replacement still loading this long after its start is stopped and replaced."""
    steal: bool = True
    """Tail stealing: a worker that runs dry takes a not-started block from the fullest queue."""
    speculation: bool = False
    """Copies of slow running blocks for idle workers at the tail (see the module docstring)."""
    speculation_multiplier: float = 3.0
    """A block is slow when its worker takes this many times the typical time for its rows."""
    speculation_quantile: float = 0.9
    """Speculation starts once this share of the blocks is done."""

    def __post_init__(self) -> None:
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {self.prefetch}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if self.max_block_attempts < 1:
            raise ValueError(f"max_block_attempts must be >= 1, got {self.max_block_attempts}")
        if not self.start_timeout_s > 0:  # written this way so that NaN is refused too
            raise ValueError(f"start_timeout_s must be > 0, got {self.start_timeout_s}")
        if not self.speculation_multiplier >= 1:
            raise ValueError(f"speculation_multiplier must be >= 1, got {self.speculation_multiplier}")
        if not 0 <= self.speculation_quantile <= 1:
            raise ValueError(f"speculation_quantile must be in [0, 1], got {self.speculation_quantile}")


@dataclass
class SpeculationStats:
    """What speculation did: copies started, copies that finished first, and the seconds of
    worker time spent on the losing copies (until the winner finished)."""

    speculated: int = 0
    won: int = 0
    wasted_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Running:
    """A running block, as the speculation policy sees it."""

    block: int
    rows: int
    started: float  # when its worker reported BlockStarted
    worker_rate: float | None  # its worker's measured rows/s (None: none finished yet)


def pick_speculation(
    running: Sequence[Running], now: float, idle_rate: float | None, per_row_s: float, multiplier: float
) -> int | None:
    """The block an idle worker (measured at `idle_rate` rows/s) should copy, or None: a slow
    one (its worker needs over `multiplier` times the typical `per_row_s` for its rows, by its
    rate or by the time it has already run) whose copy is expected to end first; of several,
    the one expected to end last (a block overdue by its worker's rate may be stuck: last of all)."""
    best: tuple[float, int] | None = None
    copy_rate = idle_rate or 1.0 / per_row_s
    for r in running:
        typical = r.rows * per_row_s
        expected = r.rows / r.worker_rate if r.worker_rate else typical
        late = now - r.started >= multiplier * typical
        if not (late or expected > multiplier * typical):
            continue
        end = r.started + expected
        if end <= now:  # overdue: when it ends is unknown
            end = math.inf
        if now + r.rows / copy_rate >= end:
            continue
        if best is None or end > best[0]:
            best = (end, r.block)
    return None if best is None else best[1]


def _job_failed(message: str, traceback: str = "") -> ErrorInfo:
    return ErrorInfo("JobFailedError", message, fatal=True, traceback=traceback)


def _not_ready(timeout_s: float) -> ErrorInfo:
    """A `WorkersNotReadyError` (errors.py); the driver adds the backend's reason when it has one."""
    return ErrorInfo(
        "WorkersNotReadyError",
        f"no worker became ready within {timeout_s:g} s; check the worker logs for why the model "
        "does not load, or raise start_timeout_s if it is just slow",
        fatal=True,
    )


class Scheduler:
    """Hands blocks to workers; see the module docstring.

    `blocks` maps block id -> row count, in the order the blocks should be handed out;
    `workers` are the ids of the workers the backend starts. Views (`done_rows`, `queue()`,
    ...) are for progress and reports and stay readable after the job finished.
    """

    __slots__ = (
        "_attempts",
        "_began_at",
        "_begun",
        "_busy",
        "_clock",
        "_config",
        "_copies",
        "_copying",
        "_done",
        "_done_rows",
        "_error",
        "_fewest_rows",
        "_finished",
        "_order",
        "_owner",
        "_pending",
        "_per_row",
        "_per_row_median",
        "_prefetch",
        "_queues",
        "_rows",
        "_slow",
        "_spec",
        "_started",
        "_steal_heap",
        "_stealing",
        "_sup",
        "_total_rows",
    )

    def __init__(
        self,
        blocks: Mapping[int, int],
        workers: Sequence[int],
        config: SchedulerConfig,
        now: float,
    ) -> None:
        total = 0
        for block, rows in blocks.items():
            if rows < 0:
                raise ValueError(f"block {block} has a negative row count ({rows})")
            total += rows
        if len(set(workers)) != len(workers):
            raise ValueError(f"worker ids must be unique, got {list(workers)}")
        if blocks and not workers:
            raise ValueError("there are blocks to run but no workers to run them on")
        self._config = config
        self._prefetch = config.prefetch
        self._rows: dict[int, int] = dict(blocks)
        self._total_rows = total
        self._pending: deque[int] = deque(self._rows)
        self._done: set[int] = set()
        self._done_rows = 0
        # Block -> the worker whose queue holds it; a block is in exactly one of: pending,
        # some queue (and here), done.
        self._owner: dict[int, int] = {}
        # Blocks whose owner reported BlockStarted; cleared whenever the block changes hands.
        self._started: set[int] = set()
        self._attempts: dict[int, int] = {}
        # Live workers (starting or ready) in the order they were started; that order is the
        # tie-break everywhere, which is what makes the actions deterministic. The keys mirror
        # the supervisor's live workers (who is ready, replacements, timeouts are its books).
        self._queues: dict[int, deque[int]] = {w: deque() for w in workers}
        # Start order of every worker that had a queue: the steal heap's tie-break.
        self._order: dict[int, int] = {w: i for i, w in enumerate(self._queues)}
        self._stealing = config.steal
        # (-stealable rows, start order, worker): each entry an upper bound of that worker's
        # stealable rows; None until a steal needs it and again whenever pending grows.
        self._steal_heap: list[tuple[int, int, int]] | None = None
        self._sup = Supervisor(
            workers,
            SupervisorConfig(config.max_restarts, config.start_timeout_s, time_first_starts=False),
            now,
        )
        self._begun = False
        self._finished = False
        self._error: ErrorInfo | None = None
        # speculation's books: when each owner's block started, each worker's rows and busy
        # seconds, the per-row seconds of finished blocks, and the copies running
        self._clock = now
        self._began_at: dict[int, float] = {}
        self._busy: dict[int, list[float]] = {}
        self._per_row: list[float] = []
        self._per_row_median = (0, 0.0)  # (finished blocks it was taken over, the median)
        self._slow: set[int] = set()  # workers whose measured rate makes their blocks slow
        self._fewest_rows = min(self._rows.values(), default=0)  # the smallest block can turn late first
        self._copies: dict[int, tuple[int, float]] = {}  # block -> (copy's worker, its start)
        self._copying: dict[int, int] = {}  # worker -> the block it copies
        self._spec = SpeculationStats()

    # --- views ------------------------------------------------------------------------

    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @property
    def total_blocks(self) -> int:
        return len(self._rows)

    @property
    def done_blocks(self) -> int:
        return len(self._done)

    @property
    def total_rows(self) -> int:
        return self._total_rows

    @property
    def done_rows(self) -> int:
        return self._done_rows

    @property
    def pending_blocks(self) -> int:
        """Blocks not yet in any worker's queue."""
        return len(self._pending)

    @property
    def live_workers(self) -> tuple[int, ...]:
        """Workers started and not lost (ready or still starting), in start order."""
        return tuple(self._queues)

    @property
    def ready_workers(self) -> tuple[int, ...]:
        return tuple(w for w in self._queues if self._sup.is_ready(w))

    @property
    def restarts_used(self) -> int:
        return self._sup.restarts_used

    @property
    def supervisor(self) -> Supervisor:
        """The books of the workers' life cycle (read them, do not drive them)."""
        return self._sup

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def error(self) -> ErrorInfo | None:
        """The error the job finished with; None while running or after success."""
        return self._error

    def queue(self, worker: int) -> tuple[int, ...]:
        """The blocks assigned to a live worker, in order (empty for any other id)."""
        return tuple(self._queues.get(worker, ()))

    def is_done(self, block: int) -> bool:
        return block in self._done

    def attempts(self, block: int) -> int:
        """How often the block was lost with a worker or failed."""
        return self._attempts.get(block, 0)

    @property
    def speculation_stats(self) -> SpeculationStats:
        return self._spec

    def worker_rate(self, worker: int) -> float | None:
        """A worker's measured rows/s over the blocks it finished (None: none yet)."""
        rows, seconds = self._busy.get(worker, (0.0, 0.0))
        return rows / seconds if rows and seconds > 0 else None

    # --- driving ----------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Begin the job; finishes at once when there is nothing to do."""
        if self._begun or self._finished:
            return []
        self._begun = True
        self._sup.start(now)
        if not self._rows:
            return self._finish(None)
        return []

    def handle(self, event: Event, now: float) -> list[Action]:
        """Apply one event; returns the actions to carry out, in order."""
        if self._finished:
            return []
        if not self._begun:
            # A backend that forgets start() still gets a correct job.
            actions = self.start(now)
            if self._finished:
                return actions
            return actions + self.handle(event, now)
        self._clock = now
        # Ordered by how often they arrive.
        if isinstance(event, BlockDone):
            return self._on_block_done(event.worker, event.block)
        if isinstance(event, BlockStarted):
            if self._owner.get(event.block) == event.worker:
                self._started.add(event.block)
                self._began_at.pop(event.block, None)  # kept in start order: the oldest first
                self._began_at[event.block] = now
            # Otherwise the block was stolen or reassigned from this worker: ignore.
            return []
        if isinstance(event, WorkerReady):
            return self._on_worker_ready(event, now)
        if isinstance(event, Tick):
            return self._on_tick(now)
        if isinstance(event, BlockFailed):
            return self._on_block_failed(event.worker, event.block, event.error)
        if isinstance(event, WorkerLost):
            if event.worker not in self._queues:
                return []
            return self._lose(event, now)
        if isinstance(event, WorkerFailed):
            return self._on_worker_failed(event, now)
        raise TypeError(f"not a scheduler event: {event!r}")

    # --- event handlers ---------------------------------------------------------------

    def _on_block_done(self, worker: int, block: int) -> list[Action]:
        owner = self._owner.get(block)
        actions: list[Action] = []
        if owner == worker:
            queue = self._queues[worker]
            if queue[0] == block:
                queue.popleft()
            else:
                queue.remove(block)
            del self._owner[block]
            self._started.discard(block)
            self._timed(worker, block, self._began_at.pop(block, None))
            copy = self._copies.pop(block, None)
            if copy is not None:  # the original won: its copy is cancelled
                self._copying.pop(copy[0], None)
                self._spec.wasted_s += self._clock - copy[1]
                actions.append(Cancel(copy[0], block))
            self._mark_done(block)
            if len(self._done) == len(self._rows):
                return self._finish(None)
            self._refill(worker, actions)
            if copy is not None and self._sup.is_ready(copy[0]):
                self._refill(copy[0], actions)
            return actions
        copy = self._copies.get(block)
        if copy is not None and copy[0] == worker:  # a copy ended first (or, done, a late one)
            del self._copies[block]
            del self._copying[worker]
            if block not in self._done:
                self._spec.won += 1
                self._timed(worker, block, copy[1])
                began = self._began_at.pop(block, None)
                self._spec.wasted_s += 0.0 if began is None else self._clock - began
                if owner is not None and block in self._started:  # the slow original: cancelled
                    actions.append(Cancel(owner, block))  # (not started: cancelled below)
        if block not in self._rows or block in self._done:
            if copy is not None and copy[0] == worker and self._sup.is_ready(worker):
                self._refill(worker, actions)  # a cancelled copy ran to its end: idle again
            return actions  # duplicate or unknown: the output is already there
        # A non-owner finished it (it started the block before a Cancel reached it, or it
        # was lost and its late message arrived): the work is real, so take it.
        if owner is None:
            self._pending.remove(block)  # back in pending after a loss; rare, O(n) is fine
        else:
            queue = self._queues[owner]
            queue.remove(block)
            del self._owner[block]
            if block in self._started:
                self._started.discard(block)
            else:
                actions.append(Cancel(owner, block))
        self._mark_done(block)
        if len(self._done) == len(self._rows):
            return self._finish(None)  # a Cancel to a worker being stopped is noise
        if owner is not None and self._sup.is_ready(owner):
            self._refill(owner, actions)
        if self._sup.is_ready(worker):
            self._refill(worker, actions)
        return actions

    def _on_worker_ready(self, event: WorkerReady, now: float) -> list[Action]:
        worker = event.worker
        if worker not in self._queues:
            return []  # unknown or already lost
        self._sup.handle(event, now)
        actions: list[Action] = []
        self._refill(worker, actions)
        return actions

    def _on_tick(self, now: float) -> list[Action]:
        actions = self._supervise(self._sup.handle(Tick(), now))
        if self._finished or not self._config.speculation or self._pending:
            return actions
        idle = self._idle_workers()  # a running block may have turned late since
        if idle and self._quantile_reached():
            candidates = self._may_be_slow(-1, self._typical_per_row())  # looked up once a tick
            for worker in idle:
                if not candidates:
                    break
                self._speculate(worker, actions, candidates)
        return actions

    def _idle_workers(self) -> list[int]:
        """Ready workers with nothing queued and no copy running."""
        queues, copying = self._queues, self._copying
        return [w for w in self._sup.ready_workers if not queues.get(w, True) and w not in copying]

    def _quantile_reached(self) -> bool:
        """Enough blocks timed for speculation: `speculation_quantile` of them, rounded down
        (Spark's rule: the last of 8 blocks may be copied at 0.9), and at least one."""
        wanted = max(1, math.floor(self._config.speculation_quantile * len(self._rows)))
        return bool(self._per_row) and len(self._done) >= wanted

    def _typical_per_row(self) -> float:
        """The median per-row time of the finished blocks, taken again only once their count
        grew by 1% (a million-block job asks at every finish of its tail)."""
        count, median = self._per_row_median
        if len(self._per_row) > count * 1.01:
            median = statistics.median(self._per_row)
            self._per_row_median = (len(self._per_row), median)
            for worker in self._busy:
                self._mark_slow(worker, median)
        return median

    def _may_be_slow(self, worker: int, typical: float) -> list[Running]:
        """The running blocks (not `worker`'s, not copied) that `pick_speculation` could pick:
        those begun long enough ago to be late (`_began_at` is in start order, so they come
        first) and those of workers measured slow; a superset of its choices, found without
        looking at every running block of a large job."""
        m = self._config.speculation_multiplier
        horizon = self._clock - m * typical * self._fewest_rows
        found: dict[int, float] = {}
        for block, began in self._began_at.items():
            if began > horizon:
                break
            found[block] = began
        for slow in self._slow:
            queue = self._queues.get(slow)
            started = self._began_at.get(queue[0]) if queue else None
            if queue and started is not None:
                found[queue[0]] = started
        return [
            Running(block, self._rows[block], began, self.worker_rate(owner))
            for block, began in found.items()
            if block not in self._copies and (owner := self._owner.get(block)) is not None and owner != worker
        ]

    def next_speculation_check(self) -> float | None:
        """When a running block turns late (it has run `speculation_multiplier` times the
        typical time for its rows), if a worker is idle to copy it then: the time a `Tick`
        may speculate (a driver ticking often needs none of this; the simulator does). None
        when no such time is known."""
        config = self._config
        if self._finished or not config.speculation or self._pending or not self._quantile_reached():
            return None
        typical = self._typical_per_row() * config.speculation_multiplier
        copies, rows, now, fewest = self._copies, self._rows, self._clock, self._fewest_rows
        best = math.inf
        for block, began in self._began_at.items():  # oldest first: stop once none can be sooner
            if began + fewest * typical >= best:
                break
            t = began + rows[block] * typical
            if now < t < best and block not in copies:
                best = t
        return best if best < math.inf else None

    def _on_block_failed(self, worker: int, block: int, error: ErrorInfo) -> list[Action]:
        if worker not in self._queues or block not in self._rows or block in self._done:
            return []
        if error.fatal:
            # Bad input or a bad model fail the same way on any worker: no retry.
            return self._finish(error)
        if self._owner.get(block) != worker:
            return []  # the block moved on; its owner's outcome is the one that counts
        self._queues[worker].remove(block)
        del self._owner[block]
        self._started.discard(block)
        self._began_at.pop(block, None)
        attempts = self._attempts.get(block, 0) + 1
        self._attempts[block] = attempts
        if attempts >= self._config.max_block_attempts:
            return self._finish(
                _job_failed(
                    f"block {block} ({self._row_range(block)}) failed {attempts} times; "
                    f"last error: {error.kind}: {error.message}",
                    error.traceback,
                )
            )
        self._pending.appendleft(block)
        self._steal_heap = None  # queues fill from pending again: rebuilt at the next steal
        actions: list[Action] = []
        self._spread(actions)
        return actions

    def _on_worker_failed(self, event: WorkerFailed, now: float) -> list[Action]:
        worker, error = event.worker, event.error
        if worker not in self._queues:
            return []
        if error.fatal:
            # The same failure anywhere: the job fails with it. The supervisor keeps its books
            # (no replacement); every worker the job had, this one included, gets a StopWorker.
            self._sup.handle(event, now)
            return self._finish(error)
        # The supervisor stops it (it may still be alive, holding memory the replacement
        # needs) and replaces it.
        return self._lose(event, now)

    # --- mechanics --------------------------------------------------------------------

    def _mark_done(self, block: int) -> None:
        self._done.add(block)
        self._done_rows += self._rows[block]

    def _refill(self, worker: int, actions: list[Action]) -> None:
        """Top a ready worker's queue up to `prefetch`; steal if it is still empty."""
        queue = self._queues[worker]
        pending = self._pending
        if pending:
            owner = self._owner
            room = self._prefetch - len(queue)
            while room > 0 and pending:
                block = pending.popleft()
                queue.append(block)
                owner[block] = worker
                actions.append(Assign(worker, block))
                room -= 1
        if not queue and self._stealing:
            self._steal(worker, actions)
        if not queue and self._config.speculation and not pending:
            self._speculate(worker, actions)

    def _timed(self, worker: int, block: int, began: float | None) -> None:
        """A finished block's time: its worker's rate and the typical per-row time."""
        rows = self._rows[block]
        if began is None or not rows or not self._config.speculation:
            return
        seconds = max(0.0, self._clock - began)
        books = self._busy.setdefault(worker, [0.0, 0.0])
        books[0] += rows
        books[1] += seconds
        self._per_row.append(seconds / rows)
        _, typical = self._per_row_median
        if typical > 0:
            self._mark_slow(worker, typical)

    def _mark_slow(self, worker: int, typical: float) -> None:
        """`worker` is slow when its blocks take over `speculation_multiplier` times the typical time."""
        rows, seconds = self._busy.get(worker, (0.0, 0.0))
        if rows and seconds > rows * typical * self._config.speculation_multiplier:
            self._slow.add(worker)
        else:
            self._slow.discard(worker)

    def _speculate(self, worker: int, actions: list[Action], candidates: list[Running] | None = None) -> None:
        """Give an idle worker a copy of a slow running block (see `pick_speculation`), chosen
        among `candidates` when given (the block chosen is taken out of them)."""
        config = self._config
        if worker in self._copying or not self._quantile_reached():
            return
        per_row = self._typical_per_row()
        if candidates is None:
            running = self._may_be_slow(worker, per_row)
        else:
            running = [c for c in candidates if self._owner.get(c.block) != worker]
        block = pick_speculation(running, self._clock, self.worker_rate(worker), per_row,
                                 config.speculation_multiplier)  # fmt: skip
        if block is None:
            return
        if candidates is not None:
            candidates[:] = [c for c in candidates if c.block != block]
        self._copies[block] = (worker, self._clock)
        self._copying[worker] = block
        self._spec.speculated += 1
        actions.append(Assign(worker, block))

    def _stealable(self, queue: deque[int]) -> int:
        """Rows of the queue's not-started blocks; -1 when there are none, so that a queue of
        zero-row blocks still counts."""
        rows = self._rows
        started = self._started
        stealable = -1
        for block in queue:
            if block not in started:
                stealable = rows[block] if stealable < 0 else stealable + rows[block]
        return stealable

    def _victim(self, thief: int) -> int | None:
        """The worker with the most not-started rows queued, ties to the earliest started (the
        thief's own queue is empty); None when nothing is stealable.

        Nothing is pending while the heap lives, so a queue only grows by a steal (which pushes
        a fresh entry): entries are upper bounds, and one that is still exact at the top wins."""
        heap = self._steal_heap
        queues = self._queues
        if heap is None:
            order = self._order
            heap = [(-s, order[w], w) for w, q in queues.items() if q and (s := self._stealable(q)) >= 0]
            heapq.heapify(heap)
            self._steal_heap = heap
        while heap:
            negative, order_index, worker = heap[0]
            queue = queues.get(worker)
            actual = -1 if queue is None or worker == thief else self._stealable(queue)
            if actual == -negative:
                return worker
            if actual >= 0:
                heapq.heapreplace(heap, (-actual, order_index, worker))
            else:
                heapq.heappop(heap)
        return None

    def _steal(self, thief: int, actions: list[Action]) -> None:
        started = self._started
        victim_id = self._victim(thief)
        if victim_id is None:
            return
        victim = self._queues[victim_id]
        # The last one: the block the victim would reach latest, and the one least likely to
        # have been started already with the BlockStarted still on its way.
        index = len(victim) - 1
        while victim[index] in started:
            index -= 1
        block = victim[index]
        del victim[index]
        self._owner[block] = thief
        self._queues[thief].append(block)
        heap = self._steal_heap
        if heap is not None:
            heapq.heappop(heap)  # the victim's entry, exact and on top
            for worker in (victim_id, thief):
                stealable = self._stealable(self._queues[worker])
                if stealable >= 0:
                    heapq.heappush(heap, (-stealable, self._order[worker], worker))
        actions.append(Cancel(victim_id, block))
        actions.append(Assign(thief, block))

    def _spread(self, actions: list[Action]) -> None:
        """Hand pending blocks to ready workers with room, emptiest queues first, one each per
        round, so that a few returned blocks go to idle workers rather than pile on one."""
        pending = self._pending
        if not pending:
            return
        prefetch = self._prefetch
        queues = self._queues
        ready = self._sup.is_ready
        takers = [w for w, q in queues.items() if ready(w) and len(q) < prefetch]
        takers.sort(key=lambda w: len(queues[w]))  # stable: start order breaks ties
        while pending and takers:
            again: list[int] = []
            for worker in takers:
                if not pending:
                    break
                block = pending.popleft()
                queues[worker].append(block)
                self._owner[block] = worker
                actions.append(Assign(worker, block))
                if len(queues[worker]) < prefetch:
                    again.append(worker)
            takers = again

    def _lose(self, event: WorkerLost | WorkerFailed, now: float) -> list[Action]:
        """Retire a live worker: requeue its blocks, then let the supervisor replace it, unless
        a poison block fails the job (then no restart is wasted on it)."""
        poison = self._requeue(event.worker)
        if poison is None:
            return self._supervise(self._sup.handle(event, now))
        outcomes = self._sup.handle(event, now, replace=False)
        stops: list[Action] = [a for a in outcomes if isinstance(a, StopWorker)]
        reason = next(o.reason for o in outcomes if isinstance(o, Retired))
        return stops + self._finish(self._poisoned(poison, reason))

    def _supervise(self, outcomes: list[Supervision]) -> list[Action]:
        """Carry the supervisor's outcomes over to the blocks, in order."""
        actions: list[Action] = []
        for outcome in outcomes:
            if isinstance(outcome, StartWorker):
                self._queues[outcome.worker] = deque()
                self._order[outcome.worker] = len(self._order)
                actions.append(outcome)
            elif isinstance(outcome, StopWorker):
                actions.append(outcome)
            elif isinstance(outcome, Retired):
                poison = self._requeue(outcome.worker)  # None when _lose did it already
                if poison is not None:
                    return actions + self._finish(self._poisoned(poison, outcome.reason))
                if outcome.replacement is None and not self._queues:
                    return actions + self._finish(
                        _job_failed(
                            f"all workers were lost (last: {outcome.reason}); {self._sup.restarts_used} "
                            f"replacement(s) started, max_restarts={self._config.max_restarts}: see "
                            "the worker logs for why they die"
                        )
                    )
            elif isinstance(outcome, NotReady):
                return actions + self._finish(_not_ready(outcome.timeout_s))
        self._spread(actions)
        return actions

    def _requeue(self, worker: int) -> int | None:
        """Take a retired worker's queue back to the front of pending; the block it makes fail
        the job (in flight on `max_block_attempts` lost workers), if any."""
        queue = self._queues.pop(worker, None)
        if queue is None:
            return None
        copied = self._copying.pop(worker, None)
        if copied is not None:
            self._copies.pop(copied, None)  # the original still runs
        max_attempts = self._config.max_block_attempts
        poison: int | None = None
        for index, block in enumerate(queue):
            del self._owner[block]
            self._began_at.pop(block, None)
            # The head counts even without BlockStarted: the report may have died with it.
            if index == 0 or block in self._started:
                self._started.discard(block)
                attempts = self._attempts.get(block, 0) + 1
                self._attempts[block] = attempts
                if attempts >= max_attempts and poison is None:
                    poison = block
        self._pending.extendleft(reversed(queue))
        if queue:
            self._steal_heap = None  # queues fill from pending again: rebuilt at the next steal
        return poison

    def _poisoned(self, block: int, reason: str) -> ErrorInfo:
        return _job_failed(
            f"block {block} ({self._row_range(block)}) was in flight on "
            f"{self._attempts[block]} workers that died (last: {reason}); the block "
            "itself probably kills them (out of memory?): check those rows, lower the "
            "block size, or raise max_block_attempts"
        )

    def _finish(self, error: ErrorInfo | None) -> list[Action]:
        actions: list[Action] = [StopWorker(w) for w in self._queues]
        actions.append(Finish(error))
        self._finished = True
        self._error = error
        return actions

    def _row_range(self, block: int) -> str:
        """'rows A-B' of a block, B inclusive; only for error messages, so O(n) is fine."""
        first = 0
        for other, rows in self._rows.items():
            if other == block:
                break
            first += rows
        count = self._rows[block]
        if count == 0:
            return f"no rows, at row {first}"
        return f"rows {first}-{first + count - 1}"
