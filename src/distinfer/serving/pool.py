"""The replicas behind a server: the batch engine's backend (local processes or Ray actors)
run by one receiver thread, bridged to the server's event loop.

The event loop sends batches itself (`Backend.send` is safe beside a waiting `receive`);
the receiver thread waits for answers and losses and hands them to the loop, and it alone
starts and stops workers (the loop queues `StartWorker`/`StopWorker` orders, carried out in
the order given; `close` stops the rest once the thread has ended), so the backend's
bookkeeping has one writer.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable

from ..backends.base import Backend
from ..messages import Order, StartWorker, StopWorker, WorkerMessage

__all__ = ["ReplicaPool"]

Items = list[WorkerMessage]


class ReplicaPool:
    def __init__(
        self, backend: Backend, loop: asyncio.AbstractEventLoop, on_items: Callable[[Items], None]
    ) -> None:
        self.backend = backend
        self.loop = loop
        self.on_items = on_items
        # Workers to start and stop, in order (a stop before the replacement's start frees
        # the resources the replacement may need).
        self._orders: queue.SimpleQueue[StartWorker | StopWorker] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._receive_loop, name="distinfer-replicas", daemon=True)

    def start(self, workers: list[int]) -> None:
        for worker in workers:
            self._orders.put(StartWorker(worker))
        self._thread.start()

    def replace(self, worker: int) -> None:
        """Start worker `worker` (a replacement) from the receiver thread."""
        self._orders.put(StartWorker(worker))

    def stop(self, worker: int) -> None:
        """Stop worker `worker` from the receiver thread (a Ray actor is killed at once); no
        more messages come from it."""
        self._orders.put(StopWorker(worker))

    def send(self, worker: int, message: Order) -> None:
        self.backend.send(worker, message)

    def _receive_loop(self) -> None:
        while not self._closing.is_set():
            while True:
                try:
                    order = self._orders.get_nowait()
                except queue.Empty:
                    break
                if isinstance(order, StartWorker):
                    self.backend.start(order.worker)
                else:
                    self.backend.stop(order.worker)
            items = self.backend.receive(timeout=0.05)
            if items and not self._closing.is_set():
                try:
                    self.loop.call_soon_threadsafe(self.on_items, items)
                except RuntimeError:  # the loop closed under us: shutting down
                    return

    def close(self) -> None:
        """Stop the receiver thread, then every worker."""
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self.backend.close()
