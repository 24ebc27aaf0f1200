"""A generation replica for every strategy: the engine (models/llm/engine.py) in the replica's
own process, with the executor the strategy needs.

- data: every layer in this process (`LocalExecutor`);
- pipeline: this process is stage 0 (the embedding and the first layers); stages 1..K-1 are
  linked as for any pipeline (`stage_links`: shared-memory rings between local processes,
  or Ray actors). The engine keeps K steps in flight, each over its own group of sequences,
  so every stage has work while the others compute. The LM head is split between the last
  stage (the upper half of the vocabulary: its best candidates come back with the final
  hidden states) and stage 0 (the lower half), which merges, samples and schedules that
  group's next step (models/llm/staged.py says why);
- tensor: `worker/llm_tensor.py`.

A stage that is lost ends this process (exit code 3), so the backend reports the replica lost
and its block is assigned again, as for every pipeline.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, NoReturn

from ..logs import log, log_to_stderr
from ..messages import GroupStats, WorkerSpec
from ..models.base import Runner
from ..models.families.llm import LlmFamily
from ..models.llm.paged import SeqChunk, build_meta
from ..models.llm.runner import GenerationRunner, LlmModel, LocalExecutor, choose_all, sample_tokens
from ..models.llm.sampling import SamplingParams, candidates_for, merge_candidates
from ..models.llm.staged import LlmStaged, step_item, upper_half
from .process import host_label, peak_rss
from .stage_links import DEFAULT_SLOT_BYTES, MemberFigures, StageFailed, StageLost, start_links

__all__ = ["PipelineExecutor", "load_generation_runner"]


def load_generation_runner(spec: WorkerSpec) -> Runner:
    family = spec.model.family
    assert isinstance(family, LlmFamily), "only the llm family generates"
    model = family.llm(spec.model)
    if spec.strategy == "data":
        return GenerationRunner(model, LocalExecutor)
    if spec.strategy == "tensor":
        from .llm_tensor import TensorExecutor

        tensor = TensorExecutor(model, spec.tensor_parallel, spec.threads, spec.tensor_comm)
        return GenerationRunner(model, lambda m: tensor, tensor.group_stats)
    pipe = PipelineExecutor(model, spec.stages, spec.threads, spec.stage_transport, spec.stage_options,
                            spec.stage_slot_bytes)
    return GenerationRunner(model, lambda m: pipe, pipe.group_stats)


class PipelineExecutor:
    """Stage 0 here, stages 1..K-1 through `stage_links`; `depth` = K steps in flight."""

    def __init__(self, model: LlmModel, stages: tuple[tuple[int, int], ...], threads: int,
                 transport: str = "local", options: Mapping[str, Any] | None = None,
                 slot_bytes: int = 0) -> None:
        self.depth = len(stages)
        lower = (0, upper_half(model.config.vocab)[0]) if len(stages) > 1 else None
        self.head = model.part(*stages[0], head_rows=lower)
        self.ring = model.cache_plan().ring
        self.links = None
        if len(stages) > 1:
            slot = slot_bytes or DEFAULT_SLOT_BYTES
            self.links = start_links(transport, LlmStaged(model), stages[1:], threads, "cpu",
                                     options or {}, slot)
        self.hosts = (host_label(), *(self.links.hosts if self.links else ()))
        self._local: deque[list[int]] = deque()
        self._sampling: deque[list[tuple[SamplingParams, int]]] = deque()  # of the steps in flight
        self._busy = self._comm = 0.0
        self._started: float | None = None
        self._steps = 0
        self._seen: list[MemberFigures] = [MemberFigures() for _ in stages]
        self._last: list[MemberFigures] = list(self._seen)

    def submit(self, chunks: list[SeqChunk], sampling: list[tuple[SamplingParams, int]]) -> None:
        if self._started is None:
            self._started = time.perf_counter()
        t = time.perf_counter()
        meta = build_meta(chunks, self.head.windows, self.ring)
        x = self.head.forward(meta, None)
        self._busy += time.perf_counter() - t
        self._steps += 1
        if self.links is None:
            self._local.append(sample_tokens(self.head, x, sampling) if sampling else [])
            return
        t = time.perf_counter()
        self._sampling.append(sampling)
        try:
            self.links.send(step_item(chunks, sampling, x))
        except StageLost as exc:
            self._lost(exc)
        self._comm += time.perf_counter() - t

    def collect(self) -> list[int]:
        if self.links is None:
            return self._local.popleft()
        item = None
        try:
            while item is None:
                item = self.links.receive(1.0)
        except StageLost as exc:
            self._lost(exc)
        y, figures = item
        self._last = figures
        sampling = self._sampling.popleft()
        if isinstance(y, StageFailed):
            raise y.raised(0)
        if not sampling:
            return []
        t = time.perf_counter()  # the lower half of the vocabulary is scored here
        k = candidates_for(sampling)
        values, ids = merge_candidates([self.head.candidates(y["h"], k), (y["values"], y["ids"])], k)
        tokens = choose_all(values.numpy(), ids.numpy(), sampling)
        self._busy += time.perf_counter() - t
        return tokens

    def _lost(self, exc: BaseException) -> NoReturn:
        log_to_stderr(logging.WARNING)  # this process ends now: its reason must reach stderr
        log.critical("%s", exc)
        os._exit(3)

    def group_stats(self) -> GroupStats | None:
        """Each stage's busy and communication time since the last call (a block)."""
        if self._started is None:
            return None
        now = [MemberFigures(self._busy, self._comm, peak_rss()), *self._last]
        deltas = [a.minus(b) for a, b in zip(now, self._seen, strict=False)]
        self._seen = now
        wall = time.perf_counter() - self._started
        steps, self._started, self._steps = self._steps, None, 0
        busy = tuple(d.busy_s for d in deltas)
        # decode keeps every stage fed: its idle share is the bubble
        bubble = sum(max(0.0, wall - b - d.comm_s) for b, d in zip(busy, deltas, strict=True))
        return GroupStats("stage", wall, steps, busy, tuple(d.comm_s for d in deltas),
                          tuple(n.rss for n in now), bubble)

    def close(self) -> None:
        if self.links is not None:
            self.links.close()
