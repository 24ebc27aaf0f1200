"""Choosing how a replica holds the model: whole (data parallel), cut into stages
(pipeline) or sharded over ranks (tensor parallel).

Runs in the driver before any worker starts, so that a model that cannot fit is refused
with sizes and alternatives, and a pipeline's cut is known (and logged) before the job runs.
Every model-specific answer comes from the model's family (models/family.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..config import RunConfig
from ..errors import ConfigError, ModelError
from ..logs import log
from ..planning import (
    LayerCost,
    PipelinePlan,
    balanced_cut,
    explicit_cut,
    format_bytes,
    min_stages_for_memory,
    parse_memory,
)
from ..planning.costmodel import HEAD_RESERVE, RUNTIME_RESERVE

if TYPE_CHECKING:
    from ..messages import Strategy
    from ..models.family import ModelSpec

__all__ = ["HEAD_RESERVE", "RUNTIME_RESERVE", "Layout", "choose_plan", "plan_layout", "usable_memory"]


@dataclass(frozen=True, slots=True)
class Layout:
    """How each replica holds the model, decided in the driver before any worker starts."""

    strategy: Strategy
    stages: tuple[tuple[int, int], ...] = ()  # pipeline: each stage's layer range [start, stop)
    slot_bytes: int = 0  # pipeline, local: each shared buffer carrying activations between stages
    ranks: int = 1  # tensor: ranks per replica
    plan: PipelinePlan | None = None  # pipeline: the cut with its predicted figures
    layer_names: tuple[str, ...] = ()  # pipeline: the model's layers, for describing the cut


def usable_memory(worker_memory: str | None) -> int | None:
    """What `--worker-memory` leaves for a model's weights and activations."""
    if not worker_memory:
        return None
    given = parse_memory(worker_memory)
    if given <= RUNTIME_RESERVE:
        raise ConfigError(
            f"--worker-memory {format_bytes(given)} leaves no room for the model: each worker "
            f"process needs about {format_bytes(RUNTIME_RESERVE)} for Python and torch alone"
        )
    return given - RUNTIME_RESERVE


def choose_plan(
    costs: list[LayerCost], stages: int | None, cuts: tuple[int, ...] | None, limit: int | None
) -> PipelinePlan:
    """Explicit `cuts`, else the balanced cut into `stages` (default: 2, or the fewest that fit).
    Stage 0's memory includes `HEAD_RESERVE`."""
    costs = with_head_reserve(costs)
    if cuts:
        return explicit_cut(costs, cuts, limit)
    if stages is None:
        stages = max(2, min_stages_for_memory(costs, limit) or 2) if limit else 2
    return balanced_cut(costs, stages, limit)


def with_head_reserve(costs: list[LayerCost]) -> list[LayerCost]:
    if not costs:
        return costs
    return [replace(costs[0], weight_bytes=costs[0].weight_bytes + HEAD_RESERVE), *costs[1:]]


def _refuse_data(config: RunConfig, model: ModelSpec, limit: int) -> None:
    weights = model.family.weight_bytes(model)
    if not weights or sum(weights) <= limit:
        return
    costs = with_head_reserve([LayerCost(str(i), float(w), w, 0) for i, w in enumerate(weights)])
    fewest = min_stages_for_memory(costs, limit)
    hint = f"--strategy pipeline --stages {fewest}" if fewest else "a larger --worker-memory"
    raise ConfigError(
        f"model '{model.name}' has {format_bytes(sum(weights))} of weights, more than --worker-memory "
        f"{config.worker_memory} leaves for a model ({format_bytes(limit)} after "
        f"{format_bytes(RUNTIME_RESERVE)} for the runtime), so --strategy data cannot hold it in "
        f"one worker; use {hint} ('distinfer plan' shows the cut)"
    )


def plan_layout(config: RunConfig, model: ModelSpec) -> Layout:
    """Check the strategy against the model and `--worker-memory`; for `--strategy pipeline`
    choose the cut (logged at INFO) and size the shared buffers that carry activations."""
    limit = usable_memory(config.worker_memory)
    family = model.family
    if config.strategy == "data":
        if limit is not None:
            _refuse_data(config, model, limit)
        return Layout("data")
    if config.strategy == "tensor":
        world = config.tensor_parallel or 2
        problem = family.shard_problem(model, world)
        if problem is None and config.backend == "local":  # Ray's GPUs are on its nodes, not here
            from ..worker.tensor import resolve_comm

            problem = resolve_comm(config.device, world, config.tensor_comm)[1]
        if problem:
            raise ConfigError(problem)
        return Layout("tensor", ranks=world)
    if family.no_stages is not None:
        reason = family.no_stages.format(name=model.name)
        raise ConfigError(f"--strategy pipeline cannot cut '{model.name}' into stages: {reason}")
    staged = family.staged(model)
    layers = staged.layer_names()
    wanted = len(config.cuts) + 1 if config.cuts else config.stages
    if wanted and wanted > len(layers):
        raise ConfigError(
            f"'{model.name}' has {len(layers)} layers that a cut may fall between, too few for "
            f"{wanted} stages; use --stages {len(layers)} or fewer"
        )
    try:
        costs = family.layer_costs(model, config.batch_size, 64)
    except ModelError:
        if not config.cuts:
            raise
        # Explicit cut points need no measurement; sizes where known, else unknown (0).
        sizes = family.weight_bytes(model) or [0] * len(layers)
        costs = [LayerCost(name, 0.0, size, 0) for name, size in zip(layers, sizes, strict=True)]
    plan = choose_plan(costs, config.stages, config.cuts, limit)
    stages = tuple((s.start, s.stop) for s in plan.stages)
    staged.prepare_stages(stages)
    names = tuple(c.name for c in costs)
    log.info("pipeline of %d stages for %s:\n%s", len(plan.stages), model.name, plan.describe(list(names)))
    # Room for four times the largest activation measured at a cut (rows longer than the
    # measurement's 64 tokens); a larger one still goes through, pickled.
    crossing = max((costs[s.stop - 1].activation_bytes for s in plan.stages[:-1]), default=0)
    slot_bytes = min(max(4 * crossing, 4 * 2**20), 256 * 2**20)
    return Layout("pipeline", stages=stages, slot_bytes=slot_bytes, plan=plan, layer_names=names)
