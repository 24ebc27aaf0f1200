"""Pipeline parallelism inside one replica: the model cut into stages, one process each.

The replica's own process (the one the backend started) is stage 0: it reads the block,
prepares micro-batches, runs its layers and streams each activation to stage 1. Stages
1..K-1 each build only their own layers (`StagedModel.build_stage`) and pass activations
on; the last stage sends each micro-batch's outputs back to stage 0, which reassembles the
block and writes the part. While stage 1 works on micro-batch i, stage 0 already computes
i+1, so with m micro-batches per block and p equal stages the idle share (the bubble) is
(p-1)/(m+p-1).

How activations travel is the transport's business (`runtime/stage_links.py`): child
processes linked by torch queues (tensors in shared memory) on the local backend, Ray actors
placed anywhere in the cluster (activations through Ray's object store) on the Ray backend.

Every item carries the figures of the stages it went through (cumulative busy and
communication seconds, peak memory), so the last result of a block tells stage 0 what each
stage did; `group_stats()` hands that to the report.

To the scheduler and the backend the group is one worker: if any stage dies, stage 0 exits,
the backend reports the worker lost, and its blocks are assigned again.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..models.base import Batches, Column, GroupStats, Runner
from ..models.staged import StagedModel
from ..planning.profile import tensor_bytes
from .stage_links import MemberFigures, StageLinks, StageLost, host_label, peak_rss, stage_device, start_links

__all__ = ["PipelineRunner"]


class PipelineRunner(Runner):
    """A `StagedModel` split at `stages` ((start, stop) layer ranges, in order)."""

    def __init__(
        self, staged: StagedModel, stages: tuple[tuple[int, int], ...], threads: int,
        device: str = "cpu", transport: str = "local", stage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.staged = staged
        self.prep = staged.preparer(device)
        self.input_names = self.prep.input_names
        self.head = staged.build_stage(*stages[0], stage_device(device, 0), threads)
        self.links: StageLinks | None = None
        if len(stages) > 1:
            self.links = start_links(transport, staged, stages[1:], threads, device, stage_options or {})
        self.hosts = (host_label(), *(self.links.hosts if self.links else ()))
        self._busy = self._comm = 0.0
        self._seen: list[MemberFigures] = [MemberFigures() for _ in stages]
        self._stats: GroupStats | None = None

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        return self.prep.prepare(inputs, batch_size)

    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        return self.forward_many([batch])[0]

    def forward_many(self, batches: list[Any]) -> list[dict[str, np.ndarray]]:
        """Stream every micro-batch through the stages; results come back in `batches`' order.

        The pipeline fills with the first micro-batch (only stage 0 works) and drains with
        the last (only the last stage works), so the two smallest go first and last."""
        order = _fill_and_drain_order(batches)
        results = self._stream([batches[i] for i in order])
        back: list[dict[str, np.ndarray]] = [{}] * len(batches)
        for position, i in enumerate(order):
            back[i] = results[position]
        return back

    def _stream(self, batches: list[Any]) -> list[dict[str, np.ndarray]]:
        started = time.perf_counter()
        if self.links is None:
            results = [self._run_head(batch) for batch in batches]
            self._record(started, len(batches), [])
            return results
        results = []
        last: list[MemberFigures] = []
        try:
            for batch in batches:
                x = self._run_head(batch)
                t = time.perf_counter()
                self.links.send(x)
                self._comm += time.perf_counter() - t
                while (item := self.links.receive(0.0)) is not None:  # collect without waiting
                    results.append(item[0])
                    last = item[1]
            while len(results) < len(batches):
                item = self.links.receive(1.0)
                if item is not None:
                    results.append(item[0])
                    last = item[1]
        except StageLost as exc:
            # The group cannot go on without that stage: end this worker so that the backend
            # sees it lost and the scheduler assigns its blocks again.
            print(f"distinfer: {exc}", file=sys.stderr, flush=True)
            os._exit(3)
        self._record(started, len(batches), last)
        return results

    def _run_head(self, batch: Any) -> Any:
        t = time.perf_counter()
        out = self.head(batch)
        self._busy += time.perf_counter() - t
        return out

    def _record(self, started: float, micro_batches: int, later: list[MemberFigures]) -> None:
        now = [MemberFigures(self._busy, self._comm, peak_rss()), *later]
        if len(now) < len(self._seen):  # no micro-batch this block: nothing new from later stages
            now += self._seen[len(now):]
        deltas = [a.minus(b) for a, b in zip(now, self._seen, strict=True)]
        self._seen = now
        self._stats = GroupStats(
            "stage", time.perf_counter() - started, micro_batches,
            tuple(d.busy_s for d in deltas), tuple(d.comm_s for d in deltas), tuple(n.rss for n in now),
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
