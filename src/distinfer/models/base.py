"""The one door every model goes through: a `Runner` loaded once per worker process.

A runner binds model inputs to input columns, turns a block of rows into model batches
(`prepare`), runs one batch (`forward`) and hands back named numpy outputs. `run_block`
does the rest the same way for every model: it times each stage and puts results back in
input order when `prepare` reordered rows (text models sort by length to save padding).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ModelInputError, RowsError
from ..messages import GenerationStats, GroupStats, TensorInfo

__all__ = [
    "Batches", "BlockCancelled", "Column", "GroupStats", "Runner", "StageTimer", "TensorInfo", "batch_rows",
    "concat_columns", "prepare_block", "rows_in_batch", "run_block",
]  # fmt: skip

Column = list[str] | np.ndarray


class BlockCancelled(Exception):
    """The block being computed was cancelled (another copy of it committed, or it was
    stolen): raised between micro-batches, before anything of it is written."""


def never() -> bool:
    """The default `cancelled` check: a block runs to its end."""
    return False


def concat_columns(parts: Sequence[Mapping[str, Column]]) -> dict[str, Column]:
    """The rows of `parts`, one after another, per column (text lists joined, arrays stacked)."""
    merged: dict[str, Column] = {}
    for name, value in parts[0].items():
        if isinstance(value, list):
            texts: list[str] = []
            for part in parts:
                texts.extend(part[name])
            merged[name] = texts
        else:
            merged[name] = np.concatenate([np.asarray(part[name]) for part in parts])
    return merged


@dataclass
class Batches:
    """Model-ready batches for one block. `order[i]` is the block row of result row i."""

    batches: list[Any]
    order: np.ndarray | None = None


@dataclass
class StageTimer:
    """Seconds spent per stage of a worker's loop (read, preprocess, model, ...)."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + (now - since)
        return now


WARM_UP_TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep. " * 3,
]


class Runner(ABC):
    """A loaded model. Subclasses load in `__init__`, once per process."""

    #: model inputs, in the model's order; text models have the single input "text"
    input_names: tuple[str, ...]
    #: whether a call pays for padding, so that rows of similar length are best batched together
    pads_batches: bool = True

    def bind(self, columns: Sequence[str], column: str | None) -> dict[str, str]:
        """Map each model input to a source column, or raise ModelInputError saying how to fix it."""
        available = ", ".join(columns) or "none"
        if column is not None:
            if len(self.input_names) != 1:
                raise ModelInputError(
                    f"the model has {len(self.input_names)} inputs "
                    f"({', '.join(self.input_names)}) but --column names one; "
                    "name the input columns after the model inputs instead"
                )
            return {self.input_names[0]: column}
        if all(name in columns for name in self.input_names):
            return {name: name for name in self.input_names}
        if len(self.input_names) == 1 and len(columns) == 1:
            return {self.input_names[0]: columns[0]}
        missing = [n for n in self.input_names if n not in columns]
        raise ModelInputError(
            f"the input has no column for model input(s) {', '.join(missing)} "
            f"(available: {available}); pick one with --column"
        )

    @abstractmethod
    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        """Turn one block's input columns (keyed by model input name) into batches."""

    @abstractmethod
    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        """Run one batch; every output has the batch's rows as its first axis."""

    def forward_many(
        self, batches: list[Any], cancelled: Callable[[], bool] = never
    ) -> list[dict[str, np.ndarray]]:
        """Run a block's batches; a pipeline overrides this to keep every stage busy.
        `cancelled()` is asked before each batch: True raises `BlockCancelled` (a pipeline or
        tensor-parallel group, whose processes work in step, finishes the block instead).

        A batch that raises ends the call with a `RowsError` naming its index (`batch`), the
        error inside kept as it was (kind, fatality); a replica group raises it only once all
        its processes are done with the call, in step for the next one."""
        results = []
        for i, batch in enumerate(batches):
            if cancelled():
                raise BlockCancelled
            try:
                results.append(self.forward(batch))
            except Exception as exc:
                raise RowsError.caught(exc, i) from exc
        return results

    def input_info(self) -> tuple[TensorInfo, ...] | None:
        """What each input takes, when the model says (None: unknown, so no warm-up rows)."""
        if self.input_names == ("text",):
            return (TensorInfo("text", "text", (-1,)),)
        return None

    def example_inputs(self) -> dict[str, Column] | None:
        """A few rows the model accepts, for warming it up (None when the inputs are unknown)."""
        info = self.input_info()
        if info is None:
            return None
        rows = len(WARM_UP_TEXTS)
        return {
            t.name: list(WARM_UP_TEXTS) if t.dtype == "text"
            else np.zeros((rows, *(1 if d < 0 else d for d in t.shape[1:])), dtype=np.dtype(t.dtype))
            for t in info
        }

    def group_stats(self) -> GroupStats | None:
        """A replica group's figures for the last `forward_many`; None for a single process."""
        return None

    def generation_stats(self) -> GenerationStats | None:
        """A generation engine's figures for the last block; None for other models."""
        return None


def prepare_block(runner: Runner, inputs: Mapping[str, Column], batch_size: int) -> Batches:
    """`runner.prepare`, with a preparer's `ModelInputError.row` raised as a `RowsError` of
    that block row."""
    try:
        return runner.prepare(inputs, batch_size)
    except ModelInputError as exc:
        if exc.row is None:
            raise
        raise RowsError.caught(exc).with_message(str(exc), (exc.row,)) from exc


def run_block(
    runner: Runner, inputs: Mapping[str, Column], batch_size: int, timer: StageTimer,
    cancelled: Callable[[], bool] = never,
) -> dict[str, np.ndarray]:
    """Prepare, run and reassemble one block; results are in the block's row order.

    An error about rows raises a `RowsError` whose `rows` are the block rows at fault: the row
    a preparer's `ModelInputError.row` names, or those of the micro-batch a forward failed on
    (the one row, when the forward's error names it)."""
    t = time.perf_counter()
    prepared = prepare_block(runner, inputs, batch_size)
    t = timer.add("preprocess", t)
    try:
        pieces = runner.forward_many(prepared.batches, cancelled)
    except RowsError as exc:
        if exc.rows or exc.batch is None or not 0 <= exc.batch < len(prepared.batches):
            raise
        rows = batch_rows(prepared, exc.batch)
        if exc.row is not None and 0 <= exc.row < len(rows):
            rows = rows[exc.row : exc.row + 1]
        raise exc.with_message(exc.error.message, rows) from exc
    t = timer.add("model", t)
    if not pieces:
        return {}
    outputs = {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]}
    if prepared.order is not None:
        inverse = np.empty_like(prepared.order)
        inverse[prepared.order] = np.arange(len(prepared.order))
        outputs = {name: value[inverse] for name, value in outputs.items()}
    timer.add("postprocess", t)
    return outputs


def batch_rows(prepared: Batches, index: int) -> tuple[int, ...]:
    """The block rows of batch `index`: a batch's rows are its first axis (of its first array)."""
    start = sum(rows_in_batch(b) for b in prepared.batches[:index])
    stop = start + rows_in_batch(prepared.batches[index])
    if prepared.order is None:
        return tuple(range(start, stop))
    return tuple(int(r) for r in prepared.order[start:stop])


def rows_in_batch(batch: Any) -> int:
    """A batch's rows: the first axis of its first array."""
    while isinstance(batch, (tuple, list, dict)) and batch:
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    shape = getattr(batch, "shape", None)
    return int(shape[0]) if shape else 0
