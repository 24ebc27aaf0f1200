"""Simulated workers: their speeds, their scripted slow-downs and stops, and when they die.

A worker runs one block at a time from its local queue (the blocks the driver's `Assign`s
have delivered, in order), as a real worker does. A block costs
`block_overhead_s + rows * per_row_s` of the worker's own time; `per_row_s` is the kind's
cost times the worker's lognormal spread and, for a straggler, the straggler factor. A
replacement runs on the node of the worker it replaces, so it has the same speed.

Scripted `stop` and `slow` faults are windows of the worker's time in which its progress
rate is 0 or 1/factor; `finish_time` integrates the rate over them. A stopped worker also
reads no message until it resumes (`stopped_until`).
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

from distinfer.simulation.spec import ClusterSpec

__all__ = ["SimWorker", "Slot", "fault_windows", "finish_time", "make_slots", "stopped_until"]

Window = tuple[float, float, float]  # (from, until, progress rate): rate 0 = stopped


@dataclass(frozen=True, slots=True)
class Slot:
    """A place a worker runs in: its kind and its speed (kept by its replacements)."""

    kind: int  # index into ClusterSpec.kinds
    per_row_s: float
    straggler: bool


class SimWorker:
    """One simulated worker process (the driver's view of it is the scheduler's)."""

    __slots__ = (
        "alive",
        "born",
        "busy_s",
        "died",
        "id",
        "local",
        "per_row_s",
        "ready_at",
        "running",
        "slot",
        "started_at",
        "windows",
    )

    def __init__(self, worker: int, slot: Slot, born: float, windows: tuple[Window, ...]) -> None:
        self.id = worker
        self.slot = slot
        self.per_row_s = slot.per_row_s
        self.windows = windows
        self.alive = True
        self.born = born
        self.died = math.inf
        self.ready_at = math.inf
        self.local: deque[int] = deque()  # blocks delivered and not started
        self.running = -1  # the block being computed, -1: idle
        self.started_at = 0.0
        self.busy_s = 0.0


def make_slots(cluster: ClusterSpec, rng: random.Random) -> list[Slot]:
    """The first workers' slots, in id order (kinds one after the other)."""
    slots: list[Slot] = []
    sigma = cluster.speed_sigma
    for index, kind in enumerate(cluster.kinds):
        for _ in range(kind.count):
            spread = math.exp(rng.gauss(0.0, sigma)) if sigma > 0 else 1.0
            slots.append(Slot(index, kind.per_row_s * spread, False))
    share = cluster.straggler_share
    if share > 0 and cluster.straggler_factor > 1:
        count = round(share * len(slots))
        for worker in rng.sample(range(len(slots)), count):
            slot = slots[worker]
            slots[worker] = Slot(slot.kind, slot.per_row_s * cluster.straggler_factor, True)
    return slots


def fault_windows(cluster: ClusterSpec) -> dict[int, tuple[Window, ...]]:
    """Each first worker's stop and slow windows, sorted (the spec refuses overlaps)."""
    windows: dict[int, list[Window]] = {}
    for fault in cluster.faults:
        if fault.kind == "stop":
            windows.setdefault(fault.worker, []).append((fault.at, fault.until, 0.0))
        elif fault.kind == "slow":
            windows.setdefault(fault.worker, []).append((fault.at, fault.until, 1.0 / fault.factor))
    return {w: tuple(sorted(spans)) for w, spans in windows.items()}


def finish_time(start: float, work_s: float, windows: tuple[Window, ...]) -> float:
    """When `work_s` seconds of full-rate work begun at `start` end, through the windows."""
    t = start
    for begin, end, rate in windows:
        if end <= t:
            continue
        if begin > t:
            if t + work_s <= begin:
                return t + work_s
            work_s -= begin - t
            t = begin
        capacity = (end - t) * rate
        if rate > 0 and work_s <= capacity:
            return t + work_s / rate
        work_s -= capacity
        t = end
    return t + work_s


def stopped_until(windows: tuple[Window, ...], now: float) -> float | None:
    """The end of the stop window `now` falls in; None when the worker is not stopped."""
    for begin, end, rate in windows:
        if begin <= now < end and rate == 0:
            return end
    return None
