"""Typed messages between the driver and a worker process (or Ray actor).

Everything that crosses a process boundary is one of these small frozen dataclasses;
errors travel as `ErrorInfo`, never as lost tracebacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.blocks import Block
from ..data.sources import SourceSpec
from ..errors import ErrorInfo
from ..models.base import Column, GroupStats, TensorInfo
from ..models.registry import ModelSpec

__all__ = [
    "AssignBlock",
    "BatchDone",
    "BatchFailed",
    "BlockFinished",
    "BlockStarting",
    "BlockUnfinished",
    "CancelBlock",
    "InferBatch",
    "StopWorker",
    "WorkerMessage",
    "WorkerReady",
    "WorkerSpec",
    "WorkerUnusable",
]


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker needs to load its model and do blocks (or serve batches); sent once at start."""

    model: ModelSpec
    source: SourceSpec | None  # None when serving: rows arrive in InferBatch messages
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
    serving: bool = False  # warm the model up and describe its inputs and outputs before ready


# driver -> worker


@dataclass(frozen=True, slots=True)
class AssignBlock:
    block: Block


@dataclass(frozen=True, slots=True)
class CancelBlock:
    block_id: int


@dataclass(frozen=True, slots=True)
class InferBatch:
    """Serving: run these rows (keyed by model input) now; answered by BatchDone or BatchFailed."""

    batch_id: int
    inputs: dict[str, Column]


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
    inputs: tuple[TensorInfo, ...] = ()  # serving: what the model takes (from the warm-up)
    outputs: tuple[TensorInfo, ...] = ()  # serving: what it returned for the warm-up rows
    pads_batches: bool = True  # serving: the model pays for padding (`Runner.pads_batches`)


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


@dataclass(frozen=True, slots=True)
class BatchDone:
    worker: int
    batch_id: int
    outputs: dict[str, np.ndarray]  # one row per input row, in order
    busy_s: float


@dataclass(frozen=True, slots=True)
class BatchFailed:
    worker: int
    batch_id: int
    error: ErrorInfo


WorkerMessage = (
    WorkerReady | BlockStarting | BlockFinished | BlockUnfinished | WorkerUnusable | BatchDone | BatchFailed
)
