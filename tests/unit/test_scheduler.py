"""The scheduler state machine, driven by scripted events and by a small simulator.

No processes and no sleeps: time is a number passed to each call.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distinfer.errors import ErrorInfo, JobFailedError, WorkersNotReadyError
from distinfer.scheduling import (
    Action,
    Assign,
    BlockDone,
    BlockFailed,
    BlockStarted,
    Cancel,
    Event,
    Finish,
    Scheduler,
    SchedulerConfig,
    StartWorker,
    StopWorker,
    Tick,
    WorkerFailed,
    WorkerLost,
    WorkerReady,
)

# --- helpers -----------------------------------------------------------------------------


def make(
    n_blocks: int = 6,
    workers: Sequence[int] = (0, 1),
    rows: int = 100,
    now: float = 0.0,
    **config: float,
) -> Scheduler:
    sched = Scheduler(
        {b: rows for b in range(n_blocks)},
        list(workers),
        SchedulerConfig(**config),  # type: ignore[arg-type]
        now=now,
    )
    assert sched.start(now) == []
    return sched


def feed(sched: Scheduler, *events: Event, now: float = 0.0) -> list[Action]:
    actions: list[Action] = []
    for event in events:
        actions.extend(sched.handle(event, now))
    return actions


def check_invariants(sched: Scheduler) -> None:
    """Every block is in exactly one place: pending, one live worker's queue, or done."""
    queued = [b for w in sched.live_workers for b in sched.queue(w)]
    assert len(queued) == len(set(queued))
    assert not any(sched.is_done(b) for b in queued)
    assert len(queued) + sched.pending_blocks + sched.done_blocks == sched.total_blocks
    for w in sched.live_workers:
        assert len(sched.queue(w)) <= sched.config.prefetch
    if not sched.finished:  # one queue per worker the supervisor holds, in start order
        assert sched.live_workers == sched.supervisor.live_workers


FATAL = ErrorInfo("ModelInputError", "column 'text' is missing", fatal=True)
TRANSIENT = ErrorInfo("RuntimeError", "CUDA error: an illegal memory access", fatal=False)


# --- simulator ---------------------------------------------------------------------------


class Sim:
    """Workers with fixed speeds (rows/s); messages arrive at once; time jumps to the next
    completion. Each worker runs its queue in order and reports BlockStarted/BlockDone."""

    def __init__(
        self,
        blocks: Mapping[int, int],
        speeds: Sequence[float],
        config: SchedulerConfig | None = None,
        *,
        startup_s: float = 0.0,
        replacement_speed: float = 100.0,
        kills: Iterable[tuple[float, int]] = (),
    ) -> None:
        self.blocks = dict(blocks)
        workers = list(range(len(speeds)))
        self.sched = Scheduler(self.blocks, workers, config or SchedulerConfig(), now=0.0)
        self.speed = dict(enumerate(speeds))
        self.startup_s = startup_s
        self.replacement_speed = replacement_speed
        self.queue: dict[int, deque[int]] = {w: deque() for w in workers}
        self.running: dict[int, int | None] = dict.fromkeys(workers)
        self.alive: set[int] = set(workers)
        self.heap: list[tuple[float, int, str, int, int]] = []
        self.seq = itertools.count()
        self.now = 0.0
        self.log: list[tuple[float, Event, list[Action]]] = []
        self.done_count: Counter[int] = Counter()
        self.rows_by_worker: Counter[int] = Counter()
        self.result: Finish | None = None
        for w in workers:
            self._push(startup_s, "ready", w)
        for t, w in kills:
            self._push(t, "kill", w)

    def _push(self, t: float, kind: str, worker: int, block: int = -1) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), kind, worker, block))

    def _feed(self, event: Event) -> None:
        actions = self.sched.handle(event, self.now)
        self.log.append((self.now, event, actions))
        self._apply(actions)

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            assert self.result is None, "action after Finish"
            if isinstance(action, Assign):
                assert action.worker in self.alive
                self.queue[action.worker].append(action.block)
            elif isinstance(action, Cancel):
                # A worker that already started the block just carries on.
                if action.block in self.queue[action.worker]:
                    self.queue[action.worker].remove(action.block)
            elif isinstance(action, StartWorker):
                w = action.worker
                assert w not in self.speed, "worker id reused"
                self.speed[w] = self.replacement_speed
                self.queue[w] = deque()
                self.running[w] = None
                self.alive.add(w)
                self._push(self.now + self.startup_s, "ready", w)
            elif isinstance(action, StopWorker):
                self.alive.discard(action.worker)
            else:
                self.result = action

    def _start_idle(self) -> None:
        for w in sorted(self.alive):
            if self.result is None and self.running[w] is None and self.queue[w]:
                block = self.queue[w].popleft()
                self.running[w] = block
                self._push(self.now + self.blocks[block] / self.speed[w], "done", w, block)
                self._feed(BlockStarted(w, block))

    def run(self) -> Finish:
        self._apply(self.sched.start(0.0))
        while self.result is None:
            assert self.heap, "simulation stalled with work left"
            self.now, _, kind, w, block = heapq.heappop(self.heap)
            if kind == "ready" and w in self.alive:
                self._feed(WorkerReady(w))
            elif kind == "done" and w in self.alive and self.running[w] == block:
                self.running[w] = None
                self.done_count[block] += 1
                self.rows_by_worker[w] += self.blocks[block]
                self._feed(BlockDone(w, block))
            elif kind == "kill" and w in self.alive:
                self.alive.discard(w)
                self.running[w] = None
                self._feed(WorkerLost(w, "killed by the test"))
            check_invariants(self.sched)
            self._start_idle()
        return self.result


def uniform(n_blocks: int, rows: int = 100) -> dict[int, int]:
    return {b: rows for b in range(n_blocks)}


# --- config and construction -------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prefetch": 0},
        {"max_restarts": -1},
        {"max_block_attempts": 0},
        {"start_timeout_s": 0.0},
        {"start_timeout_s": float("nan")},
    ],
)
def test_config_out_of_range_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(**kwargs)  # type: ignore[arg-type]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        Scheduler({0: -1}, [0], SchedulerConfig(), now=0.0)
    with pytest.raises(ValueError, match="unique"):
        Scheduler({0: 1}, [0, 0], SchedulerConfig(), now=0.0)
    with pytest.raises(ValueError, match="no workers"):
        Scheduler({0: 1}, [], SchedulerConfig(), now=0.0)


def test_empty_job_finishes_at_start_and_stops_the_workers() -> None:
    sched = Scheduler({}, [3, 1], SchedulerConfig(), now=0.0)
    assert sched.start(0.0) == [StopWorker(3), StopWorker(1), Finish(None)]
    assert sched.finished and sched.error is None
    assert sched.handle(WorkerReady(3), 1.0) == []
    assert sched.start(1.0) == []


def test_empty_job_finishes_on_first_handle_without_start() -> None:
    sched = Scheduler({}, [0], SchedulerConfig(), now=0.0)
    assert sched.handle(WorkerReady(0), 0.0) == [StopWorker(0), Finish(None)]
    assert Scheduler({}, [], SchedulerConfig(), now=0.0).start(0.0) == [Finish(None)]


def test_handle_before_start_starts_implicitly() -> None:
    sched = Scheduler(uniform(3), [0], SchedulerConfig(), now=0.0)
    assert sched.handle(WorkerReady(0), 0.0) == [Assign(0, 0), Assign(0, 1)]


# --- the common path ---------------------------------------------------------------------


def test_worked_example_from_the_design_note() -> None:
    sched = Scheduler({0: 100, 1: 100, 2: 100, 3: 50}, [0, 1], SchedulerConfig(), now=0.0)
    script: list[tuple[Event, list[Action]]] = [
        (WorkerReady(0), [Assign(0, 0), Assign(0, 1)]),
        (WorkerReady(1), [Assign(1, 2), Assign(1, 3)]),
        (BlockStarted(0, 0), []),
        (BlockStarted(1, 2), []),
        (WorkerLost(1, "killed"), [StartWorker(2)]),
        (BlockDone(0, 0), [Assign(0, 2)]),
        (WorkerReady(2), [Assign(2, 3)]),
        (BlockStarted(0, 1), []),
        (BlockDone(2, 3), [Cancel(0, 2), Assign(2, 2)]),
        (BlockStarted(2, 2), []),
        (BlockDone(0, 1), []),
        (BlockDone(2, 2), [StopWorker(0), StopWorker(2), Finish(None)]),
    ]
    assert sched.start(0.0) == []
    for event, expected in script:
        assert sched.handle(event, 1.0) == expected, event
        check_invariants(sched)
    assert sched.attempts(2) == 1 and sched.attempts(3) == 0
    assert sched.done_rows == sched.total_rows == 350


def test_blocks_go_out_in_order_and_queues_are_topped_up_to_prefetch() -> None:
    sched = make(10, workers=[0, 1], prefetch=3)
    assert feed(sched, WorkerReady(1)) == [Assign(1, 0), Assign(1, 1), Assign(1, 2)]
    assert feed(sched, WorkerReady(0)) == [Assign(0, 3), Assign(0, 4), Assign(0, 5)]
    assert feed(sched, BlockStarted(1, 0), BlockDone(1, 0)) == [Assign(1, 6)]
    assert sched.queue(1) == (1, 2, 6)
    assert sched.pending_blocks == 3 and sched.done_blocks == 1 and sched.done_rows == 100
    # A worker reporting blocks out of order is still topped up.
    assert feed(sched, BlockDone(0, 5)) == [Assign(0, 7)]
    assert sched.queue(0) == (3, 4, 7)


def test_job_finishes_when_every_block_is_done() -> None:
    sched = make(2, workers=[0, 1], prefetch=1)
    feed(sched, WorkerReady(0), WorkerReady(1), BlockStarted(0, 0), BlockStarted(1, 1))
    assert feed(sched, BlockDone(0, 0)) == []
    assert feed(sched, BlockDone(1, 1)) == [StopWorker(0), StopWorker(1), Finish(None)]
    assert sched.finished and sched.error is None
    assert feed(sched, BlockDone(1, 1), Tick(), WorkerLost(0, "x")) == []


def test_events_from_unknown_workers_are_ignored() -> None:
    sched = make(4)
    feed(sched, WorkerReady(0))
    assert feed(sched, WorkerReady(9), BlockStarted(9, 0), WorkerLost(9, "?")) == []
    assert feed(sched, BlockFailed(9, 0, FATAL), WorkerFailed(9, FATAL)) == []
    assert feed(sched, BlockStarted(1, 0)) == []  # known but does not own it
    assert not sched.finished
    check_invariants(sched)


def test_unknown_event_type_is_a_type_error() -> None:
    sched = make(1)
    with pytest.raises(TypeError):
        sched.handle(Assign(0, 0), 0.0)  # type: ignore[arg-type]


# --- stealing ----------------------------------------------------------------------------


def test_tail_stealing_takes_a_not_started_block_from_the_fullest_worker() -> None:
    sched = Scheduler({0: 10, 1: 10, 2: 10, 3: 50, 4: 10}, [0, 1, 2], SchedulerConfig(), 0.0)
    sched.start(0.0)
    feed(sched, WorkerReady(0), WorkerReady(1), WorkerReady(2))
    assert sched.queue(0) == (0, 1) and sched.queue(1) == (2, 3) and sched.queue(2) == (4,)
    feed(sched, BlockStarted(0, 0), BlockStarted(1, 2), BlockStarted(2, 4))
    # Worker 1 has the most not-started rows (block 3, 50 rows).
    assert feed(sched, BlockDone(2, 4)) == [Cancel(1, 3), Assign(2, 3)]
    assert sched.queue(1) == (2,) and sched.queue(2) == (3,)
    check_invariants(sched)


def test_a_started_block_is_never_stolen() -> None:
    sched = make(3, workers=[0, 1])
    feed(sched, WorkerReady(0), WorkerReady(1))  # 0: [0, 1], 1: [2]
    feed(sched, BlockStarted(0, 0), BlockStarted(1, 2))
    assert feed(sched, BlockDone(1, 2)) == [Cancel(0, 1), Assign(1, 1)]
    feed(sched, BlockStarted(1, 1))
    # Worker 0 runs dry: the only block left (1, on worker 1) is started, so no steal.
    assert feed(sched, BlockDone(0, 0)) == []
    assert sched.queue(0) == () and sched.queue(1) == (1,)


def test_without_block_started_the_head_is_stealable() -> None:
    sched = make(3, workers=[0, 1], prefetch=1)
    feed(sched, WorkerReady(0), WorkerReady(1))  # 0: [0], 1: [1]
    assert feed(sched, BlockDone(1, 1)) == [Assign(1, 2)]
    assert feed(sched, BlockStarted(1, 2), BlockDone(1, 2)) == [Cancel(0, 0), Assign(1, 0)]


def test_victim_that_runs_dry_steals_its_block_back() -> None:
    # Race: worker 0 started block 1 before the Cancel reached it.
    sched = make(3, workers=[0, 1])
    feed(sched, WorkerReady(0), WorkerReady(1), BlockStarted(0, 0), BlockStarted(1, 2))
    assert feed(sched, BlockDone(1, 2)) == [Cancel(0, 1), Assign(1, 1)]
    assert feed(sched, BlockStarted(0, 1)) == []  # no longer its block: ignored
    # Worker 1 has not reported starting block 1, so the now idle worker 0 takes it back.
    assert feed(sched, BlockDone(0, 0)) == [Cancel(1, 1), Assign(0, 1)]
    assert feed(sched, BlockStarted(1, 1)) == []
    # Worker 1 finished it anyway: a non-owner's BlockDone counts.
    assert feed(sched, BlockDone(1, 1)) == [StopWorker(0), StopWorker(1), Finish(None)]


def test_block_done_by_non_owner_after_owner_started_it_sends_no_cancel() -> None:
    sched = make(4, workers=[0, 1])
    feed(sched, WorkerReady(0), WorkerReady(1), BlockStarted(0, 0), BlockStarted(1, 2))
    assert feed(sched, BlockDone(1, 2), BlockStarted(1, 3)) == []
    assert feed(sched, BlockDone(1, 3)) == [Cancel(0, 1), Assign(1, 1)]
    feed(sched, BlockStarted(1, 1))
    # Worker 0 finishes block 1 anyway (it had started before the Cancel): accepted, and
    # the owner, which started it too, gets no Cancel.
    actions = feed(sched, BlockDone(0, 1))
    assert actions == []
    assert sched.is_done(1) and sched.queue(1) == ()
    assert feed(sched, BlockDone(1, 1)) == []  # the duplicate: ignored
    assert feed(sched, BlockDone(0, 0)) == [StopWorker(0), StopWorker(1), Finish(None)]


# --- duplicates and late messages --------------------------------------------------------


def test_duplicate_block_done_is_ignored() -> None:
    sched = make(4, workers=[0])
    feed(sched, WorkerReady(0))
    assert feed(sched, BlockDone(0, 0)) == [Assign(0, 2)]
    assert feed(sched, BlockDone(0, 0)) == []
    assert sched.done_blocks == 1 and sched.done_rows == 100
    assert feed(sched, BlockDone(0, 99)) == []  # unknown block


def test_late_block_done_from_a_lost_worker_is_accepted_once() -> None:
    sched = make(4, workers=[0, 1])
    feed(sched, WorkerReady(0), WorkerReady(1), BlockStarted(0, 0), BlockStarted(1, 2))
    feed(sched, WorkerLost(0, "connection reset"))  # blocks 0, 1 pending again
    assert sched.pending_blocks == 2
    # Its output was written before it died: block 0 counts, and leaves pending.
    assert feed(sched, BlockDone(0, 0)) == []
    assert sched.is_done(0) and sched.pending_blocks == 1
    assert feed(sched, BlockDone(0, 0)) == []
    assert feed(sched, BlockDone(1, 2)) == [Assign(1, 1)]
    check_invariants(sched)


def test_late_block_done_from_a_lost_worker_for_a_reassigned_block_cancels_it() -> None:
    sched = make(2, workers=[0, 1], prefetch=1)
    feed(sched, WorkerReady(0), WorkerReady(1), BlockStarted(0, 0), BlockStarted(1, 1))
    assert feed(sched, WorkerLost(0, "killed")) == [StartWorker(2)]
    assert feed(sched, WorkerReady(2)) == [Assign(2, 0)]
    assert feed(sched, BlockDone(0, 0)) == [Cancel(2, 0)]
    assert sched.queue(2) == ()


# --- worker loss -------------------------------------------------------------------------


def test_lost_worker_blocks_return_to_the_front_in_order_and_idle_workers_get_them() -> None:
    sched = make(8, workers=[0, 1, 2], prefetch=3)
    feed(sched, WorkerReady(0), WorkerReady(1))  # 0: [0, 1, 2], 1: [3, 4, 5]; 6, 7 pending
    feed(sched, BlockStarted(0, 0), BlockStarted(1, 3))
    assert feed(sched, WorkerLost(0, "segfault")) == [StartWorker(3)]
    assert sched.pending_blocks == 5
    assert sched.attempts(0) == 1 and sched.attempts(1) == 0
    # Worker 2 (still starting) becomes ready: it gets the returned blocks first, in order.
    assert feed(sched, WorkerReady(2)) == [Assign(2, 0), Assign(2, 1), Assign(2, 2)]
    assert feed(sched, BlockDone(1, 3)) == [Assign(1, 6)]
    check_invariants(sched)


def test_loss_tops_up_idle_workers_immediately_round_robin() -> None:
    sched = make(5, workers=[0, 1, 2])
    feed(sched, WorkerReady(0), WorkerReady(1), WorkerReady(2))  # 0: [0,1] 1: [2,3] 2: [4]
    feed(sched, BlockStarted(0, 0), BlockStarted(1, 2), BlockStarted(2, 4))
    feed(sched, BlockDone(1, 2), BlockStarted(1, 3), BlockDone(1, 3))  # 1 steals 1 from 0
    feed(sched, BlockStarted(1, 1), BlockDone(2, 4))  # 2 idles: nothing stealable
    assert sched.queue(2) == () and sched.queue(0) == (0,) and sched.queue(1) == (1,)
    # Worker 0 dies: its block 0 goes straight to the idle worker 2, not behind worker 1.
    assert feed(sched, WorkerLost(0, "oom")) == [StartWorker(3), Assign(2, 0)]


def test_replacement_ids_continue_after_the_largest_id_ever_seen() -> None:
    sched = make(6, workers=[5, 2], max_restarts=3)
    feed(sched, WorkerReady(5), WorkerReady(2))
    assert feed(sched, WorkerLost(2, "a"))[0] == StartWorker(6)
    assert feed(sched, WorkerLost(6, "b"))[0] == StartWorker(7)
    assert feed(sched, WorkerLost(5, "c"))[0] == StartWorker(8)
    assert sched.restarts_used == 3
    assert sched.live_workers == (7, 8) and sched.ready_workers == ()


def test_restarts_exhausted_finishes_with_the_last_reason() -> None:
    sched = make(4, workers=[0, 1], max_restarts=1)
    feed(sched, WorkerReady(0), WorkerReady(1))
    assert feed(sched, WorkerLost(0, "signal 9")) == [StartWorker(2)]
    assert feed(sched, WorkerLost(2, "signal 11")) == []  # worker 1 is still alive
    actions = feed(sched, WorkerLost(1, "CUDA out of memory"))
    assert len(actions) == 1 and isinstance(actions[0], Finish)
    error = actions[0].error
    assert error is not None and error.fatal and error.kind == "JobFailedError"
    assert error.message.startswith("all workers were lost (last: CUDA out of memory)")
    assert sched.finished and sched.error == error


def test_worker_failed_non_fatal_stops_and_replaces_it() -> None:
    sched = make(4, workers=[0, 1])
    feed(sched, WorkerReady(0))
    assert feed(sched, WorkerFailed(1, TRANSIENT)) == [StopWorker(1), StartWorker(2)]
    assert sched.live_workers == (0, 2)


def test_worker_failed_fatal_finishes_with_its_error() -> None:
    sched = make(4, workers=[0, 1])
    feed(sched, WorkerReady(0))
    error = ErrorInfo("ModelError", "no model named 'bert-tiny'", fatal=True)
    assert feed(sched, WorkerFailed(1, error)) == [StopWorker(0), StopWorker(1), Finish(error)]


def test_poison_block_fails_the_job_after_max_block_attempts() -> None:
    sched = make(4, workers=[0, 1], max_restarts=10, max_block_attempts=3)
    feed(sched, WorkerReady(0), WorkerReady(1))  # 0: [0, 1], 1: [2, 3]
    killer = 2
    owner = 1
    for attempt in range(1, 4):
        feed(sched, BlockStarted(owner, killer))
        actions = feed(sched, WorkerLost(owner, f"segfault #{attempt}"))
        if attempt < 3:
            new = actions[0]
            assert isinstance(new, StartWorker)
            assert feed(sched, WorkerReady(new.worker)) == [
                Assign(new.worker, 2),
                Assign(new.worker, 3),
            ]
            owner = new.worker
    assert actions[:-1] == [StopWorker(0)]  # 1, 2, 3 are dead
    finish = actions[-1]
    assert isinstance(finish, Finish) and finish.error is not None
    assert finish.error.kind == "JobFailedError" and finish.error.fatal
    assert finish.error.message.startswith(
        "block 2 (rows 200-299) was in flight on 3 workers that died (last: segfault #3)"
    )


def test_the_head_of_a_lost_queue_counts_as_in_flight_even_without_block_started() -> None:
    sched = make(2, workers=[0, 1], max_block_attempts=1)
    feed(sched, WorkerReady(0))
    actions = feed(sched, WorkerLost(0, "killed"))
    finish = actions[-1]
    assert isinstance(finish, Finish) and finish.error is not None
    assert "block 0 (rows 0-99)" in finish.error.message
    assert actions[:-1] == [StopWorker(1)]  # no restart wasted on a failing job


# --- block failures ----------------------------------------------------------------------


def test_fatal_block_failure_finishes_with_that_error() -> None:
    sched = make(4, workers=[0, 1])
    feed(sched, WorkerReady(0), WorkerReady(1))
    assert feed(sched, BlockFailed(1, 3, FATAL)) == [StopWorker(0), StopWorker(1), Finish(FATAL)]
    assert sched.error == FATAL


def test_non_fatal_block_failure_is_retried_first() -> None:
    sched = make(6, workers=[0, 1])
    feed(sched, WorkerReady(0), WorkerReady(1), BlockStarted(0, 0))  # 0: [0, 1]; 1: [2, 3]
    assert feed(sched, BlockFailed(0, 0, TRANSIENT)) == [Assign(0, 0)]
    assert sched.queue(0) == (1, 0) and sched.attempts(0) == 1
    assert sched.live_workers == (0, 1)
    # The next free slot anywhere takes the pending blocks in order.
    assert feed(sched, BlockDone(1, 2)) == [Assign(1, 4)]
    check_invariants(sched)


def test_failed_block_goes_to_an_idle_worker_at_the_tail() -> None:
    sched = make(3, workers=[0, 1])
    feed(sched, WorkerReady(0), WorkerReady(1), BlockStarted(0, 0), BlockStarted(1, 2))
    feed(sched, BlockDone(1, 2))  # steals 1 from 0
    feed(sched, BlockStarted(1, 1), BlockDone(1, 1))
    assert sched.queue(1) == ()
    assert feed(sched, BlockFailed(0, 0, TRANSIENT)) == [Assign(0, 0)]


def test_block_failing_max_block_attempts_times_fails_the_job() -> None:
    sched = make(2, workers=[0], max_block_attempts=2)
    feed(sched, WorkerReady(0))
    assert feed(sched, BlockFailed(0, 1, TRANSIENT)) == [Assign(0, 1)]
    error = ErrorInfo("RuntimeError", "NaN in output", fatal=False, traceback="tb")
    actions = feed(sched, BlockFailed(0, 1, error))
    assert actions[:-1] == [StopWorker(0)]
    finish = actions[-1]
    assert isinstance(finish, Finish) and finish.error is not None
    assert finish.error.message == (
        "block 1 (rows 100-199) failed 2 times; last error: RuntimeError: NaN in output"
    )
    assert finish.error.traceback == "tb" and finish.error.fatal


def test_non_fatal_failure_from_a_non_owner_is_ignored() -> None:
    sched = make(4, workers=[0, 1])
    feed(sched, WorkerReady(0), WorkerReady(1))
    assert feed(sched, BlockFailed(1, 0, TRANSIENT)) == []
    assert sched.attempts(0) == 0


# --- start timeout -----------------------------------------------------------------------


def test_start_timeout_when_no_worker_becomes_ready() -> None:
    sched = make(4, workers=[0, 1], now=100.0, start_timeout_s=60.0)
    assert sched.handle(Tick(), 159.9) == []
    actions = sched.handle(Tick(), 160.0)
    assert actions[:-1] == [StopWorker(0), StopWorker(1)]
    finish = actions[-1]
    assert isinstance(finish, Finish) and finish.error is not None
    assert finish.error.message.startswith("no worker became ready within 60 s;")


def test_start_timeout_does_not_fire_while_a_worker_is_ready() -> None:
    sched = make(4, workers=[0, 1], start_timeout_s=60.0)
    sched.handle(WorkerReady(0), 10.0)
    assert sched.handle(Tick(), 1000.0) == []
    # Losing the last ready worker restarts the clock for its replacement.
    assert sched.handle(WorkerLost(0, "x"), 1000.0) == [StartWorker(2)]
    assert sched.handle(Tick(), 1059.0) == []
    assert isinstance(sched.handle(Tick(), 1060.0)[-1], Finish)


def test_start_timeout_finishes_with_a_workers_not_ready_error() -> None:
    sched = make(4, workers=[0, 1], start_timeout_s=60.0)
    finish = sched.handle(Tick(), 60.0)[-1]
    assert isinstance(finish, Finish) and finish.error is not None
    assert finish.error.kind == "WorkersNotReadyError" and finish.error.fatal
    exc = finish.error.to_exception()
    assert isinstance(exc, WorkersNotReadyError) and isinstance(exc, JobFailedError)
    assert str(exc).startswith("no worker became ready within 60 s;")


def test_a_replacement_that_never_becomes_ready_is_stopped_and_replaced() -> None:
    sched = make(4, workers=[0, 1], start_timeout_s=60.0)
    feed(sched, WorkerReady(0), WorkerReady(1), now=1.0)
    assert sched.handle(WorkerLost(1, "killed"), 100.0) == [StartWorker(2)]
    assert sched.handle(Tick(), 159.9) == []
    assert sched.handle(Tick(), 160.0) == [StopWorker(2), StartWorker(3)]
    assert sched.live_workers == (0, 3) and sched.restarts_used == 2
    assert sched.handle(WorkerReady(2), 161.0) == []  # late: it was stopped
    assert sched.handle(WorkerReady(3), 170.0) == [Assign(3, 2), Assign(3, 3)]
    check_invariants(sched)


def test_a_timed_out_replacement_that_was_the_last_worker_fails_the_job() -> None:
    sched = make(4, workers=[0, 1], start_timeout_s=60.0, max_restarts=1)
    feed(sched, WorkerReady(0), WorkerReady(1), now=1.0)
    assert sched.handle(WorkerLost(1, "killed"), 10.0) == [StartWorker(2)]
    assert sched.handle(WorkerLost(0, "killed too"), 50.0) == []  # the budget is spent
    actions = sched.handle(Tick(), 70.0)  # 2's own start ran out before the job's clock (110)
    assert actions[0] == StopWorker(2)
    finish = actions[-1]
    assert isinstance(finish, Finish) and finish.error is not None
    assert finish.error.message.startswith(
        "all workers were lost (last: worker 2 was not ready 60 s after its start)"
    )


def test_failures_that_end_the_job_start_no_replacement() -> None:
    poisoned = make(2, workers=[0, 1], max_block_attempts=1)
    feed(poisoned, WorkerReady(0))
    assert isinstance(feed(poisoned, WorkerLost(0, "killed"))[-1], Finish)
    assert poisoned.restarts_used == 0
    fatal = make(2, workers=[0, 1])
    assert isinstance(feed(fatal, WorkerFailed(1, FATAL))[-1], Finish)
    assert fatal.restarts_used == 0


# --- simulated jobs ----------------------------------------------------------------------


def test_sim_every_block_done_exactly_once() -> None:
    blocks = {b: 50 + (b * 37) % 200 for b in range(300)}
    sim = Sim(blocks, [100.0, 150.0, 80.0, 300.0], SchedulerConfig(prefetch=3))
    assert sim.run() == Finish(None)
    assert sim.done_count == Counter(dict.fromkeys(blocks, 1))
    assert sim.sched.done_rows == sum(blocks.values())
    assert sim.alive == set()  # every worker got a StopWorker


def test_sim_uneven_speeds_balance() -> None:
    blocks = uniform(200, rows=100)
    sim = Sim(blocks, [100.0, 400.0])  # 1x and 4x
    assert sim.run() == Finish(None)
    slow, fast = sim.rows_by_worker[0], sim.rows_by_worker[1]
    assert 3.5 <= fast / slow <= 4.5
    ideal = sum(blocks.values()) / 500.0
    slow_block_s = 100 / 100.0
    assert ideal <= sim.now <= ideal + 2 * slow_block_s
    assert sim.done_count == Counter(dict.fromkeys(blocks, 1))


def test_sim_worker_loss_mid_job() -> None:
    blocks = uniform(100)
    sim = Sim(blocks, [100.0, 100.0, 100.0], startup_s=5.0, kills=[(20.0, 1)])
    assert sim.run() == Finish(None)
    assert sim.sched.restarts_used == 1
    assert sim.rows_by_worker[3] > 0  # the replacement did work
    assert sim.done_count == Counter(dict.fromkeys(blocks, 1))
    lost = next(e for _, e, _ in sim.log if isinstance(e, WorkerLost))
    assert lost.worker == 1


def test_sim_restarts_exhausted() -> None:
    sim = Sim(
        uniform(100),
        [100.0],
        SchedulerConfig(max_restarts=2),
        kills=[(10.0, 0), (20.0, 1), (30.0, 2)],
    )
    result = sim.run()
    assert result.error is not None
    assert "all workers were lost (last: killed by the test)" in result.error.message
    assert sim.sched.restarts_used == 2


def test_sim_is_deterministic() -> None:
    def run() -> list[tuple[float, Event, list[Action]]]:
        sim = Sim(
            {b: 10 + b % 7 * 30 for b in range(150)},
            [100.0, 250.0, 60.0],
            SchedulerConfig(prefetch=3),
            startup_s=2.0,
            kills=[(5.0, 2), (12.0, 0)],
        )
        sim.run()
        return sim.log

    first, second = run(), run()
    assert first == second
    assert sum(isinstance(e, WorkerLost) for _, e, _ in first) == 2
    assert any(isinstance(a, Cancel) for _, _, actions in first for a in actions)


# --- property: random (even nonsensical) event streams keep the books straight ------------


_events = st.lists(
    st.one_of(
        st.builds(WorkerReady, st.integers(0, 6)),
        st.builds(BlockStarted, st.integers(0, 6), st.integers(0, 9)),
        st.builds(BlockDone, st.integers(0, 6), st.integers(0, 9)),
        st.builds(BlockFailed, st.integers(0, 6), st.integers(0, 9), st.sampled_from([TRANSIENT])),
        st.builds(WorkerLost, st.integers(0, 6), st.just("lost")),
        st.builds(WorkerFailed, st.integers(0, 6), st.just(TRANSIENT)),
        st.builds(Tick),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(_events, st.integers(1, 3))
def test_random_event_streams_keep_invariants(events: list[Event], prefetch: int) -> None:
    sched = make(10, workers=[0, 1, 2], prefetch=prefetch, max_block_attempts=4)
    finished = False
    for i, event in enumerate(events):
        actions = sched.handle(event, float(i))
        if finished:
            assert actions == []
        for action in actions:
            assert not finished, "nothing may follow Finish"
            if isinstance(action, Assign):
                assert action.worker in sched.ready_workers
            if isinstance(action, Finish):
                finished = True
        check_invariants(sched)
    assert sched.finished == finished
    if finished and sched.error is None:
        assert sched.done_blocks == 10
