"""The batch-job simulator: the real `Scheduler` driven by a discrete-event loop.

Model
-----
Time is a number; nothing sleeps and no clock is read. One heap holds the future events
(a block's end on a worker, a message's arrival, a death, a `Tick`), ordered by time and then
by when they were posted, so a run is a pure function of its inputs and seed. Each message
between the driver and a worker takes `latency_s`; one posted for "now" goes to a FIFO
instead of the heap (the common case with no latency, and the fast one).

* Driver: feeds the scheduler what workers say (`WorkerReady`, `BlockStarted`, `BlockDone`),
  the backend's `WorkerLost` (`loss_detect_s` after a death) and a `Tick` at the supervisor's
  next deadline, and carries the actions out: `Assign` / `Cancel` become messages to the
  worker, `StartWorker` starts a replacement on the retired worker's node (ready after
  `restart_s`), `StopWorker` ends a worker, `Finish` ends the simulation (the makespan).
* Worker (`_workers.py`): runs its local queue in order, one block at a time; reports
  `BlockStarted` when it begins one and `BlockDone` when it ends; a `Cancel` takes a block
  out of its local queue, or stops it when it is running (as a worker stops at its next
  micro-batch; a stopped worker hears of it when it resumes).
* Speculation (`JobSpec.speculate`, on by default as in `distinfer run`): the scheduler's own
  (scheduler.py): its copies are `Assign`s of a running block, and the loser gets a
  `Cancel`. The driver ticks when the scheduler says a running block may turn late
  (`next_speculation_check`) as well as at the supervisor's deadlines.

Not simulated: the data (block descriptors only), the driver's own CPU, contention between
workers on one node (give it as a kind's per-row cost), and `BlockFailed` (a block's rows
raising).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from array import array
from collections import deque

from distinfer.messages import (
    Action,
    Assign,
    BlockDone,
    BlockStarted,
    Cancel,
    Finish,
    StartWorker,
    StopWorker,
    Tick,
    WorkerLost,
    WorkerReady,
)
from distinfer.scheduling import Scheduler, SchedulerConfig
from distinfer.simulation._workers import (
    SimWorker,
    Slot,
    fault_windows,
    finish_time,
    make_slots,
    stopped_until,
)
from distinfer.simulation.results import LOST, STARTING, USEFUL, WASTED, JobResult, Timeline, tail_seconds
from distinfer.simulation.spec import ClusterSpec, JobSpec

__all__ = ["simulate_job"]

# event kinds
_END, _ASSIGN, _STARTED, _DONE, _READY, _CANCEL, _KILL, _LOST, _TICK = range(9)


def simulate_job(cluster: ClusterSpec, job: JobSpec, *, timeline: bool = False, label: str = "") -> JobResult:
    """Simulate `job` on `cluster`; `timeline=True` records every interval for the plot."""
    return _Simulation(cluster, job, timeline, label or _label(job)).run()


def _label(job: JobSpec) -> str:
    return f"stealing {'on' if job.steal else 'off'}, speculation {'on' if job.speculate else 'off'}"


class _Simulation:
    def __init__(self, cluster: ClusterSpec, job: JobSpec, record: bool, label: str) -> None:
        self.cluster = cluster
        self.job = job
        self.label = label
        self.rng = random.Random(cluster.seed)
        self.rows = job.block_rows()
        self.overhead = job.block_overhead_s
        self.latency = cluster.latency_s
        self.slots = make_slots(cluster, self.rng)
        self.windows = fault_windows(cluster)
        self.timeline = Timeline() if record else None
        config = SchedulerConfig(
            prefetch=job.prefetch,
            max_restarts=job.max_restarts,
            max_block_attempts=job.max_block_attempts,
            start_timeout_s=job.start_timeout_s,
            steal=job.steal,
            speculation=job.speculate,
        )
        first = list(range(len(self.slots)))
        self.sched = Scheduler(dict(enumerate(self.rows)), first, config, now=0.0)
        self.workers: dict[int, SimWorker] = {}
        self.heap: list[tuple[float, int, int, int, int, float]] = []
        self.soon: deque[tuple[int, int, int, float]] = deque()
        self.seq = itertools.count()
        self.now = 0.0
        self.finish: Finish | None = None
        self.commit_at = array("d", [-1.0]) * len(self.rows)
        self.commits = array("d")
        self.tick_at = math.inf
        self.counts = dict.fromkeys(
            (
                "events",
                "simulated",
                "runs",
                "lost_runs",
                "duplicates",
                "steals",
                "deaths",
            ),
            0,
        )
        self.lost_s = 0.0
        self.wasted_s = 0.0

    # --- the loop ---------------------------------------------------------------------

    def post(self, t: float, kind: int, worker: int, block: int = -1, x: float = 0.0) -> None:
        if t <= self.now:
            self.soon.append((kind, worker, block, x))
        else:
            heapq.heappush(self.heap, (t, next(self.seq), kind, worker, block, x))

    def run(self) -> JobResult:
        self.apply(self.sched.start(0.0), -1)
        for worker, slot in enumerate(self.slots):
            self.start_worker(worker, slot, self.cluster.start_up_s, self.windows.get(worker, ()))
        for fault in self.cluster.faults:
            if fault.kind == "kill":
                self.post(fault.at, _KILL, fault.worker)
        self.schedule_tick()
        soon, heap = self.soon, self.heap
        simulated = 0
        while self.finish is None:
            if soon:
                kind, worker, block, x = soon.popleft()
            elif heap:
                self.now, _, kind, worker, block, x = heapq.heappop(heap)
            else:  # pragma: no cover - the scheduler always finishes; this would be a simulator bug
                raise RuntimeError(f"the simulation stalled at {self.now:g} s with no event left")
            simulated += 1
            if kind == _END:
                self.on_end(worker, block)
            elif kind == _ASSIGN:
                self.on_order(worker, block, kind)
            elif kind == _STARTED:
                self.handle(BlockStarted(worker, block), -1)
            elif kind == _DONE:
                self.on_done(worker, block, x)
            elif kind == _READY:
                self.on_ready(worker)
            elif kind == _CANCEL:
                self.on_order(worker, block, kind)
            elif kind == _KILL:
                self.on_kill(worker)
            elif kind == _LOST:
                self.handle(WorkerLost(worker, "killed (simulated)"), worker)
                self.schedule_tick()
            elif kind == _TICK and self.now >= self.tick_at:  # else a later one replaced it
                self.tick_at = math.inf
                self.handle(Tick(), -1)
                self.schedule_tick()
        self.counts["simulated"] = simulated
        return self.result()

    def handle(self, event: BlockStarted | BlockDone | WorkerReady | WorkerLost | Tick, origin: int) -> None:
        self.counts["events"] += 1
        self.apply(self.sched.handle(event, self.now), origin)

    def apply(self, actions: list[Action], origin: int) -> None:
        """Carry the scheduler's actions out; `origin`: the worker a loss was about (its
        replacement runs on its node)."""
        now, latency = self.now, self.latency
        ending = bool(actions) and isinstance(actions[-1], Finish)
        previous: Action | None = None
        for action in actions:
            kind = type(action)
            if kind is Assign:
                self.post(now + latency, _ASSIGN, action.worker, action.block)  # type: ignore[union-attr]
                if type(previous) is Cancel and previous.block == action.block:  # type: ignore[union-attr]
                    self.counts["steals"] += 1
            elif kind is Cancel:
                self.post(now + latency, _CANCEL, action.worker, action.block)  # type: ignore[union-attr]
            elif kind is StartWorker:
                slot = self.workers[origin].slot
                self.start_worker(action.worker, slot, self.cluster.replacement_start_s, ())  # type: ignore[union-attr]
            elif kind is StopWorker:
                origin = action.worker  # type: ignore[union-attr]
                if not ending:
                    self.end_worker(self.workers[origin], counted=False)
            elif kind is Finish:
                self.finish = action  # type: ignore[assignment]
            previous = action

    # --- workers ----------------------------------------------------------------------

    def start_worker(
        self, worker: int, slot: Slot, start_up_s: float, windows: tuple[tuple[float, float, float], ...]
    ) -> None:
        now = self.now
        sim = SimWorker(worker, slot, now, windows)
        self.workers[worker] = sim
        sim.ready_at = finish_time(now, start_up_s, windows) if windows else now + start_up_s
        self.post(sim.ready_at + self.latency, _READY, worker)
        if self.timeline is not None:
            self.timeline.add(worker, now, sim.ready_at, STARTING)
        mtbf = self.cluster.mtbf_s
        if mtbf is not None:
            self.post(now + self.rng.expovariate(1.0 / mtbf), _KILL, worker)

    def on_ready(self, worker: int) -> None:
        if self.workers[worker].alive:
            # A ready worker only takes deadlines away: the tick already posted stays right.
            self.handle(WorkerReady(worker), -1)

    def on_order(self, worker: int, block: int, kind: int) -> None:
        """An Assign or a Cancel reaches the worker."""
        sim = self.workers[worker]
        if not sim.alive:
            return
        if sim.windows:
            resume = stopped_until(sim.windows, self.now)
            if resume is not None:  # frozen: it reads its pipe when it resumes
                heapq.heappush(self.heap, (resume, next(self.seq), kind, worker, block, 0.0))
                return
        if kind == _ASSIGN:
            sim.local.append(block)
        elif block == sim.running:  # stopped at its next micro-batch: time spent for nothing
            run_s = self.now - sim.started_at
            sim.busy_s += run_s
            self.wasted_s += run_s
            if self.timeline is not None:
                self.timeline.add(sim.id, sim.started_at, self.now, WASTED)
            sim.running = -1  # its _END event finds it idle and is dropped
        elif block in sim.local:
            sim.local.remove(block)
        if sim.running < 0 and sim.local:
            self.start_next(sim)

    def start_next(self, sim: SimWorker) -> None:
        block = sim.local.popleft()
        now = self.now
        sim.running, sim.started_at = block, now
        self.counts["runs"] += 1
        work = self.overhead + self.rows[block] * sim.per_row_s
        end = finish_time(now, work, sim.windows) if sim.windows else now + work
        heapq.heappush(self.heap, (end, next(self.seq), _END, sim.id, block, 0.0))
        self.post(now + self.latency, _STARTED, sim.id, block)

    def on_end(self, worker: int, block: int) -> None:
        sim = self.workers[worker]
        if not sim.alive or sim.running != block:
            return  # it died or was cancelled meanwhile
        now = self.now
        sim.busy_s += now - sim.started_at
        sim.running = -1
        self.post(now + self.latency, _DONE, worker, block, now - sim.started_at)
        if sim.local:
            self.start_next(sim)

    def on_done(self, worker: int, block: int, run_s: float) -> None:
        self.handle(BlockDone(worker, block), -1)
        timeline = self.timeline
        end = self.now - self.latency
        if self.commit_at[block] < 0 and self.sched.is_done(block):
            self.commit_at[block] = self.now
            self.commits.append(self.now)
            if timeline is not None:
                timeline.add(worker, end - run_s, end, USEFUL)
        else:
            self.counts["duplicates"] += 1
            self.wasted_s += run_s
            if timeline is not None:
                timeline.add(worker, end - run_s, end, WASTED)
        if self.job.speculate and self.finish is None:
            self.schedule_tick(deadlines=False)

    def on_kill(self, worker: int) -> None:
        sim = self.workers[worker]
        if not sim.alive:
            return
        self.counts["deaths"] += 1
        self.end_worker(sim, counted=True)
        self.post(self.now + self.cluster.loss_detect_s, _LOST, worker)

    def end_worker(self, sim: SimWorker, *, counted: bool) -> None:
        """The worker's process is gone (killed, or stopped by the scheduler)."""
        now = self.now
        sim.alive = False
        sim.died = now
        if sim.running >= 0:
            run_s = now - sim.started_at
            sim.busy_s += run_s
            self.lost_s += run_s
            if counted:
                self.counts["lost_runs"] += 1
            if self.timeline is not None:
                self.timeline.add(sim.id, sim.started_at, now, LOST)
            sim.running = -1

    def schedule_tick(self, deadlines: bool = True) -> None:
        """A `Tick` at the supervisor's next deadline (unless `deadlines` is False: they have
        not moved) or when a running block may turn late (the only times one changes anything)."""
        sched = self.sched
        due = sched.supervisor.next_deadline() if deadlines else None
        if self.job.speculate:
            late = sched.next_speculation_check()
            due = late if due is None or (late is not None and late < due) else due
        if due is not None and self.now < due < self.tick_at:
            self.tick_at = due
            self.post(due, _TICK, -1)

    # --- the report -------------------------------------------------------------------

    def result(self) -> JobResult:
        makespan = self.now
        busy = capacity = 0.0
        for sim in self.workers.values():
            if sim.alive and sim.running >= 0:  # a copy still running at the end: wasted
                run_s = makespan - sim.started_at
                sim.busy_s += run_s
                self.wasted_s += run_s
                if self.timeline is not None:
                    self.timeline.add(sim.id, sim.started_at, makespan, WASTED)
            busy += sim.busy_s
            capacity += min(sim.died, makespan) - sim.born
        block_size, overhead = self.job.block_size, self.overhead
        throughput = sum(1.0 / (slot.per_row_s + overhead / block_size) for slot in self.slots)
        nominal = sum(kind.count / (kind.per_row_s + overhead / block_size) for kind in self.cluster.kinds)
        total_rows = sum(self.rows)
        ideal = total_rows / throughput
        commits = self.commits
        n = len(commits)
        error = self.finish.error if self.finish is not None else None
        c = self.counts
        sched_spec = self.sched.speculation_stats
        return JobResult(
            label=self.label,
            ok=error is None,
            error=None if error is None else f"{error.kind}: {error.message}",
            workers=len(self.slots),
            blocks=len(self.rows),
            rows=total_rows,
            makespan_s=makespan,
            ideal_s=ideal,
            nominal_ideal_s=total_rows / nominal,
            lower_bound_s=self.cluster.start_up_s + ideal,
            utilisation=busy / capacity if capacity > 0 else 0.0,
            useful_share=(busy - self.lost_s - self.wasted_s) / capacity if capacity > 0 else 0.0,
            tail_s=tail_seconds(commits),
            done_99_s=commits[n - math.ceil(n / 100) - 1] if n >= 2 else 0.0,
            committed=self.sched.done_blocks,
            runs=c["runs"],
            lost_runs=c["lost_runs"],
            lost_s=self.lost_s,
            duplicate_runs=c["duplicates"],
            wasted_s=self.wasted_s,
            steals=c["steals"],
            backups=sched_spec.speculated,
            backups_won=sched_spec.won,
            deaths=c["deaths"],
            restarts=self.sched.restarts_used,
            scheduler_events=c["events"],
            simulated_events=c["simulated"],
            timeline=self.timeline,
        )
