"""The planner: every layout a model can take on the given resources, predicted and ranked.

Pure: a `Profile` (measured figures), a `Cluster` (node kinds) and a `Workload` in, a list
of `Plan`s out, best first, each with the reasons for its place. No process is started and
no clock is read, so the unit tests give fixed profiles and check the choices.

Candidates, for each node kind (every replica of a layout lives on one node):

* data: `r` replicas of `t` threads, `r t <= cores`;
* pipeline: `r` replicas of `p` stages (2 <= p <= layers) of `t` threads, `r p t <= cores`,
  or one replica of more stages than cores (1 thread each) when the model needs them to fit;
* tensor: `r` replicas of `k` ranks (the counts the family can shard over), `r k t <= cores`;
* each at every measured batch size.

A text-generation profile (`tokens_per_row` > 0) plans data-parallel layouts only, its
"batch size" being the sequences a replica runs together (`--max-running`) and its latency
the time per output token: a step's time, with `b` sequences each getting one token.

A plan is refused (kept in the list, last, with the reason) when a process would need more
memory than `--worker-memory` or a node has, when one batch's latency misses the target, or
when it cannot sustain the serving rate. The rest are ranked by throughput (the job's time
on a cluster), then by latency, then by fewer processes; plans within 2% of each other in
throughput are taken as equal, so the one with the lower latency wins.

On this machine every replica count is a plan of its own (2 x 1 thread against 1 x 2
threads); on a described cluster each node kind runs as many replicas as gives it the most
throughput, since nodes are independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from distinfer.data.blocks import block_size_counts
from distinfer.errors import ConfigError
from distinfer.planning.cluster import Cluster, NodeKind
from distinfer.planning.costmodel import (
    RUNTIME_RESERVE,
    Estimate,
    bubble,
    contention,
    estimate_data,
    estimate_pipeline,
    estimate_tensor,
    with_calls,
)
from distinfer.planning.cuts import LayerCost, min_stages_for_memory
from distinfer.planning.profiles import Profile
from distinfer.planning.sizes import format_bytes

__all__ = ["Plan", "Workload", "make_plans"]

TIE = 0.02  # throughputs within 2% rank as equal
#: a pipeline or tensor-parallel plan ranks above a data-parallel one only when predicted this
#: much faster: its processes wait on each other, so the machine's noise costs it more, and
#: its prediction (bubble, all-reduces, measured group efficiency) is the less certain one
MODEL_PARALLEL_MARGIN = 0.05


@dataclass(frozen=True, slots=True)
class Workload:
    """What is to be run: `rows` rows in blocks of `block_size`, optionally under a latency
    target for one batch, or as a server that must sustain `request_rate` rows/s."""

    rows: int
    block_size: int = 256
    latency_target_s: float | None = None
    request_rate: float | None = None
    worker_memory: int | None = None  # bytes a worker process may use, all included
    batch_sizes: tuple[int, ...] = ()  # () = the profile's measured batch sizes
    min_block_size: int | None = None  # the first and last blocks; None: the batch size, as `run`

    def micro_batches(self, batch_size: int) -> list[tuple[int, int]]:
        """The job's blocks as (micro-batches of `batch_size`, blocks) pairs: the plan `run`
        makes (`block_size_counts`), so the ramp's small blocks count with their bubbles."""
        least = min(self.min_block_size or batch_size, self.block_size)
        counts = block_size_counts(self.rows, self.block_size, least) if self.rows else []
        micro: dict[int, int] = {}
        for size, n in counts or [(self.block_size, 1)]:
            m = math.ceil(size / batch_size)
            micro[m] = micro.get(m, 0) + n
        return sorted(micro.items())


@dataclass(frozen=True, slots=True)
class Plan:
    """One layout with its predicted figures (on the whole cluster) and its reasons."""

    strategy: str  # data, pipeline, tensor, or a hybrid: "data x pipeline", "data x tensor"
    replicas: int  # over the whole cluster
    stages: int
    ranks: int
    threads: int  # per process
    batch_size: int
    cuts: tuple[int, ...]
    rows_per_s: float
    job_s: float
    latency_s: float
    memory_bytes: int  # per process, the largest
    processes: int  # over the whole cluster
    per_node: tuple[tuple[str, int], ...] = ()  # (node kind, replicas per node)
    refused: str = ""  # why the plan cannot be used, or ""
    reasons: tuple[str, ...] = field(default=())
    tokens_per_row: float = 0.0  # text generation: tokens generated per row (0: not generation)

    @property
    def generates(self) -> bool:
        return self.tokens_per_row > 0

    @property
    def shape(self) -> str:
        """How one replica holds the model, e.g. `2 stages x 1 thread`."""
        inner = (
            f"{self.stages} stages"
            if self.stages > 1
            else f"{self.ranks} ranks"
            if self.ranks > 1
            else "1 process"
        )
        batch = f"{self.batch_size} running" if self.generates else f"batch {self.batch_size}"
        return f"{inner} x {self.threads} thread{'s' if self.threads > 1 else ''}, {batch}"

    def cli_args(self) -> list[str]:
        """The `distinfer run` flags that give this layout (on the local backend)."""
        base = self.strategy.split(" x ")[-1]
        batch = "--max-running" if self.generates else "--batch-size"
        args = ["--strategy", base, "--workers", str(self.replicas), batch, str(self.batch_size)]
        args += ["--threads-per-worker", str(self.threads)]
        if self.stages > 1:
            args += ["--stages", str(self.stages)]
        if self.ranks > 1:
            args += ["--tensor-parallel", str(self.ranks)]
        return args


def _strategy(replicas: int, stages: int, ranks: int) -> str:
    inner = "pipeline" if stages > 1 else "tensor" if ranks > 1 else "data"
    return f"data x {inner}" if replicas > 1 and inner != "data" else inner


def _shapes(profile: Profile, node: NodeKind, work: Workload) -> list[tuple[int, int]]:
    """(stages, ranks) of one replica that the model's family supports on this node: up to a
    stage per core, and when the model is larger than a worker's memory up to one more than
    the fewest stages that fit it, however many cores (the stages then share the cores)."""
    out = [(1, 1)]
    if "pipeline" in profile.strategies and len(profile.layers) >= 2:
        most = node.cores
        limit = work.worker_memory if work.worker_memory is not None else node.memory
        if profile.weight_bytes + RUNTIME_RESERVE > limit:
            fewest = min_stages_for_memory(profile.layers, max(0, limit - RUNTIME_RESERVE))
            most = max(most, (fewest or 0) + 1)
        out += [(p, 1) for p in range(2, min(len(profile.layers), most) + 1)]
    if "tensor" in profile.strategies:
        out += [(1, k) for k in profile.tensor_ranks if 1 < k <= node.cores]
    return out


def _estimate(
    profile: Profile, node: NodeKind, r: int, p: int, k: int, t: int, b: int, work: Workload
) -> Estimate:
    if p > 1:
        limit = work.worker_memory if work.worker_memory is not None else node.memory
        return estimate_pipeline(profile, r, p, t, b, node.cores, work.micro_batches(b), limit)
    if k > 1:
        return estimate_tensor(profile, r, k, t, b, node.cores)
    return estimate_data(profile, r, t, b, node.cores)


def _memory_refusal(est: Estimate, node: NodeKind, r: int, work: Workload) -> str:
    if work.worker_memory is not None and est.memory_bytes > work.worker_memory:
        return (
            f"a process needs {format_bytes(est.memory_bytes)}, more than --worker-memory "
            f"{format_bytes(work.worker_memory)}"
        )
    if est.memory_bytes * est.processes * r > node.memory:
        return (
            f"{r * est.processes} processes of {format_bytes(est.memory_bytes)} need more than "
            f"{node.kind}'s {format_bytes(node.memory)}"
        )
    return ""


def _node_options(
    profile: Profile, node: NodeKind, p: int, k: int, t: int, b: int, work: Workload
) -> list[tuple[int, Estimate, str]]:
    """(replicas per node, estimate, refusal) for every replica count that fits the cores."""
    procs = p * k
    out = []
    for r in range(1, max(1, node.cores // (procs * t)) + 1):
        try:
            est = _estimate(profile, node, r, p, k, t, b, work)
        except ConfigError as exc:  # no cut fits the memory limit
            out.append((r, Estimate(0.0, math.inf, 0, procs), str(exc).split(";")[0]))
            continue
        out.append((r, est, _memory_refusal(est, node, r, work)))
    return out


def _combine(
    profile: Profile, cluster: Cluster, p: int, k: int, t: int, b: int, work: Workload
) -> list[Plan]:
    per_kind = {n.kind: _node_options(profile, n, p, k, t, b, work) for n in cluster.nodes}
    if any(not opts for opts in per_kind.values()):
        return []
    if cluster.local and len(cluster.nodes) == 1:
        choices = [[o] for o in next(iter(per_kind.values()))]
    else:  # each kind at its best replica count (a refused one only when none fits)
        best = [max(opts, key=lambda o: (not o[2], o[0] * o[1].rows_per_s)) for opts in per_kind.values()]
        choices = [best]
    plans = []
    # a described cluster runs on Ray: each block is an actor call through its object store
    call_s = 0.0 if cluster.local else 2 * profile.links.ray_latency_s
    for choice in choices:
        rate = sum(
            n.count * r * with_calls(n.speed * est.rows_per_s, work.block_size, call_s)
            for n, (r, est, _) in zip(cluster.nodes, choice, strict=True)
        )
        replicas = sum(n.count * r for n, (r, _, _) in zip(cluster.nodes, choice, strict=True))
        slowest = min(n.speed for n in cluster.nodes)
        latency = max(est.latency_s for _, est, _ in choice) / slowest
        if profile.tokens_per_row:  # a step: every running sequence's next token
            latency /= profile.tokens_per_row
        refused = next((why for _, _, why in choice if why), "")
        first = choice[0][1]
        plans.append(Plan(
            strategy=_strategy(replicas, p, k), replicas=replicas, stages=p, ranks=k, threads=t,
            batch_size=b, cuts=first.plan.cuts() if first.plan else (), rows_per_s=rate,
            job_s=(work.rows / rate if rate > 0 else math.inf) + profile.startup_s, latency_s=latency,
            memory_bytes=max(est.memory_bytes for _, est, _ in choice), processes=replicas * p * k,
            per_node=tuple((n.kind, r) for n, (r, _, _) in zip(cluster.nodes, choice, strict=True)),
            refused=refused, tokens_per_row=profile.tokens_per_row,
        ))  # fmt: skip
    return plans


def _latency_name(plan: Plan) -> str:
    return "one output token" if plan.generates else "one batch"


def _targets(plan: Plan, work: Workload) -> Plan:
    if plan.refused:
        return plan
    if work.latency_target_s is not None and plan.latency_s > work.latency_target_s:
        return replace(
            plan,
            refused=f"{_latency_name(plan)} takes {plan.latency_s * 1e3:.0f} ms, over the "
            f"{work.latency_target_s * 1e3:.0f} ms latency target",
        )
    if work.request_rate is not None and plan.rows_per_s < work.request_rate:
        return replace(
            plan, refused=f"sustains {plan.rows_per_s:.0f} rows/s, under the requested {work.request_rate:g}"
        )
    return plan


def _ranked_rate(plan: Plan) -> float:
    """The throughput a plan is ranked by: a model-parallel plan's less its margin."""
    return plan.rows_per_s / (1 + MODEL_PARALLEL_MARGIN) if plan.stages * plan.ranks > 1 else plan.rows_per_s


def _rank_key(plan: Plan, best_rate: float) -> tuple[float, ...]:
    rate = _ranked_rate(plan)
    bucket = math.floor(math.log(max(rate, 1e-12) / best_rate) / math.log1p(TIE)) if best_rate else 0
    return (bool(plan.refused), -bucket, plan.latency_s, plan.processes, -plan.rows_per_s)


def make_plans(profile: Profile, cluster: Cluster, work: Workload) -> list[Plan]:
    """Every candidate layout, best first; refused ones last, each with its reason."""
    if work.rows < 0:
        raise ConfigError(f"the row count must be >= 0, got {work.rows}")
    alone = {r.batch_size for r in profile.rates if r.processes == 1 and r.ranks == 1}
    batches = work.batch_sizes or tuple(sorted(alone))
    # a batch never holds more rows than its block: larger sizes would run as the block's size
    batches = tuple(b for b in batches if b <= work.block_size) or batches[:1]
    node_cores = min(n.cores for n in cluster.nodes)
    plans: list[Plan] = []
    for p, k in _shapes(profile, min(cluster.nodes, key=lambda n: n.cores), work):
        # more processes than cores (a pipeline that memory forces): one thread each
        for t in (t for t in range(1, node_cores + 1) if p * k * t <= max(node_cores, p * k)):
            for b in batches:
                plans += [_targets(plan, work) for plan in _combine(profile, cluster, p, k, t, b, work)]
    if not plans:
        raise ConfigError(f"no layout of {profile.model} fits {cluster.describe()}")
    usable = [pl for pl in plans if not pl.refused]
    best_rate = max((_ranked_rate(pl) for pl in usable), default=0.0)
    plans.sort(key=lambda pl: _rank_key(pl, best_rate))
    return [replace(pl, reasons=tuple(_reasons(pl, plans, profile, cluster, work))) for pl in plans]


def _reasons(plan: Plan, plans: list[Plan], profile: Profile, cluster: Cluster, work: Workload) -> list[str]:
    out: list[str] = []
    if plan.refused:
        return [plan.refused]
    node = cluster.nodes[0]
    limit = work.worker_memory if work.worker_memory is not None else node.memory
    weights = profile.weight_bytes
    if weights and weights + RUNTIME_RESERVE > limit:
        costs = [LayerCost(c.name, c.seconds, c.weight_bytes, c.activation_bytes) for c in profile.layers]
        fewest = min_stages_for_memory(costs, max(0, limit - RUNTIME_RESERVE)) if costs else None
        out.append(
            f"model {format_bytes(weights)} > worker memory {format_bytes(limit)}, so "
            + (f"at least {fewest} stages" if fewest else "it must be split")
        )
    elif plan.stages == 1 and plan.ranks == 1:
        out.append(
            f"the whole model fits one process ({format_bytes(plan.memory_bytes)} of "
            f"{format_bytes(limit)}), and data parallel replicas never talk to each other"
        )
    counts = dict(plan.per_node)
    for kind in cluster.nodes:
        inner = plan.stages * plan.ranks
        if plan.stages > 1:  # a block of m micro-batches keeps at most m stages busy
            inner = min(plan.stages, max(m for m, _ in work.micro_batches(plan.batch_size)))
        busy = counts.get(kind.kind, plan.replicas) * inner
        if busy <= 1:
            continue
        kappa = contention(profile, busy, plan.threads, kind.cores, plan.batch_size)
        where = "" if cluster.local else f" on {kind.kind}"
        out.append(
            f"{busy} busy processes of {plan.threads} thread(s){where} run at {kappa:.2f}x "
            f"their speed alone (contention measured with up to {profile.cores} busy cores)"
        )
    if plan.stages > 1:
        blocks, p = work.micro_batches(plan.batch_size), plan.stages
        cut = f"{p} stages cut at layers {', '.join(map(str, plan.cuts))}; bubble"
        if len(blocks) == 1:
            m = blocks[0][0]
            out.append(f"{cut} (p-1)/(m+p-1) = {bubble(p, m):.0%} with {m} micro-batches a block")
        else:
            idle = sum((p - 1) * n for _, n in blocks) / sum((m + p - 1) * n for m, n in blocks)
            least, most = min(m for m, _ in blocks), max(m for m, _ in blocks)
            out.append(f"{cut} {idle:.0%} over the job's blocks of {least} to {most} micro-batches "
                       "((p-1)/(m+p-1) each)")
    top = next(p for p in plans if not p.refused)
    if plan is not top:
        slower = 1 - plan.rows_per_s / top.rows_per_s if top.rows_per_s else 0.0
        if slower < -TIE:  # faster, but model parallel within its margin of a data-parallel top
            out.append(f"{-slower:.0%} more throughput than the top plan, under the "
                       f"{MODEL_PARALLEL_MARGIN:.0%} a pipeline or tensor-parallel layout must gain over "
                       "data parallel")
        elif slower > TIE:
            out.append(f"{slower:.0%} less throughput than the top plan")
        else:
            out.append(
                f"as fast as the top plan, with {plan.latency_s / top.latency_s:.1f}x its latency"
                if top.latency_s
                else "as fast as the top plan"
            )
        return out
    fastest = max(
        (p for p in plans if p.refused == "" or "latency target" in p.refused), key=lambda p: p.rows_per_s
    )
    if fastest is not plan and fastest.rows_per_s > plan.rows_per_s * (1 + TIE):
        cost = 1 - plan.rows_per_s / fastest.rows_per_s
        gain = fastest.latency_s / plan.latency_s if plan.latency_s else 1.0
        out.append(
            f"{plan.strategy} ({plan.shape}) cuts {_latency_name(plan)} {gain:.1f}x against "
            f"{fastest.strategy} ({fastest.shape}) but costs {cost:.0%} throughput here, so it is "
            f"chosen only for the {work.latency_target_s * 1e3:.0f} ms latency target"
            if work.latency_target_s is not None
            else f"{cost:.0%} less throughput than {fastest.strategy} ({fastest.shape}), which is refused"
        )
    return out
