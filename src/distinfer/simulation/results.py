"""What a simulated job reports, and the formulas behind the figures.

With `R` rows, first workers `w` of per-row cost `c_w` (spread and stragglers included),
block size `B`, per-block overhead `o` and start-up `s`:

* per-worker throughput   `r_w = 1 / (c_w + o / B)`  rows/s (full blocks, steady state)
* ideal                   `ideal = R / sum_w r_w`    (the issue's data / (workers x throughput))
* lower bound             `s + ideal`                (no schedule can finish before it)
* efficiency              `ideal / makespan`
* utilisation             busy worker-seconds / worker-seconds alive (start-up counts as idle;
                          a worker is alive from its start to its death or the job's end)
* useful share            the busy share that produced committed output (no lost or duplicate runs)
* tail                    `T_n - T_(n - ceil(n / 100))`, with `T_k` the time the k-th block was
                          committed and `T_0 = 0`: the time the last 1% of the blocks took

`nominal_ideal` is the ideal with every worker at its kind's speed (no spread, no stragglers).
"""

from __future__ import annotations

import math
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["JobResult", "Timeline", "tail_seconds"]

#: kinds of intervals in a timeline
USEFUL, WASTED, LOST, STARTING = 0, 1, 2, 3


@dataclass
class Timeline:
    """Intervals of the workers' time, for the plot: worker, from, until, kind (USEFUL...)."""

    worker: array[int] = field(default_factory=lambda: array("i"))
    start: array[float] = field(default_factory=lambda: array("d"))
    end: array[float] = field(default_factory=lambda: array("d"))
    kind: array[int] = field(default_factory=lambda: array("b"))

    def add(self, worker: int, start: float, end: float, kind: int) -> None:
        self.worker.append(worker)
        self.start.append(start)
        self.end.append(end)
        self.kind.append(kind)

    def __len__(self) -> int:
        return len(self.worker)


def tail_seconds(commit_times: array[float] | list[float]) -> float:
    """The time the last 1% of the blocks took (see the module docstring)."""
    n = len(commit_times)
    if n == 0:
        return 0.0
    k = n - math.ceil(n / 100)
    return commit_times[-1] - (commit_times[k - 1] if k > 0 else 0.0)


@dataclass
class JobResult:
    """One simulated job; `to_dict()` is what `--json` prints."""

    label: str
    ok: bool
    error: str | None
    workers: int
    blocks: int
    rows: int
    makespan_s: float
    ideal_s: float
    nominal_ideal_s: float
    lower_bound_s: float
    utilisation: float
    useful_share: float
    tail_s: float
    done_99_s: float  # when 99% of the blocks were committed
    committed: int  # blocks committed (each once: the scheduler's books)
    runs: int  # block runs started, copies included
    lost_runs: int  # runs cut short by a worker's death: re-run elsewhere
    lost_s: float
    duplicate_runs: int  # finished after another copy was committed
    wasted_s: float
    steals: int
    backups: int  # speculative copies started (the scheduler's speculation)
    backups_won: int
    deaths: int
    restarts: int
    scheduler_events: int  # Scheduler.handle calls
    simulated_events: int  # events the simulator processed (messages, block ends, deaths...)
    timeline: Timeline | None = field(default=None, repr=False)

    @property
    def efficiency(self) -> float:
        return self.ideal_s / self.makespan_s if self.makespan_s > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("timeline")
        data["efficiency"] = self.efficiency
        return data

    def describe(self) -> str:
        """The text report: a few lines, figures first."""
        state = "finished" if self.ok else f"FAILED: {self.error}"
        lines = [
            f"{self.label}: {state}",
            f"  {self.blocks:,} blocks ({self.rows:,} rows) on {self.workers:,} workers",
            f"  makespan   {self.makespan_s:10.3f} s   ideal {self.ideal_s:.3f} s "
            f"(efficiency {self.efficiency:.1%}; start-up + ideal {self.lower_bound_s:.3f} s; "
            f"nominal speeds {self.nominal_ideal_s:.3f} s)",
            f"  utilisation {self.utilisation:.1%} busy, {self.useful_share:.1%} useful",
            f"  tail       {self.tail_s:10.3f} s for the last 1% of blocks "
            f"(99% done at {self.done_99_s:.3f} s)",
            f"  failures   {self.deaths} worker deaths, {self.restarts} replacements, {self.lost_runs} "
            f"blocks re-run ({self.lost_s:.1f} worker-s lost)",
            f"  copies     {self.steals} steals, {self.duplicate_runs} duplicate runs ({self.wasted_s:.1f} "
            f"worker-s), {self.backups} backups ({self.backups_won} won)",
            f"  events     {self.scheduler_events:,} to the scheduler, {self.simulated_events:,} simulated",
        ]
        return "\n".join(lines)
