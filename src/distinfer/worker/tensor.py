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

A model that raises is a result, not a loss. Every rank runs the same code on the same
broadcast micro-batch; each catches a failure of its shards per micro-batch and goes on
with the block's announced micro-batches (computing the rest, as if nothing happened), so
the ranks stay in step when the failure happens at the same point on every rank, or on a
rank after its last collective of the micro-batch (rank 0's head or pooling, say). Ranks
1..N-1 report their first failure with their figures; rank 0 raises the first failing
micro-batch's error (a `RowsError`, kind and fatality kept) once every rank is done with the
block, and the group takes the next one. Each rank also reports its `Comm.progress`
(collectives and barriers so far): a rank that differs from rank 0 is out of step and the
group ends as lost. A failure that leaves the ranks out of step (one rank raised before a
collective that the others entered) is not survived: the others wait in that collective
until its timeout (`_COLLECTIVE_TIMEOUT_S`), then the group ends as lost, as below.

To the scheduler and the backend the group is one worker: if a rank process dies, rank 0's
next collective fails (gloo raises on a closed peer; a shared-memory wait polls the ranks'
liveness every second), or the figures do not arrive; rank 0 then prints why on stderr and
exits with code 3, so the backend replaces the worker and its blocks are assigned again. A
rank whose parent is gone exits by itself.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, TypeAlias

import numpy as np
import torch

from ..errors import ErrorInfo, ModelError, RowsError
from ..logs import log, log_to_stderr
from ..models.base import Batches, Column, GroupStats, Runner, never
from ..models.family import ModelSpec, ShardedForm
from .collectives import CHUNK_BYTES, GroupLost, make_comm
from .process import host_label, limit_threads, peak_rss

__all__ = ["RankGroup", "TensorParallelRunner", "comm_plan", "resolve_comm"]

_READY_TIMEOUT_S = 600.0  # loading the shards
_COLLECTIVE_TIMEOUT_S = 300.0  # one collective: bounded by how far the ranks drift apart
_POLL_S = 1.0


def _rank_device(device: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if torch.device(device).type == "cuda" else torch.device("cpu")


def _rank_main(
    sharded: ShardedForm, rank: int, world: int, threads: int, device: str,
    plan: tuple[Any, ...], control: Any, status: Any,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limit_threads(threads)
    log_to_stderr(logging.WARNING)
    dev = _rank_device(device, rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    parent = os.getppid()

    def orphaned() -> str | None:
        return "rank 0 is gone" if os.getppid() != parent else None

    comm = make_comm(plan, rank, world, dev, orphaned)
    try:
        model = sharded.build_rank(rank, world, comm.all_reduce, dev)
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
            failure: RankFailure | None = None
            for i, shape in enumerate(shapes):
                packed = torch.empty((2, *shape), dtype=torch.int64, device=dev)
                comm.broadcast(packed)  # token ids and mask
                try:
                    model(packed[0], packed[1])
                except GroupLost:
                    raise
                except Exception as exc:  # a result: go on with the block's micro-batches, in step
                    if failure is None:
                        failure = _failure(exc, i)
            wall = time.perf_counter() - start
            comm_s = comm.seconds - comm_before
            status.put(("figures", rank, (wall - comm_s, comm_s, peak_rss()), comm.progress, failure))
    except Exception as exc:
        # A collective failed (rank 0 or another rank is gone; rank 0 reports it) or the model
        # did. Leave without running finalisers that could wait on the broken group.
        if not isinstance(exc, GroupLost):
            log.exception("tensor-parallel rank %d failed", rank)
        os._exit(1)
    status.close()
    status.join_thread()  # what was put reaches rank 0
    os._exit(0)


RankFailure: TypeAlias = tuple[int, ErrorInfo, int | None]
"""A rank's first failure in a block: (micro-batch, error, row of the micro-batch or None)."""


def _failure(exc: BaseException, batch: int) -> RankFailure:
    caught = RowsError.caught(exc)
    return batch, caught.error, caught.row


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


def comm_plan(ctx: Any, comm: str, world: int) -> tuple[tuple[Any, ...], str | None]:
    """What every rank needs to join the group (`make_comm`), and the temporary directory of a
    torch.distributed store (None for shared memory), for rank 0 to remove at the end."""
    if comm == "shm":
        slots = torch.zeros((2, world, CHUNK_BYTES), dtype=torch.uint8)
        slots.share_memory_()  # type: ignore[no-untyped-call]
        sems = [[ctx.Semaphore(0) for _ in range(world)] for _ in range(world)]
        return ("shm", slots, sems), None
    store_dir = tempfile.mkdtemp(prefix="distinfer-tp-")
    return (comm, os.path.join(store_dir, "store")), store_dir


class RankGroup:
    """Ranks 1..world-1 of a group as spawned child processes of rank 0 (this process): the
    plan by which every rank joins the collectives, one control queue per rank, one status
    queue, and the life cycle every tensor-parallel group shares: start, wait until each
    rank has loaded, notice a dead rank, stop. `TensorParallelRunner` and the generation
    engine's `TensorExecutor` (worker/llm_tensor.py) are both built on it."""

    def __init__(self, comm: str, world: int) -> None:
        self.world = world
        self.ctx = torch.multiprocessing.get_context("spawn")
        self.plan, self._store_dir = comm_plan(self.ctx, comm, world)
        self.status = self.ctx.Queue()
        self.controls = [self.ctx.Queue() for _ in range(1, world)]
        self.procs: list[Any] = []

    def start(self, target: Any, args_of: Any) -> None:
        """Start rank r (1..world-1) as `target(*args_of(r))`."""
        for rank in range(1, self.world):
            proc = self.ctx.Process(target=target, args=args_of(rank), name=f"distinfer-rank-{rank}",
                                    daemon=True)
            proc.start()
            self.procs.append(proc)

    def tell(self, message: Any) -> None:
        for control in self.controls:
            control.put(message)

    def hosts(self) -> tuple[str, ...]:
        here = host_label()
        return (here, *(f"{here.split(' pid ')[0]} pid {p.pid}" for p in self.procs))

    def dead_rank(self) -> str | None:
        for rank, proc in enumerate(self.procs, start=1):
            if not proc.is_alive():
                return f"rank {rank} died (exit code {proc.exitcode})"
        return None

    def wait_ready(self) -> None:
        waiting = set(range(1, self.world))
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while waiting:
            try:
                kind, rank, text = self.status.get(timeout=_POLL_S)
            except queue.Empty:
                dead = self.dead_rank()
                if dead is not None:
                    raise ModelError(f"tensor-parallel {dead} while loading") from None
                if time.monotonic() > deadline:
                    raise ModelError("a tensor-parallel rank did not load within 10 minutes") from None
                continue
            if kind == "error":
                raise ModelError(f"tensor-parallel rank {rank} could not load its shards: {text}")
            waiting.discard(rank)

    def lost(self, why: str) -> NoReturn:
        """End this process (exit code 3) so the backend sees the replica lost; the reason
        names the rank that died when one did."""
        for proc in self.procs:
            proc.join(timeout=0.5)
            if not proc.is_alive():
                break
        why = self.dead_rank() or why
        log_to_stderr(logging.WARNING)  # this process ends now: its reason must reach stderr
        log.critical("tensor-parallel group lost: %s", why)
        os._exit(3)

    def stop(self) -> None:
        """Stop every rank (asked first, then killed) and drop the queues."""
        self.tell(None)
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for q in (self.status, *self.controls):
            q.close()
            q.join_thread()
        if self._store_dir is not None:
            shutil.rmtree(self._store_dir, ignore_errors=True)


class TensorParallelRunner(Runner):
    """`spec`'s model sharded over `world` ranks (its family's `sharded` form; see
    models/family.py): this process is rank 0, ranks 1..world-1 are child processes using `threads`
    threads each (this process keeps its own thread settings). See the module docstring.

    `comm` picks how the ranks exchange tensors: "shm" (shared memory, CPU only), "gloo"
    (torch.distributed over loopback TCP, CPU), "nccl" (torch.distributed, CUDA only); "auto"
    is shm on the CPU and NCCL with device "cuda".
    """

    def __init__(self, spec: ModelSpec, world: int, threads: int, device: str = "cpu",
                 *, comm: str = "auto") -> None:
        problem = spec.family.shard_problem(spec, world)
        if problem is not None:
            raise ModelError(problem)
        dev = _rank_device(device, 0)
        comm, problem = resolve_comm(device, world, comm)
        if problem is not None:
            raise ModelError(problem)
        sharded = spec.family.sharded(spec)
        self.preparer = sharded.preparer(device)
        self.input_names = self.preparer.input_names
        self.world = world
        self.device = dev
        self._stats: GroupStats | None = None
        self._closed = False
        self._group = RankGroup(comm, world)
        self._status = self._group.status
        self._comm = make_comm(self._group.plan, 0, world, dev, self._group.dead_rank)
        try:
            self._group.start(_rank_main, lambda rank: (
                sharded, rank, world, threads, device, self._group.plan, self._group.controls[rank - 1],
                self._status))
            self._model = sharded.build_rank(0, world, self._comm.all_reduce, dev)
            self._group.wait_ready()
            self.hosts = self._group.hosts()
            self._group.tell(("connect",))
            self._comm.connect()
        except BaseException:
            self.close()
            raise

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        return self.preparer.prepare(inputs, batch_size)

    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        return self.forward_many([batch])[0]

    def forward_many(
        self, batches: list[Any], cancelled: Callable[[], bool] = never
    ) -> list[dict[str, np.ndarray]]:
        """Broadcast each micro-batch, run every rank's shards, collect rank 0's outputs."""
        if self._closed:
            raise RuntimeError("the tensor-parallel runner is closed")
        if not batches:
            return []
        start = time.perf_counter()
        comm_before = self._comm.seconds
        shapes = [tuple(ids.shape) for ids, _ in batches]
        self._group.tell(("run", shapes))
        results: list[dict[str, np.ndarray]] = []
        failures: dict[int, RankFailure] = {}  # rank -> its first failure in this block
        try:
            for i, (ids, mask) in enumerate(batches):
                ids, mask = ids.to(self.device), mask.to(self.device)
                self._comm.broadcast(torch.stack((ids, mask.to(torch.int64))))
                try:
                    out = self._model(ids, mask)
                except GroupLost:
                    raise
                except Exception as exc:  # a result: go on with the block's micro-batches, in step
                    failures.setdefault(0, _failure(exc, i))
                    results.append({})
                    continue
                assert out is not None
                results.append(out)
        except GroupLost as exc:
            self._lost(str(exc))
        except Exception as exc:
            # Not the model but the broadcast around it: the other ranks may be left inside
            # this micro-batch's collectives, out of step for good, so it ends like a lost rank.
            log.exception("tensor-parallel rank 0 failed around a collective")
            self._lost(f"rank 0 failed: {type(exc).__name__}: {exc}")
        wall = time.perf_counter() - start
        comm_s = self._comm.seconds - comm_before
        figures = {0: (wall - comm_s, comm_s, peak_rss())}
        figures.update(self._collect_figures(self._comm.progress, failures))
        ranks = range(self.world)
        self._stats = GroupStats(
            kind="rank", wall_s=time.perf_counter() - start, micro_batches=len(batches),
            busy_s=tuple(figures[r][0] for r in ranks), comm_s=tuple(figures[r][1] for r in ranks),
            peak_rss=tuple(figures[r][2] for r in ranks),
        )
        if failures:  # the first micro-batch that failed on any rank (rank 0's, on a tie)
            batch, error, row = min(failures.values(), key=lambda f: f[0])
            raise RowsError(error, batch=batch, row=row)
        return results

    def _collect_figures(self, progress: tuple[int, int], failures: dict[int, RankFailure]
                         ) -> dict[int, tuple[float, float, int]]:
        """Each other rank's figures for the block (and its failure, into `failures`); a rank
        whose `Comm.progress` differs from rank 0's is out of step: the group is lost."""
        figures: dict[int, tuple[float, float, int]] = {}
        deadline = time.monotonic() + _COLLECTIVE_TIMEOUT_S
        while len(figures) < self.world - 1:
            try:
                kind, rank, value, *rest = self._status.get(timeout=_POLL_S)
            except queue.Empty:
                dead = self._group.dead_rank()
                if dead is not None:
                    self._lost(dead)
                if time.monotonic() > deadline:
                    self._lost(f"no figures from the other ranks within {_COLLECTIVE_TIMEOUT_S:.0f} s")
                continue
            if kind != "figures":
                continue
            figures[rank] = value
            rank_progress, failure = rest
            if failure is not None:
                failures.setdefault(rank, failure)
            if tuple(rank_progress) != progress:
                why = f" after rank {rank}'s {failure[1].kind}: {failure[1].message}" if failure else ""
                self._lost(f"rank {rank} made {rank_progress[0]} collectives in all, rank 0 {progress[0]} "
                           f"(barriers: {rank_progress[1]}, {progress[1]}): the ranks are out of step{why}")
        return figures

    def _lost(self, why: str) -> NoReturn:
        # The group cannot go on without every rank: end this worker so that the backend
        # sees it lost and the scheduler assigns its blocks again.
        self._group.lost(why)

    def group_stats(self) -> GroupStats | None:
        return self._stats

    def close(self) -> None:
        """Stop ranks 1..N-1 and drop the process group; the runner cannot be used after."""
        if self._closed:
            return
        self._closed = True
        self._group.stop()
        self._comm.release()
