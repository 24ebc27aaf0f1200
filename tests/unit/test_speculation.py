"""Speculation at the tail, over the pure scheduler: the policy (`pick_speculation`) alone, then
whole jobs driven in simulated time with one worker five times slower than the others."""

from __future__ import annotations

import heapq
from collections import deque

import pytest

from distinfer.scheduling import (
    Assign,
    BlockDone,
    BlockStarted,
    Cancel,
    Finish,
    Scheduler,
    SchedulerConfig,
    StopWorker,
    Tick,
    WorkerReady,
)
from distinfer.scheduling.scheduler import Running, pick_speculation

# typical: 0.1 s a row, so 10 s for a block of 100 rows
PER_ROW = 0.1


def test_a_block_on_a_much_slower_worker_is_copied_when_the_copy_ends_first() -> None:
    slow = Running(block=7, rows=100, started=0.0, worker_rate=2.0)  # 50 s: 5x the typical 10 s
    assert pick_speculation([slow], now=1.0, idle_rate=10.0, per_row_s=PER_ROW, multiplier=3) == 7
    # the copy would end at 1 + 100 / 1.5 = 67.7 s, after the original's 50 s
    assert pick_speculation([slow], now=1.0, idle_rate=1.5, per_row_s=PER_ROW, multiplier=3) is None
    # an idle worker with no rate yet is taken as typical: 11 s
    assert pick_speculation([slow], now=1.0, idle_rate=None, per_row_s=PER_ROW, multiplier=3) == 7


def test_a_worker_a_little_slower_is_left_alone() -> None:
    meh = Running(block=1, rows=100, started=0.0, worker_rate=5.0)  # 20 s: 2x typical, under 3x
    assert pick_speculation([meh], now=1.0, idle_rate=10.0, per_row_s=PER_ROW, multiplier=3) is None
    assert pick_speculation([], now=1.0, idle_rate=10.0, per_row_s=PER_ROW, multiplier=3) is None


def test_a_late_block_is_copied_and_the_one_ending_last_comes_first() -> None:
    # worker rates say 10 s, but it has run for 31 s: stuck (SIGSTOP, swapping): ends "never"
    stuck = Running(block=3, rows=100, started=0.0, worker_rate=10.0)
    slow = Running(block=4, rows=100, started=20.0, worker_rate=2.0)  # ends at 70 s
    assert pick_speculation([stuck], now=25.0, idle_rate=10.0, per_row_s=PER_ROW, multiplier=3) is None
    assert pick_speculation([stuck], now=31.0, idle_rate=10.0, per_row_s=PER_ROW, multiplier=3) == 3
    assert pick_speculation([slow, stuck], now=31.0, idle_rate=10.0, per_row_s=PER_ROW, multiplier=3) == 3
    fast_slow = Running(block=5, rows=100, started=20.0, worker_rate=1.0)  # ends at 120 s
    assert pick_speculation([slow, fast_slow], now=31.0, idle_rate=10.0, per_row_s=PER_ROW, multiplier=3) == 5


def _run(speculation: bool, blocks: int = 30, slow_factor: float = 5.0) -> tuple[Scheduler, float, list[int]]:
    """A job of `blocks` 100-row blocks on workers 0-2 in simulated time, worker 2 `slow_factor`
    times slower; a Cancel drops a queued block, a running one runs to its end. Returns the
    scheduler, the makespan and every block each BlockDone reported."""
    seconds = {0: 100 * PER_ROW, 1: 100 * PER_ROW, 2: 100 * PER_ROW * slow_factor}
    sched = Scheduler({b: 100 for b in range(blocks)}, [0, 1, 2],
                      SchedulerConfig(speculation=speculation), now=0.0)  # fmt: skip
    sched.start(0.0)
    queues: dict[int, deque[int]] = {w: deque() for w in seconds}
    running: dict[int, int | None] = dict.fromkeys(seconds)
    heap: list[tuple[float, int, int]] = []
    done: list[int] = []
    stopped: set[int] = set()
    now = 0.0

    def act(actions: list) -> bool:  # type: ignore[type-arg]
        finished = False
        for a in actions:
            if isinstance(a, Assign):
                queues[a.worker].append(a.block)
            elif isinstance(a, Cancel) and a.block in queues[a.worker]:
                queues[a.worker].remove(a.block)
            elif isinstance(a, StopWorker):
                stopped.add(a.worker)
            elif isinstance(a, Finish):
                assert a.error is None
                finished = True
        for w in seconds:
            if running[w] is None and queues[w] and w not in stopped:
                block = queues[w].popleft()
                running[w] = block
                heapq.heappush(heap, (now + seconds[w], w, block))
                finished |= act(sched.handle(BlockStarted(w, block), now))
        return finished

    finished = False
    for w in seconds:
        finished |= act(sched.handle(WorkerReady(w), now))
    while not finished:
        now, w, block = heapq.heappop(heap)
        running[w] = None
        done.append(block)
        finished = act(sched.handle(BlockDone(w, block, 100), now))
    return sched, now, done


def test_speculation_shortens_the_tail_and_commits_each_block_once() -> None:
    off, off_time, _ = _run(speculation=False)
    on, on_time, reported = _run(speculation=True)
    stats = on.speculation_stats
    assert off.speculation_stats.speculated == 0
    assert stats.speculated >= 1 and stats.won >= 1 and stats.wasted_s > 0
    assert on_time < off_time
    assert on.done_blocks == 30 and on.done_rows == 3000  # each block counted once
    assert set(reported) == set(range(30))
    # the two fast workers' ideal: 3000 rows at 2 x 10 + 2 rows/s = 136 s; the tail is at most
    # one fast block longer
    assert on_time <= 3000 / 22 + 10


def test_no_speculation_before_the_quantile_of_blocks_is_done() -> None:
    sched, _, _ = _run(speculation=True, blocks=3)  # 3 workers, 3 blocks: no finished block to gate on
    assert sched.speculation_stats.speculated == 0


@pytest.mark.parametrize("value", [0.5, float("nan")])
def test_a_multiplier_under_one_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match="speculation_multiplier"):
        SchedulerConfig(speculation_multiplier=value)


def test_a_block_that_turns_late_after_the_others_went_idle_is_copied_at_a_tick() -> None:
    # 2 workers, 4 blocks of 10 s; worker 1's second block stalls (SIGSTOP) when worker 0 has
    # nothing left: no refill comes to look at it again, so a Tick must
    config = SchedulerConfig(speculation=True, prefetch=1, speculation_quantile=0.5)
    sched = Scheduler({b: 100 for b in range(4)}, [0, 1], config, now=0.0)
    sched.start(0.0)
    owner: dict[int, int] = {}

    def take(actions: list[object]) -> None:
        owner.update({a.block: a.worker for a in actions if isinstance(a, Assign)})

    take(sched.handle(WorkerReady(0), 0.0) + sched.handle(WorkerReady(1), 0.0))
    first = {w: b for b, w in owner.items()}
    for w in (0, 1):
        sched.handle(BlockStarted(w, first[w]), 0.0)
    take(sched.handle(BlockDone(0, first[0]), 10.0))
    take(sched.handle(BlockDone(1, first[1]), 10.0))
    second = {w: b for b, w in owner.items() if b not in first.values()}
    for w in (0, 1):
        sched.handle(BlockStarted(w, second[w]), 10.0)
    assert sched.handle(BlockDone(0, second[0]), 20.0) == []  # nothing to copy yet: 1 is on time
    assert sched.next_speculation_check() == pytest.approx(10.0 + 3 * 10.0)  # late from 40 s
    assert sched.handle(Tick(), 30.0) == []
    assert sched.handle(Tick(), 41.0) == [Assign(0, second[1])]  # the stalled block, copied
    assert sched.speculation_stats.speculated == 1 and sched.next_speculation_check() is None
    done = sched.handle(BlockDone(0, second[1]), 51.0)  # the copy ends the job (worker 1 is stopped)
    assert isinstance(done[-1], Finish) and sched.speculation_stats.won == 1
