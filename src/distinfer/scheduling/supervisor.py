"""The worker supervisor: a deterministic state machine that keeps workers (batch) or replicas
(serving) alive, shared by `Scheduler` (`distinfer run`) and `InferenceServer` (`distinfer serve`).

Design
------
`Supervisor` does no I/O, starts no thread and reads no clock: a face (the batch scheduler,
the server) feeds it the life-cycle events (`handle(event, now)`: `WorkerReady`,
`WorkerFailed`, `WorkerLost`, `Tick`) and carries out what it returns, in order:
`StopWorker` and `StartWorker` for the backend, and two outcomes for the face itself:

* `Retired(worker, ...)`: the worker left the books (lost, unusable, or timed out); its work
  must go elsewhere. It comes after the worker's `StopWorker` (when it needs one) and before
  its replacement's `StartWorker`; `replacement` is None when none was started.
* `NotReady(timeout_s, since)`: no worker has been ready for `start_timeout_s`; the face fails.

Rules
-----
* Ready: a live worker that reports `WorkerReady` is ready (and its start clock stops).
  Anything from a worker the supervisor does not hold (unknown, retired) is ignored.
* Unusable (`WorkerFailed`): the worker may still be alive, holding memory or a Ray actor's
  CPUs, so it is stopped at once (`StopWorker`) and retired. A fatal error (`ErrorInfo.fatal`,
  a DistinferError such as a model that cannot load) would fail the same way anywhere: no
  replacement. The face decides what a fatal error means (batch: the job fails with it; serve:
  the server fails once no replica is left).
* Lost (`WorkerLost`, from the backend: the process is gone): retired, no `StopWorker`.
* Replacement: a retired worker (not fatal) is replaced while the budget lasts:
  `max_restarts` replacements over the supervisor's whole life, each under a fresh id (the
  largest id ever seen + 1). A face that must not replace (a batch job about to fail on a
  poison block, a draining server) passes `replace=False`.
* Two start clocks, both `start_timeout_s` long:
  - each start's own: from its `StartWorker` (and, with `time_first_starts`, the first
    workers' from `start()`). A worker still loading when it runs out is stopped and retired
    like a lost one (`timed_out=True`), and replaced within the budget.
  - the face's: while no worker is ready, from `start()` or from the last reported loss
    (`WorkerLost`, `WorkerFailed`) that left none ready, so that a replacement gets the whole
    timeout to load. When it runs out, a `Tick` answers `NotReady` and nothing else: per-start
    clocks that ran out at the same time are moot, the face is giving up. A start-timeout
    retirement does not restart the face's clock: the supervisor's own retries never postpone
    the face's failure (they are bounded by it and by the budget).
* `time_first_starts=False` (the batch scheduler) leaves the first workers to the face's
  clock alone: a job that has a ready worker never stops a slow first one, as it always did;
  its replacements are timed. Serving times every start: a first replica that hangs while
  another is warm would otherwise keep the server from ever being started.

Worked example (max_restarts=3, start_timeout_s=60, workers [0, 1], every start timed)::

    start(0)                        -> []          # 0 and 1 loading, both due at 60
    WorkerReady(0) @5               -> []
    Tick @60                        -> StopWorker(1), Retired(1, timed_out, replacement=2),
                                       StartWorker(2)                      # 2 due at 120
    WorkerFailed(2, transient) @70  -> StopWorker(2), Retired(2, replacement=3),
                                       StartWorker(3)                      # 3 due at 130
    WorkerLost(0, "killed") @100    -> Retired(0, replacement=4), StartWorker(4)
                                       # none ready: the face's clock runs from 100; 4 due at 160
    Tick @130                       -> StopWorker(3), Retired(3, timed_out, replacement=None)
                                       # the budget is spent; the face's clock stays at 100
    Tick @160                       -> NotReady(60, since=100)  # the face fails (4 is moot)

`next_deadline()` says when a `Tick` could next change anything, so that a face with a
timer (the server's event loop) arms it instead of polling.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

from distinfer.errors import ErrorInfo
from distinfer.messages import StartWorker, StopWorker, Tick, WorkerFailed, WorkerLost, WorkerReady

__all__ = ["NotReady", "Retired", "Supervision", "Supervisor", "SupervisorConfig", "SupervisorEvent"]


@dataclass(frozen=True, slots=True)
class SupervisorConfig:
    max_restarts: int = 3
    """Replacement workers started over the supervisor's whole life (>= 0)."""
    start_timeout_s: float = 600.0
    """A start's own timeout, and the face's: no worker ready for this long fails it (> 0)."""
    time_first_starts: bool = True
    """Whether the first workers' starts are timed too (else only the face's clock covers them)."""

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if not self.start_timeout_s > 0:  # written this way so that NaN is refused too
            raise ValueError(f"start_timeout_s must be > 0, got {self.start_timeout_s}")


@dataclass(frozen=True, slots=True)
class Retired:
    """`worker` left the books: its work must go elsewhere (see the module docstring)."""

    worker: int
    reason: str  # the loss's reason, "Kind: message" of a failure, or the timeout
    was_ready: bool
    error: ErrorInfo | None = None  # what a WorkerFailed said (a fatal one: never replaced)
    timed_out: bool = False  # still loading `start_timeout_s` after its start
    replacement: int | None = None  # the id started for it, if any


@dataclass(frozen=True, slots=True)
class NotReady:
    """No worker has been ready for `timeout_s` seconds, since `since`: the face fails."""

    timeout_s: float
    since: float


Supervision: TypeAlias = StartWorker | StopWorker | Retired | NotReady
"""What `Supervisor.handle` returns: actions for the backend, outcomes for the face."""

SupervisorEvent: TypeAlias = WorkerReady | WorkerFailed | WorkerLost | Tick


class Supervisor:
    """Keeps the books of live workers; see the module docstring.

    `workers` are the ids the face starts first. Views stay readable after the face gave up.
    """

    __slots__ = ("_config", "_deadline", "_live", "_max_id", "_ready", "_restarts_used", "_since")

    def __init__(self, workers: Iterable[int], config: SupervisorConfig, now: float) -> None:
        first = list(workers)
        if len(set(first)) != len(first):
            raise ValueError(f"worker ids must be unique, got {first}")
        self._config = config
        # Live workers (loading or ready) in start order, the tie-break everywhere; each with
        # the time its start runs out (None: ready, or a first worker left untimed).
        self._live: dict[int, float | None] = dict.fromkeys(first)
        self._ready: set[int] = set()
        self._max_id = max(first, default=-1)
        self._restarts_used = 0
        self._since = now
        self._deadline = 0.0
        self.start(now)

    # --- views ------------------------------------------------------------------------

    @property
    def config(self) -> SupervisorConfig:
        return self._config

    @property
    def live_workers(self) -> tuple[int, ...]:
        """Workers started and not retired (loading or ready), in start order."""
        return tuple(self._live)

    @property
    def ready_workers(self) -> tuple[int, ...]:
        return tuple(w for w in self._live if w in self._ready)

    @property
    def loading_workers(self) -> tuple[int, ...]:
        return tuple(w for w in self._live if w not in self._ready)

    @property
    def restarts_used(self) -> int:
        return self._restarts_used

    @property
    def since(self) -> float:
        """Where the face's clock runs from (it only runs while no worker is ready)."""
        return self._since

    def is_live(self, worker: int) -> bool:
        return worker in self._live

    def is_ready(self, worker: int) -> bool:
        return worker in self._ready

    def next_deadline(self) -> float | None:
        """The earliest time at which a `Tick` could change anything; None: none could."""
        due = [d for d in self._live.values() if d is not None]
        if not self._ready:
            due.append(self._since + self._config.start_timeout_s)
        return min(due, default=None)

    # --- driving ----------------------------------------------------------------------

    def start(self, now: float) -> None:
        """(Re)start the clocks of the first workers and of the face, at `now`."""
        self._since = now
        if self._config.time_first_starts:
            timeout = self._config.start_timeout_s
            for worker in self._live:
                if worker not in self._ready:
                    self._live[worker] = now + timeout

    def handle(self, event: SupervisorEvent, now: float, *, replace: bool = True) -> list[Supervision]:
        """Apply one event; what to carry out, in order. `replace=False`: whatever this event
        retires is not replaced (the budget is not touched)."""
        if isinstance(event, Tick):
            return self._on_tick(now, replace)
        if isinstance(event, WorkerReady):
            if event.worker in self._live:
                self._ready.add(event.worker)
                self._live[event.worker] = None
            return []
        if isinstance(event, WorkerFailed):
            if event.worker not in self._live:
                return []
            error = event.error
            return self._retire(event.worker, f"{error.kind}: {error.message}", now, replace=replace,
                                stop=True, error=error)
        if isinstance(event, WorkerLost):
            if event.worker not in self._live:
                return []
            return self._retire(event.worker, event.reason, now, replace=replace, stop=False)
        raise TypeError(f"not a supervisor event: {event!r}")

    # --- mechanics --------------------------------------------------------------------

    def _on_tick(self, now: float, replace: bool) -> list[Supervision]:
        timeout = self._config.start_timeout_s
        if not self._ready and now - self._since >= timeout:
            return [NotReady(timeout, self._since)]
        out: list[Supervision] = []
        for worker, deadline in list(self._live.items()):
            if deadline is not None and now >= deadline and worker in self._live:
                reason = f"worker {worker} was not ready {timeout:g} s after its start"
                out.extend(self._retire(worker, reason, now, replace=replace, stop=True, timed_out=True))
        return out

    def _retire(
        self,
        worker: int,
        reason: str,
        now: float,
        *,
        replace: bool,
        stop: bool,
        error: ErrorInfo | None = None,
        timed_out: bool = False,
    ) -> list[Supervision]:
        out: list[Supervision] = [StopWorker(worker)] if stop else []
        was_ready = worker in self._ready
        del self._live[worker]
        self._ready.discard(worker)
        if not self._ready and not timed_out:
            # A reported loss left none ready: the replacement gets the whole timeout.
            self._since = now
        replacement: int | None = None
        fatal = error is not None and error.fatal
        if replace and not fatal and self._restarts_used < self._config.max_restarts:
            self._restarts_used += 1
            self._max_id += 1
            replacement = self._max_id
            self._live[replacement] = now + self._config.start_timeout_s
        out.append(Retired(worker, reason, was_ready, error, timed_out, replacement))
        if replacement is not None:
            out.append(StartWorker(replacement))
        return out
