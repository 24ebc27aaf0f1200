"""How a pipeline's activations travel from stage 0 through stages 1..K-1 and back.

- `local`: stages 1..K-1 are child processes of stage 0 (torch multiprocessing, spawn), linked
  by `ShmChannel`s: rings of shared buffers allocated once, so activations move by one copy
  in the sender's own thread. Used by the local backend, and always on one machine.
- `ray`: stages 1..K-1 are Ray actors, placed by Ray on any node with the resources each asks
  for (the same as a worker's); activations go through Ray's object store (`ray.put` in the
  sender, `ray.get` in the receiver, both timed as communication). Stage 0 chains one actor
  call per stage for every micro-batch; Ray runs an actor's calls in order, so the stages
  work on different micro-batches at the same time. Used by the Ray backend, so one
  pipeline may span machines. The stage actors are owned by stage 0's actor and die with it.

Each item is `(activation, figures)`; every stage appends its cumulative `MemberFigures`.

A stage whose layers raise passes a `StageFailed` on instead of an activation (the error as
`ErrorInfo`, where it happened); the later stages forward it without computing. So every
micro-batch sent in yields exactly one item back, and the links stay aligned for the next
block: a model's failure is a result, only a lost stage process or actor ends the group.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ErrorInfo, ModelError, RowsError
from ..logs import log_to_stderr
from ..models.staged import StagedModel
from .process import host_label, limit_threads, peak_rss
from .shm_channel import ShmChannel

__all__ = [
    "MemberFigures", "StageFailed", "StageLinks", "StageLost", "host_label", "peak_rss", "stage_device",
    "start_links",
]

_READY_TIMEOUT_S = 600.0
DEFAULT_SLOT_BYTES = 32 * 2**20  # per activation buffer between two local stages (4 per link)


class StageLost(Exception):
    """A stage process or actor is gone; the group cannot go on."""


@dataclass(frozen=True, slots=True)
class StageFailed:
    """What travels in place of an activation once a stage raised on the micro-batch."""

    error: ErrorInfo
    stage: int  # the first layer of the stage that raised
    row: int | None = None  # the row of the micro-batch at fault, when the error names it

    @classmethod
    def caught(cls, exc: BaseException, stage: int) -> StageFailed:
        """`exc`, just caught in the stage starting at layer `stage`."""
        failure = RowsError.caught(exc)
        return cls(failure.error, stage, failure.row)

    def raised(self, batch: int) -> RowsError:
        """The error to raise in stage 0 for micro-batch `batch`."""
        return RowsError(self.error, batch=batch, row=self.row)


def run_stage(stage: Any, x: Any, start: int) -> Any:
    """The stage's output for `x`; a `StageFailed` when `x` is one or the stage raises."""
    if isinstance(x, StageFailed):
        return x
    try:
        return stage(x)
    except Exception as exc:
        return StageFailed.caught(exc, start)


@dataclass(frozen=True, slots=True)
class MemberFigures:
    """One stage's cumulative figures since it started, and its time on the item carrying them."""

    busy_s: float = 0.0
    comm_s: float = 0.0
    rss: int = 0
    item_s: float = 0.0  # this micro-batch's compute time in that stage

    def minus(self, earlier: MemberFigures) -> MemberFigures:
        busy, comm = self.busy_s - earlier.busy_s, self.comm_s - earlier.comm_s
        return MemberFigures(busy, comm, self.rss, self.item_s)


def stage_device(device: str, index: int) -> str:
    """Stage `index`'s device: with several GPUs, stages go round-robin over them."""
    if device != "cuda":
        return device
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{index % count}" if count > 1 else "cuda"


class StageLinks(ABC):
    hosts: tuple[str, ...]  # where each of stages 1..K-1 runs

    @abstractmethod
    def send(self, x: Any) -> None:
        """Hand stage 0's output for the next micro-batch to stage 1."""

    @abstractmethod
    def receive(self, timeout: float) -> tuple[Any, list[MemberFigures]] | None:
        """The next micro-batch's outputs (in order; a `StageFailed` when a stage raised) and
        figures, or None after `timeout`."""

    @abstractmethod
    def close(self) -> None: ...


def start_links(
    transport: str, staged: StagedModel, stages: tuple[tuple[int, int], ...], threads: int, device: str,
    options: Mapping[str, Any], slot_bytes: int = DEFAULT_SLOT_BYTES,
) -> StageLinks:
    if transport == "ray":
        return _RayLinks(staged, stages, threads, device, options)
    return _LocalLinks(staged, stages, threads, device, slot_bytes)


# -- local: child processes and shared-memory rings ------------------------------------------


def _stage_main(
    staged: StagedModel, start: int, stop: int, threads: int, device: str,
    inbox: ShmChannel, outbox: ShmChannel, status: Any,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limit_threads(threads)
    log_to_stderr(logging.WARNING)
    try:
        stage = staged.build_stage(start, stop, device, threads)
    except Exception as exc:
        status.put(("error", start, f"{type(exc).__name__}: {exc}"))
        return
    status.put(("ready", start, host_label()))
    parent = os.getppid()

    def check_parent() -> None:
        if os.getppid() != parent:  # stage 0 is gone: nobody will read our results
            raise SystemExit(0)

    busy = comm = 0.0
    while True:
        if not inbox.poll(1.0):
            check_parent()
            continue
        t = time.perf_counter()
        more, item = inbox.receive()
        comm += time.perf_counter() - t
        if not more:
            outbox.close_sender()
            return
        x, figures = item
        t = time.perf_counter()
        y = run_stage(stage, x, start)
        took = time.perf_counter() - t
        busy += took
        t = time.perf_counter()
        # Sent before the input's slot is freed: y may be a view of x (a passed-through input).
        outbox.send((y, [*figures, MemberFigures(busy, comm, peak_rss(), took)]), check_parent)
        inbox.release()
        comm += time.perf_counter() - t


class _LocalLinks(StageLinks):
    def __init__(
        self, staged: StagedModel, stages: tuple[tuple[int, int], ...], threads: int, device: str,
        slot_bytes: int,
    ) -> None:
        import torch.multiprocessing

        ctx = torch.multiprocessing.get_context("spawn")
        # channels[k] carries stage k's output to stage k+1; the last one back to stage 0
        self.channels = [ShmChannel(ctx, slot_bytes) for _ in range(len(stages) + 1)]
        status = ctx.Queue()
        self.procs = []
        for k, (start, stop) in enumerate(stages):
            proc = ctx.Process(
                target=_stage_main,
                args=(staged, start, stop, threads, stage_device(device, k + 1), self.channels[k],
                      self.channels[k + 1], status),
                name=f"distinfer-stage-{k + 1}", daemon=True,
            )
            proc.start()
            self.procs.append(proc)
        hosts: dict[int, str] = {}
        for _ in self.procs:
            try:
                kind, start, text = status.get(timeout=_READY_TIMEOUT_S)
            except queue.Empty:
                raise ModelError("a pipeline stage did not load within 10 minutes") from None
            if kind == "error":
                raise ModelError(f"pipeline stage starting at layer {start} could not load: {text}")
            hosts[start] = text
        self.hosts = tuple(hosts[start] for start, _ in stages)

    def send(self, x: Any) -> None:
        self.channels[0].send((x, []), self._check)

    def receive(self, timeout: float) -> tuple[Any, list[MemberFigures]] | None:
        results = self.channels[-1]
        if not results.poll(timeout):
            if timeout > 0:
                self._check()
            return None
        more, item = results.receive(copy=True)
        if not more:
            raise StageLost("the last pipeline stage stopped")
        output, figures = item
        return output, figures

    def _check(self) -> None:
        for k, proc in enumerate(self.procs, start=1):
            if not proc.is_alive():
                raise StageLost(f"pipeline stage {k} died (exit code {proc.exitcode})")

    def close(self) -> None:
        try:
            self.channels[0].close_sender()
        except OSError:
            pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()


# -- ray: one actor per stage, activations through the object store --------------------------


class RayStage:
    """Stage k of a pipeline, as a Ray actor."""

    def __init__(self, staged: StagedModel, start: int, stop: int, threads: int, device: str) -> None:
        limit_threads(threads)
        self.start = start
        self.stage = staged.build_stage(start, stop, device, threads)
        self.busy = self.comm = 0.0

    def where(self) -> str:
        import ray

        node = ray.get_runtime_context().get_node_id()[:8]
        return f"{host_label()} node {node}"

    def run(self, item: tuple[list[Any], list[MemberFigures]]) -> tuple[list[Any], list[MemberFigures]]:
        import ray

        refs, figures = item
        t = time.perf_counter()
        x = ray.get(refs[0])
        self.comm += time.perf_counter() - t
        t = time.perf_counter()
        y = run_stage(self.stage, x, self.start)  # a failure is a result: the calls after stay in order
        took = time.perf_counter() - t
        self.busy += took
        t = time.perf_counter()
        out = [ray.put(y)]
        self.comm += time.perf_counter() - t
        return out, [*figures, MemberFigures(self.busy, self.comm, peak_rss(), took)]


class _RayLinks(StageLinks):
    def __init__(
        self, staged: StagedModel, stages: tuple[tuple[int, int], ...], threads: int, device: str,
        options: Mapping[str, Any],
    ) -> None:
        import ray

        self.ray: Any = ray
        remote: Any = ray.remote(RayStage).options(max_restarts=0, max_task_retries=0, **options)
        self.actors: list[Any] = [
            remote.remote(staged, start, stop, threads, stage_device(device, k + 1))
            for k, (start, stop) in enumerate(stages)
        ]
        self.pending: collections.deque[Any] = collections.deque()
        try:
            self.hosts = tuple(ray.get([a.where.remote() for a in self.actors], timeout=_READY_TIMEOUT_S))
        except ray.exceptions.GetTimeoutError:
            raise ModelError(
                f"Ray placed no pipeline stage actor within {_READY_TIMEOUT_S:.0f} s; "
                f"each asks for {dict(options)}"
            ) from None
        except ray.exceptions.RayError as exc:
            raise ModelError(f"a pipeline stage actor could not load: {_first_line(exc)}") from None

    def send(self, x: Any) -> None:
        item = self.actors[0].run.remote(([self.ray.put(x)], []))
        for actor in self.actors[1:]:
            item = actor.run.remote(item)
        self.pending.append(item)

    def receive(self, timeout: float) -> tuple[Any, list[MemberFigures]] | None:
        if not self.pending:
            return None
        ready, _ = self.ray.wait([self.pending[0]], timeout=timeout)
        if not ready:
            return None
        try:
            refs, figures = self.ray.get(self.pending.popleft())  # taken out first: no stale entry
            return self.ray.get(refs[0]), figures
        except self.ray.exceptions.RayActorError as exc:
            raise StageLost(f"a pipeline stage actor was lost: {_first_line(exc)}") from None
        except self.ray.exceptions.RayTaskError as exc:
            # Not the layers (RayStage.run catches theirs) but the call itself: still this
            # micro-batch's one result, so the items after it stay aligned.
            cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else None
            info = (ErrorInfo.from_exception(cause) if cause is not None
                    else ErrorInfo(type(exc).__name__, _first_line(exc), False))
            return StageFailed(info, -1), []

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else type(exc).__name__
