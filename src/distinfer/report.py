"""What a job tells its user: a progress bar while it runs, a report when it ends.

The report (`DIR/_report.json`, and a summary on stderr) gives rows, wall time and
throughput, each worker's rows, busy fraction and where its time went (read, preprocess,
model, postprocess, write, idle), the workers more than 2x slower than the median of the
others (a noisy neighbour, a throttled or swapping node), and the scaling efficiency
`steady throughput / (workers x single-worker throughput)` when the latter is known.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from .messages import GenerationStats
    from .models.base import GroupStats

__all__ = ["GenerationSummary", "GroupSummary", "JobReport", "Progress", "WorkerStats"]

# Stages in which a worker does the model's own work; the rest is the engine's overhead.
MODEL_STAGES = ("preprocess", "model")
STAGES = ("read", "preprocess", "model", "postprocess", "write", "idle")
# A worker this many times slower than the median of the others is flagged in the report.
SLOW_FACTOR = 2.0


@dataclass
class GroupSummary:
    """A replica group's stages (pipeline) or ranks (tensor parallel), summed over its blocks.

    Shares are of the group's model time (`wall_s`: the blocks' forward passes end to end).
    Of the stages' idle time, `1 - sum(busy + comm) / (p * wall)`, the bubble is the part
    spent waiting while each block's pipeline fills and drains: stage k waits for the first
    micro-batch to cross stages 0..k-1, and after its last one for the last micro-batch to
    cross stages k+1..p-1, computed from each stage's measured time on those two
    micro-batches. The rest ("stalls") is waiting on a slower neighbour mid-block. The
    theoretical bubble is `(p-1)/(m+p-1)` for a block of m equal micro-batches, weighted by
    each block's wall time.
    """

    kind: str  # "stage" or "rank"
    members: list[str] = field(default_factory=list)  # where each stage or rank runs
    blocks: int = 0
    micro_batches: int = 0
    wall_s: float = 0.0
    busy_s: list[float] = field(default_factory=list)
    comm_s: list[float] = field(default_factory=list)
    peak_rss: list[int] = field(default_factory=list)
    ideal_bubble_s: float = 0.0  # sum over blocks of (p-1)/(m+p-1) x wall
    bubble_s: float = 0.0  # stage-seconds idle in fill and drain, over blocks

    def add(self, g: GroupStats) -> None:
        p = len(g.busy_s)
        if not self.busy_s:
            self.busy_s, self.comm_s, self.peak_rss = [0.0] * p, [0.0] * p, [0] * p
        self.blocks += 1
        self.micro_batches += g.micro_batches
        self.wall_s += g.wall_s
        self.bubble_s += g.bubble_s
        for k in range(p):
            self.busy_s[k] += g.busy_s[k]
            self.comm_s[k] += g.comm_s[k]
            self.peak_rss[k] = max(self.peak_rss[k], g.peak_rss[k])
        if g.micro_batches:
            self.ideal_bubble_s += (p - 1) / (g.micro_batches + p - 1) * g.wall_s

    @property
    def idle(self) -> float:
        """Share of the stages' time spent neither computing nor moving activations."""
        p = len(self.busy_s)
        if not p or self.wall_s <= 0:
            return 0.0
        return max(0.0, 1.0 - (sum(self.busy_s) + sum(self.comm_s)) / (p * self.wall_s))

    @property
    def measured_bubble(self) -> float:
        p = len(self.busy_s)
        return self.bubble_s / (p * self.wall_s) if p and self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "measured_bubble": self.measured_bubble, "idle": self.idle,
                "theoretical_bubble": self.theoretical_bubble}

    @property
    def theoretical_bubble(self) -> float:
        return self.ideal_bubble_s / self.wall_s if self.wall_s > 0 else 0.0

    def lines(self) -> list[str]:
        wall = self.wall_s or 1.0
        out = []
        for k, busy in enumerate(self.busy_s):
            where = f" ({self.members[k]})" if k < len(self.members) else ""
            out.append(
                f"    {self.kind} {k}{where}: busy {busy / wall:.0%}, communication "
                f"{self.comm_s[k] / wall:.1%} ({self.comm_s[k]:.2f} s), peak memory "
                f"{self.peak_rss[k] / 2**30:.2f} GiB"
            )
        if self.kind == "stage" and self.blocks:
            p = len(self.busy_s)
            out.append(
                f"    pipeline bubble {self.measured_bubble:.1%} measured (fill and drain), "
                f"{self.theoretical_bubble:.1%} theoretical (p-1)/(m+p-1) for p={p}, "
                f"m={self.micro_batches / self.blocks:.1f} micro-batches per block; idle in all "
                f"{self.idle:.1%} (the rest: stalls on a slower stage)"
            )
        return out


@dataclass
class GenerationSummary:
    """A generation engine's figures, summed over blocks (one worker's, or the job's)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    running_sum: int = 0
    preemptions: int = 0
    peak_kv_pages: int = 0
    kv_pages: int = 0
    kv_cache_bytes: int = 0
    model_s: float = 0.0  # the engine's time on its blocks
    first_token_s: float | None = None  # the first block's, from its first request

    def add(self, g: GenerationStats | GenerationSummary) -> None:
        self.prompt_tokens += g.prompt_tokens
        self.generated_tokens += g.generated_tokens
        self.steps += g.steps
        self.running_sum += g.running_sum
        self.preemptions += g.preemptions
        self.peak_kv_pages = max(self.peak_kv_pages, g.peak_kv_pages)
        self.kv_pages = max(self.kv_pages, g.kv_pages)
        self.kv_cache_bytes = max(self.kv_cache_bytes, g.kv_cache_bytes)
        self.model_s += g.model_s
        if self.first_token_s is None:
            self.first_token_s = g.first_token_s

    @property
    def mean_running(self) -> float:
        return self.running_sum / self.steps if self.steps else 0.0

    @property
    def kv_peak_use(self) -> float:
        return self.peak_kv_pages / self.kv_pages if self.kv_pages else 0.0

    def rates(self, seconds: float) -> dict[str, float]:
        return {"generated_tokens_per_s": self.generated_tokens / seconds if seconds > 0 else 0.0,
                "prompt_tokens_per_s": self.prompt_tokens / seconds if seconds > 0 else 0.0}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean_running": self.mean_running, "kv_peak_use": self.kv_peak_use}

    def line(self, seconds: float) -> str:
        r = self.rates(seconds)
        return (f"{self.generated_tokens} tokens generated ({r['generated_tokens_per_s']:.1f}/s), "
                f"{self.prompt_tokens} prompt tokens ({r['prompt_tokens_per_s']:.1f}/s); mean running batch "
                f"{self.mean_running:.1f}, KV cache peak {self.kv_peak_use:.0%} of "
                f"{self.kv_cache_bytes / 2**20:.0f} MiB, {self.preemptions} preemptions")


@dataclass
class WorkerStats:
    worker: int
    pid: int = 0
    host: str = ""
    load_s: float = 0.0
    rows: int = 0
    blocks: int = 0
    elapsed_s: float = 0.0  # from ready to its last finished block, on the worker's clock
    seconds: dict[str, float] = field(default_factory=dict)
    lost: str = ""  # why the worker was lost, if it was
    ready: bool = False  # it loaded its model (pid, host and load_s are known)
    not_ready: str = ""  # why it never became ready ("still loading when the job ended", ...)
    group: GroupSummary | None = None  # a pipeline's stages or a tensor-parallel group's ranks
    generation: GenerationSummary | None = None  # a generation job's engine

    def add_block(
        self, rows: int, seconds: dict[str, float], elapsed_s: float, group: GroupStats | None = None,
        generation: GenerationStats | None = None,
    ) -> None:
        if generation is not None:
            if self.generation is None:
                self.generation = GenerationSummary()
            self.generation.add(generation)
        if group is not None:
            if self.group is None:
                self.group = GroupSummary(group.kind)
            self.group.add(group)
        self.rows += rows
        self.blocks += 1
        self.elapsed_s = max(self.elapsed_s, elapsed_s)
        for stage, value in seconds.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + value

    def fractions(self) -> dict[str, float]:
        total = self.elapsed_s or 1.0
        out = {s: self.seconds.get(s, 0.0) / total for s in STAGES}
        out["other"] = max(0.0, 1.0 - sum(out.values()))
        return out

    @property
    def busy_fraction(self) -> float:
        f = self.fractions()
        return 1.0 - f["idle"] - f["other"]

    @property
    def overhead_fraction(self) -> float:
        """Share of the worker's time outside preprocessing and the model."""
        f = self.fractions()
        return 1.0 - sum(f[s] for s in MODEL_STAGES)

    @property
    def rate(self) -> float | None:
        """Rows per second of its working time (reading to writing, idle excluded)."""
        working = sum(v for k, v in self.seconds.items() if k != "idle")
        return self.rows / working if self.rows and working > 0 else None


@dataclass
class JobReport:
    output_dir: str
    model: str
    input: str
    backend: str
    workers: int
    threads_per_worker: int
    rows: int = 0  # rows computed in this run
    rows_total: int = 0  # rows in the input
    rows_resumed: int = 0  # rows already committed by an earlier run
    blocks: int = 0
    wall_s: float = 0.0
    startup_s: float = 0.0  # from the job's start to the first worker ready
    first_block_s: float = 0.0  # from the job's start to the first finished block
    restarts: int = 0
    baseline_throughput: float | None = None
    bad_rows: int = 0  # rows set aside (--max-bad-rows), this run's and a resumed run's
    bad_reasons: list[str] = field(default_factory=list)  # the first few, each naming its row
    speculated: int = 0  # blocks copied to an idle worker at the tail
    speculation_won: int = 0  # ... whose copy finished first
    speculation_wasted_s: float = 0.0  # worker-seconds the losing copies ran
    worker_stats: list[WorkerStats] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steady_throughput(self) -> float:
        """Rows per second once the first worker was ready (start-up excluded)."""
        span = self.wall_s - self.startup_s
        return self.rows / span if span > 0 else 0.0

    @property
    def generation(self) -> GenerationSummary | None:
        """The job's generation figures (all workers), None for other models."""
        parts = [w.generation for w in self.worker_stats if w.generation is not None]
        if not parts:
            return None
        total = GenerationSummary()
        for p in parts:
            total.add(p)
        firsts = [p.first_token_s for p in parts if p.first_token_s is not None]
        total.first_token_s = min(firsts) if firsts else None
        return total

    def generation_dict(self) -> dict[str, Any] | None:
        g = self.generation
        if g is None:
            return None
        span = self.wall_s - self.startup_s
        first = self.startup_s + g.first_token_s if g.first_token_s is not None else None
        return {**g.to_dict(), **g.rates(span), "time_to_first_token_s": first}

    @property
    def efficiency(self) -> float | None:
        if not self.baseline_throughput:
            return None
        return self.steady_throughput / (self.workers * self.baseline_throughput)

    def slow_workers(self) -> dict[int, float]:
        """Workers running more than `SLOW_FACTOR` times slower than the median of the
        others (by rows per working second), with how many times slower."""
        rates = {w.worker: r for w in self.worker_stats if (r := w.rate) is not None}
        slow = {}
        for worker, rate in rates.items():
            others = [r for w, r in rates.items() if w != worker]
            if others and statistics.median(others) > SLOW_FACTOR * rate:
                slow[worker] = statistics.median(others) / rate
        return slow

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("worker_stats")
        data.update(
            slow_workers={str(w): factor for w, factor in self.slow_workers().items()},
            generation=self.generation_dict(),
            throughput=self.throughput,
            steady_throughput=self.steady_throughput,
            efficiency=self.efficiency,
            worker_stats=[
                {
                    **asdict(w),
                    **({"group": w.group.to_dict()} if w.group else {}),
                    **({"generation": w.generation.to_dict()} if w.generation else {}),
                    "busy_fraction": w.busy_fraction,
                    "overhead_fraction": w.overhead_fraction,
                    "fractions": w.fractions(),
                }
                for w in self.worker_stats
            ],
        )
        return data

    def summary(self) -> str:
        lines = [
            f"distinfer: {self.rows} rows in {self.wall_s:.1f} s "
            f"({self.throughput:.1f} rows/s; {self.steady_throughput:.1f} rows/s after "
            f"{self.startup_s:.1f} s start-up) with {self.workers} {self.backend} workers "
            f"x {self.threads_per_worker} threads",
        ]
        if self.rows_resumed:
            lines.append(f"  resumed: {self.rows_resumed} rows were already done")
        if self.bad_rows:
            first = f"; the first: {self.bad_reasons[0]}" if self.bad_reasons else ""
            errors = self.output_dir.rstrip("/") + "/_errors/"
            lines.append(f"  {self.bad_rows} bad row(s) set aside in {errors}{first}")
        gen = self.generation_dict()
        if gen is not None and self.generation is not None:
            first = gen["time_to_first_token_s"]
            lines.append(f"  generation: {self.generation.line(self.wall_s - self.startup_s)}"
                         + (f"; first token {first:.1f} s after the start" if first is not None else ""))
        if self.efficiency is not None:
            ideal = self.workers * (self.baseline_throughput or 0.0)
            lines.append(
                f"  scaling efficiency {self.efficiency:.0%} of the ideal {ideal:.1f} rows/s "
                f"({self.workers} x {self.baseline_throughput:.1f})"
            )
        slow = self.slow_workers()
        for w in self.worker_stats:
            f = w.fractions()
            parts = " ".join(f"{s} {f[s]:.0%}" for s in (*STAGES, "other"))
            note = f"  LOST: {w.lost}" if w.lost else ""
            if w.worker in slow:
                note += f"  SLOW: {slow[w.worker]:.1f}x slower than the median of the other workers"
            if not w.ready:
                lines.append(f"  worker {w.worker}: not ready: {w.not_ready or 'never loaded'}{note}")
                continue
            lines.append(
                f"  worker {w.worker} ({w.host} pid {w.pid}): {w.rows} rows, busy {w.busy_fraction:.0%}"
                f" | {parts}{note}"
            )
            if w.generation is not None:
                lines.append(f"    {w.generation.line(w.elapsed_s)}")
            if w.group is not None:
                lines.extend(w.group.lines())
        if self.restarts:
            lines.append(f"  {self.restarts} worker(s) replaced")
        if self.speculated:
            lines.append(f"  speculation: {self.speculated} block(s) copied at the tail, "
                         f"{self.speculation_won} copy(ies) finished first, "
                         f"{self.speculation_wasted_s:.1f} worker-s on losing copies")
        lines.append(f"  output: {self.output_dir}")
        return "\n".join(lines)


class Progress:
    """A one-line progress bar on a terminal: rows, rows/s, ETA. Silent elsewhere."""

    def __init__(self, total: int, enabled: bool | None = None, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = total
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._first: tuple[float, int] | None = None  # (time, rows) of the first progress
        self._first_tokens = 0

    def update(self, done: int, force: bool = False, tokens: int | None = None) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last_draw < 0.2):
            return
        self._last_draw = now
        if self._first is None and done > 0:
            self._first = (now, done)
            self._first_tokens = tokens or 0
        # The rate counts from the first finished rows, so start-up does not skew the ETA.
        since, base = self._first if self._first is not None else (self.started, 0)
        elapsed = now - since
        rate = (done - base) / elapsed if elapsed > 0 and done > base else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        width = 30
        filled = int(width * done / self.total) if self.total else width
        eta_text = f"{eta:5.0f}s" if eta != float("inf") else "    ?"
        token_text = ""
        if tokens is not None:
            token_rate = (tokens - self._first_tokens) / elapsed if elapsed > 0 and done > base else 0.0
            token_text = f" {token_rate:7.1f} tokens/s"
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} rows "
            f"{rate:7.1f} rows/s{token_text} ETA {eta_text}"
        )
        self.stream.flush()

    def close(self, done: int) -> None:
        if self.enabled:
            self.update(done, force=True)
            self.stream.write("\n")
            self.stream.flush()
