"""The work inside one replica, independent of how messages reach it.

`Replica` loads the model once, binds model inputs to input columns, and turns a block
descriptor into a committed output part: read the rows, run the model, write the part
(temporary name, then rename). The local process loop and the Ray actor both wrap it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from ..data._spec import name_of
from ..data.blocks import Block
from ..data.sink import write_errors, write_part
from ..data.sources import SourceSpec, read_block
from ..errors import DistinferError, ErrorInfo, ModelError, ModelInputError, RowsError
from ..messages import (
    BadRow,
    BatchDone,
    BatchFailed,
    BlockDone,
    GenerationStats,
    InferBatch,
    WorkerReady,
    WorkerSpec,
)
from ..models.base import (
    BlockCancelled,
    Column,
    Runner,
    StageTimer,
    TensorInfo,
    never,
    prepare_block,
    run_block,
)
from ..models.families import load_runner
from .process import limit_threads
from .quarantine import Isolator, TooManyBadRows, read_isolating, row_value, run_isolating

if TYPE_CHECKING:
    from .text_serving import TextServing

__all__ = ["GenerationFailed", "Replica", "error_info", "limit_threads"]


_WARM_UP_TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 3

#: A test hook: "W:F" makes worker W run its blocks F times slower (it sleeps F - 1 times each
#: block's time before writing it), for the tests and benchmarks of speculation.
SLOW_WORKER_ENV = "DISTINFER_TEST_SLOW_WORKER"
#: the prefix a kept column (`WorkerSpec.keep`) is read under, apart from the model's inputs
_KEEP = "\0keep:"


def _slowdown(worker: int) -> float:
    """The test hook's factor for this worker (1: none)."""
    setting = os.environ.get(SLOW_WORKER_ENV, "")
    who, _, factor = setting.partition(":")
    try:
        return max(1.0, float(factor)) if who and int(who) == worker else 1.0
    except ValueError:
        return 1.0


def _pause(seconds: float, cancelled: Callable[[], bool]) -> None:
    """The slow-worker hook's sleep, cut short (`BlockCancelled`) like a model's batches."""
    end = time.perf_counter() + seconds
    while (left := end - time.perf_counter()) > 0:
        if cancelled():
            raise BlockCancelled
        time.sleep(min(left, 0.02))


def read_inputs(source: SourceSpec, block: Block, binding: Mapping[str, str]) -> dict[str, Column]:
    """Read a block's bound columns once each, keyed by the model input they feed."""
    columns = read_block(source, block, list(dict.fromkeys(binding.values())))
    return {name: columns[col] for name, col in binding.items()}


def _model_inputs(read: Mapping[str, Column]) -> dict[str, Column]:
    """The columns read for the model, without the kept ones."""
    return {name: column for name, column in read.items() if not name.startswith(_KEEP)}


def error_info(exc: BaseException) -> ErrorInfo:
    return ErrorInfo.from_exception(exc, traceback.format_exc())


class Replica:
    def __init__(self, worker: int, spec: WorkerSpec, entered_at: float) -> None:
        self.worker = worker
        self.spec = spec
        self.runner = _load(spec)
        self.binding = self.runner.bind(spec.source.columns, spec.column) if spec.source else {}
        self.inputs: tuple[TensorInfo, ...] = ()
        self.outputs: tuple[TensorInfo, ...] = ()
        self.text: TextServing | None = None  # serving text generation
        if spec.serving and spec.model.generation is not None:
            self.text = self._serve_text()
        elif spec.serving:
            self._warm_up()
        self.streams = spec.model.generation is not None and spec.source is not None
        self._open: dict[int, tuple[Block, StageTimer, np.ndarray, list[BadRow]]] = {}
        self._done_early: dict[int, BlockDone] = {}  # generation: blocks with no good row
        self._finished: dict[int, BlockDone | ErrorInfo] = {}
        self._lock = threading.Lock()
        self.ready_at = time.perf_counter()
        self.load_s = self.ready_at - entered_at
        self.slowdown = _slowdown(worker)
        #: whether a block was cancelled while it runs (set by the backend that hears of it):
        #: a batch job's replica asks between micro-batches and stops with `BlockCancelled`
        self.cancelled: Callable[[int], bool] = lambda block: False

    def ready_message(self) -> WorkerReady:
        text = self.text
        return WorkerReady(self.worker, os.getpid(), socket.gethostname(), self.load_s,
                           getattr(self.runner, "hosts", ()), self.inputs, self.outputs,
                           self.runner.pads_batches, text.kv_pages if text else 0,
                           text.max_running if text else 0)

    def _serve_text(self) -> TextServing:
        """Serving text generation: the engine warmed up (first-call costs paid, rates measured)."""
        from ..models.llm.runner import GenerationRunner
        from .text_serving import TextServing

        runner = self.runner
        assert isinstance(runner, GenerationRunner)
        text = TextServing(self.worker, runner)
        text.warm_up(tuple(runner.model.tokenizer.encode(_WARM_UP_TEXT)))
        schema = self.spec.model.family.schema(self.spec.model)
        self.inputs, self.outputs = schema.inputs or (), schema.outputs or ()
        return text

    def _warm_up(self) -> None:
        """Run a few example rows twice (first-call costs paid before any request) and
        describe the model's inputs and outputs from them."""
        inputs = self.runner.input_info()
        example = self.runner.example_inputs()
        if inputs is None or example is None:
            raise ModelError(
                f"cannot serve '{self.spec.model.name}' this way: the server must know each input's type "
                "and shape, which text models and ONNX files (with --strategy data) tell; "
                "use 'distinfer run' for this model"
            )
        self.inputs = inputs
        for _ in range(2):
            outputs = self._infer(example)
        self.outputs = tuple(
            TensorInfo(name, value.dtype.str, (-1, *value.shape[1:])) for name, value in outputs.items()
        )

    def infer(self, message: InferBatch) -> BatchDone | BatchFailed:
        """Serving: one batch of rows now, outputs in row order (or the error, as data)."""
        start = time.perf_counter()
        try:
            if self.text is not None:  # the server sends none (its routes refuse first)
                raise ModelInputError("a text-generation model is served by /v1/completions")
            try:
                outputs = self._infer(message.inputs)
            except RowsError as exc:  # rows of the batch (a lone request's, when the client hears it)
                if not exc.rows:
                    raise
                raise exc.with_message(f"{name_rows(exc.rows)}: {exc.error.message}") from None
        except Exception as exc:
            return BatchFailed(self.worker, message.batch_id, error_info(exc))
        return BatchDone(self.worker, message.batch_id, outputs, time.perf_counter() - start)

    def _infer(self, inputs: Mapping[str, Column]) -> dict[str, np.ndarray]:
        rows = len(next(iter(inputs.values())))
        outputs = run_block(self.runner, inputs, self.spec.batch_size, StageTimer())
        _check_rows(outputs, rows)
        return outputs

    def run(self, block: Block, waited_s: float = 0.0) -> BlockDone:
        """One block, read, run and written. A generation replica may be given the next block
        on another thread while one runs (a Ray actor's second call): both share its engine.
        With a bad-row allowance the block's bad rows are set aside (worker/quarantine.py).
        A block cancelled while it runs raises `BlockCancelled` and writes nothing."""
        if self.streams:
            return self._run_shared(block, waited_s)
        timer = StageTimer({"idle": waited_s})
        cancelled = partial(self.cancelled, block.id)
        t = time.perf_counter()
        source = self.spec.source
        assert source is not None, "a serving replica runs no blocks"
        if self.spec.max_bad_rows > 0:
            with too_many_named(source, block):
                kept, read, bad = self._read_quarantined(block)
                inputs = _model_inputs(read)
                t = timer.add("read", t)
                with rows_named(source, block, kept):
                    isolated = run_isolating(self.runner, inputs, self.spec.batch_size, timer,
                                             self.spec.max_bad_rows - len(bad), cancelled)
            bad += self._bad_rows(source, block, kept, inputs, isolated.bad)
            rows = kept[isolated.rows] if len(kept) else kept
            outputs = self._with_kept(isolated.outputs, read, isolated.rows)
            return self._commit(block, outputs, timer, self.runner.generation_stats(), rows, bad, cancelled)
        read = read_inputs(source, block, self._reads)
        t = timer.add("read", t)
        with rows_named(source, block):
            outputs = run_block(self.runner, _model_inputs(read), self.spec.batch_size, timer, cancelled)
        outputs = self._with_kept(outputs, read)
        return self._commit(block, outputs, timer, self.runner.generation_stats(), cancelled=cancelled)

    @property
    def _reads(self) -> dict[str, str]:
        """The columns a block reads, keyed by what they feed: the model inputs (`binding`),
        and the kept columns written next to the outputs (under their own names, prefixed)."""
        return {**self.binding, **{_KEEP + c: c for c in self.spec.keep}}

    def _with_kept(self, outputs: Mapping[str, np.ndarray], read: Mapping[str, Column],
                   rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """`outputs` and the kept input columns (of the rows `rows` of those `read`, all by default)."""
        kept = {}
        for column in self.spec.keep:
            if column in outputs:
                raise ModelError(f"model output '{column}' has the name of the input column written "
                                 "next to the outputs; rename that output")
            values = np.empty(len(read[_KEEP + column]), dtype=object)
            values[:] = list(read[_KEEP + column])
            kept[column] = values if rows is None else values[rows]
        return {**kept, **outputs}

    def _read_quarantined(self, block: Block) -> tuple[np.ndarray, dict[str, Column], list[BadRow]]:
        """The block's readable rows (absolute), their inputs, and the unreadable rows."""
        assert self.spec.source is not None
        reads = self._reads
        wanted = list(dict.fromkeys(reads.values()))
        columns, kept, bad = read_isolating(self.spec.source, block, wanted, self.spec.max_bad_rows)
        inputs = {name: columns[col] for name, col in reads.items()}
        return block.start + np.asarray(kept, dtype=np.int64), inputs, bad

    @staticmethod
    def _bad_rows(source: SourceSpec, block: Block, kept: np.ndarray, inputs: Mapping[str, Column],
                  found: list[tuple[int, str, ErrorInfo]]) -> list[BadRow]:
        """Bad rows found among `inputs` (the block's rows `kept`), as records naming their rows."""
        return [BadRow(int(kept[i]), stage, error.kind,
                       f"{describe_rows(source, [int(kept[i])])}: {error.message}", row_value(inputs, i))
                for i, stage, error in found]  # fmt: skip

    def _commit(self, block: Block, outputs: Mapping[str, np.ndarray], timer: StageTimer,
                generation: GenerationStats | None, rows: np.ndarray | None = None,
                bad: Sequence[BadRow] = (), cancelled: Callable[[], bool] = never) -> BlockDone:
        """Write the block's part (its rows `rows`, all of them by default) and its bad rows."""
        if self.slowdown > 1:  # the test hook: this worker's model runs slower
            pause = (self.slowdown - 1) * sum(v for k, v in timer.seconds.items() if k != "idle")
            _pause(pause, cancelled)
            timer.seconds["model"] = timer.seconds.get("model", 0.0) + pause
        if cancelled():
            raise BlockCancelled
        t = time.perf_counter()
        if rows is None:
            rows = np.arange(block.start, block.stop, dtype=np.int64)
        _check_rows(outputs, len(rows))
        if self.spec.max_bad_rows > 0:  # before the part, so that a committed part has its errors
            write_errors(self.spec.output_dir, block.id, bad)
        write_part(self.spec.output_dir, block.id, rows, outputs)
        timer.add("write", t)
        return BlockDone(
            self.worker, block.id, block.rows, timer.seconds, time.perf_counter() - self.ready_at,
            self.runner.group_stats(), generation, tuple(bad),
        )

    # --- generation: blocks overlap in one engine ----------------------------------------

    @property
    def room(self) -> bool:
        """A generation replica can start another block now (see `GenerationRunner.room`)."""
        return self.streams and self.runner.room  # type: ignore[attr-defined]

    @property
    def busy(self) -> bool:
        return self.streams and self.runner.busy  # type: ignore[attr-defined]

    def open(self, block: Block, waited_s: float = 0.0) -> None:
        """Read and prepare a block and add its prompts to the engine; a bad row raises here."""
        source = self.spec.source
        assert source is not None, "a serving replica runs no blocks"
        timer = StageTimer({"idle": waited_s})
        t = time.perf_counter()
        if self.spec.max_bad_rows > 0:
            with too_many_named(source, block):
                kept, read, bad = self._read_quarantined(block)
                inputs = _model_inputs(read)
                t = timer.add("read", t)
                with rows_named(source, block, kept):
                    isolator = Isolator(self.runner, inputs, self.spec.batch_size,
                                        self.spec.max_bad_rows - len(bad))
                    prepared, good = isolator.prepare(list(range(len(kept))))
            bad += self._bad_rows(source, block, kept, inputs, isolator.bad)
            kept = kept[np.asarray(good, dtype=np.int64)]
        else:
            inputs = read_inputs(source, block, self.binding)
            t = timer.add("read", t)
            with rows_named(source, block):
                prepared = prepare_block(self.runner, inputs, self.spec.batch_size)
            kept, bad = np.arange(block.start, block.stop, dtype=np.int64), []
        timer.add("preprocess", t)
        if prepared is None:  # every row was bad: nothing to generate
            self._done_early[block.id] = self._commit(block, {}, timer, None, kept, bad)
            return
        self.runner.open(block.id, prepared.batches[0])  # type: ignore[attr-defined]
        self._open[block.id] = (block, timer, kept, bad)

    def advance(self) -> list[BlockDone]:
        """One engine step; the blocks it finished, committed. An error in the step fails every
        open block: `GenerationFailed` names them."""
        try:
            ended = self.runner.advance()  # type: ignore[attr-defined]
        except Exception as exc:
            keys = self.runner.abandon()  # type: ignore[attr-defined]
            self._open.clear()
            raise GenerationFailed(keys, error_info(exc)) from exc
        done = []
        for key, outputs, stats in ended:
            block, timer, kept, bad = self._open.pop(key)
            timer.seconds["model"] = stats.model_s
            done.append(self._commit(block, outputs, timer, stats, kept, bad))
        done += self._done_early.values()
        self._done_early.clear()
        return done

    def _run_shared(self, block: Block, waited_s: float) -> BlockDone:
        """`run` for a generation replica, safe to call from several threads: each caller
        steps the shared engine in turn until its own block is done."""
        opened = False
        while True:
            with self._lock:
                if not opened and (self.room or not self.busy):
                    self.open(block, waited_s)
                    opened = True
                try:
                    for done in self.advance():
                        self._finished[done.block] = done
                except GenerationFailed as exc:
                    for key in exc.blocks:
                        self._finished[key] = exc.error
                result = self._finished.pop(block.id, None)
            if isinstance(result, BlockDone):
                return result
            if result is not None:
                raise RowsError(result)  # the step's error, its kind kept


class GenerationFailed(Exception):
    """A generation step failed: every block open in the engine failed with it."""

    def __init__(self, blocks: list[int], error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.blocks = blocks
        self.error = error


@contextmanager
def rows_named(source: SourceSpec, block: Block, kept: np.ndarray | None = None) -> Iterator[None]:
    """Errors about rows (or the block's column) re-raised naming the input's absolute rows
    (`kept`: the absolute row of each row the code inside was given; the block's by default)."""
    try:
        yield
    except RowsError as exc:  # the input's absolute rows, named once
        rows = np.arange(block.start, block.stop) if kept is None else kept
        at_fault = [int(rows[r]) for r in exc.rows if 0 <= r < len(rows)] or [int(r) for r in rows]
        where = describe_rows(source, at_fault)
        raise exc.with_message(f"{where}: {exc.error.message}") from None
    except ModelInputError as exc:  # about the block's column as a whole
        where = describe_rows(source, range(block.start, block.stop))
        raise ModelInputError(f"{where}: {exc}") from None


@contextmanager
def too_many_named(source: SourceSpec, block: Block) -> Iterator[None]:
    """A block over the bad-row allowance fails the job, saying so and naming its first error."""
    try:
        yield
    except TooManyBadRows as exc:
        error = ErrorInfo(
            "JobFailedError",
            f"{describe_rows(source, range(block.start, block.stop))} hold more than {exc.limit} bad "
            f"rows, over --max-bad-rows; one of them: {exc.first.message}",
            fatal=True,
        )
        raise RowsError(error) from None


def describe_rows(source: SourceSpec, rows: Sequence[int]) -> str:
    """Where input rows are, for messages: "data.npy row 137", "data.txt rows 130-137, 141
    (lines 131-138, 142)": 0-based rows (as in the output's `row` column), and the 1-based
    lines or CSV records of a text file."""
    if source.format == "images":  # the listing is ours: its rows are images (the message names the file)
        return f"image {name_rows(rows)}"
    file = name_of(source.path)
    unit = {"text": "line", "jsonl": "line", "csv": "record"}.get(source.format)
    where = f"{file} {name_rows(rows)}"
    if unit is None:
        return where
    return f"{where} ({name_rows([r + 1 for r in rows], unit)})"


def name_rows(rows: Sequence[int], unit: str = "row", most: int = 6) -> str:
    """"row 7", "rows 130-137, 141", or the first `most` runs and how many rows in all."""
    ordered = sorted(set(rows))
    runs: list[tuple[int, int]] = []
    for r in ordered:
        if runs and r == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], r)
        else:
            runs.append((r, r))
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:most])
    if len(runs) > most:
        text += f", ... ({len(ordered)} {unit}s)"
    return f"{unit} {text}" if len(ordered) == 1 else f"{unit}s {text}"


def _check_rows(outputs: Mapping[str, np.ndarray], rows: int) -> None:
    for name, value in outputs.items():
        if len(value) != rows:
            raise DistinferError(
                f"model output '{name}' has {len(value)} rows for {rows} input rows; "
                "a model must return one result per input row"
            )


def _load(spec: WorkerSpec) -> Runner:
    """The model (`_load_model`), behind image decoding when its rows are images."""
    runner = _load_model(spec)
    if spec.images is None:
        return runner
    from ..models.images import ImageRunner

    return ImageRunner(runner, spec.images)


def _load_model(spec: WorkerSpec) -> Runner:
    """The whole model (data parallel), a pipeline of stages, or a tensor-parallel group."""
    if spec.model.generation is not None:  # a generation job: the engine with its executor
        from .generation import load_generation_runner

        return load_generation_runner(spec)
    if spec.strategy == "data":
        return load_runner(spec.model, spec.threads, spec.device)
    if spec.strategy == "tensor":
        from .tensor import TensorParallelRunner

        return TensorParallelRunner(spec.model, spec.tensor_parallel, spec.threads, spec.device,
                                    comm=spec.tensor_comm)
    from .pipeline import PipelineRunner

    staged = spec.model.family.staged(spec.model)
    return PipelineRunner(staged, spec.stages, spec.threads, spec.device, spec.stage_transport,
                          spec.stage_options, spec.stage_slot_bytes)
