"""The planner's face in the driver: profile (cached), plan, and `--strategy auto`.

`advise` gathers what the pure planner needs (the profile, measured once per machine and
model; the cluster, this machine or a file; the workload, from the input's row count) and
returns the ranked plans. `auto_layout` turns the top plan into a job's layout options,
leaving every option the user gave explicitly as it is; `auto_serve_layout` does the same
for a server.

`auto` is the default strategy. Asked for by name (`--strategy auto`) it measures the model
when no profile is cached (about a minute, once). Left as the default it never measures: it
plans from the profile cached for this input, else from the last one measured for the same
model on this machine (another input), else it runs data parallel and says how to get a
profile. `--stages`/`--cuts` mean a pipeline and `--tensor-parallel`/`--tensor-comm` tensor
parallel, with no planning.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import RunConfig
from ..errors import ConfigError
from ..messages import GenerationOptions
from ..planning.cluster import Cluster, load_cluster, this_machine
from ..planning.describe import choice_line
from ..planning.planner import Plan, Workload, make_plans
from ..planning.profiles import Profile
from ..planning.sizes import format_bytes, parse_memory
from .profiling import GENERATION_RUNNING, LATENCY_BATCHES, ProfileRequest, get_profile

if TYPE_CHECKING:
    from ..models.family import ModelSpec
    from ..serving.config import ServeConfig

__all__ = ["Advice", "advise", "announce", "auto_layout", "auto_serve_layout"]

#: how the line of a default `auto` with no profile begins; it is logged at DEBUG only, so
#: that an ordinary run (or its one-line error) prints nothing more than before
NO_PROFILE = "--strategy auto: data parallel"


def announce(line: str) -> None:
    """Log what `auto` chose: at INFO, but at DEBUG the plain data-parallel fallback."""
    from ..logs import log

    if line:
        (log.debug if line.startswith(NO_PROFILE) else log.info)("%s", line)


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
    generation: GenerationOptions | None = None,
) -> Advice:
    """Ranked plans for `model` over `input` (or `rows` rows like it) on `cluster`; a
    text-generation model is measured with `generation`'s settings (default: the defaults)."""
    advice = _advise(
        model, input, rows, cluster, latency_target_s, request_rate, worker_memory, block_size,
        batch_sizes, input_format, column, refresh, generation, measure=True,
    )  # fmt: skip
    if advice is None:  # measure=True always gives a profile
        raise ConfigError(f"no profile of {model} could be made")
    return advice


def _advise(
    model: str,
    input: str,
    rows: int | None,
    cluster: str | Path | None,
    latency_target_s: float | None,
    request_rate: float | None,
    worker_memory: str | None,
    block_size: int,
    batch_sizes: tuple[int, ...],
    input_format: str | None,
    column: str | None,
    refresh: bool,
    generation: GenerationOptions | None,
    measure: bool,
) -> Advice | None:
    """`advise`, or None when `measure` is False and no profile of the model is cached."""
    from ..data.sources import open_source
    from ..models.families import parse_model

    if latency_target_s is not None and not latency_target_s > 0:
        raise ConfigError(f"--latency-target must be > 0, got {latency_target_s}")
    if request_rate is not None and not request_rate > 0:
        raise ConfigError(f"--request-rate must be > 0, got {request_rate}")
    if generation is not None and generation.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1, got {generation.max_tokens}")
    source = open_source(input, input_format)
    request = ProfileRequest(model, input, input_format, column, sample=min(256, max(1, source.num_rows)))
    generates = parse_model(model).family.generates
    if generates:
        request = replace(request, generation=generation or GenerationOptions(),
                          batch_sizes=GENERATION_RUNNING)  # fmt: skip
    if batch_sizes:
        request = replace(request, batch_sizes=tuple(sorted(set(batch_sizes))))
    elif latency_target_s is not None and not generates:
        # a latency target may only be met with smaller batches than a throughput job runs
        request = replace(request, batch_sizes=(*LATENCY_BATCHES, *request.batch_sizes))
    profile = get_profile(request, refresh, measure)
    if profile is None:
        return None
    resources = load_cluster(cluster) if cluster else this_machine()
    work = Workload(
        rows=source.num_rows if rows is None else rows, block_size=block_size,
        latency_target_s=latency_target_s, request_rate=request_rate,
        worker_memory=parse_memory(worker_memory) if worker_memory else None, batch_sizes=batch_sizes,
    )  # fmt: skip
    return Advice(profile, resources, work, make_plans(profile, resources, work))


def _named_strategy(stages: int | None, cuts: object, ranks: int | None, comm: str) -> str | None:
    """The strategy that layout options name by themselves: a pipeline's, a tensor group's."""
    if stages is not None or cuts:
        return "pipeline"
    if ranks is not None or comm != "auto":
        return "tensor"
    return None


def auto_layout(config: RunConfig, given: set[str]) -> tuple[RunConfig, str]:
    """`config` with the top plan's layout, and the line saying what was chosen and why. A
    text-generation job is planned with its own settings, the plan's batch size read as
    `max_running`. `strategy` in `given` (asked for by name) measures the model if need be;
    the default plans only from a cached profile (see the module's docstring)."""
    from ..models.families import parse_model
    from .job import with_task

    named = _named_strategy(config.stages, config.cuts, config.tensor_parallel, config.tensor_comm)
    if named is not None:
        return replace(config, strategy=named), ""  # type: ignore[arg-type]
    model = with_task(parse_model(config.model), config)
    explicit = "strategy" in given
    advice = _advise(
        config.model, config.input, rows=None, cluster=None, latency_target_s=None, request_rate=None,
        worker_memory=config.worker_memory, block_size=config.block_size or 1024, batch_sizes=(),
        input_format=config.input_format, column=config.column, refresh=False,
        generation=model.generation, measure=explicit,
    )  # fmt: skip
    if advice is None:
        return _unprofiled(config, model)
    top = advice.top

    def layout(plan: Plan) -> dict[str, int | None]:
        batch = "max_running" if plan.generates else "batch_size"
        return _layout_fields(plan, "workers", "threads_per_worker", batch)

    # the best plan that agrees with every layout option the user gave, else the top plan
    # with those options kept
    plan = next(
        (p for p in advice.plans if not p.refused
         and all(getattr(config, k) == v for k, v in layout(p).items() if k in given)),
        top,
    )  # fmt: skip
    base = plan.strategy.split(" x ")[-1]
    updates = {k: v for k, v in layout(plan).items() if k not in given}
    return replace(config, strategy=base, **updates), choice_line(plan)  # type: ignore[arg-type]


def _layout_fields(plan: Plan, replicas: str, threads: str, batch: str | None) -> dict[str, int | None]:
    """The config fields that give `plan`'s layout, under the names a job or a server uses
    (`batch` None: the batch size is not set)."""
    fields: dict[str, int | None] = {
        replicas: plan.replicas, threads: plan.threads,
        "stages": plan.stages if plan.stages > 1 else None,
        "tensor_parallel": plan.ranks if plan.ranks > 1 else None,
    }  # fmt: skip
    if batch is not None:
        fields[batch] = plan.batch_size
    return fields


def _unprofiled(config: RunConfig, model: ModelSpec) -> tuple[RunConfig, str]:
    """The default `auto` with no profile: data parallel, or the fewest pipeline stages that
    fit when the model's weights (known without loading it) exceed `--worker-memory`."""
    from .layout import usable_memory

    hint = (f"no profile of {config.model} on this machine yet ('distinfer plan --model "
            f"{config.model} --input FILE', or '--strategy auto' by name, measures it once; "
            "later runs plan from it)")  # fmt: skip
    limit = usable_memory(config.worker_memory)
    weights = model.family.weight_bytes(model) if limit is not None else None
    if limit is not None and weights and sum(weights) > limit:
        return replace(config, strategy="pipeline"), (
            f"--strategy auto: pipeline, as few stages as fit: {format_bytes(sum(weights))} of weights "
            f"is more than --worker-memory {config.worker_memory} leaves for one process; {hint}"
        )
    threads = config.threads_per_worker or "the cores divided among them"
    line = f"{NO_PROFILE}, {config.workers} replicas x {threads} thread(s): {hint}"
    return replace(config, strategy="data"), line


def auto_serve_layout(config: ServeConfig, given: set[str]) -> tuple[ServeConfig, str]:
    """A server's layout from the last profile measured of its model on this machine (a
    server has no input to measure): its top plan. With no profile: data parallel by default,
    and a `ConfigError` saying how to make one when `--strategy auto` was asked for by name."""
    from ..models.families import parse_model
    from .job import with_task
    from .profiling import latest_profile

    named = _named_strategy(config.stages, config.cuts, config.tensor_parallel, config.tensor_comm)
    if named is not None:
        return replace(config, strategy=named), ""  # type: ignore[arg-type]
    model = with_task(parse_model(config.model), config.run_config())
    profile = latest_profile(model)
    if profile is None:
        hint = (f"no profile of {config.model} on this machine yet; 'distinfer plan --model {config.model} "
                "--input SAMPLE' measures one (a sample of the requests' rows or prompts)")  # fmt: skip
        if "strategy" in given or config.latency_target_s or config.request_rate:
            raise ConfigError(f"serve --strategy auto: {hint}, or give --strategy data, pipeline or tensor "
                              "(--latency-target and --request-rate are planned from a profile)")
        line = f"{NO_PROFILE}, {config.replicas} replicas: {hint}"
        return replace(config, strategy="data"), line
    memory = parse_memory(config.worker_memory) if config.worker_memory else None
    work = Workload(rows=1, worker_memory=memory, latency_target_s=config.latency_target_s,
                    request_rate=config.request_rate)  # fmt: skip
    here = this_machine()
    plan = Advice(profile, here, work, make_plans(profile, here, work)).top
    # a latency target holds for the plan's batch size: the server's batches are no larger
    batch = "max_running" if plan.generates else "max_batch_size" if config.latency_target_s else None
    chosen = _layout_fields(plan, "replicas", "threads_per_replica", batch)
    updates = {k: v for k, v in chosen.items() if k not in given}
    base = plan.strategy.split(" x ")[-1]
    return replace(config, strategy=base, **updates), choice_line(plan)  # type: ignore[arg-type]
