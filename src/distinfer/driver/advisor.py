"""The planner's face in the driver: profile (cached), plan, and `--strategy auto`.

`advise` gathers what the pure planner needs (the profile, measured once per machine and
model; the cluster, this machine or a file; the workload, from the input's row count) and
returns the ranked plans. `auto_layout` turns the top plan into a job's layout options,
leaving every option the user gave explicitly as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..config import RunConfig
from ..errors import ConfigError
from ..planning.cluster import Cluster, load_cluster, this_machine
from ..planning.describe import choice_line
from ..planning.planner import Plan, Workload, make_plans
from ..planning.profiles import Profile
from ..planning.sizes import parse_memory
from .profiling import ProfileRequest, get_profile

__all__ = ["Advice", "advise", "auto_layout"]


@dataclass(frozen=True, slots=True)
class Advice:
    profile: Profile
    cluster: Cluster
    workload: Workload
    plans: list[Plan]

    @property
    def top(self) -> Plan:
        usable = [p for p in self.plans if not p.refused]
        if not usable:
            reasons = "; ".join(sorted({p.refused for p in self.plans})[:3])
            raise ConfigError(f"no layout of {self.profile.model} can run here: {reasons}")
        return usable[0]


def advise(
    model: str,
    input: str,
    rows: int | None = None,
    cluster: str | Path | None = None,
    latency_target_s: float | None = None,
    request_rate: float | None = None,
    worker_memory: str | None = None,
    block_size: int = 1024,
    batch_sizes: tuple[int, ...] = (),
    input_format: str | None = None,
    column: str | None = None,
    refresh: bool = False,
) -> Advice:
    """Ranked plans for `model` over `input` (or `rows` rows like it) on `cluster`."""
    from ..data.sources import open_source

    if latency_target_s is not None and not latency_target_s > 0:
        raise ConfigError(f"--latency-target must be > 0, got {latency_target_s}")
    if request_rate is not None and not request_rate > 0:
        raise ConfigError(f"--request-rate must be > 0, got {request_rate}")
    source = open_source(input, input_format)
    request = ProfileRequest(model, input, input_format, column, sample=min(256, max(1, source.num_rows)))
    if batch_sizes:
        request = replace(request, batch_sizes=tuple(sorted(set(batch_sizes))))
    profile = get_profile(request, refresh)
    resources = load_cluster(cluster) if cluster else this_machine()
    work = Workload(
        rows=source.num_rows if rows is None else rows, block_size=block_size,
        latency_target_s=latency_target_s, request_rate=request_rate,
        worker_memory=parse_memory(worker_memory) if worker_memory else None, batch_sizes=batch_sizes,
    )  # fmt: skip
    return Advice(profile, resources, work, make_plans(profile, resources, work))


#: the options `--strategy auto` may set; one the user gave keeps its value
AUTO_FIELDS = ("workers", "threads_per_worker", "batch_size", "stages", "tensor_parallel")


def auto_layout(config: RunConfig, given: set[str]) -> tuple[RunConfig, str]:
    """`config` with the top plan's layout, and the line saying what was chosen and why."""
    from ..models.families import parse_model

    if parse_model(config.model).family.generates:
        return replace(config, strategy="data"), (
            "--strategy auto: text generation is not planned yet, so data parallel "
            f"({config.workers} replicas); give --strategy to choose"
        )
    advice = advise(
        config.model, config.input, worker_memory=config.worker_memory,
        block_size=config.block_size or 1024, input_format=config.input_format, column=config.column,
    )  # fmt: skip
    plan = advice.top
    chosen = {
        "workers": plan.replicas, "threads_per_worker": plan.threads, "batch_size": plan.batch_size,
        "stages": plan.stages if plan.stages > 1 else None,
        "tensor_parallel": plan.ranks if plan.ranks > 1 else None,
    }  # fmt: skip
    base = plan.strategy.split(" x ")[-1]
    updates = {k: v for k, v in chosen.items() if k not in given}
    return replace(config, strategy=base, **updates), choice_line(plan)  # type: ignore[arg-type]
