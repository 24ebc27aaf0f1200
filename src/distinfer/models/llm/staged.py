"""A generation model as pipeline stages: the layers a stage holds, with their KV cache.

A stage's item is a step: the sequences' chunks and sampling settings (small, pickled) and
the hidden states of the step's tokens. Each stage builds the step's attention metadata from
the chunks itself, runs its layers (reading and writing its own layers' KV pages) and passes
the hidden states on. The LM head (a large share of a decode step: 168M of Gemma 3 270M's
268M multiply-adds per token) is split between the last stage and stage 0, which holds the
embedding table anyway: the last stage scores the upper half of the vocabulary and sends
back the final hidden states of the sequences that want a token with its best candidates;
stage 0 scores the lower half, merges, and samples. So the stages stay balanced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..staged import Preparer, Stage, StagedModel
from .paged import build_meta
from .sampling import candidates_for

if TYPE_CHECKING:
    from ...planning.cuts import LayerCost
    from .model import DecoderPart
    from .runner import LlmModel

__all__ = ["LlmStage", "LlmStaged", "step_item", "upper_half"]


def step_item(chunks: Any, sampling: Any, x: Any) -> dict[str, Any]:
    return {"chunks": chunks, "sampling": sampling, "x": x}


class LlmStage:
    def __init__(self, part: DecoderPart, ring: int) -> None:
        self.part = part
        self.ring = ring
        self.is_last: bool = part.is_last

    def __call__(self, x: Any) -> Any:
        item: dict[str, Any] = x
        meta = build_meta(item["chunks"], self.part.windows, self.ring)
        h = self.part.forward(meta, None if self.part.is_first else item["x"])
        if not self.is_last:
            return step_item(item["chunks"], item["sampling"], h)
        sampling = item["sampling"]
        if not sampling:
            return {"h": h}
        values, ids = self.part.candidates(h, candidates_for(sampling))
        return {"h": h, "values": values, "ids": ids}


def upper_half(vocab: int) -> tuple[int, int]:
    return vocab // 2, vocab


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
        last = stop == self.model.config.layers
        rows = upper_half(self.model.config.vocab) if last and start > 0 else None
        return LlmStage(self.model.part(start, stop, head_rows=rows), self.model.cache_plan().ring)

    def outputs(self, x: Any) -> dict[str, np.ndarray]:
        return dict(x)
