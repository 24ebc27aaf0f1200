"""The Ray backend: workers are Ray actors placed and supervised by a Ray cluster.

Ray places the actors (by the CPUs, GPUs and custom resources each asks for), runs them on
any node, and tells the driver when one dies with its node. distinfer keeps its own
scheduler: a `RunBlock` becomes an actor call `run(block)`; the call's result (or the
actor's death) becomes the event. Actor calls run one at a time in submission order, so the
calls queued behind the running one are the worker's prefetch. A `Cancel` goes to a
separate concurrency group, so it overtakes the queued calls; the cancelled call then
returns at once without work, and a running one stops at its next micro-batch.

Ray's own actor restarts are off on purpose: the scheduler starts replacement workers
(bounded by --max-restarts) and re-assigns the lost blocks, the same as with local
processes, so there is one authority over retries. Blocks never travel through Ray: an
actor reads its rows from storage all nodes see and writes its part there.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import RunConfig
from ..data.blocks import Block
from ..errors import ConfigError
from ..messages import (
    BlockFailed,
    Generate,
    InferBatch,
    Order,
    RunBlock,
    StopSequence,
    WorkerFailed,
    WorkerLost,
    WorkerMessage,
    WorkerReady,
    WorkerSpec,
)
from ..worker.process import worker_environment
from .base import Backend

__all__ = ["RayBackend", "RayOptions", "ReplicaActor"]


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--backend ray needs Ray; install it with: pip install 'distinfer[ray]'"
        ) from None
    return ray


@dataclass(frozen=True, slots=True)
class RayOptions:
    address: str | None = None
    cpus: float = 1.0
    gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: RunConfig) -> RayOptions:
        resources = dict(config.worker_resources or {})
        return cls(config.address, config.worker_cpus, config.worker_gpus, resources)

    def describe(self) -> str:
        asks = {"CPU": self.cpus, "GPU": self.gpus, **self.resources}
        return ", ".join(f"{k} {v:g}" for k, v in asks.items() if v)


class ReplicaActor:
    """One worker on a Ray node: loads the model once (in `ready`), then runs blocks."""

    def __init__(self, worker: int, spec: WorkerSpec) -> None:
        from ..worker.process import limit_threads

        self.entered = time.perf_counter()
        limit_threads(spec.threads)
        self.worker = worker
        self.spec = spec
        self.replica: Any = None
        self.cancelled: set[int] = set()
        self.last_end = 0.0
        # serving text generation: orders in, reports out, an engine thread in between
        self._orders: queue.SimpleQueue[Generate | StopSequence] = queue.SimpleQueue()
        self._reports: queue.SimpleQueue[WorkerMessage] = queue.SimpleQueue()

    def ready(self) -> WorkerMessage:
        import ray

        from ..worker.replica import Replica, error_info

        try:
            self.replica = Replica(self.worker, self.spec, self.entered)
        except Exception as exc:
            return WorkerFailed(self.worker, error_info(exc))
        node = ray.get_runtime_context().get_node_id()[:8]
        ip = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self.last_end = time.perf_counter()
        here = f"{socket.gethostname()} {ip} node {node}"
        members = tuple(getattr(self.replica.runner, "hosts", ()))
        if members:  # stage 0 / rank 0 is this actor
            members = (f"{socket.gethostname()} pid {os.getpid()} node {node}", *members[1:])
        self.replica.cancelled = self.cancelled.__contains__  # read between micro-batches
        ready: WorkerReady = self.replica.ready_message()
        if self.replica.text is not None:
            threading.Thread(target=self._engine_loop, name="distinfer-engine", daemon=True).start()
        return replace(ready, host=here, members=members)

    def generate(self, order: Generate | StopSequence) -> None:
        self._orders.put(order)

    def pieces(self) -> list[WorkerMessage]:
        """The engine's reports since the last call, waiting up to a second for the first."""
        try:
            got = [self._reports.get(timeout=1.0)]
        except queue.Empty:
            return []
        while True:
            try:
                got.append(self._reports.get_nowait())
            except queue.Empty:
                return got

    def _engine_loop(self) -> None:
        """Serving text generation: orders applied between engine steps, a report per step."""
        text = self.replica.text
        self._reports.put(text.step())
        while True:
            try:
                order = self._orders.get_nowait() if text.busy else self._orders.get(timeout=0.5)
            except queue.Empty:
                order = None
            while order is not None:
                if isinstance(order, Generate):
                    text.generate(order)
                else:
                    text.stop(order.request)
                try:
                    order = self._orders.get_nowait()
                except queue.Empty:
                    order = None
            if text.busy:
                self._reports.put(text.step())

    def cancel(self, block_id: int) -> None:
        self.cancelled.add(block_id)

    def infer(self, message: InferBatch) -> WorkerMessage:
        return self.replica.infer(message)  # type: ignore[no-any-return]

    def run(self, block: Block) -> WorkerMessage | None:
        from ..models.base import BlockCancelled
        from ..worker.replica import error_info

        if block.id in self.cancelled:
            self.cancelled.discard(block.id)
            return None
        waited = time.perf_counter() - self.last_end
        try:
            return self.replica.run(block, waited)  # type: ignore[no-any-return]
        except BlockCancelled:  # mid-block: the other copy's BlockDone is the block's
            return None
        except Exception as exc:
            return BlockFailed(self.worker, block.id, error_info(exc))
        finally:
            self.cancelled.discard(block.id)  # dealt with: the block may come back (a thief lost)
            self.last_end = time.perf_counter()


class RayBackend(Backend):
    def __init__(self, spec: WorkerSpec, options: RayOptions) -> None:
        # A pipeline's later stages are actors of their own, placed anywhere in the cluster.
        stage_options = {"num_cpus": options.cpus, "num_gpus": options.gpus, "resources": options.resources}
        super().__init__(replace(spec, stage_transport="ray", stage_options=stage_options))
        self.ray = ray = _import_ray()
        self.options = options
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            try:
                ray.init(address=options.address, include_dashboard=False, logging_level=logging.WARNING,
                         log_to_driver=True, configure_logging=True)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(
                    f"cannot connect to the Ray cluster at '{options.address}': {first}; "
                    "check --address (auto, ray://host:10001) and that 'ray start' ran on the head"
                ) from None
        remote = ray.remote(concurrency_groups={"control": 1})(_with_control_group(ReplicaActor))
        self._actor_class = remote.options(
            num_cpus=options.cpus, num_gpus=options.gpus, resources=options.resources or None,
            max_restarts=0, max_task_retries=0, max_concurrency=_concurrency(spec),
            runtime_env={"env_vars": worker_environment()},
        )
        self._actors: dict[int, Any] = {}
        self._refs: dict[Any, tuple[int, str]] = {}  # in-flight call -> (worker, what)
        self._ready: set[int] = set()
        # Serving sends from its event loop while a receiver thread waits in `receive`.
        self._lock = threading.Lock()

    def start(self, worker: int) -> None:
        actor = self._actor_class.remote(worker, self.spec)
        self._actors[worker] = actor
        self._refs[actor.ready.remote()] = (worker, "ready")

    def send(self, worker: int, message: Order) -> None:
        actor = self._actors.get(worker)
        if actor is None:
            return
        if isinstance(message, InferBatch):
            ref = actor.infer.remote(message)
            with self._lock:
                self._refs[ref] = (worker, "infer")
        elif isinstance(message, RunBlock):
            ref = actor.run.remote(message.block)
            with self._lock:
                self._refs[ref] = (worker, "run")
        elif isinstance(message, Generate | StopSequence):
            actor.generate.remote(message)  # its reports come back through `pieces`
        else:
            actor.cancel.remote(message.block)

    def receive(self, timeout: float) -> list[WorkerMessage]:
        with self._lock:
            refs = list(self._refs)
        if not refs:
            time.sleep(timeout)
            return []
        done, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
        if not done:
            return []
        with self._lock:
            refs = list(self._refs)
        done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        out: list[WorkerMessage] = []
        for ref in done:
            with self._lock:
                entry = self._refs.pop(ref, None)
            if entry is None:
                continue
            worker, _what = entry
            if worker not in self._actors:
                continue  # already reported gone
            try:
                message = self.ray.get(ref)
            except self.ray.exceptions.RayError as exc:
                out.append(WorkerLost(worker, _death_reason(worker, exc)))
                self._forget(worker)
                continue
            if isinstance(message, WorkerReady):
                self._ready.add(worker)
                if message.kv_pages:  # serving text generation: poll its reports from now on
                    self._poll(worker)
            if _what == "pieces":
                out.extend(message)
                self._poll(worker)
            elif message is not None:
                out.append(message)
        return out

    def _poll(self, worker: int) -> None:
        ref = self._actors[worker].pieces.remote()
        with self._lock:
            self._refs[ref] = (worker, "pieces")

    def _forget(self, worker: int) -> None:
        self._actors.pop(worker, None)
        self._ready.discard(worker)
        with self._lock:
            for ref in [r for r, (w, _) in self._refs.items() if w == worker]:
                del self._refs[ref]

    def stop(self, worker: int) -> None:
        actor = self._actors.get(worker)
        if actor is not None:
            self.ray.kill(actor, no_restart=True)
            self._forget(worker)

    def unready_reason(self) -> str | None:
        if self._ready:
            return None
        try:
            available = self.ray.cluster_resources()
        except Exception:
            return None
        have = ", ".join(f"{k} {v:g}" for k, v in sorted(available.items())
                         if not k.startswith(("node:", "memory", "object_store_memory")))
        return (
            f"Ray placed no worker: each asks for {self.options.describe()}, and the cluster "
            f"({have}) has no node with that free; lower --worker-cpus/--worker-gpus/--worker-resource "
            "or add nodes that offer them"
        )

    def close(self) -> None:
        for worker in list(self._actors):
            self.stop(worker)
        if self._owns_ray:
            self.ray.shutdown()


def _concurrency(spec: WorkerSpec) -> int:
    """Calls an actor runs at once: 1; a generation replica's next block beside the current
    one (two threads share its engine, worker/replica.py), so a finished sequence's place is
    taken by the next block's prompt at once; a text server's report poll beside its orders."""
    if spec.model.generation is None:
        return 1
    return 4 if spec.serving else 2


def _with_control_group(cls: type) -> type:
    """Put `cancel` in the "control" concurrency group, so it overtakes queued `run` calls."""
    import ray

    class Actor(cls):  # type: ignore[misc]
        @ray.method(concurrency_group="control")
        def cancel(self, block_id: int) -> None:
            super().cancel(block_id)

    Actor.__name__ = Actor.__qualname__ = "DistinferReplica"
    return Actor


def _death_reason(worker: int, exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((line for line in text if "died" in line.lower() or "node" in line.lower()),
                 text[0] if text else "")
    return f"worker {worker} actor was lost ({type(exc).__name__}: {first.strip()[:200]})"
