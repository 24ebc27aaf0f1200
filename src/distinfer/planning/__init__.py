"""Planning pipeline parallelism: measure a model's layers, then cut them into balanced stages.

The planning core (`cuts`, `sizes`) is pure Python over frozen records; only `profile` touches
torch, and only when it is installed.
"""

from distinfer.planning.cuts import (
    LayerCost,
    PipelinePlan,
    Stage,
    balanced_cut,
    explicit_cut,
    min_stages_for_memory,
)
from distinfer.planning.profile import measure_layers, module_bytes, profile_layers, tensor_bytes
from distinfer.planning.sizes import format_bytes, parse_memory

__all__ = [
    "LayerCost",
    "PipelinePlan",
    "Stage",
    "balanced_cut",
    "explicit_cut",
    "format_bytes",
    "measure_layers",
    "min_stages_for_memory",
    "module_bytes",
    "parse_memory",
    "profile_layers",
    "tensor_bytes",
]
