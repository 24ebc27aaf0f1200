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

__all__ = [
    "TORCHSCRIPT_SUFFIXES",
    "TorchRunner",
    "float_dtype",
    "is_torchscript",
    "load_factory",
    "load_module",
    "name_outputs",
    "prepare_batches",
]

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")


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


def is_torchscript(model: str) -> bool:
    """Whether `model` names a TorchScript file (by its suffix)."""
    return Path(model).suffix in TORCHSCRIPT_SUFFIXES


def load_module(model: str, device: torch.device) -> Any:
    """The model on `device`, in eval mode: a factory's module, a TorchScript module, or an
    exported program's `GraphModule`."""
    path = Path(model)
    try:
        if path.suffix == ".pt2":
            module: Any = torch.export.load(str(path)).module()
        elif is_torchscript(model):
            module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
        else:
            module = load_factory(model)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot load PyTorch model '{model}': {exc}") from None
    if isinstance(module, torch.nn.Module):
        module = module.to(device)
        if hasattr(module, "eval") and not isinstance(module, torch.fx.GraphModule):
            module.eval()
    return module


def float_dtype(module: Any) -> torch.dtype:
    """The dtype float inputs are cast to: that of the module's first parameter."""
    params = list(module.parameters()) if hasattr(module, "parameters") else []
    return params[0].dtype if params else torch.float32


def prepare_batches(
    name: str, dtype: torch.dtype, inputs: Mapping[str, Column], batch_size: int
) -> Batches:
    """The `input` column as tensors of `batch_size` rows, float columns cast to `dtype`."""
    column = inputs["input"]
    if isinstance(column, list):
        raise ModelInputError(
            f"model '{name}' takes numbers but the input column holds text; check --column"
        )
    tensor = torch.from_numpy(np.ascontiguousarray(column))
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return Batches(list(torch.split(tensor, batch_size)))


class TorchRunner(Runner):
    input_names = ("input",)

    def __init__(self, model: str, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.module: Any = load_module(model, self.device)
        self.float_dtype = float_dtype(self.module)
        self.name = model

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        return prepare_batches(self.name, self.float_dtype, inputs, batch_size)

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
        return name_outputs(result)


def name_outputs(result: Any) -> dict[str, np.ndarray]:
    """`output` for a tensor, `output_0`, `output_1`, ... for a tuple or list, keys for a dict."""
    if isinstance(result, torch.Tensor):
        return {"output": result.detach().cpu().numpy()}
    if isinstance(result, dict):
        return {str(k): v.detach().cpu().numpy() for k, v in result.items()}
    if isinstance(result, (tuple, list)):
        return {f"output_{i}": v.detach().cpu().numpy() for i, v in enumerate(result)}
    raise ModelInputError(f"model returned {type(result).__name__}; expected tensors")
