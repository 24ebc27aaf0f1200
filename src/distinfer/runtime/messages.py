"""Typed messages between the driver and a worker process (or Ray actor).

Everything that crosses a process boundary is one of these small frozen dataclasses;
errors travel as `ErrorInfo`, never as lost tracebacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..data.blocks import Block
from ..data.sources import SourceSpec
from ..errors import ErrorInfo
from ..models.base import GroupStats
from ..models.registry import ModelSpec

__all__ = [
    "AssignBlock",
    "BlockFinished",
    "BlockStarting",
    "BlockUnfinished",
    "CancelBlock",
    "StopWorker",
    "WorkerMessage",
    "WorkerReady",
    "WorkerSpec",
    "WorkerUnusable",
]


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker needs to load its model and do blocks; sent once at start."""

    model: ModelSpec
    source: SourceSpec
    column: str | None
    output_dir: str
    batch_size: int
    threads: int
    device: str = "cpu"
    strategy: str = "data"  # "data", "pipeline" or "tensor"
    stages: tuple[tuple[int, int], ...] = ()  # pipeline: layer range of each stage
    tensor_parallel: int = 1  # tensor: ranks per replica
    tensor_comm: str = "auto"  # tensor: how ranks exchange tensors (runtime/collectives.py)
    stage_transport: str = "local"  # pipeline: "local" child processes or "ray" actors
    stage_slot_bytes: int = 0  # pipeline, local: each shared activation buffer (0: the default)
    stage_options: dict[str, Any] = field(default_factory=dict)  # ray: what each stage actor asks for


# driver -> worker


@dataclass(frozen=True, slots=True)
class AssignBlock:
    block: Block


@dataclass(frozen=True, slots=True)
class CancelBlock:
    block_id: int


@dataclass(frozen=True, slots=True)
class StopWorker:
    pass


# worker -> driver


@dataclass(frozen=True, slots=True)
class WorkerReady:
    worker: int
    pid: int
    host: str
    load_s: float  # from the worker's entry to a loaded model (imports included)
    members: tuple[str, ...] = ()  # a group's stages or ranks: where each runs


@dataclass(frozen=True, slots=True)
class BlockStarting:
    worker: int
    block_id: int


@dataclass(frozen=True, slots=True)
class BlockFinished:
    worker: int
    block_id: int
    rows: int
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, this block
    elapsed_s: float = 0.0  # since the worker became ready
    group: GroupStats | None = None  # pipeline stages / tensor ranks, this block


@dataclass(frozen=True, slots=True)
class BlockUnfinished:
    worker: int
    block_id: int
    error: ErrorInfo


@dataclass(frozen=True, slots=True)
class WorkerUnusable:
    """The worker could not start (model failed to load, bad column binding)."""

    worker: int
    error: ErrorInfo


WorkerMessage = WorkerReady | BlockStarting | BlockFinished | BlockUnfinished | WorkerUnusable
