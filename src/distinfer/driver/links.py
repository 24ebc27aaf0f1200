"""Measuring the links between one machine's processes, for the planner's profile.

- The pipeline's shared-memory ring: a memory copy's bandwidth (what moving an activation
  through a slot costs) and a pipe's one-way latency between two processes (its signal).
- A tensor-parallel group's all-reduce, through the collectives a group really uses
  (`worker/collectives.py`): shared memory (the CPU default) and gloo over loopback TCP.
  Two ranks, each one spawned process with one thread, time all-reduces of a small and a
  large tensor; the cost model's ring formula for `k` ranks, `2 (k-1) l + 2 (k-1)/k a / w`,
  is `2 l + a / w` for two, which gives the latency `l` and the bandwidth `w`.
- Ray's object store, when Ray is installed: in a child process that starts a one-node Ray
  instance, an actor call that takes a small and then a large array put in the store and
  answers its size, timed the same way (`2 l + a / w`): what a worker's block call costs on
  the Ray backend, and what an activation would cost between actors.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import shutil
import time
from multiprocessing.connection import Connection
from typing import Any

from ..errors import DistinferError
from ..logs import log
from ..planning.profiles import Links

__all__ = ["measure_links"]

SMALL_BYTES = 4 << 10
LARGE_BYTES = 4 << 20
_TIMEOUT_S = 120.0


def measure_links() -> Links:
    try:
        bandwidth, latency = _copy_bandwidth(), _pipe_latency()
        shm = _allreduce("shm")
        gloo = _allreduce("gloo")
    except (OSError, EOFError, RuntimeError) as exc:  # TimeoutError is an OSError
        raise DistinferError(f"profiling the links between processes failed: {exc}") from exc
    ray = _ray_object_store()
    return Links(
        shm_latency_s=latency, shm_bytes_per_s=bandwidth,
        allreduce_latency_s=shm[0], allreduce_bytes_per_s=shm[1],
        gloo_allreduce_latency_s=gloo[0], gloo_allreduce_bytes_per_s=gloo[1],
        ray_latency_s=ray[0], ray_bytes_per_s=ray[1],
    )  # fmt: skip


def _copy_bandwidth() -> float:
    import numpy as np

    src = np.ones(32 * 2**20, dtype=np.uint8)
    dst = np.empty_like(src)
    start = time.perf_counter()
    for _ in range(8):
        np.copyto(dst, src)
    return 8 * src.nbytes / (time.perf_counter() - start)


def _pipe_latency() -> float:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    proc = ctx.Process(target=_echo, args=(b,), daemon=True)
    proc.start()
    b.close()  # so that a dead echo process ends our wait (EOFError), not hangs it
    try:
        a.send(0)
        if not a.poll(_TIMEOUT_S):
            raise TimeoutError(f"the pipe latency probe gave no answer in {_TIMEOUT_S:g} s")
        a.recv()
        start = time.perf_counter()
        for i in range(200):
            a.send(i)
            a.recv()
        latency = (time.perf_counter() - start) / 400  # one way
        a.send(None)
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    return latency


def _echo(conn: Connection) -> None:
    while (item := conn.recv()) is not None:
        conn.send(item)


def _allreduce(comm: str) -> tuple[float, float]:
    """(latency l, bandwidth w) of a 2-rank all-reduce over `comm`, from `2 l + a / w`."""
    import torch.multiprocessing

    from ..worker.tensor import comm_plan

    ctx = torch.multiprocessing.get_context("spawn")
    plan, store_dir = comm_plan(ctx, comm, 2)
    pipes, procs = [], []
    try:
        for rank in range(2):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_rank, args=(plan, rank, child), daemon=True)
            proc.start()
            child.close()
            pipes.append(parent)
            procs.append(proc)
        if not pipes[0].poll(_TIMEOUT_S):
            raise TimeoutError(f"a {comm} all-reduce probe gave no answer in {_TIMEOUT_S:g} s")
        small, large = pipes[0].recv()
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        if store_dir:
            shutil.rmtree(store_dir, ignore_errors=True)
    return _two_points(max(small, 0.0), max(large, small + 1e-9))


def _two_points(small: float, large: float) -> tuple[float, float]:
    """(l, w) from the times of a SMALL_BYTES and a LARGE_BYTES exchange, `t = 2 l + a / w`
    (the small one's bytes taken as nothing next to its latency)."""
    return small / 2, (LARGE_BYTES - SMALL_BYTES) / (large - small)


def _rank(plan: tuple[Any, ...], rank: int, conn: Connection) -> None:
    from ..worker.process import limit_threads

    limit_threads(1)
    import torch

    from ..worker.collectives import make_comm

    comm = make_comm(plan, rank, 2, torch.device("cpu"), lambda: None)
    comm.connect()
    times = []
    for nbytes, repeats in ((SMALL_BYTES, 200), (LARGE_BYTES, 20)):
        t = torch.zeros(nbytes // 4)
        for _ in range(3):
            comm.all_reduce(t)
        start = time.perf_counter()
        for _ in range(repeats):
            comm.all_reduce(t)
        times.append((time.perf_counter() - start) / repeats)
    comm.release()
    conn.send(times)
    conn.close()


def _ray_object_store() -> tuple[float, float]:
    """(latency l, bandwidth w) of an actor call through Ray's object store, from `2 l + a / w`;
    (0, 0) when Ray is not installed or cannot start here (the plan then shows no Ray link)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return 0.0, 0.0
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_ray_probe, args=(child,), daemon=False)
    proc.start()
    child.close()
    try:
        if not parent.poll(_TIMEOUT_S):
            log.info("the Ray object store probe gave no answer in %g s", _TIMEOUT_S)
            return 0.0, 0.0
        small, large = parent.recv()
    except EOFError:
        return 0.0, 0.0
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    if small <= 0 or large <= small:
        return 0.0, 0.0
    return _two_points(small, large)


def _ray_probe(conn: Connection) -> None:
    times = (0.0, 0.0)
    try:
        import numpy as np
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)  # a Ray of its own, even beside a cluster

        @ray.remote(num_cpus=0)
        class _Sink:
            def size(self, array: Any) -> int:
                return int(array.nbytes)

        sink = _Sink.remote()  # type: ignore[attr-defined]
        measured = []
        for nbytes, repeats in ((SMALL_BYTES, 100), (LARGE_BYTES, 20)):
            data = np.ones(nbytes, dtype=np.uint8)
            for _ in range(3):
                ray.get(sink.size.remote(ray.put(data)))
            start = time.perf_counter()
            for _ in range(repeats):
                ray.get(sink.size.remote(ray.put(data)))
            measured.append((time.perf_counter() - start) / repeats)
        times = (measured[0], measured[1])
        ray.shutdown()
    except Exception as exc:  # no Ray here: the profile goes on without this link
        log.info("no Ray object store figure: %s", exc)
    conn.send(times)
    conn.close()
