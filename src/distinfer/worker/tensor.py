"""Tensor parallelism inside one replica: every layer sharded over N rank processes.

The replica's own process (the one the backend started) is rank 0; ranks 1..N-1 are its
child processes (torch multiprocessing, spawn, daemons). Each rank builds only its shards of
the model (`models/sharding.py`: Megatron column/row-parallel linears, two all-reduces per
transformer block).

How ranks exchange tensors (`comm`: shared memory on the CPU by default, gloo or NCCL through
`torch.distributed`) is `runtime/collectives.py`'s business.

Per block, rank 0 prepares the micro-batches (the model's own preparer, as the data-parallel
runners do) and tells the other ranks, through a small control queue, how many micro-batches
follow and their shapes. Then, per micro-batch, it broadcasts token ids and mask packed into
one tensor (one broadcast), every rank runs its shards, and rank 0 computes the outputs.
Ranks 1..N-1 wait on the control queue between blocks, never inside a collective, so an idle
worker does not run into collective timeouts; afterwards each reports its busy seconds,
communication seconds (broadcasts and all-reduces, waiting for the other ranks included) and
peak memory on a status queue (`group_stats`).

To the scheduler and the backend the group is one worker: if a rank process dies, rank 0's
next collective fails (gloo raises on a closed peer; a shared-memory wait polls the ranks'
liveness every second), or the figures do not arrive; rank 0 then prints why on stderr and
exits with code 3, so the backend replaces the worker and its blocks are assigned again. A
rank whose parent is gone exits by itself.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from typing import Any, NoReturn

import numpy as np
import torch

from ..errors import ModelError
from ..models.base import Batches, Column, GroupStats, Runner
from ..models.sharding import AllReduce, tensor_parallel_problem
from .collectives import CHUNK_BYTES, GroupLost, make_comm
from .process import host_label, limit_threads, peak_rss

__all__ = ["TensorParallelRunner"]

_READY_TIMEOUT_S = 600.0  # loading the shards
_COLLECTIVE_TIMEOUT_S = 300.0  # one collective: bounded by how far the ranks drift apart
_POLL_S = 1.0


def _rank_device(device: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if torch.device(device).type == "cuda" else torch.device("cpu")


class _RankModel:
    """One rank's shards of a model; `__call__(ids, mask)` runs a micro-batch and returns the
    outputs on rank 0 (None on the other ranks)."""

    def __init__(self, model_name: str, kind: str, rank: int, world: int, all_reduce: AllReduce,
                 device: torch.device) -> None:
        self.kind = kind
        self.rank = rank
        self.model: torch.nn.Module
        if kind == "decoder":
            from ..models.decoder import parse_decoder_name
            from ..models.sharding import ShardedDecoder

            config = parse_decoder_name(model_name)
            assert config is not None
            self.model = ShardedDecoder(config, rank, world, all_reduce, device)
        else:
            from ..models.minilm import minilm_path
            from ..models.sharding import ShardedBert

            self.model = ShardedBert(minilm_path(), rank, world, all_reduce, device)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray] | None:
        with torch.inference_mode():
            out = self.model(ids, mask)
            if self.rank != 0:
                return None
            if self.kind == "decoder":
                from ..models.decoder_stages import decoder_outputs

                return decoder_outputs(out)
            from ..models.minilm import mean_pool

            return mean_pool(out, mask)


def _rank_main(
    model_name: str, kind: str, rank: int, world: int, threads: int, device: str,
    plan: tuple[Any, ...], control: Any, status: Any,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limit_threads(threads)
    dev = _rank_device(device, rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    parent = os.getppid()

    def orphaned() -> str | None:
        return "rank 0 is gone" if os.getppid() != parent else None

    comm = make_comm(plan, rank, world, dev, orphaned)
    try:
        model = _RankModel(model_name, kind, rank, world, comm.all_reduce, dev)
    except Exception as exc:
        status.put(("error", rank, f"{type(exc).__name__}: {exc}"))
        return
    status.put(("ready", rank, None))
    try:
        while True:
            try:
                message = control.get(timeout=_POLL_S)
            except queue.Empty:
                if orphaned():  # nobody will send work
                    break
                continue
            if message is None:
                break
            if message[0] == "connect":
                comm.connect()
                continue
            _, shapes = message
            start = time.perf_counter()
            comm_before = comm.seconds
            for shape in shapes:
                packed = torch.empty((2, *shape), dtype=torch.int64, device=dev)
                comm.broadcast(packed)  # token ids and mask
                model(packed[0], packed[1])
            wall = time.perf_counter() - start
            comm_s = comm.seconds - comm_before
            status.put(("figures", rank, (wall - comm_s, comm_s, peak_rss())))
    except Exception as exc:
        # A collective failed (rank 0 or another rank is gone; rank 0 reports it) or the model
        # did. Leave without running finalisers that could wait on the broken group.
        if not isinstance(exc, GroupLost):
            traceback.print_exc()
            sys.stderr.flush()
        os._exit(1)
    status.close()
    status.join_thread()  # what was put reaches rank 0
    os._exit(0)


def resolve_comm(device: str, world: int, comm: str = "auto") -> tuple[str, str | None]:
    """The collective engine for `comm` ("auto" resolved) and, if the ranks cannot run here,
    why and what to use instead."""
    dev = _rank_device(device, 0)
    if comm == "auto":
        comm = "nccl" if dev.type == "cuda" else "shm"
    if (comm == "nccl") != (dev.type == "cuda") or comm not in ("shm", "gloo", "nccl"):
        return comm, (f"tensor-parallel ranks on {dev.type} cannot exchange tensors with {comm!r}; "
                      "use --tensor-comm shm or gloo on the CPU, nccl with --device cuda")
    if dev.type == "cuda":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus < world:
            instead = "--device cpu" if gpus < 2 else f"--tensor-parallel {gpus} or less, or --device cpu"
            return comm, (f"--device cuda with --tensor-parallel {world} puts each rank on a GPU of its own, "
                          f"but this machine has {gpus}; use {instead}")
    return comm, None


class TensorParallelRunner(Runner):
    """`model_name` (`decoder-SIZE` or `minilm`, of ModelSpec kind `kind`) sharded over `world`
    ranks: this process is rank 0, ranks 1..world-1 are child processes using `threads`
    threads each (this process keeps its own thread settings). See the module docstring.

    `comm` picks how the ranks exchange tensors: "shm" (shared memory, CPU only), "gloo"
    (torch.distributed over loopback TCP, CPU), "nccl" (torch.distributed, CUDA only); "auto"
    is shm on the CPU and NCCL with device "cuda".
    """

    def __init__(self, model_name: str, kind: str, world: int, threads: int, device: str = "cpu",
                 *, comm: str = "auto") -> None:
        problem = tensor_parallel_problem(model_name, kind, world)
        if problem is not None:
            raise ModelError(problem)
        dev = _rank_device(device, 0)
        comm, problem = resolve_comm(device, world, comm)
        if problem is not None:
            raise ModelError(problem)
        from ..models.staged import staged_model

        staged = staged_model(model_name, kind)
        assert staged is not None
        self.preparer = staged.preparer(device)
        self.input_names = self.preparer.input_names
        self.world = world
        self.device = dev
        self._stats: GroupStats | None = None
        self._closed = False
        self._store_dir: str | None = None
        ctx = torch.multiprocessing.get_context("spawn")
        plan: tuple[Any, ...]
        if comm == "shm":
            slots = torch.zeros((2, world, CHUNK_BYTES), dtype=torch.uint8)
            slots.share_memory_()  # type: ignore[no-untyped-call]
            sems = [[ctx.Semaphore(0) for _ in range(world)] for _ in range(world)]
            plan = ("shm", slots, sems)
        else:
            self._store_dir = tempfile.mkdtemp(prefix="distinfer-tp-")
            plan = (comm, os.path.join(self._store_dir, "store"))
        self._status = ctx.Queue()
        self._controls = [ctx.Queue() for _ in range(1, world)]
        self._procs: list[Any] = []
        self._comm = make_comm(plan, 0, world, dev, self._dead_rank)
        try:
            for rank in range(1, world):
                proc = ctx.Process(
                    target=_rank_main,
                    args=(model_name, kind, rank, world, threads, device, plan,
                          self._controls[rank - 1], self._status),
                    name=f"distinfer-rank-{rank}", daemon=True,
                )
                proc.start()
                self._procs.append(proc)
            self._model = _RankModel(model_name, kind, 0, world, self._comm.all_reduce, dev)
            self._wait_ready()
            here = host_label()
            self.hosts = (here, *(f"{here.split(' pid ')[0]} pid {p.pid}" for p in self._procs))
            for control in self._controls:
                control.put(("connect",))
            self._comm.connect()
        except BaseException:
            self.close()
            raise

    def _dead_rank(self) -> str | None:
        for rank, proc in enumerate(self._procs, start=1):
            if not proc.is_alive():
                return f"rank {rank} died (exit code {proc.exitcode})"
        return None

    def _wait_ready(self) -> None:
        waiting = set(range(1, self.world))
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while waiting:
            try:
                kind, rank, text = self._status.get(timeout=_POLL_S)
            except queue.Empty:
                dead = self._dead_rank()
                if dead is not None:
                    raise ModelError(f"tensor-parallel {dead} while loading") from None
                if time.monotonic() > deadline:
                    raise ModelError("a tensor-parallel rank did not load within 10 minutes") from None
                continue
            if kind == "error":
                raise ModelError(f"tensor-parallel rank {rank} could not load its shards: {text}")
            waiting.discard(rank)

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        return self.preparer.prepare(inputs, batch_size)

    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        return self.forward_many([batch])[0]

    def forward_many(self, batches: list[Any]) -> list[dict[str, np.ndarray]]:
        """Broadcast each micro-batch, run every rank's shards, collect rank 0's outputs."""
        if self._closed:
            raise RuntimeError("the tensor-parallel runner is closed")
        if not batches:
            return []
        start = time.perf_counter()
        comm_before = self._comm.seconds
        shapes = [tuple(ids.shape) for ids, _ in batches]
        for control in self._controls:
            control.put(("run", shapes))
        results: list[dict[str, np.ndarray]] = []
        try:
            for ids, mask in batches:
                ids, mask = ids.to(self.device), mask.to(self.device)
                self._comm.broadcast(torch.stack((ids, mask.to(torch.int64))))
                out = self._model(ids, mask)
                assert out is not None
                results.append(out)
        except GroupLost as exc:
            self._lost(str(exc))
        except Exception as exc:
            # The other ranks are left inside this micro-batch's collectives: the group is
            # out of step for good, so it ends like a lost rank.
            traceback.print_exc()
            self._lost(f"rank 0 failed: {type(exc).__name__}: {exc}")
        wall = time.perf_counter() - start
        comm_s = self._comm.seconds - comm_before
        figures = {0: (wall - comm_s, comm_s, peak_rss())}
        figures.update(self._collect_figures())
        ranks = range(self.world)
        self._stats = GroupStats(
            kind="rank", wall_s=time.perf_counter() - start, micro_batches=len(batches),
            busy_s=tuple(figures[r][0] for r in ranks), comm_s=tuple(figures[r][1] for r in ranks),
            peak_rss=tuple(figures[r][2] for r in ranks),
        )
        return results

    def _collect_figures(self) -> dict[int, tuple[float, float, int]]:
        figures: dict[int, tuple[float, float, int]] = {}
        deadline = time.monotonic() + _COLLECTIVE_TIMEOUT_S
        while len(figures) < self.world - 1:
            try:
                kind, rank, value = self._status.get(timeout=_POLL_S)
            except queue.Empty:
                dead = self._dead_rank()
                if dead is not None:
                    self._lost(dead)
                if time.monotonic() > deadline:
                    self._lost(f"no figures from the other ranks within {_COLLECTIVE_TIMEOUT_S:.0f} s")
                continue
            if kind == "figures":
                figures[rank] = value
        return figures

    def _lost(self, why: str) -> NoReturn:
        # The group cannot go on without every rank: end this worker so that the backend
        # sees it lost and the scheduler assigns its blocks again. A peer's closed connection
        # is reported best as the rank that died, once its process is reaped.
        for proc in self._procs:
            proc.join(timeout=0.5)
            if not proc.is_alive():
                break
        why = self._dead_rank() or why
        print(f"distinfer: tensor-parallel group lost: {why}", file=sys.stderr, flush=True)
        os._exit(3)

    def group_stats(self) -> GroupStats | None:
        return self._stats

    def close(self) -> None:
        """Stop ranks 1..N-1 and drop the process group; the runner cannot be used after."""
        if self._closed:
            return
        self._closed = True
        for control in self._controls:
            control.put(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._comm.release()
        for q in (self._status, *self._controls):
            q.close()
            q.join_thread()
        if self._store_dir is not None:
            shutil.rmtree(self._store_dir, ignore_errors=True)
