"""What a simulation is of: the workers (`ClusterSpec`), the job (`JobSpec`) and the faults.

Everything is plain frozen data, checked when it is made: a bad value raises `ConfigError`
naming the command-line flag that sets it, so the CLI and the Python API report the same
line. The inputs are chosen so that a real `distinfer run` can be described exactly:

* a worker kind's cost is seconds per row on one worker of that kind (`per_row_s`), plus a
  fixed `block_overhead_s` per block (reading the block, writing its part, the messages);
* a worker is ready `start_up_s` after its start (`restart_s` for a replacement);
* explicit faults name a worker id and a simulated time (`Fault.parse`):

      kill:1@5          worker 1 dies at t=5 s (the backend reports it `loss_detect_s` later)
      stop:0@3-8        worker 0 is frozen from t=3 s to t=8 s (SIGSTOP ... SIGCONT)
      slow:2@10-20x3    worker 2 takes 3x as long per row from t=10 s to t=20 s

* random faults: each worker dies after an exponential lifetime of mean `mtbf_s` (from its
  start); a share of the workers are stragglers, `straggler_factor` times slower all along;
  every worker's speed is multiplied by exp(N(0, speed_sigma)) (a lognormal spread, median 1).

Worker ids are given in the order of `ClusterSpec.kinds` (the kinds' workers one after the
other), as the scheduler numbers them; replacements take the next ids, as it does.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Literal

from distinfer.data.blocks import block_sizes
from distinfer.errors import ConfigError

__all__ = ["ClusterSpec", "Fault", "JobSpec", "WorkerKind"]

_FAULT = re.compile(
    r"^\s*(kill|stop|slow)\s*:\s*(\d+)\s*@\s*([0-9.eE+]+)\s*(?:-\s*([0-9.eE+]+))?\s*(?:x\s*([0-9.eE+]+))?\s*$"
)


def _finite(value: float, flag: str, *, least: float = 0.0, strict: bool = False) -> None:
    ok = math.isfinite(value) and (value > least if strict else value >= least)
    if not ok:
        sign = ">" if strict else ">="
        raise ConfigError(f"{flag} must be a number {sign} {least:g}, got {value!r}")


def _whole(value: int, flag: str, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"{flag} must be a whole number >= {least}, got {value!r}")


@dataclass(frozen=True, slots=True)
class WorkerKind:
    """`count` workers that each take `per_row_s` seconds per row."""

    name: str
    count: int
    per_row_s: float

    def __post_init__(self) -> None:
        _whole(self.count, f"the worker count of kind {self.name!r}", 1)
        _finite(self.per_row_s, f"--per-row-ms (kind {self.name!r})", strict=True)


@dataclass(frozen=True, slots=True)
class Fault:
    """A scripted fault: `kill` at `at`; `stop` (frozen) or `slow` (`factor` times slower)
    from `at` to `until`."""

    kind: Literal["kill", "stop", "slow"]
    worker: int
    at: float
    until: float = math.inf
    factor: float = 1.0

    def __post_init__(self) -> None:
        _whole(self.worker, "--fault: the worker id", 0)
        _finite(self.at, "--fault: the time")
        if self.kind == "kill":
            return
        if not self.until > self.at:
            raise ConfigError(
                f"--fault {self.kind}: the end ({self.until:g} s) must be after the start ({self.at:g} s)"
            )
        if self.kind == "slow":
            _finite(self.factor, "--fault slow: the factor after 'x'", least=1.0)

    @classmethod
    def parse(cls, text: str) -> Fault:
        """`kill:W@T`, `stop:W@T1-T2` or `slow:W@T1-T2xF` (see the module docstring)."""
        match = _FAULT.match(text)
        if match is None:
            raise ConfigError(
                f"--fault {text!r}: expected kill:W@T, stop:W@T1-T2 or slow:W@T1-T2xF (seconds)"
            )
        kind, worker, at, until, factor = match.groups()
        try:
            start = float(at)
            end = math.inf if until is None else float(until)
            slow = 1.0 if factor is None else float(factor)
        except ValueError:
            raise ConfigError(f"--fault {text!r}: not a number in it") from None
        if kind == "kill" and (until is not None or factor is not None):
            raise ConfigError(f"--fault {text!r}: a kill takes one time, kill:W@T")
        if kind == "stop" and (until is None or factor is not None):
            raise ConfigError(f"--fault {text!r}: a stop takes a time range, stop:W@T1-T2")
        if kind == "slow" and (until is None or factor is None):
            raise ConfigError(f"--fault {text!r}: a slow-down takes a range and a factor, slow:W@T1-T2xF")
        return cls(kind, int(worker), start, end, slow)  # type: ignore[arg-type]

    def describe(self) -> str:
        if self.kind == "kill":
            return f"kill worker {self.worker} at {self.at:g} s"
        what = "stop" if self.kind == "stop" else f"slow ({self.factor:g}x)"
        return f"{what} worker {self.worker} from {self.at:g} s to {self.until:g} s"


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """The workers, how they start, how they fail, and the messages between them and the driver."""

    kinds: tuple[WorkerKind, ...]
    start_up_s: float = 0.0
    """From a first worker's start to its `WorkerReady` (loading the model)."""
    restart_s: float | None = None
    """A replacement's start-up; None: `start_up_s`."""
    speed_sigma: float = 0.0
    """Lognormal sigma of the per-worker speed multiplier (0: all workers of a kind alike)."""
    mtbf_s: float | None = None
    """Mean time between failures of one worker (exponential lifetimes); None: no random deaths."""
    straggler_share: float = 0.0
    """Share of the first workers (chosen at random) that are `straggler_factor` times slower."""
    straggler_factor: float = 1.0
    faults: tuple[Fault, ...] = ()
    latency_s: float = 0.0
    """One way, driver <-> worker, for every message."""
    loss_detect_s: float = 0.0
    """From a worker's death to the backend's `WorkerLost` reaching the scheduler."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.kinds:
            raise ConfigError("--cluster: the cluster has no workers")
        _finite(self.start_up_s, "--start-up-s")
        if self.restart_s is not None:
            _finite(self.restart_s, "--restart-s")
        _finite(self.speed_sigma, "--speed-sigma")
        if self.mtbf_s is not None:
            _finite(self.mtbf_s, "--mtbf-s", strict=True)
        _finite(self.straggler_share, "--stragglers")
        if self.straggler_share > 1:
            raise ConfigError(f"--stragglers is a share of the workers, 0..1, got {self.straggler_share!r}")
        _finite(self.straggler_factor, "--straggler-factor", least=1.0)
        _finite(self.latency_s, "--latency-ms")
        _finite(self.loss_detect_s, "--loss-detect-ms")
        _whole(self.seed, "--seed", 0)
        windows: dict[int, list[Fault]] = {}
        for fault in self.faults:
            if fault.worker >= self.workers:
                raise ConfigError(
                    f"--fault {fault.describe()}: the first workers are 0..{self.workers - 1} "
                    "(faults name first workers only)"
                )
            if fault.kind != "kill":
                windows.setdefault(fault.worker, []).append(fault)
        for spans in windows.values():
            spans.sort(key=lambda f: f.at)
            for before, after in itertools.pairwise(spans):
                if after.at < before.until:
                    raise ConfigError(f"--fault: '{before.describe()}' and '{after.describe()}' overlap")

    @property
    def workers(self) -> int:
        """Workers at the start (replacements not counted)."""
        return sum(k.count for k in self.kinds)

    @property
    def replacement_start_s(self) -> float:
        return self.start_up_s if self.restart_s is None else self.restart_s

    @classmethod
    def uniform(cls, workers: int, per_row_s: float, **options: object) -> ClusterSpec:
        """`workers` identical workers of one kind ("worker")."""
        _whole(workers, "--workers", 1)
        return cls((WorkerKind("worker", workers, per_row_s),), **options)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class JobSpec:
    """The job: rows cut into blocks as `distinfer run` cuts them, and the scheduler's knobs."""

    rows: int
    block_size: int = 1024
    min_block_size: int | None = None
    """First and last blocks, as `run --min-block-size`; None: min(64, block_size), run's default."""
    block_overhead_s: float = 0.0
    """Fixed seconds per block on top of its rows' cost."""
    prefetch: int = 2
    steal: bool = True
    speculate: bool = True
    """The scheduler's speculation at the tail, as `distinfer run --speculation on` (see batch.py)."""
    max_restarts: int = 3
    max_block_attempts: int = 3
    start_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        _whole(self.rows, "--rows", 0)
        _whole(self.block_size, "--block-size", 1)
        if self.min_block_size is not None:
            _whole(self.min_block_size, "--min-block-size", 1)
            if self.min_block_size > self.block_size:
                raise ConfigError(
                    f"--min-block-size ({self.min_block_size}) must not exceed "
                    f"--block-size ({self.block_size})"
                )
        _finite(self.block_overhead_s, "--block-overhead-ms")
        _whole(self.prefetch, "--prefetch", 1)
        _whole(self.max_restarts, "--max-restarts", 0)
        _whole(self.max_block_attempts, "--max-block-attempts", 1)
        _finite(self.start_timeout_s, "--start-timeout", strict=True)

    def block_rows(self) -> list[int]:
        """Rows of each block, in order: the plan `distinfer run` makes (`block_sizes`)."""
        least = self.min_block_size if self.min_block_size is not None else min(64, self.block_size)
        return block_sizes(self.rows, self.block_size, least)
