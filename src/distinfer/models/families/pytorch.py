"""The `torch` family: a PyTorch model from `package.module:factory`, a TorchScript file or a
`.pt2` (torch.export) file (models/torch_runner.py).

One tensor input; outputs named `output`, `output_0`, ... or by key. A pipeline cuts what
`torch.fx` can trace (models/fx_stages.py). The server refuses it: the model does not say
what its inputs are (export it to ONNX).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ...errors import ModelError
from ..family import ModelFamily, ModelSpec

if TYPE_CHECKING:
    from ...messages import Strategy
    from ..base import Runner
    from ..staged import StagedModel

__all__ = ["FAMILY", "TorchFamily"]

_FILES = (".pt", ".pth", ".ts", ".torchscript", ".pt2")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class TorchFamily(ModelFamily):
    name = "torch"
    summary = "a PyTorch model: package.module:factory, a TorchScript file or a .pt2 (torch.export) file"
    accepts = "a TorchScript/.pt2 file, or package.module:factory"
    no_stages: ClassVar[str | None] = None

    def parse(self, name: str) -> ModelSpec | None:
        if Path(name).suffix.lower() in _FILES:
            path = Path(name).expanduser()
            if not path.is_file():
                raise ModelError(f"model file '{name}' does not exist; check --model")
            from ..file_checks import check_torch_file

            check_torch_file(path.resolve())
            return ModelSpec(str(path.resolve()), self)
        return ModelSpec(name, self) if _FACTORY.match(name) else None

    def runner(self, spec: ModelSpec, threads: int, device: str) -> Runner:
        try:
            from ..torch_runner import TorchRunner
        except ImportError:
            raise ModelError(
                "PyTorch models need torch; install it with: pip install 'distinfer[torch]'"
            ) from None
        return TorchRunner(spec.name, device)

    def staged(self, spec: ModelSpec) -> StagedModel:
        from ..fx_stages import TracedStaged

        return TracedStaged(spec.name)

    def served_name(self, spec: ModelSpec) -> str:
        if "/" in spec.name:
            return Path(spec.name).stem
        return spec.name.rsplit(":", 1)[-1]

    def serving_problem(self, spec: ModelSpec, strategy: Strategy) -> str | None:
        return (f"cannot serve '{spec.name}': a PyTorch model does not say what its inputs are; "
                "export it to ONNX (torch.onnx.export) and serve the .onnx file, or use 'distinfer run'")


FAMILY = TorchFamily()
