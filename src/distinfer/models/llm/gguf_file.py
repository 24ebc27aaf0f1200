"""A GGUF file read with the `gguf` package (llama.cpp's own reader): metadata, the tensor
index, and one tensor dequantised to float32 at a time from the memory-mapped file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ModelError
from .config import LlmConfig, from_gguf_metadata

__all__ = ["GgufFile"]


class GgufFile:
    def __init__(self, path: Path) -> None:
        try:
            import gguf
        except ModuleNotFoundError:
            raise ModelError(
                "reading GGUF files needs the 'gguf' package: pip install 'distinfer[llm]'"
            ) from None
        self.path = path
        try:
            self._reader = gguf.GGUFReader(str(path))
        except Exception as exc:  # the reader raises ValueError, struct errors, IndexError...
            raise ModelError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.metadata = {name: _value(field) for name, field in self._reader.fields.items()
                         if not name.startswith("GGUF.")}
        self.config: LlmConfig = from_gguf_metadata(self.metadata, str(path))

    @staticmethod
    @lru_cache(maxsize=4)
    def open(path: Path) -> GgufFile:
        return GgufFile(Path(path))

    def names(self) -> list[str]:
        return list(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str) -> np.ndarray:
        """Tensor `name` as float32, in PyTorch's axis order (ModelError if missing or corrupt)."""
        from gguf import quants

        info = self._tensors.get(name)
        if info is None:
            raise ModelError(f"{self.path}: tensor '{name}' is missing; the file is incomplete")
        try:
            array = quants.dequantize(info.data, info.tensor_type)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            raise ModelError(f"{self.path}: cannot read tensor '{name}' ({why})") from None
        expected = tuple(int(d) for d in reversed(info.shape))
        if array.shape != expected:
            array = array.reshape(expected)
        return np.array(array, dtype=np.float32, order="C", copy=True)


def _value(field: Any) -> Any:
    """A metadata field as a Python value (strings decoded, arrays as lists)."""
    try:
        return field.contents()
    except Exception:
        return None
