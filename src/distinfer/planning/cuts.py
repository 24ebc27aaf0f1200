"""Cutting a model's layers into pipeline stages: balanced for time, within a memory limit.

Design
------
A model is a sequence of layers, each with a measured `LayerCost`. A pipeline stage is a
contiguous range of layers on one worker; in steady state a pipeline runs one micro-batch per
slowest stage, so `balanced_cut` minimises that bottleneck exactly (dynamic programming over
prefix sums, O(K·n²)), under a per-worker memory limit.

* Memory of a stage = its weights + 2 × the largest activation it holds. While a layer runs,
  its input and its output are alive together, and both are at most that largest activation;
  the activations counted are the outputs of the stage's layers and, for every stage but the
  first, the output of the layer before it (what the stage receives). The model's own input is
  not known here and is left out. A sub-range of a stage never needs more memory than the
  stage, which is why more stages always fit if fewer do, and why `min_stages_for_memory` can
  take the longest stage that fits, left to right.
* Ties: among the splits with the least bottleneck, the one that sends the fewest bytes across
  its cuts wins, since transfers are the cost the time model leaves out. This is a second
  exact DP with the bottleneck as a cap, as a lexicographic (bottleneck, bytes) DP would not
  be exact. Any tie left keeps the later cuts, so the same costs always give the same plan.
* Impossible plans raise `ConfigError` with what would work (`--stages N`, the memory needed).

Worked example: times 2, 3, 4, 1 ms; weights 3, 1, 1, 1 GiB; every output 0.1 GiB.

* `balanced_cut(costs, 2)` cuts before layer 2: 5 ms | 5 ms, 100% of the ideal 5 ms each.
* With `memory_limit` 4 GiB stage [0, 2) would need 3 + 1 + 2 × 0.1 = 4.2 GiB, so the cut
  moves to 1: 2 ms | 8 ms (stage [1, 4) needs 3.2 GiB).
* With 3 GiB layer 0 alone needs 3.2 GiB: `ConfigError`, no number of stages fits.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from distinfer.errors import ConfigError
from distinfer.planning.sizes import format_bytes

__all__ = ["LayerCost", "PipelinePlan", "Stage", "balanced_cut", "explicit_cut", "min_stages_for_memory"]


@dataclass(frozen=True, slots=True)
class LayerCost:
    """What one layer costs for one micro-batch."""

    name: str
    seconds: float  # measured compute time
    weight_bytes: int  # parameters + buffers
    activation_bytes: int  # its output: what crosses a cut placed after it

    def __post_init__(self) -> None:
        if not (math.isfinite(self.seconds) and self.seconds >= 0):
            raise ValueError(f"layer {self.name!r}: seconds must be finite and >= 0, got {self.seconds}")
        if self.weight_bytes < 0 or self.activation_bytes < 0:
            raise ValueError(f"layer {self.name!r}: byte counts must be >= 0")


@dataclass(frozen=True, slots=True)
class Stage:
    """Layers [start, stop) on one worker, with their predicted time and memory per micro-batch."""

    start: int
    stop: int
    seconds: float
    memory_bytes: int  # weights + 2 × the largest activation held (see the module note)


@dataclass(frozen=True, slots=True)
class PipelinePlan:
    """Contiguous, non-empty stages that cover layers 0..n-1 in order."""

    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        starts = [0, *(s.stop for s in self.stages)]
        if not self.stages or any(
            s.start != a or s.stop <= a for s, a in zip(self.stages, starts[:-1], strict=True)
        ):
            raise ValueError(f"stages must be contiguous, non-empty and start at 0: {self.stages}")

    def cuts(self) -> tuple[int, ...]:
        """The layer indices where stages 1.. start."""
        return tuple(s.start for s in self.stages[1:])

    @property
    def bottleneck_s(self) -> float:
        """The slowest stage: the pipeline's time per micro-batch in steady state."""
        return max(s.seconds for s in self.stages)

    @property
    def total_s(self) -> float:
        """One micro-batch through every stage: the latency of an empty pipeline."""
        return math.fsum(s.seconds for s in self.stages)

    def bubble(self, micro_batches: int) -> float:
        """The idle fraction of a GPipe-style schedule: (p - 1) / (m + p - 1)."""
        if micro_batches < 1:
            raise ConfigError(f"micro-batches must be at least 1, got {micro_batches}")
        p = len(self.stages)
        return (p - 1) / (micro_batches + p - 1)

    def describe(self, names: Sequence[str] | None = None) -> str:
        """A table of the stages; `of ideal` is a stage's time as a % of a perfect balance."""
        ideal = self.total_s / len(self.stages)
        label = (lambda i: names[i]) if names is not None else str
        rows = [("stage", "layers", "time", "memory", "of ideal")]
        for k, s in enumerate(self.stages):
            span = label(s.start) if s.stop - s.start == 1 else f"{label(s.start)}..{label(s.stop - 1)}"
            share = f"{100 * s.seconds / ideal:.0f}%" if ideal > 0 else "-"
            rows.append((str(k), span, f"{s.seconds * 1e3:.3f} ms", format_bytes(s.memory_bytes), share))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.append(f"bottleneck {self.bottleneck_s * 1e3:.3f} ms a micro-batch, ideal {ideal * 1e3:.3f} ms")
        return "\n".join(lines)


class _Costs:
    """Prefix sums over the layers, so that a stage's time and weights cost O(1)."""

    def __init__(self, costs: Sequence[LayerCost]) -> None:
        self.costs = list(costs)
        self.n = len(self.costs)
        self.time = [0.0, *itertools.accumulate(c.seconds for c in self.costs)]
        self.weights = [0, *itertools.accumulate(c.weight_bytes for c in self.costs)]

    def received(self, i: int) -> int:
        """Bytes a stage starting at layer i receives (and a cut before i sends)."""
        return self.costs[i - 1].activation_bytes if i > 0 else 0

    def memory(self, i: int, j: int) -> int:
        peak = max(self.received(i), *(c.activation_bytes for c in self.costs[i:j]))
        return self.weights[j] - self.weights[i] + 2 * peak

    def ending_at(self, j: int, limit: int | None) -> Iterator[tuple[int, float, int]]:
        """(start, seconds, memory) of the stages [i, j) that fit, longest last.

        Growing the stage leftwards keeps a running peak, and stops at the first that does
        not fit, since a longer one cannot fit either.
        """
        peak = 0
        for i in range(j - 1, -1, -1):
            peak = max(peak, self.costs[i].activation_bytes, self.received(i))
            memory = self.weights[j] - self.weights[i] + 2 * peak
            if limit is not None and memory > limit:
                return
            yield i, self.time[j] - self.time[i], memory

    def plan(self, cuts: Sequence[int]) -> PipelinePlan:
        bounds = [0, *cuts, self.n]
        stages = (
            Stage(a, b, math.fsum(c.seconds for c in self.costs[a:b]), self.memory(a, b))
            for a, b in itertools.pairwise(bounds)
        )
        return PipelinePlan(tuple(stages))


def _split(
    table: _Costs,
    stages: int,
    limit: int | None,
    cost: Callable[[int, float, int], float],
    combine: Callable[[float, float], float],
) -> tuple[float, list[int]] | None:
    """The least combined cost of `stages` stages over all layers, and its cuts; None if none fits.

    `cost(start, seconds, memory)` prices one stage; a stage priced `inf` is not allowed.
    """
    n, inf = table.n, math.inf
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    choice = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        # the first k stages end between k and n - (stages - k): every stage keeps one layer
        for j in range(k, n - stages + k + 1):
            for i, seconds, memory in table.ending_at(j, limit):
                if i < k - 1:
                    break
                value = combine(best[k - 1][i], cost(i, seconds, memory))
                if value < best[k][j]:
                    best[k][j], choice[k][j] = value, i
    if best[stages][n] == inf:
        return None
    cuts = [n]
    for k in range(stages, 1, -1):
        cuts.append(choice[k][cuts[-1]])
    return best[stages][n], cuts[:0:-1]


def _stages(k: int) -> str:
    return f"{k} stage" if k == 1 else f"{k} stages"


def _table(costs: Sequence[LayerCost]) -> _Costs:
    table = _Costs(costs)
    if table.n == 0:
        raise ConfigError("the model has no layers to cut into stages")
    return table


def min_stages_for_memory(costs: Sequence[LayerCost], memory_limit: int) -> int | None:
    """The fewest stages whose every stage fits `memory_limit`; None if a single layer does not.

    Greedy is exact here: taking the longest stage that fits leaves the fewest layers behind,
    and a stage that fits stays fitting when it starts later (see the module note).
    """
    table, count, start = _Costs(costs), 0, 0
    while start < table.n:
        stop = start
        while stop < table.n and table.memory(start, stop + 1) <= memory_limit:
            stop += 1
        if stop == start:
            return None
        count, start = count + 1, stop
    return count


def _no_fit(table: _Costs, stages: int, limit: int, what: str) -> ConfigError:
    i = max(range(table.n), key=lambda i: table.memory(i, i + 1))
    name, biggest = table.costs[i].name, table.memory(i, i + 1)
    need = min_stages_for_memory(table.costs, limit)
    head = f"{what} --worker-memory {format_bytes(limit)}"
    if need is None:
        return ConfigError(
            f"{head}: the largest layer {name!r} alone needs {format_bytes(biggest)}; no number of "
            f"stages fits, use a larger --worker-memory (at least {format_bytes(biggest)})"
        )
    if need <= stages:  # only explicit cuts get here: a better placed cut of as many stages fits
        cuts = balanced_cut(table.costs, stages, limit).cuts()
        return ConfigError(f"{head}; {_stages(stages)} do fit with --cuts {','.join(map(str, cuts))}")
    # the least limit for this many stages: the same DP with memory as the price
    found = _split(table, stages, None, lambda _i, _s, memory: float(memory), max)
    assert found is not None  # without a limit every split fits
    return ConfigError(
        f"{head} (largest layer {name!r}: {format_bytes(biggest)}); the fewest stages that fit is "
        f"{need}: use --stages {need} or --worker-memory of at least {format_bytes(int(found[0]))}"
    )


def balanced_cut(costs: Sequence[LayerCost], stages: int, memory_limit: int | None = None) -> PipelinePlan:
    """The split into `stages` contiguous stages with the least bottleneck that fits the limit."""
    table = _table(costs)
    if stages < 1:
        raise ConfigError(f"--stages must be at least 1, got {stages}")
    if stages > table.n:
        raise ConfigError(
            f"--stages {stages} is more than the model's {table.n} layers; use --stages {table.n} or fewer"
        )
    fastest = _split(table, stages, memory_limit, lambda _i, seconds, _m: seconds, max)
    if fastest is None:
        assert memory_limit is not None  # without a limit every split fits
        raise _no_fit(table, stages, memory_limit, f"no split into {_stages(stages)} fits")
    bottleneck = fastest[0]

    def sent(i: int, seconds: float, _memory: int) -> float:
        return float(table.received(i)) if seconds <= bottleneck else math.inf

    fewest_bytes = _split(table, stages, memory_limit, sent, lambda a, b: a + b)
    assert fewest_bytes is not None  # the fastest split is one candidate
    return table.plan(fewest_bytes[1])


def explicit_cut(
    costs: Sequence[LayerCost], cut_points: Sequence[int], memory_limit: int | None = None
) -> PipelinePlan:
    """The plan whose stages start at the given layer indices (besides 0), checked for memory."""
    table, cuts = _table(costs), list(cut_points)
    for c in cuts:
        if not 0 < c < table.n:
            raise ConfigError(f"--cuts: {c} is not a layer index from 1 to {table.n - 1} ({table.n} layers)")
    for a, b in itertools.pairwise(cuts):
        if b <= a:
            raise ConfigError(f"--cuts must be strictly increasing, got {a} then {b}")
    plan = table.plan(cuts)
    if memory_limit is not None:
        for k, s in enumerate(plan.stages):
            if s.memory_bytes > memory_limit:
                need = format_bytes(s.memory_bytes)
                what = f"stage {k} (layers {s.start}..{s.stop - 1}) needs {need}, over"
                raise _no_fit(table, len(plan.stages), memory_limit, what)
    return plan
