"""Pipeline parallelism inside one replica: the model cut into stages, one process each.

The replica's own process (the one the backend started) is stage 0: it reads the block,
prepares micro-batches, runs its layers and streams each activation to stage 1. Stages
1..K-1 each build only their own layers (`StagedModel.build_stage`) and pass activations
on; the last stage sends each micro-batch's outputs back to stage 0, which reassembles the
block and writes the part. While stage 1 works on micro-batch i, stage 0 already computes
i+1, so with m micro-batches per block and p equal stages the idle share (the bubble) is
(p-1)/(m+p-1).

How activations travel is the transport's business (`worker/stage_links.py`): child
processes linked by rings of shared-memory slots (`worker/shm_channel.py`) on the local backend, Ray actors
placed anywhere in the cluster (activations through Ray's object store) on the Ray backend.

Every item carries the figures of the stages it went through (cumulative busy and
communication seconds, peak memory), so the last result of a block tells stage 0 what each
stage did; `group_stats()` hands that to the report.

A model that raises is a result, not a loss: a later stage that raises passes a
`StageFailed` on in place of the activation (the stages after it forward it without
computing), so stage 0 still collects exactly one item per micro-batch sent and the links
stay aligned for the next block; then `forward_many` raises the error (a `RowsError` naming
the micro-batch, kind and fatality kept). If stage 0's own layers raise, it sends nothing
more, collects the items of the micro-batches already sent, and raises.

To the scheduler and the backend the group is one worker: if any stage dies, stage 0 exits,
the backend reports the worker lost, and its blocks are assigned again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..errors import RowsError
from ..logs import log, log_to_stderr
from ..models.base import Batches, Column, GroupStats, Runner, never
from ..models.profile import tensor_bytes
from ..models.staged import StagedModel
from .process import host_label, peak_rss
from .stage_links import (
    DEFAULT_SLOT_BYTES,
    MemberFigures,
    StageFailed,
    StageLinks,
    StageLost,
    stage_device,
    start_links,
)

__all__ = ["PipelineRunner"]


class PipelineRunner(Runner):
    """A `StagedModel` split at `stages` ((start, stop) layer ranges, in order)."""

    def __init__(
        self, staged: StagedModel, stages: tuple[tuple[int, int], ...], threads: int,
        device: str = "cpu", transport: str = "local", stage_options: Mapping[str, Any] | None = None,
        slot_bytes: int = 0,
    ) -> None:
        self.staged = staged
        self.prep = staged.preparer(device)
        self.input_names = self.prep.input_names
        self.head = staged.build_stage(*stages[0], stage_device(device, 0), threads)
        self.links: StageLinks | None = None
        if len(stages) > 1:
            self.links = start_links(transport, staged, stages[1:], threads, device, stage_options or {},
                                     slot_bytes or DEFAULT_SLOT_BYTES)
        self.hosts = (host_label(), *(self.links.hosts if self.links else ()))
        self._busy = self._comm = 0.0
        self._seen: list[MemberFigures] = [MemberFigures() for _ in stages]
        self._stats: GroupStats | None = None

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        return self.prep.prepare(inputs, batch_size)

    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        return self.forward_many([batch])[0]

    def forward_many(
        self, batches: list[Any], cancelled: Callable[[], bool] = never
    ) -> list[dict[str, np.ndarray]]:
        """Stream every micro-batch through the stages; results come back in `batches`' order.

        The pipeline fills with the first micro-batch (only stage 0 works) and drains with
        the last (only the last stage works), so the two smallest go first and last."""
        order = _fill_and_drain_order(batches)
        results, failure = self._stream([batches[i] for i in order])
        if failure is not None:  # the micro-batch as the caller numbers it
            assert failure.batch is not None
            raise RowsError(failure.error, batch=order[failure.batch], row=failure.row) from None
        back: list[dict[str, np.ndarray]] = [{}] * len(batches)
        for position, i in enumerate(order):
            back[i] = results[position]
        return back

    def _stream(self, batches: list[Any]) -> tuple[list[Any], RowsError | None]:
        """Every micro-batch's outputs, or the first failure (`batch`: its position here); all
        stages are done with the block either way."""
        started = time.perf_counter()
        head_s: list[float] = []  # stage 0's time on each micro-batch
        results: list[Any] = []
        head_failed: RowsError | None = None
        if self.links is None:
            for position, batch in enumerate(batches):
                try:
                    results.append(self._run_head(batch, head_s))
                except Exception as exc:
                    head_failed = RowsError.caught(exc, position)
                    break
            self._record(started, len(results), [], [], head_s)
            return results, head_failed
        figures: list[list[MemberFigures]] = []  # stages 1..K-1 on each micro-batch
        sent = 0
        try:
            for position, batch in enumerate(batches):
                try:
                    x = self._run_head(batch, head_s)
                except Exception as exc:  # send no more; collect what was sent, then raise
                    head_failed = RowsError.caught(exc, position)
                    break
                t = time.perf_counter()
                self.links.send(x)
                sent += 1
                self._comm += time.perf_counter() - t
                while (item := self.links.receive(0.0)) is not None:  # collect without waiting
                    results.append(item[0])
                    figures.append(item[1])
            while len(results) < sent:
                item = self.links.receive(1.0)
                if item is not None:
                    results.append(item[0])
                    figures.append(item[1])
        except StageLost as exc:
            # The group cannot go on without that stage: end this worker so that the backend
            # sees it lost and the scheduler assigns its blocks again.
            log_to_stderr(logging.WARNING)  # this process ends now: its reason must reach stderr
            log.critical("%s", exc)
            os._exit(3)
        self._record(started, sent, figures[0] if figures else [], figures[-1] if figures else [],
                     head_s)
        # A later stage's failure is on an earlier micro-batch than stage 0's own, if both.
        for position, result in enumerate(results):
            if isinstance(result, StageFailed):
                return results, result.raised(position)
        return results, head_failed

    def _run_head(self, batch: Any, head_s: list[float]) -> Any:
        t = time.perf_counter()
        out = self.head(batch)
        took = time.perf_counter() - t
        self._busy += took
        head_s.append(took)
        return out

    def _record(
        self, started: float, micro_batches: int, first: list[MemberFigures], last: list[MemberFigures],
        head_s: list[float],
    ) -> None:
        now = [MemberFigures(self._busy, self._comm, peak_rss()), *last]
        if len(now) < len(self._seen):  # no micro-batch this block: nothing new from later stages
            now += self._seen[len(now):]
        deltas = [a.minus(b) for a, b in zip(now, self._seen, strict=True)]
        self._seen = now
        bubble = 0.0
        if head_s and len(first) == len(last) == len(now) - 1:
            bubble = fill_and_drain_s([head_s[0], *(f.item_s for f in first)],
                                      [head_s[-1], *(f.item_s for f in last)])
        self._stats = GroupStats(
            "stage", time.perf_counter() - started, micro_batches,
            tuple(d.busy_s for d in deltas), tuple(d.comm_s for d in deltas), tuple(n.rss for n in now),
            bubble,
        )

    def group_stats(self) -> GroupStats | None:
        return self._stats

    def close(self) -> None:
        if self.links is not None:
            self.links.close()


def _fill_and_drain_order(batches: list[Any]) -> list[int]:
    """Indices of `batches` with the smallest first and the second smallest last."""
    if len(batches) < 3:
        return list(range(len(batches)))
    sizes = [tensor_bytes(b) for b in batches]
    by_size = sorted(range(len(batches)), key=sizes.__getitem__)
    first, last = by_size[0], by_size[1]
    return [first, *(i for i in range(len(batches)) if i not in (first, last)), last]


def fill_and_drain_s(first: list[float], last: list[float]) -> float:
    """Stage-seconds idle while a block's pipeline fills and drains: stage k waits for the
    first micro-batch to cross stages 0..k-1 and, after its last one, for the last
    micro-batch to cross stages k+1..p-1. `first` / `last`: each stage's time on them."""
    p = len(first)
    return sum(sum(first[:k]) + sum(last[k + 1 :]) for k in range(p))
