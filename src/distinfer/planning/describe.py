"""Plans as people read them (`distinfer plan`) and as data (`--json`)."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from distinfer.planning.cluster import Cluster
from distinfer.planning.planner import Plan, Workload
from distinfer.planning.profiles import Profile
from distinfer.planning.sizes import format_bytes

__all__ = ["choice_line", "describe_plans", "plans_json"]


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _replicas(plan: Plan, cluster: Cluster) -> str:
    if cluster.local or len(plan.per_node) == 0:
        return str(plan.replicas)
    return f"{plan.replicas} ({', '.join(f'{r}/node on {kind}' for kind, r in plan.per_node)})"


def describe_plans(plans: list[Plan], profile: Profile, cluster: Cluster, work: Workload, top: int) -> str:
    """A ranked table of the first `top` usable plans with their reasons, then the refusals' count."""
    usable = [p for p in plans if not p.refused]
    refused = [p for p in plans if p.refused]
    target = f", latency target {work.latency_target_s * 1e3:g} ms" if work.latency_target_s else ""
    rate = f", {work.request_rate:g} rows/s to sustain" if work.request_rate else ""
    lines = [
        f"{profile.model}: {work.rows:,} rows in blocks of {work.block_size}{target}{rate}",
        f"on {cluster.describe()}",
        f"profile: {profile.machine}; one process {_best_alone(profile)}; start-up {profile.startup_s:.1f} s",
        "",
    ]
    links = _links(profile)
    if links:
        lines.insert(3, links)
    gen = profile.tokens_per_row > 0
    if gen:
        lines.insert(3, f"generation: {profile.tokens_per_row:.0f} tokens a row in the sample; rows/s "
                        "(tokens/s), latency = time per output token; data parallel only")
    rows = [("#", "strategy", "replicas", "each replica", "rows/s (tokens/s)" if gen else "rows/s", "job",
             "per token" if gen else "batch latency", "memory/process")]  # fmt: skip
    for i, p in enumerate(usable[:top], start=1):
        rows.append(
            (
                str(i),
                p.strategy,
                _replicas(p, cluster),
                p.shape,
                _rate(p) if gen else rate_text(p.rows_per_s),
                _duration(p.job_s),
                f"{p.latency_s * 1e3:,.0f} ms",
                format_bytes(p.memory_bytes),
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(table[0])
    for i, p in enumerate(usable[:top], start=1):
        lines.append(table[i])
        lines.extend(f"     - {reason}" for reason in p.reasons)
        if i == 1 and cluster.local:
            lines.append(f"     run it: distinfer run {' '.join(p.cli_args())} ...")
    if not usable:
        lines.append("(no layout can be used)")
    if refused:
        lines.append("")
        lines.append(f"{len(refused)} layouts refused, for example:")
        seen: set[str] = set()
        for p in refused:
            kind = p.refused.split(",")[0].split(" ms")[0][:40]
            if kind in seen:
                continue
            seen.add(kind)
            lines.append(f"  {p.strategy} {p.shape}: {p.refused}")
            if len(seen) >= 4:
                break
    return "\n".join(lines)


def _rate(plan: Plan) -> str:
    return f"{rate_text(plan.rows_per_s)} ({rate_text(plan.rows_per_s * plan.tokens_per_row)})"


def rate_text(rate: float) -> str:
    """Whole numbers from 100 up, three significant digits below (0.16, not 0)."""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


def _best_alone(profile: Profile) -> str:
    alone = [r for r in profile.rates if r.processes == 1 and r.ranks == 1]
    best = max(alone, key=lambda r: r.rows_per_s)
    batch = "running" if profile.tokens_per_row else "batch"
    return f"{best.rows_per_s:,.1f} rows/s at {best.threads} thread(s), {batch} {best.batch_size}"


def choice_line(plan: Plan) -> str:
    """The one line `--strategy auto` prints: what it chose and why."""
    why = plan.reasons[0] if plan.reasons else "the top plan"
    return (
        f"--strategy auto chose {plan.strategy}: {plan.replicas} replica(s) of {plan.shape}, "
        f"predicted {rate_text(plan.rows_per_s)} rows/s ({why})"
    )


def plans_json(plans: list[Plan], profile: Profile, cluster: Cluster, work: Workload) -> dict[str, Any]:
    def one(p: Plan) -> dict[str, Any]:
        return {
            "strategy": p.strategy, "replicas": p.replicas, "stages": p.stages, "ranks": p.ranks,
            "threads": p.threads, "batch_size": p.batch_size, "cuts": list(p.cuts),
            "per_node": dict(p.per_node), "rows_per_s": p.rows_per_s,
            "job_s": p.job_s if math.isfinite(p.job_s) else None,
            "latency_s": p.latency_s if math.isfinite(p.latency_s) else None,
            "memory_bytes": p.memory_bytes, "processes": p.processes, "refused": p.refused or None,
            "reasons": list(p.reasons), "run_args": p.cli_args(),
            **({"tokens_per_s": p.rows_per_s * p.tokens_per_row} if p.generates else {}),
        }  # fmt: skip

    return {
        "model": profile.model,
        "machine": profile.machine,
        "cluster": cluster.describe(),
        "workload": {
            "rows": work.rows,
            "block_size": work.block_size,
            "latency_target_s": work.latency_target_s,
            "request_rate": work.request_rate,
            "worker_memory": work.worker_memory,
        },
        "links": asdict(profile.links),  # measured: seconds and bytes/s
        "plans": [one(p) for p in plans],
    }


def _links(profile: Profile) -> str:
    """The measured links a plan's processes talk over, when its strategies use any."""
    ln = profile.links

    def link(latency: float, bandwidth: float) -> str:
        return f"{latency * 1e6:,.0f} us + {bandwidth / 1e9:.1f} GB/s"

    parts = []
    if "pipeline" in profile.strategies:
        parts.append(f"stage to stage {link(ln.shm_latency_s, ln.shm_bytes_per_s)}")
    if "tensor" in profile.strategies:
        gloo = (f", gloo {link(ln.gloo_allreduce_latency_s, ln.gloo_allreduce_bytes_per_s)}"
                if ln.gloo_allreduce_bytes_per_s else "")  # fmt: skip
        shm = link(ln.allreduce_latency_s, ln.allreduce_bytes_per_s)
        parts.append(f"all-reduce of 2 ranks: shared memory {shm}{gloo}")
    if ln.ray_bytes_per_s:
        parts.append(f"Ray object store {link(ln.ray_latency_s, ln.ray_bytes_per_s)}")
    return f"links: {'; '.join(parts)}" if parts else ""
