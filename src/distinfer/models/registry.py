"""Model names → runners. Parsing is cheap and runs in the driver (early, clear errors);
loading is heavy and runs once in each worker process."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError
from .base import Runner

__all__ = ["ZOO", "ModelSpec", "load_runner", "parse_model"]

#: built-in models, by name
ZOO = {
    "minilm": "all-MiniLM-L6-v2 sentence embeddings (384-d), pretrained",
    "decoder": "GPT-style decoder with seeded random weights; decoder-SIZE picks the size "
    "(tiny 1.4M, small 28M, base 135M, large 369M, 1b 1.24B, 2b 2.06B parameters; default small)",
}
_TORCH_FILES = (".pt", ".pth", ".ts", ".torchscript", ".pt2")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str  # as the user gave it (files made absolute)
    kind: str  # "minilm", "onnx" or "torch"

    def identity(self) -> dict[str, Any]:
        """What makes two jobs' models the same, for the output manifest."""
        ident: dict[str, Any] = {"model": self.name, "kind": self.kind}
        if self.kind in ("onnx", "torch") and os.path.isfile(self.name):
            st = os.stat(self.name)
            ident.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        return ident


def parse_model(name: str) -> ModelSpec:
    if name == "minilm":
        return ModelSpec(name, name)
    if name.lower().startswith("decoder"):
        from .decoder import parse_decoder_name

        try:
            config = parse_decoder_name(name)
        except ValueError as exc:
            raise ModelError(f"{exc}; e.g. --model decoder-tiny") from None
        if config is not None:
            return ModelSpec(name.lower(), "decoder")
    suffix = Path(name).suffix.lower()
    if suffix == ".onnx" or suffix in _TORCH_FILES:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelError(f"model file '{name}' does not exist; check --model")
        return ModelSpec(str(path.resolve()), "onnx" if suffix == ".onnx" else "torch")
    if _FACTORY.match(name):
        return ModelSpec(name, "torch")
    raise ModelError(
        f"unknown model '{name}'; use a built-in model ({', '.join(ZOO)}), an .onnx file, "
        "a TorchScript/.pt2 file, or package.module:factory"
    )


def load_runner(spec: ModelSpec, threads: int, device: str = "cpu") -> Runner:
    if spec.kind == "minilm":
        from .minilm import MiniLMRunner

        return MiniLMRunner(device=device)
    if spec.kind == "decoder":
        from .decoder import DecoderRunner

        return DecoderRunner(spec.name, device=device)
    if spec.kind == "onnx":
        from .onnx_runner import OnnxRunner

        return OnnxRunner(Path(spec.name), threads, device)
    try:
        from .torch_runner import TorchRunner
    except ImportError:
        raise ModelError(
            "PyTorch models need torch; install it with: pip install 'distinfer[torch]'"
        ) from None
    return TorchRunner(spec.name, device)
