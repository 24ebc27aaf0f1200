"""The table of model families: a model name is parsed by the first family that takes it.

Adding a family is one module (a `ModelFamily` subclass and its `FAMILY`) and one line in
`FAMILIES` below; see docs/architecture.md for a worked example. The runtime, the planner,
the server and the CLI only ever go through `parse_model` and the parsed spec's family.
"""

from __future__ import annotations

from ...errors import ModelError
from ..base import Runner
from ..family import ModelFamily, ModelSpec
from . import decoder, efficientnet, keras, llm, minilm, onnx_file, pytorch

__all__ = ["FAMILIES", "load_runner", "parse_model", "register"]

#: in the order names are tried: the file and factory families last, as they take any path
FAMILIES: list[ModelFamily] = [
    minilm.FAMILY,
    efficientnet.FAMILY,
    decoder.FAMILY,
    llm.FAMILY,
    keras.FAMILY,
    onnx_file.FAMILY,
    pytorch.FAMILY,
]


def register(family: ModelFamily) -> None:
    """Add a family to this process's table, before the built-in ones (a plug-in, a test).
    Worker processes need nothing: a parsed spec carries its family."""
    if family not in FAMILIES:
        FAMILIES.insert(0, family)


def parse_model(name: str) -> ModelSpec:
    """The spec of model `name`, or ModelError naming what the table accepts."""
    for family in FAMILIES:
        spec = family.parse(name)
        if spec is not None:
            return spec
    accepted = ", ".join(f.accepts for f in FAMILIES)
    raise ModelError(f"unknown model '{name}'; use {accepted}")


def load_runner(spec: ModelSpec, threads: int, device: str = "cpu") -> Runner:
    """The whole model, loaded in this process."""
    return spec.family.runner(spec, threads, device)
