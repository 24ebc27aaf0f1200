"""Models that can be built in consecutive pieces: what pipeline stages and tensor-parallel
ranks need beyond a `Runner`.

A `StagedModel` is a cheap, picklable description of a model (a name, a path, a config:
never weights). It is created in the driver to plan, and again in every stage process,
which builds only the layers it holds:

- `layer_names()` lists the model's layers in order: the units a pipeline cut may fall between;
- `weight_bytes()` gives each layer's weight size without building anything, when known;
- `layer_costs(batch_size, seq_len)` measures each layer for the planner;
- `preparer(device)` turns a block's input columns into batches (tokenising, padding): it runs
  in the first stage's process only;
- `build_stage(start, stop, device, threads)` builds layers [start, stop) alone and returns a
  `Stage`: a callable from one activation to the next. The first stage takes a prepared
  batch; every other stage takes what the one before it returned; the last stage
  (`stage.is_last`) returns the batch's outputs as `dict[str, np.ndarray]` on the CPU.

Activations cross process boundaries, so they are CPU tensors (or tuples/dicts of them, or
numpy arrays): on one machine they are copied into a ring of shared-memory slots
(`worker/shm_channel.py`), on Ray they go through its object store. A family says whether
it has a staged form (`ModelFamily.staged`, or `no_stages` with the reason).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .base import Batches, Column

if TYPE_CHECKING:
    from ..planning.cuts import LayerCost

__all__ = ["Preparer", "Stage", "StagedModel"]


class Preparer(Protocol):
    """The first stage's input side: model inputs and how a block becomes batches."""

    input_names: tuple[str, ...]

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches: ...


class Stage(Protocol):
    """Layers [start, stop) of a model, built in this process."""

    is_last: bool

    def __call__(self, x: Any) -> Any: ...


class StagedModel(ABC):
    """A model that builds any contiguous range of its layers alone (see the module docstring)."""

    name: str

    @abstractmethod
    def layer_names(self) -> list[str]:
        """The model's layers in order; a cut falls between two of them."""

    def weight_bytes(self) -> list[int] | None:
        """Each layer's weight size in bytes, known without building; None if unknown."""
        return None

    @abstractmethod
    def layer_costs(self, batch_size: int, seq_len: int) -> list[LayerCost]:
        """Each layer's measured time and its weight and output bytes for one micro-batch of
        `batch_size` rows (`seq_len` tokens where that applies); for the planner."""

    def prepare_stages(self, stages: tuple[tuple[int, int], ...]) -> None:
        """Called in the driver once the cut is chosen, before stage processes start; a model
        that must write per-stage files (an ONNX subgraph per stage) does it here."""
        return None

    @abstractmethod
    def preparer(self, device: str) -> Preparer:
        """The input side of the first stage."""

    @abstractmethod
    def build_stage(self, start: int, stop: int, device: str, threads: int) -> Stage:
        """Layers [start, stop) alone; the other layers' weights are never loaded."""

    def outputs(self, x: Any) -> dict[str, np.ndarray]:
        """The last stage's result as named numpy arrays (it already is, by default)."""
        return dict(x)
