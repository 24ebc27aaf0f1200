"""Models behind one adapter: a table of model families (`families/`), each with its
whole-model runner, staged and sharded forms, costs and schema (`family.py`)."""

from .base import Batches, Runner, StageTimer, run_block
from .families import FAMILIES, load_runner, parse_model, register
from .family import ModelFamily, ModelSpec, Schema

__all__ = [
    "FAMILIES",
    "Batches",
    "ModelFamily",
    "ModelSpec",
    "Runner",
    "Schema",
    "StageTimer",
    "load_runner",
    "parse_model",
    "register",
    "run_block",
]
