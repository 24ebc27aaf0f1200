"""The `onnx` family: any ONNX file, run with ONNX Runtime (models/onnx_runner.py).

Inputs are matched to columns by name; every output is written under its ONNX name. A
pipeline cuts the graph at tensors (models/onnx_stages.py); ranks cannot shard it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ...errors import ModelError
from ..family import ModelFamily, ModelSpec

if TYPE_CHECKING:
    from ...messages import Strategy
    from ..base import Runner
    from ..staged import StagedModel

__all__ = ["FAMILY", "OnnxFamily"]


class OnnxFamily(ModelFamily):
    name = "onnx"
    summary = "any .onnx file, with ONNX Runtime; inputs by name, every output written"
    accepts = "an .onnx file"
    no_stages: ClassVar[str | None] = None

    def parse(self, name: str) -> ModelSpec | None:
        if Path(name).suffix.lower() != ".onnx":
            return None
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelError(f"model file '{name}' does not exist; check --model")
        from ..file_checks import check_onnx

        check_onnx(path.resolve())
        return ModelSpec(str(path.resolve()), self)

    def runner(self, spec: ModelSpec, threads: int, device: str) -> Runner:
        from ..onnx_runner import OnnxRunner

        return OnnxRunner(Path(spec.name), threads, device)

    def staged(self, spec: ModelSpec) -> StagedModel:
        from ..onnx_stages import OnnxStaged

        return OnnxStaged(spec.name)

    def served_name(self, spec: ModelSpec) -> str:
        return Path(spec.name).stem

    def serving_problem(self, spec: ModelSpec, strategy: Strategy) -> str | None:
        if strategy == "data":
            return None  # the ONNX Runtime session says what each input takes
        return (f"cannot serve '{spec.name}' with --strategy {strategy}: the server must know each input's "
                "type and shape, which the whole ONNX file tells; use --strategy data")


FAMILY = OnnxFamily()
