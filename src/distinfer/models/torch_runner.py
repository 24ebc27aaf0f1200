"""Any PyTorch model: `package.module:factory` (a callable returning an `nn.Module`), a
TorchScript file (`torch.jit.save`) or an exported program (`torch.export.save`, `.pt2`).

The model gets one tensor input (the column picked with `--column`, or the only one); its
outputs are named `output` for a tensor, `output_0`, `output_1`, ... for a tuple, and by key
for a dict. Float inputs are cast to the dtype of the model's parameters.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelError, ModelInputError
from .base import Batches, Column, Runner

__all__ = ["TorchRunner", "load_factory"]


def load_factory(spec: str) -> torch.nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"cannot import '{module_name}' for model '{spec}': {exc}; "
            "make sure the package is installed or on PYTHONPATH"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"'{module_name}' has no callable '{attr}' for model '{spec}'")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"'{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


class TorchRunner(Runner):
    input_names = ("input",)

    def __init__(self, model: str, device: str = "cpu") -> None:
        self.device = torch.device(device)
        path = Path(model)
        try:
            if path.suffix == ".pt2":
                self.module: Any = torch.export.load(str(path)).module()
            elif path.suffix in (".pt", ".pth", ".ts", ".torchscript"):
                self.module = torch.jit.load(str(path), map_location=self.device)  # type: ignore[no-untyped-call]
            else:
                self.module = load_factory(model)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"cannot load PyTorch model '{model}': {exc}") from None
        if isinstance(self.module, torch.nn.Module):
            self.module = self.module.to(self.device)
            if hasattr(self.module, "eval") and not isinstance(self.module, torch.fx.GraphModule):
                self.module.eval()
        params = list(self.module.parameters()) if hasattr(self.module, "parameters") else []
        self.float_dtype = params[0].dtype if params else torch.float32
        self.name = model

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        column = inputs["input"]
        if isinstance(column, list):
            raise ModelInputError(
                f"model '{self.name}' takes numbers but the input column holds text; check --column"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(column))
        if tensor.is_floating_point():
            tensor = tensor.to(self.float_dtype)
        return Batches(list(torch.split(tensor, batch_size)))

    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        try:
            with torch.inference_mode():
                result = self.module(batch.to(self.device))
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelInputError(
                f"model '{self.name}' failed on input of shape {list(batch.shape)} "
                f"({str(batch.dtype).removeprefix('torch.')}): {first}; check --column and the model"
            ) from None
        return _name_outputs(result)


def _name_outputs(result: Any) -> dict[str, np.ndarray]:
    if isinstance(result, torch.Tensor):
        return {"output": result.detach().cpu().numpy()}
    if isinstance(result, dict):
        return {str(k): v.detach().cpu().numpy() for k, v in result.items()}
    if isinstance(result, (tuple, list)):
        return {f"output_{i}": v.detach().cpu().numpy() for i, v in enumerate(result)}
    raise ModelInputError(f"model returned {type(result).__name__}; expected tensors")
