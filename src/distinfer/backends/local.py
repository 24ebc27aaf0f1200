"""The embedded default backend: N worker processes on this machine (spawn start method).

Each worker has its own duplex pipe; the driver waits on all pipes and all process
sentinels at once, so a worker killed mid-job (even mid-message) is noticed at once and
only its own pipe is lost. A worker drains its pipe before each block, so a `Cancel`
for a queued block lands before the block starts. A `Cancel` for the block a worker is
running also sets the worker's shared cancel slot, which the worker reads between
micro-batches: a losing speculative copy stops there and writes nothing. A worker told to
stop (the job is done, or it is being replaced) drops its running block the same way.
A generation worker drains its pipe between engine steps, and starts its next queued block
as soon as its engine has room, while the current one still runs (continuous batching
across blocks).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized
from typing import TYPE_CHECKING, Any

from ..logs import log_to_stderr
from ..messages import (
    BlockFailed,
    BlockStarted,
    Cancel,
    Generate,
    InferBatch,
    Order,
    RunBlock,
    StopSequence,
    StopWorker,
    WorkerFailed,
    WorkerLost,
    WorkerMessage,
    WorkerSpec,
)
from ..worker.process import set_worker_environment
from .base import Backend

if TYPE_CHECKING:
    from ..worker.replica import Replica
    from ..worker.text_serving import TextServing

__all__ = ["LocalBackend"]


_PARENT_POLL_S = 1.0  # how often a worker checks that its driver is still there
_NONE, _ANY = -1, -2  # a cancel slot's values besides a block id: nothing; whatever runs


def _exit_with_parent() -> None:
    """End this worker within about a second once the driver is gone (killed, even with
    SIGKILL, which closes no pipe in time for a worker in the middle of a block): a daemon
    thread watches the parent's pid. Its stage and rank processes watch theirs in turn."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(_PARENT_POLL_S)
            if os.getppid() != parent:
                os._exit(3)  # nobody will read what this worker makes; resume redoes its block

    threading.Thread(target=watch, name="distinfer-parent-watch", daemon=True).start()


def _worker_main(worker: int, spec: WorkerSpec, conn: Connection, slot: Synchronized[int]) -> None:
    entered = time.perf_counter()
    _exit_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    log_to_stderr(logging.WARNING)  # a worker's last words (a group lost) reach its stderr
    try:
        _serve(worker, spec, conn, entered, slot)
    except (BrokenPipeError, ConnectionResetError, EOFError):
        pass  # the driver stopped or went away: nothing left to report to
    if spec.strategy == "data":
        # Done: every part it wrote is renamed into place. The interpreter's teardown does
        # nothing a finished worker needs and takes long with some libraries loaded (about a
        # second with TensorFlow), which the driver would wait for. A pipeline or tensor group
        # exits normally, so that multiprocessing ends its stage and rank processes.
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)


def _clear(slot: Synchronized[int], block: int) -> None:
    """Forget a cancellation once it is dealt with (the block may come back: a thief lost)."""
    with slot.get_lock():
        if slot.value == block:
            slot.value = _NONE


def _serve(worker: int, spec: WorkerSpec, conn: Connection, entered: float, slot: Synchronized[int]) -> None:
    from ..models.base import BlockCancelled
    from ..worker.process import limit_threads
    from ..worker.replica import Replica, error_info

    limit_threads(spec.threads)
    try:
        replica = Replica(worker, spec, entered)
    except Exception as exc:
        conn.send(WorkerFailed(worker, error_info(exc)))
        return
    replica.cancelled = lambda block: slot.value in (block, _ANY)
    conn.send(replica.ready_message())
    if replica.text is not None:
        _serve_text(replica.text, conn)
        return
    queue: deque[RunBlock] = deque()
    while True:
        waited = 0.0
        # wait for a message only when there is nothing to run
        while not (queue or replica.busy) or conn.poll():
            t = time.perf_counter()
            message = conn.recv()
            waited += time.perf_counter() - t if not (queue or replica.busy) else 0.0
            if isinstance(message, StopWorker):
                return
            if isinstance(message, InferBatch):  # serving: answered at once, never queued
                conn.send(replica.infer(message))
            elif isinstance(message, RunBlock):
                queue.append(message)
            elif isinstance(message, Cancel):  # between blocks: a queued (or finished) one
                queue = deque(m for m in queue if m.block.id != message.block)
                _clear(slot, message.block)
        if replica.streams:
            _stream(worker, replica, queue, conn, waited)
            continue
        block = queue.popleft().block
        conn.send(BlockStarted(worker, block.id))
        try:
            conn.send(replica.run(block, waited))
        except BlockCancelled:
            _clear(slot, block.id)  # the other copy's BlockDone is the block's
        except Exception as exc:
            conn.send(BlockFailed(worker, block.id, error_info(exc)))


def _stream(worker: int, replica: Replica, queue: deque[RunBlock], conn: Connection, waited: float) -> None:
    """A generation replica: start queued blocks while its engine has room, then one step."""
    from ..worker.replica import GenerationFailed, error_info

    while queue and (replica.room or not replica.busy):
        block = queue.popleft().block
        conn.send(BlockStarted(worker, block.id))
        try:
            replica.open(block, waited)
        except Exception as exc:
            conn.send(BlockFailed(worker, block.id, error_info(exc)))
        waited = 0.0
    try:
        for done in replica.advance():
            conn.send(done)
    except GenerationFailed as exc:
        for key in exc.blocks:
            conn.send(BlockFailed(worker, key, exc.error))


def _serve_text(text: TextServing, conn: Connection) -> None:
    """A replica serving text generation: take the server's orders between engine steps and
    send each step's report (new text, the replica's state) as soon as it is made."""
    conn.send(text.step())  # the warm-up's measured rates, before any request
    while True:
        while not text.busy or conn.poll():
            message = conn.recv()
            if isinstance(message, StopWorker):
                return
            if isinstance(message, Generate):
                text.generate(message)
            elif isinstance(message, StopSequence):
                text.stop(message.request)
        conn.send(text.step())


class LocalBackend(Backend):
    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        set_worker_environment()  # glibc reads it when the spawned workers start
        self._ctx = mp.get_context("spawn")
        self._procs: dict[int, BaseProcess] = {}
        self._conns: dict[int, Connection] = {}
        self._slots: dict[int, Synchronized[int]] = {}  # worker -> the block to cancel
        self._stopping: list[BaseProcess] = []  # told to stop, not yet joined

    def start(self, worker: int) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        slot = self._ctx.Value("q", _NONE)
        proc = self._ctx.Process(
            target=_worker_main, args=(worker, self.spec, child, slot), name=f"distinfer-worker-{worker}",
            # A pipeline or tensor-parallel worker starts its stage or rank processes itself,
            # which a daemon may not do; it still ends with the driver (EOF on its pipe) and
            # close() kills it if need be.
            daemon=self.spec.strategy == "data",
        )
        proc.start()
        child.close()
        self._procs[worker] = proc
        self._conns[worker] = parent
        self._slots[worker] = slot

    def pid(self, worker: int) -> int | None:
        proc = self._procs.get(worker)
        return proc.pid if proc is not None else None

    def send(self, worker: int, message: Order) -> None:
        conn = self._conns.get(worker)
        if conn is None:
            return
        if isinstance(message, Cancel):  # read mid-block; the message clears it between blocks
            with self._slots[worker].get_lock():
                self._slots[worker].value = message.block
        try:
            conn.send(message)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the sentinel reports the death

    def receive(self, timeout: float) -> list[WorkerMessage]:
        handles: dict[Any, tuple[str, int]] = {}
        for worker, conn in self._conns.items():
            handles[conn] = ("conn", worker)
            handles[self._procs[worker].sentinel] = ("proc", worker)
        if not handles:
            time.sleep(timeout)
            return []
        out: list[WorkerMessage] = []
        for handle in wait(list(handles), timeout):
            kind, worker = handles[handle]
            if worker not in self._conns:
                continue  # already reported gone in this round
            if kind == "conn":
                try:
                    out.append(self._conns[worker].recv())
                    continue
                except (EOFError, OSError):
                    pass  # a dead or half-written pipe: read the process's fate below
            out.extend(self._drain(worker))
            out.append(WorkerLost(worker, self._fate(worker)))
            self._forget(worker)
        return out

    def _drain(self, worker: int) -> list[WorkerMessage]:
        """Messages a worker sent before it died are still real (its parts are written)."""
        conn = self._conns[worker]
        got: list[WorkerMessage] = []
        try:
            while conn.poll():
                got.append(conn.recv())
        except (EOFError, OSError):
            pass
        return got

    def _fate(self, worker: int) -> str:
        proc = self._procs[worker]
        proc.join(timeout=1.0)
        code = proc.exitcode
        if code is None:
            return "worker stopped answering"
        if code < 0:
            return f"worker {worker} (pid {proc.pid}) was killed by {signal.Signals(-code).name}"
        return f"worker {worker} (pid {proc.pid}) exited with code {code}"

    def _forget(self, worker: int) -> None:
        conn = self._conns.pop(worker)
        conn.close()
        self._procs.pop(worker)
        self._slots.pop(worker, None)

    def stop(self, worker: int) -> None:
        conn = self._conns.get(worker)
        if conn is None:
            return
        self._slots.pop(worker).value = _ANY  # a block still running is nobody's now
        with contextlib.suppress(OSError):
            conn.send(StopWorker(worker))
        self._stopping.append(self._procs.pop(worker))
        self._conns.pop(worker).close()

    def close(self) -> None:
        for worker in list(self._conns):
            self.stop(worker)
        procs, self._stopping = self._stopping, []
        deadline = time.monotonic() + 5.0
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
