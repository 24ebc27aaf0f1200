"""Planning pipeline parallelism: cut measured layers into balanced stages, pure.

Plain Python over frozen records (`LayerCost` in, `PipelinePlan` out): no torch, no model
code. The measurements come from each model family (`models/profile.py` times layers).
"""

from distinfer.planning.cuts import (
    LayerCost,
    PipelinePlan,
    Stage,
    balanced_cut,
    explicit_cut,
    min_stages_for_memory,
)
from distinfer.planning.sizes import format_bytes, parse_memory

__all__ = [
    "LayerCost",
    "PipelinePlan",
    "Stage",
    "balanced_cut",
    "explicit_cut",
    "format_bytes",
    "min_stages_for_memory",
    "parse_memory",
]
