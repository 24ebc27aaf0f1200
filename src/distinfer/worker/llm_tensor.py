"""Tensor-parallel generation: every layer of the model sharded over N rank processes.

The replica's own process is rank 0 and runs the engine; ranks 1..N-1 are its child
processes. Each rank builds only its shards (`DecoderPart` with `rank`/`world`: the query
heads, the MLP and the vocabulary split; with fewer KV heads than ranks, each rank keeps the
KV head its query heads use, as vLLM does) and holds the KV cache of its heads.

Per step, rank 0 puts the step's plan (chunks and sampling settings, a few kB, pickled) on
each rank's control queue; every rank builds the same attention metadata from it and runs
its shards, the all-reduces keeping them in step (`worker/collectives.py`: shared memory on
the CPU by default). The LM head is vocabulary-parallel: each rank scores its slice and
contributes only its best candidates (one each when every sequence is greedy, else
`CANDIDATES`); one all-reduce of a small buffer gives rank 0 all of them, which it merges
and samples from, so the full logits never cross between ranks.

A rank that dies makes rank 0's next collective fail; rank 0 then ends with exit code 3 so
the backend replaces the replica and its block is run again.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import time
from typing import Any

import torch

from ..errors import ModelError
from ..logs import log, log_to_stderr
from ..messages import GroupStats
from ..models.llm.model import DecoderPart
from ..models.llm.paged import SeqChunk, build_meta
from ..models.llm.runner import LlmModel, choose_all
from ..models.llm.sampling import CANDIDATES, SamplingParams, merge_candidates
from .collectives import Comm, GroupLost, make_comm
from .process import limit_threads, peak_rss
from .tensor import RankGroup, resolve_comm

__all__ = ["TensorExecutor"]

_READY_TIMEOUT_S = 600.0
_POLL_S = 1.0


def _step(part: DecoderPart, comm: Comm, ring: int, chunks: list[SeqChunk],
          sampling: list[tuple[SamplingParams, int]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One step on one rank; rank 0 gets every rank's candidates merged (best first)."""
    meta = build_meta(chunks, part.windows, ring)
    h = part.forward(meta, None)
    if not sampling:
        return None
    k = 1 if all(p.greedy for p, _ in sampling) else CANDIDATES
    values, ids = part.candidates(h, k)
    rows = values.shape[0]
    exchange = torch.zeros((part.world, 2, rows, values.shape[1]), dtype=torch.float64)
    exchange[part.rank, 0] = values.double()
    exchange[part.rank, 1] = ids.double()
    comm.all_reduce(exchange)
    if part.rank != 0:
        return None
    parts = [(exchange[r, 0].float(), exchange[r, 1].long()) for r in range(part.world)]
    return merge_candidates(parts, k)


def _rank_main(model: LlmModel, rank: int, world: int, threads: int, plan: tuple[Any, ...],
               control: Any, status: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limit_threads(threads)
    log_to_stderr(logging.WARNING)
    parent = os.getppid()

    def orphaned() -> str | None:
        return "rank 0 is gone" if os.getppid() != parent else None

    comm = make_comm(plan, rank, world, torch.device("cpu"), orphaned)
    try:
        part = model.part(0, model.config.layers, rank, world, comm.all_reduce)
    except Exception as exc:
        status.put(("error", rank, f"{type(exc).__name__}: {exc}"))
        return
    status.put(("ready", rank, None))
    ring = model.cache_plan().ring
    busy = 0.0
    try:
        while True:
            try:
                message = control.get(timeout=_POLL_S)
            except queue.Empty:
                if orphaned():
                    break
                continue
            if message is None:
                break
            if message[0] == "connect":
                comm.connect()
                continue
            if message[0] == "figures":
                status.put(("figures", rank, (busy, comm.seconds, peak_rss())))
                continue
            t = time.perf_counter()
            _step(part, comm, ring, message[1], message[2])
            busy += time.perf_counter() - t
    except GroupLost:
        os._exit(1)
    except Exception:
        log.exception("tensor-parallel rank %d failed", rank)
        os._exit(1)
    os._exit(0)


class TensorExecutor:
    """The engine's executor over `world` ranks (this process is rank 0); `depth` 1."""

    depth = 1

    def __init__(self, model: LlmModel, world: int, threads: int, comm: str = "auto") -> None:
        problem = None if world >= 2 else f"tensor parallelism needs at least 2 ranks, got {world}"
        from ..models.llm.model import shard_problem

        problem = problem or shard_problem(model.config, world)
        comm, comm_problem = resolve_comm("cpu", world, comm)
        if problem or comm_problem:
            raise ModelError(problem or comm_problem or "")
        self.world = world
        self.ring = model.cache_plan().ring
        self._group = RankGroup(comm, world)
        self._done: list[list[int]] = []
        self._busy = 0.0
        self._seen = [(0.0, 0.0)] * world
        self._started: float | None = None
        self._steps = 0
        self._closed = False
        self._comm = make_comm(self._group.plan, 0, world, torch.device("cpu"), self._group.dead_rank)
        try:
            self._group.start(_rank_main, lambda rank: (
                model, rank, world, threads, self._group.plan, self._group.controls[rank - 1],
                self._group.status))
            self.part = model.part(0, model.config.layers, 0, world, self._comm.all_reduce)
            self._group.wait_ready()
            self.hosts = self._group.hosts()
            self._group.tell(("connect",))
            self._comm.connect()
        except BaseException:
            self.close()
            raise

    def submit(self, chunks: list[SeqChunk], sampling: list[tuple[SamplingParams, int]]) -> None:
        if self._started is None:
            self._started = time.perf_counter()
        t = time.perf_counter()
        self._group.tell(("step", chunks, sampling))
        try:
            merged = _step(self.part, self._comm, self.ring, chunks, sampling)
        except GroupLost as exc:
            self._group.lost(str(exc))
        self._busy += time.perf_counter() - t
        self._steps += 1
        if merged is None:
            self._done.append([])
            return
        values, ids = merged
        self._done.append(choose_all(values.numpy(), ids.numpy(), sampling))

    def collect(self) -> list[int]:
        return self._done.pop(0)

    def group_stats(self) -> GroupStats | None:
        """Each rank's busy and communication seconds since the last call (a block)."""
        if self._started is None:
            return None
        self._group.tell(("figures",))
        figures = {0: (self._busy, self._comm.seconds, peak_rss())}
        deadline = time.monotonic() + 60
        while len(figures) < self.world and time.monotonic() < deadline:
            try:
                kind, rank, value = self._group.status.get(timeout=_POLL_S)
            except queue.Empty:
                if (dead := self._group.dead_rank()) is not None:
                    self._group.lost(dead)
                continue
            if kind == "figures":
                figures[rank] = value
        ranks = range(self.world)
        now = [(figures.get(r, (0.0, 0.0, 0))[0], figures.get(r, (0.0, 0.0, 0))[1]) for r in ranks]
        deltas = [(a[0] - b[0], a[1] - b[1]) for a, b in zip(now, self._seen, strict=True)]
        self._seen = now
        wall = time.perf_counter() - self._started
        steps, self._started, self._steps = self._steps, None, 0
        # rank 0's busy time includes its collectives; the others' too
        return GroupStats("rank", wall, steps, tuple(b - c for b, c in deltas), tuple(c for _, c in deltas),
                          tuple(figures.get(r, (0.0, 0.0, 0))[2] for r in ranks))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._group.stop()
        self._comm.release()
