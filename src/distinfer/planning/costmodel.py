"""The cost model: a layout's throughput, batch latency and memory, from a `Profile` alone.

Pure arithmetic over measured figures; docs/planning.md writes the same formulas out.

* One process, `t` threads, batches of `b` rows: `X(t, b)` rows/s, measured (`Rate` with one
  process), interpolated linearly in `t` and in `log b` between measured points and held
  flat beyond them.
* Contention. `n` busy processes of `t` threads each on a node of `C` cores each run at
  `kappa(n, t) * X(t, b)`. `kappa` is measured: the per-process rate of `n` processes at
  once over one alone (on this machine two one-thread processes each run slower than one
  alone: shared caches and memory bandwidth), at the measured batch size nearest `b`
  (how much two processes slow each other depends on it). Between measured core counts `u = n*t` it is
  interpolated linearly from `kappa = 1` at `u = t`; past `C` busy cores the processes
  share them in time: `kappa(C) * C / (n t)`.
* Data parallel, `R` replicas: `R * kappa(R, t) * X(t, b)`; a batch's latency `b / (kappa X)`.
* Pipeline, `p` stages cut by `balanced_cut` over the measured layer times (their shares
  interpolated in `log b` between the batch sizes they were measured at): stage `k` takes
  `s_k * b / (kappa(R min(p, m), t) X(t, b)) + link(a_k)` (no more than `m` stages are busy at
  once), where `s_k` is the stage's share of the
  layer time and `link(a) = latency + a / bandwidth` moves the activation `a` it sends. A
  replica makes `b / max_k T_k` rows/s in steady state. A block of `m` micro-batches takes
  `sum_k T_k + (m - 1) max_k T_k`: the first micro-batch's way through every stage, then one
  bottleneck step each; with equal stages `(m + p - 1) T`, the bubble `(p - 1) / (m + p - 1)`.
  Over a job, `sum_i m_i b / sum_i (sum_k T_k + (m_i - 1) max_k T_k)` for its blocks `i` (the
  first and last blocks are small, so their bubbles are larger). Latency: `sum_k T_k`.
* Tensor parallel, `k` ranks (Megatron): ideally every rank computes `1/k` of each layer, so
  a batch takes `b / (k kappa(R k, t) X(t, b)) + 2 L allreduce(a)` for `L` layers, where
  `allreduce(a) = 2 (k-1) latency + 2 (k-1)/k * a / bandwidth` (a ring) and `a` is one
  layer's output for the batch. What is not sharded (embeddings, norms, the head, the
  preparation, small matrices that do not halve in time) makes a real group slower, the
  more so the smaller the batch; so one group of `k` one-thread ranks is measured at each
  batch size, and its rate over this formula's (at `R = 1`, `t = 1`), the efficiency
  `e_k(b)` (interpolated in `log b`), multiplies the formula's rate for every `R` and `t`.
* Memory per process: data, the measured worker's peak; pipeline, the stage's weights + 2 x
  its largest activation + `RUNTIME_RESERVE` (+ `HEAD_RESERVE` on stage 0, which also reads
  and writes the block); tensor, `1/k` of the weights + 2 x the largest activation +
  `RUNTIME_RESERVE`.
* A node of relative speed `s` runs every rate `s` times faster; a cluster's throughput is
  the sum over its nodes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from distinfer.planning.cuts import LayerCost, PipelinePlan, balanced_cut
from distinfer.planning.profiles import Profile, Rate

__all__ = [
    "HEAD_RESERVE",
    "RUNTIME_RESERVE",
    "Estimate",
    "allreduce_s",
    "bubble",
    "contention",
    "estimate_data",
    "estimate_pipeline",
    "estimate_tensor",
    "single_rate",
    "tensor_efficiency",
]

#: Memory each worker process needs beyond weights and activations: Python, torch and the
#: allocator's slack. A stage of the 1B decoder measured about 0.45 GiB above its planned size.
RUNTIME_RESERVE = 512 * 2**20

#: Stage 0 of a pipeline is also the worker process: it reads and tokenises each block,
#: collects every micro-batch's outputs and writes the part. On the 1B decoder it peaked
#: about 0.3 GiB above the other stages, so its first layer is charged this much more.
HEAD_RESERVE = 320 * 2**20


@dataclass(frozen=True, slots=True)
class Estimate:
    """What one replica of a layout does on the profiled machine, at speed 1."""

    rows_per_s: float  # one replica, with the contention of every process of the node busy
    latency_s: float  # one batch through the replica
    memory_bytes: int  # the largest process
    processes: int  # per replica
    plan: PipelinePlan | None = None


def _interp(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear through sorted (x, y) points, flat beyond the ends."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def _alone(profile: Profile) -> list[Rate]:
    alone = [r for r in profile.rates if r.processes == 1 and r.ranks == 1]
    if not alone:
        raise ValueError(f"the profile of {profile.model} has no single-process rate")
    return alone


def single_rate(profile: Profile, threads: int, batch_size: int) -> float:
    """X(t, b): one process's rows/s with `threads` threads and batches of `batch_size`."""
    alone = _alone(profile)
    by_threads: dict[int, list[tuple[float, float]]] = {}
    for r in alone:
        by_threads.setdefault(r.threads, []).append((math.log(r.batch_size), r.rows_per_s))
    points = [(float(t), _interp(sorted(pts), math.log(batch_size))) for t, pts in sorted(by_threads.items())]
    return _interp(points, float(threads))


def contention(
    profile: Profile, processes: int, threads: int, cores: int, batch_size: int | None = None
) -> float:
    """kappa: each of `processes` busy processes' rate over one alone (1 for one process),
    as measured at the batch size nearest `batch_size` (None: the mean over batch sizes)."""
    busy = processes * threads
    if processes <= 1:
        return 1.0 if busy <= cores else cores / busy
    by_busy: dict[int, list[tuple[float, float]]] = {}  # busy cores -> (log batch, kappa)
    for r in profile.rates:
        if r.processes > 1 and r.ranks == 1:
            kappa = r.rows_per_s / single_rate(profile, r.threads, r.batch_size)
            by_busy.setdefault(r.processes * r.threads, []).append((math.log(r.batch_size), kappa))
    measured = []
    for u, points in sorted(by_busy.items()):
        if batch_size is None:
            measured.append((u, math.fsum(k for _, k in points) / len(points)))
        else:
            near = min(points, key=lambda p: abs(p[0] - math.log(batch_size)))
            measured.append((u, near[1]))
    points = [(float(threads), 1.0), *((float(u), k) for u, k in measured if u > threads)]
    if busy <= cores:
        return min(1.0, _interp(points, float(busy)))
    return min(1.0, _interp(points, float(cores))) * cores / busy


def bubble(stages: int, micro_batches: int) -> float:
    """The idle share of a pipeline over one block: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (max(1, micro_batches) + stages - 1)


def allreduce_s(profile: Profile, nbytes: float, ranks: int) -> float:
    """A ring all-reduce of `nbytes` over `ranks` ranks."""
    if ranks <= 1:
        return 0.0
    links = profile.links
    steps = 2 * (ranks - 1)
    return steps * links.allreduce_latency_s + steps / ranks * nbytes / links.allreduce_bytes_per_s


def _shares(seconds: Sequence[float]) -> list[float]:
    whole = math.fsum(seconds) or 1.0
    return [x / whole for x in seconds]


def _shares_at(measured: list[tuple[int, list[float]]], at: float) -> list[float]:
    """Each layer's share of the time at `at`, interpolated in log between the points measured."""
    points = sorted((math.log(x), _shares(secs)) for x, secs in measured)
    return [_interp([(px, sh[i]) for px, sh in points], math.log(at)) for i in range(len(points[0][1]))]


def _scaled_layers(profile: Profile, batch_size: int) -> list[LayerCost]:
    """The measured layers at `batch_size` rows of the sample's length: each layer's share of
    the time interpolated in `log b` between the batch sizes measured (`layer_batch` and
    `layers_by_batch`), then moved by how the shares move in `log L` between the lengths
    measured (`layer_seq_len` and `layers_by_seq`) to the sample's `seq_len` (flat beyond the
    points measured), in `layer_batch`'s units; activations scaled by rows and length."""
    base = [c.seconds for c in profile.layers]
    total = math.fsum(base) or 1.0
    by_batch = [(profile.layer_batch, base), *((b, list(s)) for b, s in profile.layers_by_batch
                                               if len(s) == len(base))]  # fmt: skip
    shares = _shares_at(by_batch, batch_size) if len(by_batch) > 1 else _shares(base)
    by_seq = [(profile.layer_seq_len, base), *((n, list(s)) for n, s in profile.layers_by_seq
                                               if len(s) == len(base))]  # fmt: skip
    # only a family measured at several lengths (a text model) is moved to the sample's
    length = profile.seq_len if len(by_seq) > 1 and profile.seq_len else profile.layer_seq_len
    if length != profile.layer_seq_len:
        moved = [a / b if b else 1.0 for a, b in zip(_shares_at(by_seq, length), _shares(base), strict=True)]
        shares = _shares([s * m for s, m in zip(shares, moved, strict=True)])
    scale = batch_size / max(1, profile.layer_batch) * length / max(1, profile.layer_seq_len)
    return [
        LayerCost(c.name, total * share, c.weight_bytes, int(c.activation_bytes * scale))
        for c, share in zip(profile.layers, shares, strict=True)
    ]


def with_calls(rows_per_s: float, block_rows: int, call_s: float) -> float:
    """A replica's rows/s when each block of `block_rows` also costs `call_s` to hand out and
    answer (an actor call on Ray: twice the object store's measured latency)."""
    if call_s <= 0 or rows_per_s <= 0 or block_rows <= 0:
        return rows_per_s
    return block_rows / (block_rows / rows_per_s + call_s)


def estimate_data(profile: Profile, replicas: int, threads: int, batch_size: int, cores: int) -> Estimate:
    kappa = contention(profile, replicas, threads, cores, batch_size)
    rate = single_rate(profile, threads, batch_size) * kappa
    memory = profile.worker_rss or profile.weight_bytes + RUNTIME_RESERVE
    return Estimate(rate, batch_size / rate, memory, 1)


def estimate_pipeline(
    profile: Profile,
    replicas: int,
    stages: int,
    threads: int,
    batch_size: int,
    cores: int,
    micro_batches: Sequence[tuple[int, int]],
    memory_limit: int | None,
) -> Estimate:
    """`balanced_cut` over the measured layers; raises ConfigError when no cut fits the limit.

    `micro_batches`: the job's blocks as (micro-batches, blocks) pairs (its ramp of small
    first and last blocks has larger bubbles than the middle's)."""
    layers = _scaled_layers(profile, batch_size)
    reserve = [HEAD_RESERVE, *([0] * (len(layers) - 1))]
    charged = [
        LayerCost(c.name, c.seconds, c.weight_bytes + r, c.activation_bytes)
        for c, r in zip(layers, reserve, strict=True)
    ]
    limit = None if memory_limit is None else max(0, memory_limit - RUNTIME_RESERVE)
    plan = balanced_cut(charged, stages, limit)
    total = math.fsum(c.seconds for c in layers) or 1.0
    shares = [math.fsum(c.seconds for c in layers[s.start : s.stop]) / total for s in plan.stages]
    links = profile.links
    sends = [  # moving each stage's activation on to the next (the last sends nothing)
        links.shm_latency_s + layers[s.stop - 1].activation_bytes / links.shm_bytes_per_s
        if k < len(plan.stages) - 1 and layers[s.stop - 1].activation_bytes else 0.0
        for k, s in enumerate(plan.stages)
    ]  # fmt: skip
    alone = single_rate(profile, threads, batch_size)
    rows = seconds = most = latency = 0.0
    for m, count in micro_batches:
        m = max(1, m)
        # a block of m < p micro-batches never has more than m stages busy at once
        kappa = contention(profile, replicas * min(stages, m), threads, cores, batch_size)
        per_batch = batch_size / (alone * kappa)
        times = [per_batch * share + send for share, send in zip(shares, sends, strict=True)]
        # m micro-batches through the stages: the first one's way through all of them, then
        # one more bottleneck step each ((m + p - 1) T when the stages are equal)
        rows += count * m * batch_size
        seconds += count * (math.fsum(times) + (m - 1) * max(times))
        if count * m > most:  # a batch's latency in the blocks that hold most of the rows
            most, latency = count * m, math.fsum(times)
    memory = max(s.memory_bytes for s in plan.stages) + RUNTIME_RESERVE
    return Estimate(rows / seconds if seconds else 0.0, latency, memory, stages, plan)


def _ideal_tensor_s(
    profile: Profile, replicas: int, ranks: int, threads: int, batch_size: int, cores: int
) -> float:
    """One batch through a group whose ranks each compute exactly `1/ranks` of the model,
    plus two all-reduces of a block's output per block."""
    layers = _scaled_layers(profile, batch_size)
    compute = batch_size / (
        ranks
        * single_rate(profile, threads, batch_size)
        * contention(profile, replicas * ranks, threads, cores, batch_size)
    )
    blocks = [c for c in layers if c.name.startswith(("block", "layer"))] or layers
    hidden = max((c.activation_bytes for c in blocks), default=0)
    return compute + 2 * len(blocks) * allreduce_s(profile, hidden, ranks)


def tensor_efficiency(profile: Profile, ranks: int, batch_size: int, cores: int) -> float:
    """e_k(b): a measured group of `ranks` one-thread ranks' rate over the ideal formula's,
    interpolated in `log b` between measured batch sizes (1 where none was measured)."""
    points = sorted(
        (math.log(r.batch_size),
         r.rows_per_s * _ideal_tensor_s(profile, 1, ranks, 1, r.batch_size, cores) / r.batch_size)
        for r in profile.rates if r.ranks == ranks and r.threads == 1 and r.processes == 1
    )  # fmt: skip
    return _interp(points, math.log(batch_size)) if points else 1.0


def estimate_tensor(
    profile: Profile, replicas: int, ranks: int, threads: int, batch_size: int, cores: int
) -> Estimate:
    ideal = _ideal_tensor_s(profile, replicas, ranks, threads, batch_size, cores)
    latency = ideal / tensor_efficiency(profile, ranks, batch_size, cores)
    layers = _scaled_layers(profile, batch_size)
    largest = max((c.activation_bytes for c in layers), default=0)
    memory = profile.weight_bytes // ranks + 2 * largest + RUNTIME_RESERVE
    return Estimate(batch_size / latency, latency, memory, ranks)
