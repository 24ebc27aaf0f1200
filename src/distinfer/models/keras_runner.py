"""A Keras 3 file (`.keras`) or a TensorFlow SavedModel directory, run on the CPU.

TensorFlow is imported here, in the worker, never in the driver (it takes seconds, and the
workers are spawned fresh). Before any op runs, the process's TensorFlow gets `threads`
intra-op threads and one inter-op thread, as ONNX Runtime sessions do, so that two workers
do not each start a pool as large as the machine. TensorFlow writes notices (oneDNN, absl)
straight to file descriptor 2 while it loads, whatever `TF_CPP_MIN_LOG_LEVEL` says; they are
silenced unless the user set that variable.

- A `.keras` file loads with `safe_mode` (a `Lambda` layer's pickled code is refused: loading
  a model file runs no code) and without its optimizer. Its forward is the model's call in a
  `tf.function` with a fixed input signature (any batch size): traced once, with none of
  `predict()`'s per-call cost (data adapters, callbacks, building a step function).
- A SavedModel runs its `serving_default` signature, the function TF Serving would call.
- Without TensorFlow (or with `KERAS_BACKEND=torch`), a `.keras` file runs on Keras's torch
  backend, if torch is installed; a SavedModel always needs TensorFlow.

Inputs are named as the model names them (a functional model's inputs, the signature's
arguments) and checked like an ONNX model's (`onnx_runner.InputSpec`, TensorFlow's types named
as ONNX's), so a wrong shape or type reads as one line. Outputs are named by the model: a
dict's keys, a functional model's output names, otherwise `output_0`, `output_1`, ... (as
`model.export` names them). An op that refuses a batch's values (TensorFlow's
`InvalidArgumentError`, e.g. an embedding index out of range) is a `ModelInputError`, about
rows: the job fails at once naming them, or sets them aside under `--max-bad-rows`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError, ModelInputError
from .base import Batches, Column, Runner, TensorInfo
from .families.keras import is_saved_model
from .onnx_runner import ONNX_TYPES, InputSpec, input_info, prepare_inputs

__all__ = ["KerasRunner", "keras_backend", "name_outputs", "onnx_type"]

Call = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]

_ONNX_NAMES = {np.dtype(t).name: name for name, t in ONNX_TYPES.items()}  # "float32" -> "tensor(float)"
_INSTALL = "install it with: pip install 'distinfer[tensorflow]'"


def onnx_type(dtype: str) -> str:
    """A TensorFlow or Keras dtype name ("float32") as ONNX Runtime names the type."""
    return _ONNX_NAMES.get(dtype, f"tensor({dtype})")


def dtype_name(onnx: str) -> str:
    """An ONNX type name ("tensor(float)") as TensorFlow names the dtype ("float32")."""
    return np.dtype(ONNX_TYPES[onnx]).name if onnx in ONNX_TYPES else onnx.removeprefix("tensor(")[:-1]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def keras_backend(path: Path) -> str:
    """The Keras backend a model runs on: "tensorflow", or "torch" for a `.keras` file where
    TensorFlow is not installed or `KERAS_BACKEND=torch` asks for it."""
    has = {name: importlib.util.find_spec(name) is not None for name in ("tensorflow", "keras", "torch")}
    if is_saved_model(path):
        if not has["tensorflow"]:
            raise ModelError(f"{path}: a TensorFlow SavedModel needs TensorFlow; {_INSTALL}")
        return "tensorflow"
    if "keras" in sys.modules:  # this process chose already (a test, a notebook calling `distinfer.bench`)
        chosen = str(sys.modules["keras"].backend.backend())
        if chosen not in ("tensorflow", "torch"):
            raise ModelError(f"{path}: Keras runs on its {chosen} backend in this process; distinfer runs "
                             "Keras models on tensorflow or torch")
        return chosen
    if os.environ.get("KERAS_BACKEND") == "torch" and has["keras"] and has["torch"]:
        return "torch"
    if has["tensorflow"] and has["keras"]:
        return "tensorflow"
    if has["keras"] and has["torch"]:
        return "torch"
    raise ModelError(f"{path}: Keras models need TensorFlow (or Keras with torch); {_INSTALL}")


@contextmanager
def fd2_silenced(silence: bool) -> Iterator[None]:
    """Native code's writes to stderr (file descriptor 2) dropped while inside."""
    if not silence:
        yield
        return
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def import_tensorflow(threads: int, device: str) -> Any:
    """TensorFlow, quiet, with this process's thread pools sized (if no op has run yet)."""
    silence = "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["KERAS_BACKEND"] = "tensorflow"
    try:
        with fd2_silenced(silence):
            import tensorflow as tf
    except ImportError as exc:
        raise ModelError(f"cannot import TensorFlow ({first_line(exc)}); {_INSTALL}") from None
    tf.get_logger().setLevel("ERROR")
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        if device == "cpu":
            tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already ran in this process: its pools stay as they are
        pass
    return tf


def load_keras(path: Path) -> Any:
    """The model in a `.keras` file (Keras imported on the backend chosen before)."""
    import keras

    try:
        return keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except Exception as exc:
        raise ModelError(f"cannot load Keras model '{path}': {first_line(exc)}") from None


def keras_inputs(model: Any, path: Path) -> tuple[dict[str, InputSpec], Callable[[Mapping[str, Any]], Any]]:
    """A Keras model's inputs by name, and how to arrange a batch (by input name) the way the
    model was built: a dict, a list in the model's order, or the one tensor."""
    try:
        struct = model.input
    except (AttributeError, ValueError):
        raise ModelError(f"{path}: the Keras model does not say what its inputs are (a subclassed model "
                         "never called on keras.Input); save a functional or Sequential model") from None
    if isinstance(struct, Mapping):
        named = [(str(name), t) for name, t in struct.items()]
        arrange: Callable[[Mapping[str, Any]], Any] = dict
    elif isinstance(struct, (list, tuple)):
        named = [(str(t.name), t) for t in struct]
        arrange = lambda batch: [batch[name] for name, _ in named]  # noqa: E731
    else:
        named = [(str(struct.name), struct)]
        arrange = lambda batch: batch[named[0][0]]  # noqa: E731
    specs = {name: InputSpec(name, onnx_type(str(t.dtype)), tuple(t.shape)) for name, t in named}
    return specs, arrange


def name_outputs(result: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    """A model call's result as named numpy arrays: a dict by key, a tensor or a list by the
    model's output names (or `output_0`, ... where it has none to match)."""
    if isinstance(result, Mapping):
        return {str(k): np.asarray(v) for k, v in result.items()}
    values = list(result) if isinstance(result, (list, tuple)) else [result]
    if len(names) != len(values):
        names = [f"output_{i}" for i in range(len(values))]
    return {name: np.asarray(v) for name, v in zip(names, values, strict=True)}


def refused_rows(tf: Any, call: Call) -> Call:
    """`call`, with TensorFlow refusing a batch's values raised as a ModelInputError."""

    def checked(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return call(batch)
        except tf.errors.InvalidArgumentError as exc:
            lines = [s for s in str(exc.message).splitlines() if s and not s[0].isspace()]
            raise ModelInputError(f"the model refuses these rows: {lines[-1] if lines else exc}") from None

    return checked


def keras_on_tensorflow(path: Path, threads: int, device: str) -> tuple[dict[str, InputSpec], Call]:
    tf = import_tensorflow(threads, device)
    model = load_keras(path)
    specs, arrange = keras_inputs(model, path)
    signature = arrange({name: tf.TensorSpec(s.shape, tf.as_dtype(dtype_name(s.type)), name)
                         for name, s in specs.items()})
    forward = tf.function(lambda x: model(x, training=False), input_signature=[signature])
    names = tuple(getattr(model, "output_names", None) or ())
    return specs, refused_rows(tf, lambda batch: name_outputs(forward(arrange(batch)), names))


def keras_on_torch(path: Path, threads: int) -> tuple[dict[str, InputSpec], Call]:
    os.environ["KERAS_BACKEND"] = "torch"
    import torch

    torch.set_num_threads(threads)
    model = load_keras(path)
    specs, arrange = keras_inputs(model, path)
    names = tuple(getattr(model, "output_names", None) or ())

    def call(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return name_outputs(model(arrange(batch), training=False), names)

    return specs, call


def saved_model(path: Path, threads: int, device: str) -> tuple[dict[str, InputSpec], Call]:
    tf = import_tensorflow(threads, device)
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:
        raise ModelError(f"cannot load SavedModel '{path}': {first_line(exc)}") from None
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        has = ", ".join(loaded.signatures) or "none"
        raise ModelError(f"{path}: the SavedModel has no 'serving_default' signature (it has: {has}); "
                         "export it with model.export(dir) or tf.saved_model.save(obj, dir, signatures=...)")
    specs = {}
    for name, t in signature.structured_input_signature[1].items():
        if t.shape.rank is None:
            raise ModelError(f"{path}: signature input '{name}' has no known rank; export it with a shape")
        specs[name] = InputSpec(name, onnx_type(t.dtype.name), tuple(t.shape.as_list()))

    def call(batch: Mapping[str, np.ndarray], _keep: Any = loaded) -> dict[str, np.ndarray]:
        # `_keep`: the signature function holds the model's variables only weakly
        outputs = signature(**{name: tf.constant(value) for name, value in batch.items()})
        return {name: np.asarray(value) for name, value in outputs.items()}

    return specs, refused_rows(tf, call)


class KerasRunner(Runner):
    #: rows are fixed-shape tensors: nothing is padded
    pads_batches = False

    def __init__(self, path: Path, threads: int, device: str = "cpu") -> None:
        self.path = path
        self.backend = keras_backend(path)
        if is_saved_model(path):
            self.inputs, self._call = saved_model(path, threads, device)
        elif self.backend == "torch":
            self.inputs, self._call = keras_on_torch(path, threads)
        else:
            self.inputs, self._call = keras_on_tensorflow(path, threads, device)
        self.input_names = tuple(self.inputs)

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        return prepare_inputs(self.inputs, inputs, batch_size)

    def input_info(self) -> tuple[TensorInfo, ...] | None:
        return input_info(self.inputs)

    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        return self._call(batch)
