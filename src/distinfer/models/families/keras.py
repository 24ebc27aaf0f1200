"""The `keras` family: a Keras 3 `.keras` file or a TensorFlow SavedModel directory, run with
TensorFlow on the CPU (models/keras_runner.py).

Parsing looks at the files only: TensorFlow takes seconds to import, and the driver (which
spawns the workers) never loads the model. Inputs are matched to columns by name, as for
ONNX; every output is written. Neither pipeline stages nor tensor-parallel ranks: the engine
cannot cut a TensorFlow graph (export it to ONNX for that).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import ModelError
from ..family import ModelFamily, ModelSpec

if TYPE_CHECKING:
    from ...messages import Strategy
    from ..base import Runner

__all__ = ["FAMILY", "KerasFamily", "is_saved_model"]

_GRAPHS = ("saved_model.pb", "saved_model.pbtxt")


def is_saved_model(path: Path) -> bool:
    """Whether `path` is a directory holding a SavedModel's graph."""
    return path.is_dir() and any((path / name).is_file() for name in _GRAPHS)


class KerasFamily(ModelFamily):
    name = "keras"
    summary = ("a Keras 3 .keras file or a TensorFlow SavedModel directory, with TensorFlow on the CPU; "
               "inputs by name, every output written")
    accepts = "a .keras file, a TensorFlow SavedModel directory"
    no_stages: ClassVar[str | None] = (
        "the engine cannot cut a Keras or TensorFlow model into stages; '{name}' runs with --strategy data "
        "(or export it to ONNX, e.g. with tf2onnx, to cut it)"
    )
    no_shards: ClassVar[str | None] = (
        "tensor parallelism shards the built-in transformers (minilm, decoder-SIZE); "
        "'{name}' runs with --strategy data"
    )

    def parse(self, name: str) -> ModelSpec | None:
        path = Path(name).expanduser()
        if is_saved_model(path):
            from ..file_checks import check_saved_model

            check_saved_model(path.resolve())
            return ModelSpec(str(path.resolve()), self)
        if path.suffix.lower() != ".keras":
            return None
        if not path.is_file():
            raise ModelError(f"model file '{name}' does not exist; check --model")
        from ..file_checks import check_keras_file

        check_keras_file(path.resolve())
        return ModelSpec(str(path.resolve()), self)

    def identity(self, spec: ModelSpec) -> dict[str, Any]:
        """A file's size and time (the default); a directory's, every file's, so that a resumed
        job refuses a SavedModel exported again into the same directory."""
        ident = super().identity(spec)
        folder = Path(spec.name)
        if folder.is_dir():
            digest = hashlib.sha256()
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                st = path.stat()
                digest.update(f"{path.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            ident["files"] = digest.hexdigest()
        return ident

    def runner(self, spec: ModelSpec, threads: int, device: str) -> Runner:
        from ..keras_runner import KerasRunner

        return KerasRunner(Path(spec.name), threads, device)

    def served_name(self, spec: ModelSpec) -> str:
        path = Path(spec.name)
        return path.name if path.is_dir() else path.stem

    def serving_problem(self, spec: ModelSpec, strategy: Strategy) -> str | None:
        if strategy == "data":
            return None  # the model's signature says what each input takes
        return (f"cannot serve '{spec.name}' with --strategy {strategy}: the engine cannot cut a Keras or "
                "TensorFlow model; use --strategy data")


FAMILY = KerasFamily()
