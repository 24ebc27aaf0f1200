"""Any ONNX file, run with ONNX Runtime on the CPU (or CUDA when asked and available).

Model inputs are matched to input columns by name; the batch dimension may be dynamic;
every model output is written. Before the first run each input is checked against the
model's declared element type and shape so that a mismatch reads as one clear line.

The checking and batching work on `InputSpec`s, which come from an ONNX Runtime session here
and from the ONNX graph itself for pipeline stages (`onnx_stages`), so both check alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError, ModelInputError
from .base import Batches, Column, Runner, TensorInfo

__all__ = ["ONNX_TYPES", "InputSpec", "OnnxRunner", "check_input", "open_session", "prepare_inputs"]

ONNX_TYPES = {  # ONNX Runtime's type names -> the numpy types inputs are cast to
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True, slots=True)
class InputSpec:
    """A model input as ONNX Runtime describes it: `type` like "tensor(float)", `shape` with an
    int per fixed dimension and a name (str) or None per dynamic one."""

    name: str
    type: str
    shape: tuple[int | str | None, ...]


def open_session(model: str | bytes, threads: int, device: str, label: str) -> Any:
    """An ONNX Runtime session for a model file (or serialized model): `threads` intra-op
    threads, one inter-op thread, CUDA first when `device` is "cuda"; `label` names the
    model in the error raised when it cannot be loaded."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelError(
            "ONNX models need onnxruntime; install it with: pip install 'distinfer[onnx]'"
        ) from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load ONNX model '{label}': {first}") from None


def check_input(spec: InputSpec, value: np.ndarray) -> np.ndarray:
    """`value` cast to the input's element type, or ModelInputError when type or shape cannot fit."""
    name = spec.name
    dtype = ONNX_TYPES.get(spec.type)
    if dtype is None:
        raise ModelInputError(f"model input '{name}' has type {spec.type}, not supported")
    want = list(spec.shape)
    got = value.shape
    fixed = [(i, d) for i, d in enumerate(want) if isinstance(d, int) and i > 0]
    if len(got) != len(want) or any(got[i] != d for i, d in fixed):
        shown = ["N" if i == 0 else (d if isinstance(d, int) else "?") for i, d in enumerate(want)]
        raise ModelInputError(
            f"model input '{name}' expects shape [{', '.join(map(str, shown))}] but the input "
            f"column gives rows of shape {list(got[1:])}; check --column and the model"
        )
    if value.dtype != dtype:
        kind_ok = np.can_cast(value.dtype, dtype, casting="same_kind") or (
            value.dtype.kind in "iu" and np.dtype(dtype).kind == "f"
        )
        if not kind_ok:
            raise ModelInputError(
                f"model input '{name}' expects {np.dtype(dtype).name} but the input column "
                f"holds {value.dtype.name}; check --column"
            )
        value = value.astype(dtype)
    return value


def prepare_inputs(specs: Mapping[str, InputSpec], inputs: Mapping[str, Column], batch_size: int) -> Batches:
    """Check a block's columns against the model inputs and slice them into batches of rows."""
    arrays: dict[str, np.ndarray] = {}
    for name, column in inputs.items():
        if isinstance(column, list):
            raise ModelInputError(
                f"model input '{name}' takes numbers but its column holds text; check --column"
            )
        arrays[name] = check_input(specs[name], column)
    rows = len(next(iter(arrays.values()))) if arrays else 0
    batches = [
        {name: a[start : start + batch_size] for name, a in arrays.items()}
        for start in range(0, rows, batch_size)
    ]
    return Batches(batches)


def input_info(specs: Mapping[str, InputSpec]) -> tuple[TensorInfo, ...] | None:
    """The inputs as the serving protocol describes them (None if a type is unsupported)."""
    out = []
    for spec in specs.values():
        dtype = ONNX_TYPES.get(spec.type)
        if dtype is None:
            return None
        shape = (-1, *(d if isinstance(d, int) and d >= 0 else -1 for d in spec.shape[1:]))
        out.append(TensorInfo(spec.name, np.dtype(dtype).str, shape))
    return tuple(out)


class OnnxRunner(Runner):
    def __init__(self, path: Path, threads: int, device: str = "cpu") -> None:
        self.session = open_session(str(path), threads, device, str(path))
        self.path = path
        self.inputs = {i.name: InputSpec(i.name, i.type, tuple(i.shape)) for i in self.session.get_inputs()}
        self.input_names = tuple(self.inputs)
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        return prepare_inputs(self.inputs, inputs, batch_size)

    def input_info(self) -> tuple[TensorInfo, ...] | None:
        return input_info(self.inputs)

    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        results = self.session.run(None, batch)
        return {name: np.asarray(r) for name, r in zip(self.output_names, results, strict=True)}
