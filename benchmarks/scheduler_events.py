"""How many events per second the scheduler handles over a whole simulated job.

    .venv/bin/python benchmarks/scheduler_events.py [--blocks 200000 --workers 64]

Simulated workers of four different speeds pull blocks; each BlockStarted and BlockDone goes
through `Scheduler.handle`, and each BlockDone returns the `Assign` that tops its worker up.
The figure that counts is BlockDone events (with their Assign) per second of time spent in
the scheduler; the simulator's own bookkeeping is timed separately and left out.
"""

from __future__ import annotations

import argparse
import heapq
import sys
import time
from collections import deque

from distinfer.scheduling import (
    Action,
    Assign,
    BlockDone,
    BlockStarted,
    Cancel,
    Event,
    Finish,
    Scheduler,
    SchedulerConfig,
    WorkerReady,
)

TARGET = 100_000.0  # BlockDone events per second


def run(n_blocks: int, n_workers: int, prefetch: int, rows: int) -> int:
    blocks = {b: rows for b in range(n_blocks)}
    workers = list(range(n_workers))
    speed = {w: 1000.0 * (1 + w % 4) for w in workers}  # rows/s: 1x to 4x
    queues: dict[int, deque[int]] = {w: deque() for w in workers}
    running: dict[int, int | None] = dict.fromkeys(workers)
    heap: list[tuple[float, int, int]] = []  # (time, worker, block) of the next completions
    done_count = 0
    counts = {"events": 0, "done": 0, "assign": 0, "cancel": 0}
    in_scheduler = 0.0
    result: Finish | None = None

    sched = Scheduler(blocks, workers, SchedulerConfig(prefetch=prefetch), now=0.0)

    def call(event: Event | None, now: float) -> list[Action]:
        nonlocal in_scheduler
        t0 = time.perf_counter()
        actions = sched.start(now) if event is None else sched.handle(event, now)
        in_scheduler += time.perf_counter() - t0
        if event is not None:
            counts["events"] += 1
        return actions

    def apply(actions: list[Action], now: float) -> None:
        nonlocal result
        for action in actions:
            if isinstance(action, Assign):
                counts["assign"] += 1
                queues[action.worker].append(action.block)
            elif isinstance(action, Cancel):
                counts["cancel"] += 1
                if action.block in queues[action.worker]:
                    queues[action.worker].remove(action.block)
            elif isinstance(action, Finish):
                result = action
        for worker in {a.worker for a in actions if isinstance(a, Assign | Cancel)}:
            start_next(worker, now)

    def start_next(worker: int, now: float) -> None:
        if running[worker] is None and queues[worker]:
            block = queues[worker].popleft()
            running[worker] = block
            heapq.heappush(heap, (now + blocks[block] / speed[worker], worker, block))
            apply(call(BlockStarted(worker, block), now), now)

    wall0 = time.perf_counter()
    apply(call(None, 0.0), 0.0)
    for worker in workers:
        apply(call(WorkerReady(worker), 0.0), 0.0)
    now = 0.0
    while result is None:
        now, worker, block = heapq.heappop(heap)
        running[worker] = None
        done_count += 1
        counts["done"] += 1
        apply(call(BlockDone(worker, block), now), now)
        start_next(worker, now)
    wall = time.perf_counter() - wall0

    ok = result.error is None and sched.done_blocks == n_blocks
    done_rate = counts["done"] / in_scheduler
    event_rate = counts["events"] / in_scheduler
    print(f"blocks {n_blocks}, workers {n_workers}, prefetch {prefetch}: job ok={ok}")
    print(
        f"events handled: {counts['events']} ({counts['done']} BlockDone, "
        f"{counts['events'] - counts['done']} other); actions: {counts['assign']} Assign, "
        f"{counts['cancel']} Cancel"
    )
    print(f"seconds in scheduler: {in_scheduler:.3f} (whole simulation {wall:.3f})")
    print(f"events/s (all events): {event_rate:,.0f}")
    print(f"BlockDone+Assign events/s: {done_rate:,.0f}   (target >= {TARGET:,.0f})")
    # The rate with the simulator's own time included: a floor, not the scheduler's figure.
    print(f"BlockDone/s including the simulator: {counts['done'] / wall:,.0f}")
    passed = ok and done_rate >= TARGET
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--blocks", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1000, help="rows per block")
    args = parser.parse_args(argv)
    return run(args.blocks, args.workers, args.prefetch, args.rows)


if __name__ == "__main__":
    sys.exit(main())
