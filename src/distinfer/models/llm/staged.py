"""A generation model as pipeline stages: the layers a stage holds, with their KV cache.

A stage's item is a step: the sequences' chunks and sampling settings (small, pickled) and
the hidden states of the step's tokens. Each stage builds the step's attention metadata from
the chunks itself, runs its layers (reading and writing its own layers' KV pages) and passes
the hidden states on; the last stage applies the LM head, samples, and returns only the
token ids, which go back to stage 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..staged import Preparer, Stage, StagedModel
from .paged import build_meta

if TYPE_CHECKING:
    from ...planning.cuts import LayerCost
    from .model import DecoderPart
    from .runner import LlmModel

__all__ = ["LlmStage", "LlmStaged", "step_item"]


def step_item(chunks: Any, sampling: Any, x: Any) -> dict[str, Any]:
    return {"chunks": chunks, "sampling": sampling, "x": x}


class LlmStage:
    def __init__(self, part: DecoderPart, ring: int) -> None:
        self.part = part
        self.ring = ring
        self.is_last: bool = part.is_last

    def __call__(self, x: Any) -> Any:
        from .runner import sample_tokens

        item: dict[str, Any] = x
        meta = build_meta(item["chunks"], self.part.windows, self.ring)
        x = self.part.forward(meta, None if self.part.is_first else item["x"])
        if not self.is_last:
            return step_item(item["chunks"], item["sampling"], x)
        sampling = item["sampling"]
        tokens = sample_tokens(self.part.logits(x), sampling) if sampling else []
        return {"tokens": np.asarray(tokens, dtype=np.int64)}


class LlmStaged(StagedModel):
    """`LlmModel` cut into stages (picklable: a path and options)."""

    def __init__(self, model: LlmModel) -> None:
        self.model = model
        self.name = str(model.path)

    def layer_names(self) -> list[str]:
        return [f"layer.{i}" for i in range(self.model.config.layers)]

    def weight_bytes(self) -> list[int] | None:
        return self.model.weight_bytes()

    def layer_costs(self, batch_size: int, seq_len: int) -> list[LayerCost]:
        return self.model.layer_costs(batch_size)

    def preparer(self, device: str) -> Preparer:
        from .runner import PromptPreparer

        return PromptPreparer(self.model)

    def build_stage(self, start: int, stop: int, device: str, threads: int) -> Stage:
        return LlmStage(self.model.part(start, stop), self.model.cache_plan().ring)

    def outputs(self, x: Any) -> dict[str, np.ndarray]:
        return dict(x)
