"""Choosing how a replica holds the model: whole (data parallel) or cut into stages.

Runs in the driver before any worker starts, so that a model that cannot fit is refused
with sizes and alternatives, and a pipeline's cut is printed before the job runs.
"""

from __future__ import annotations

import sys

from ..config import RunConfig
from ..errors import ConfigError
from ..planning import (
    LayerCost,
    PipelinePlan,
    balanced_cut,
    explicit_cut,
    format_bytes,
    min_stages_for_memory,
    parse_memory,
)

__all__ = ["RUNTIME_RESERVE", "choose_plan", "plan_stages", "usable_memory"]

#: Memory each worker process needs beyond weights and activations: Python, torch and the
#: allocator's slack. A stage of the 1B decoder measured about 0.45 GiB above its planned size.
RUNTIME_RESERVE = 512 * 2**20


def _weight_costs(model: str) -> list[LayerCost] | None:
    """Cheap per-layer weight sizes from the config alone (no layer is built)."""
    if not model.startswith("decoder"):
        return None
    from ..models.decoder import parse_decoder_name

    config = parse_decoder_name(model)
    if config is None:
        return None
    return [LayerCost(str(i), float(n), 4 * n, 0) for i, n in enumerate(config.layer_parameters())]


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
    """Explicit `cuts`, else the balanced cut into `stages` (default: 2, or the fewest that fit)."""
    if cuts:
        return explicit_cut(costs, cuts, limit)
    if stages is None:
        stages = max(2, min_stages_for_memory(costs, limit) or 2) if limit else 2
    return balanced_cut(costs, stages, limit)


def plan_stages(config: RunConfig, model: str) -> tuple[tuple[int, int], ...]:
    """The stages' layer ranges for `--strategy pipeline`, () for `--strategy data`."""
    limit = usable_memory(config.worker_memory)
    weights = _weight_costs(model)
    if config.strategy == "data":
        total = sum(c.weight_bytes for c in weights) if weights else 0
        if limit is not None and weights and total > limit:
            fewest = min_stages_for_memory(weights, limit)
            hint = f"--strategy pipeline --stages {fewest}" if fewest else "a larger --worker-memory"
            raise ConfigError(
                f"model '{model}' has {format_bytes(total)} of weights, more than --worker-memory "
                f"{config.worker_memory} leaves for a model ({format_bytes(limit)} after "
                f"{format_bytes(RUNTIME_RESERVE)} for the runtime), so --strategy data cannot hold it in "
                f"one worker; use {hint} ('distinfer plan' shows the cut)"
            )
        return ()
    if weights is None:
        raise ConfigError(
            f"--strategy pipeline needs a model that can be cut into stages (decoder-SIZE); "
            f"'{model}' runs with --strategy data"
        )
    from ..planning.layers import model_layer_costs

    costs = model_layer_costs(model, config.batch_size, 64)
    plan = choose_plan(costs, config.stages, config.cuts, limit)
    print(f"distinfer: pipeline of {len(plan.stages)} stages for {model}:", file=sys.stderr)
    print(plan.describe([c.name for c in costs]), file=sys.stderr)
    return tuple((s.start, s.stop) for s in plan.stages)
