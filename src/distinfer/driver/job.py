"""The driver: plans blocks, runs the scheduler against a backend, commits the manifest.

    open input → plan blocks → prepare DIR (resume: skip committed blocks)
    → start workers → loop { backend messages → scheduler events → actions → backend }
    → manifest complete → report

The driver never touches rows: workers read their blocks and write their own parts; the
driver records each finished block in the manifest (atomically replaced, at most a few
times a second; parts written but not yet recorded are adopted on resume).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, replace

from .. import messages as msg
from ..backends import Backend, make_backend
from ..config import RunConfig
from ..data.blocks import Block
from ..data.sink import REPORT, first_errors, normalize_location, prepare_output, remove_temp_parts, save_json
from ..data.sources import plan_blocks
from ..errors import ConfigError, ErrorInfo, InputError, JobFailedError, WorkersNotReadyError
from ..models.families import parse_model
from ..models.family import ModelSpec
from ..planning import parse_memory
from ..report import GroupSummary, JobReport, Progress, WorkerStats
from ..scheduling import (
    Action,
    Assign,
    BlockDone,
    Cancel,
    Event,
    Finish,
    Scheduler,
    SchedulerConfig,
    StartWorker,
    StopWorker,
    Tick,
    WorkerFailed,
    WorkerLost,
    WorkerReady,
)
from .inputs import JobInput, image_options, open_input
from .layout import plan_layout

__all__ = ["run_job"]

_MANIFEST_EVERY_S = 0.5
_REASONS = 3  # bad rows' reasons kept for the summary and a failure's message


def _job_identity(
    config: RunConfig, spec: msg.WorkerSpec, input: JobInput, blocks: list[Block]
) -> dict[str, object]:
    plan = hashlib.sha256(repr([(b.start, b.stop) for b in blocks]).encode()).hexdigest()[:16]
    source = input.source
    images = {} if spec.images is None else {"image_options": asdict(spec.images)}
    return {
        **spec.model.identity(),
        **({"images": input.images} if input.images else {}),
        **images,
        "input": source.path,
        "input_format": source.format,
        "input_size": source.size_bytes,
        "input_mtime_ns": source.mtime_ns,
        **({"input_version": source.version} if source.version else {}),
        "column": config.column,
        "rows": source.num_rows,
        "blocks": len(blocks),
        "block_plan": plan,
    }


def with_task(model: ModelSpec, config: RunConfig) -> ModelSpec:
    """The model with its job's generation settings when it generates (`--task generate`,
    the default for the families that generate); a model that cannot is refused."""
    generates = model.family.generates
    if config.task == "generate" and not generates:
        raise ConfigError(f"--task generate needs a text-generation model (gemma3-270m, a .gguf file or a "
                          f"Hugging Face model directory); '{model.name}' does not generate text")
    if not generates:
        return model
    kv = parse_memory(config.kv_cache_memory, "--kv-cache-memory")
    if kv < 1 << 20:
        raise ConfigError(f"--kv-cache-memory {config.kv_cache_memory} is too small; give at least 1MiB")
    options = msg.GenerationOptions(
        config.max_tokens, config.temperature, config.top_p, config.top_k, config.min_p, config.seed,
        tuple(config.stop), config.ignore_eos, config.max_running, kv, dtype=config.dtype,
    )
    return replace(model, generation=options)


class _Job:
    def __init__(self, config: RunConfig, backend_factory: Callable[[msg.WorkerSpec], Backend]):
        self.started = time.monotonic()
        model = with_task(parse_model(config.model), config)
        if model.generation is not None and config.block_size is None:  # a block: a few engine batches
            config = config.with_options(block_size=4 * config.max_running,
                                         min_block_size=config.min_block_size or config.max_running)
        self.config = config
        self.output_dir = normalize_location(config.output)
        self.input = open_input(config, self.output_dir)
        self.source = self.input.source
        if config.column is not None and config.column not in self.source.columns:
            raise InputError(
                f"input '{config.input}' has no column '{config.column}' "
                f"(available: {', '.join(self.source.columns)}); pick one with --column"
            )
        layout = plan_layout(config, model)
        self.spec = msg.WorkerSpec(
            model, self.source, config.column, self.output_dir, config.batch_size, config.threads,
            config.device, layout.strategy, layout.stages, layout.ranks,
            tensor_comm=config.tensor_comm, stage_slot_bytes=layout.slot_bytes,
            max_bad_rows=config.bad_row_limit(self.source.num_rows),
            images=image_options(config, model, self.source),
            keep=("path",) if self.source.format == "images" else (),
        )
        self.backend_factory = backend_factory
        self.report = JobReport(
            self.output_dir, model.name, self.input.images or self.source.path, config.backend,
            config.workers, config.threads, rows_total=self.source.num_rows,
            baseline_throughput=config.baseline_throughput,
        )
        self.stats: dict[int, WorkerStats] = {}
        self.tokens = 0  # generated so far (a generation job)

    def run(self) -> JobReport:
        # Workers load their model while the driver plans blocks.
        backend = self.backend_factory(self.spec)
        finished = False
        try:
            workers = list(range(self.config.workers))
            for w in workers:
                self.stats[w] = WorkerStats(w)
                backend.start(w)
            blocks = plan_blocks(self.input.planned, self.config.block_size or 1024,
                                 self.config.first_block_size)
            self.blocks = {b.id: b for b in blocks}
            identity = _job_identity(self.config, self.spec, self.input, blocks)
            self.manifest = prepare_output(self.output_dir, identity, blocks, self.config.overwrite,
                                           self.config.retry_bad_rows)
            self.input.place()
            todo = {b.id: b.rows for b in blocks if b.id not in self.manifest.committed}
            self.report.blocks = len(blocks)
            self.report.rows_resumed = sum(self.manifest.committed.values())
            self.report.bad_rows = sum(len(rows) for rows in self.manifest.bad.values())
            self.report.bad_reasons = first_errors(self.output_dir, list(self.manifest.bad), _REASONS)
            self._loop(backend, todo, workers)
            finished = True
        finally:
            backend.close()
            if hasattr(self, "manifest"):
                self.manifest.complete = finished
                self.manifest.save(self.output_dir)
                remove_temp_parts(self.output_dir)
        self.report.wall_s = time.monotonic() - self.started
        for stats in self.stats.values():
            if not stats.ready and not stats.lost and not stats.not_ready:
                stats.not_ready = "still loading when the job ended"
        self.report.worker_stats = [self.stats[w] for w in sorted(self.stats)]
        save_json(self.output_dir, REPORT, self.report.to_dict(), indent=2)
        return self.report

    def _loop(self, backend: Backend, todo: dict[int, int], workers: list[int]) -> None:
        sched_config = SchedulerConfig(
            prefetch=self.config.prefetch,
            max_restarts=self.config.max_restarts,
            start_timeout_s=self.config.start_timeout_s,
            speculation=self.config.speculation,
        )
        scheduler = Scheduler(todo, workers, sched_config, self._now())
        progress = Progress(sum(todo.values()), self.config.progress)
        last_save = self._now()
        finish: ErrorInfo | None = None
        pending = scheduler.start(self._now())
        try:
            while True:
                for action in pending:
                    if isinstance(action, Finish):
                        finish = action.error
                        if finish is None:
                            return
                        not_ready = finish.kind == WorkersNotReadyError.__name__
                        reason = backend.unready_reason() if not_ready else None
                        if reason:
                            raise WorkersNotReadyError(
                                f"no worker became ready within {self.config.start_timeout_s:g} s: {reason}"
                            )
                        raise finish.to_exception()
                    self._act(backend, action, scheduler.finished)
                pending = []
                for item in backend.receive(timeout=0.2):
                    event = self._event(item)
                    if event is not None:
                        pending.extend(scheduler.handle(event, self._now()))
                pending.extend(scheduler.handle(Tick(), self._now()))
                progress.update(self.report.rows, tokens=self.tokens if self.spec.model.generation else None)
                if self._now() - last_save >= _MANIFEST_EVERY_S:
                    self.manifest.save(self.output_dir)
                    last_save = self._now()
        finally:
            progress.close(self.report.rows)
            self.report.restarts = scheduler.restarts_used
            spec = scheduler.speculation_stats
            self.report.speculated, self.report.speculation_won = spec.speculated, spec.won
            self.report.speculation_wasted_s = spec.wasted_s

    def _now(self) -> float:
        return time.monotonic() - self.started

    def _set_aside(self, done: BlockDone) -> None:
        """Record a committed block's bad rows; more than the job allows fails it (the
        committed blocks stay, for a resumed run with a higher --max-bad-rows)."""
        self.manifest.bad[done.block] = [b.row for b in done.bad]
        self.report.bad_rows += len(done.bad)
        self.report.bad_reasons.extend(b.message for b in done.bad[: _REASONS - len(self.report.bad_reasons)])
        limit = self.spec.max_bad_rows
        if self.report.bad_rows > limit:
            self.manifest.save(self.output_dir)
            first = "; ".join(self.report.bad_reasons)
            raise JobFailedError(
                f"{self.report.bad_rows} bad rows, over --max-bad-rows {self.config.max_bad_rows} "
                f"({limit} row{'' if limit == 1 else 's'}); the first: {first}. Fix those rows or allow "
                "more, then run the same command again: the finished blocks are kept"
            )

    def _act(self, backend: Backend, action: Action, finished: bool) -> None:
        if isinstance(action, Assign):
            backend.send(action.worker, msg.RunBlock(self.blocks[action.block]))
        elif isinstance(action, Cancel):
            backend.send(action.worker, action)
        elif isinstance(action, StartWorker):
            self.stats[action.worker] = WorkerStats(action.worker)
            backend.start(action.worker)
        elif isinstance(action, StopWorker):
            stats = self.stats[action.worker]
            if not finished and not (stats.ready or stats.lost or stats.not_ready):
                timeout = self.config.start_timeout_s
                stats.not_ready = f"still loading after --start-timeout {timeout:g} s: stopped"
            backend.stop(action.worker)

    def _event(self, item: msg.WorkerMessage) -> Event | None:
        """Record what a message tells the manifest and the report; the message itself is the
        scheduler's event (serving answers, which a batch job never gets, are dropped)."""
        if isinstance(item, BlockDone):
            if item.block not in self.manifest.committed:
                self.manifest.committed[item.block] = item.rows
                self.report.rows += item.rows
                if not self.report.first_block_s:
                    self.report.first_block_s = self._now()
                if item.bad:
                    self._set_aside(item)
            self.stats[item.worker].add_block(item.rows, item.seconds, item.elapsed_s, item.group,
                                              item.generation)
            if item.generation is not None:
                self.tokens += item.generation.generated_tokens
        elif isinstance(item, WorkerReady):
            stats = self.stats[item.worker]
            stats.pid, stats.host, stats.load_s, stats.ready = item.pid, item.host, item.load_s, True
            if item.members:
                kind = "stage" if self.spec.strategy == "pipeline" else "rank"
                stats.group = GroupSummary(kind, list(item.members))
            if not self.report.startup_s:
                self.report.startup_s = self._now()
        elif isinstance(item, WorkerFailed):
            self.stats[item.worker].not_ready = f"could not start: {item.error.message}"
        elif isinstance(item, WorkerLost):
            self.stats[item.worker].lost = item.reason
        elif isinstance(item, msg.BatchDone | msg.BatchFailed | msg.TokenPieces):
            return None
        return item


def run_job(
    config: RunConfig, backend_factory: Callable[[msg.WorkerSpec], Backend] | None = None
) -> JobReport:
    """Run a batch job to completion; raises a `DistinferError` subclass on failure. A
    config still at `strategy="auto"` is laid out as the default `auto` does (no measuring)."""
    if config.strategy == "auto":
        from .advisor import announce, auto_layout

        config, line = auto_layout(config, set())
        announce(line)
    factory = backend_factory or (lambda spec: make_backend(config, spec))
    return _Job(config, factory).run()
