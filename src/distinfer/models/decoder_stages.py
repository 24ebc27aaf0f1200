"""`decoder-SIZE` as a `StagedModel`: each stage builds only its layers' seeded weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import ModelError
from ._batching import padded_batches
from .base import Batches, Column
from .decoder import DecoderConfig, DecoderStage, decoder_rows, parse_decoder_name
from .staged import StagedModel

if TYPE_CHECKING:
    from ..planning.cuts import LayerCost

__all__ = ["DecoderStaged", "decoder_outputs"]


def decoder_outputs(out: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {"hidden": out["hidden"].float().cpu().numpy(), "next_token": out["next_token"].cpu().numpy()}


class _DecoderTokens:
    input_names: tuple[str, ...] = ("text",)

    def __init__(self, config: DecoderConfig, device: str) -> None:
        self.config = config
        self.device_type = torch.device(device).type

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        rows = decoder_rows(self.config, inputs["text"])
        return padded_batches(rows, batch_size, self.device_type, torch.bool)


class _DecoderStageRunner:
    def __init__(self, config: DecoderConfig, start: int, stop: int, device: str) -> None:
        self.device = torch.device(device)
        self.stage = DecoderStage(config, start, stop, device=self.device)
        self.is_last = self.stage.is_last

    def __call__(self, x: Any) -> Any:
        hidden, mask = (t.to(self.device) for t in x)
        with torch.inference_mode():
            out = self.stage((hidden, mask))
        if isinstance(out, dict):
            return decoder_outputs(out)
        return out[0].cpu(), out[1].cpu()


class DecoderStaged(StagedModel):
    def __init__(self, name: str) -> None:
        config = parse_decoder_name(name)
        if config is None:
            raise ModelError(f"'{name}' is not a decoder-SIZE model")
        self.name = name
        self.config = config

    def layer_names(self) -> list[str]:
        return ["embedding", *(f"block {i}" for i in range(self.config.n_layers)), "head"]

    def weight_bytes(self) -> list[int]:
        return [4 * n for n in self.config.layer_parameters()]

    def layer_costs(self, batch_size: int, seq_len: int) -> list[LayerCost]:
        from .layer_costs import decoder_layer_costs

        return decoder_layer_costs(self.config, batch_size, seq_len)

    def preparer(self, device: str) -> _DecoderTokens:
        return _DecoderTokens(self.config, device)

    def build_stage(self, start: int, stop: int, device: str, threads: int) -> _DecoderStageRunner:
        return _DecoderStageRunner(self.config, start, stop, device)
