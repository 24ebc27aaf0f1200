"""Models behind one adapter: built-in zoo models, ONNX files and PyTorch models."""

from .base import Batches, Runner, StageTimer, run_block
from .registry import ZOO, ModelSpec, load_runner, parse_model

__all__ = ["ZOO", "Batches", "ModelSpec", "Runner", "StageTimer", "load_runner", "parse_model", "run_block"]
