"""An in-process stand-in for replicas, and a server on it in a background thread, so the
HTTP app and the batcher are tested fast and deterministically (no model, no processes).

The fake model takes text and returns `length` (int64, characters per row) and `pair`
(float32, [length, batch rows]); a row "boom" makes its whole batch fail with a
ModelInputError, as a bad row would. Replicas named in `hang` never become ready; those in
`fail` report WorkerFailed with that error; `stopped` records the backend's stop calls."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from distinfer import messages as msg
from distinfer.backends.base import Backend
from distinfer.errors import ErrorInfo
from distinfer.models.base import TensorInfo
from distinfer.serving.config import ServeConfig

INPUTS = (TensorInfo("text", "text", (-1,)),)
OUTPUTS = (TensorInfo("length", "<i8", (-1,)), TensorInfo("pair", "<f4", (-1, 2)))


class FakeBackend(Backend):
    def __init__(self, batch_s: float = 0.0, hang: Iterable[int] = (),
                 fail: Mapping[int, ErrorInfo] | None = None) -> None:
        self.batch_s = batch_s
        self.hang = set(hang)
        self.fail = dict(fail or {})
        self.events: queue.Queue[Any] = queue.Queue()
        self.started: list[int] = []
        self.stopped: list[int] = []
        self.batches: list[tuple[int, list[str]]] = []  # (worker, texts) as they arrived
        self.dead: set[int] = set()
        self.lock = threading.Lock()

    def start(self, worker: int) -> None:
        self.started.append(worker)
        if worker in self.fail:
            self.events.put(msg.WorkerFailed(worker, self.fail[worker]))
        elif worker not in self.hang:
            self.events.put(msg.WorkerReady(worker, 1000 + worker, "fake", 0.0, (), INPUTS, OUTPUTS))

    def send(self, worker: int, message: Any) -> None:
        assert isinstance(message, msg.InferBatch)
        texts = list(message.inputs["text"])
        with self.lock:
            self.batches.append((worker, texts))

        def answer() -> None:
            if worker in self.dead:
                return
            if "boom" in texts:
                error = ErrorInfo("ModelInputError", "a row says boom", fatal=True)
                self.events.put(msg.BatchFailed(worker, message.batch_id, error))
                return
            lengths = np.array([len(t) for t in texts], dtype=np.int64)
            pair = np.stack([lengths, np.full(len(texts), len(texts))], axis=1).astype(np.float32)
            self.events.put(msg.BatchDone(worker, message.batch_id, {"length": lengths, "pair": pair},
                                          self.batch_s))

        if self.batch_s:
            threading.Timer(self.batch_s, answer).start()
        else:
            answer()

    def kill(self, worker: int) -> None:
        self.dead.add(worker)
        self.events.put(msg.WorkerLost(worker, f"worker {worker} was killed by SIGKILL"))

    def receive(self, timeout: float) -> list[Any]:
        try:
            first = self.events.get(timeout=timeout)
        except queue.Empty:
            return []
        items = [first]
        while not self.events.empty():
            items.append(self.events.get_nowait())
        return items

    def stop(self, worker: int) -> None:
        self.stopped.append(worker)
        self.dead.add(worker)

    def close(self) -> None:
        pass

    def texts_seen(self) -> list[str]:
        with self.lock:
            return [t for _, texts in self.batches for t in texts]


@dataclass
class Running:
    url: str
    backend: FakeBackend
    server: Any  # InferenceServer
    loop: asyncio.AbstractEventLoop

    def call(self, fn: Any) -> Any:
        """Run `fn()` on the server's loop and return its result (coroutines awaited)."""

        async def wrapped() -> Any:
            result = fn()
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout=30)

    def metric(self, line_start: str) -> float:
        import requests

        text = requests.get(self.url + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


@contextmanager
def fake_server(backend: Backend | None = None, ready_timeout: float = 10.0, **options: Any) -> Iterator[Running]:
    """A real aiohttp server on 127.0.0.1 (a free port) over a FakeBackend (or the backend
    given); the model is called "fake" in URLs."""
    from aiohttp import web

    from distinfer.serving.app import make_app
    from distinfer.serving.metrics import ServerMetrics
    from distinfer.serving.server import InferenceServer

    backend = backend or FakeBackend()
    config = ServeConfig(model="minilm", **{"replicas": 2, "max_queue_delay_ms": 5.0, **options})
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def setup() -> tuple[Any, Any, str]:
        metrics = ServerMetrics()
        server = InferenceServer(config, backend, metrics, "fake", "fake")
        runner = web.AppRunner(make_app(server, metrics, config.max_body_bytes), handler_cancellation=True,
                               access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server.start()
        host, port = runner.addresses[0][:2]
        return server, runner, f"http://{host}:{port}"

    server, runner, url = asyncio.run_coroutine_threadsafe(setup(), loop).result(timeout=30)
    running = Running(url, backend, server, loop)  # type: ignore[arg-type]
    deadline = time.monotonic() + ready_timeout
    while not running.call(server.is_ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield running
    finally:
        async def teardown() -> None:
            await runner.cleanup()
            server.close()

        asyncio.run_coroutine_threadsafe(teardown(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
