"""A block cancelled while it runs (a losing speculative copy, a block stolen after it
started) stops at its next micro-batch and writes nothing; a worker told to stop drops its
running block the same way. The worker's blocks are made to last minutes (the slow-worker
hook, 200x), so "it stopped" is told apart from "it finished" by a bound far from both."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from distinfer.backends.local import LocalBackend
from distinfer.config import RunConfig
from distinfer.data.blocks import Block
from distinfer.data.sink import part_name
from distinfer.driver.job import _Job
from distinfer.messages import BlockDone, BlockStarted, Cancel, RunBlock, WorkerMessage, WorkerReady
from distinfer.worker.replica import SLOW_WORKER_ENV

_BOUND_S = 30.0  # a cancelled block stops within this; a whole one takes over 60 s


def _wait_for(backend: LocalBackend, kind: type, bound_s: float) -> list[WorkerMessage]:
    """Every message up to and including the first of `kind` (or fail after `bound_s`)."""
    said: list[WorkerMessage] = []
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        said += backend.receive(timeout=0.5)
        if any(isinstance(m, kind) for m in said):
            return said
    raise AssertionError(f"no {kind.__name__} within {bound_s:g} s; got {said}")


def test_a_cancelled_running_block_stops_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rows.npy"
    np.save(path, np.random.default_rng(0).standard_normal((128, 16)).astype(np.float32))
    monkeypatch.setenv("TOY_DELAY_S", "0.05")  # 8 batches of 8: 0.4 s of model per block ...
    monkeypatch.setenv(SLOW_WORKER_ENV, "0:200")  # ... and 80 s of the hook's pause after it
    out = tmp_path / "out"
    config = RunConfig.build({"model": "toy_models:slow_mlp", "input": str(path), "output": str(out),
                              "workers": 1, "batch_size": 8, "strategy": "data"})  # fmt: skip
    backend = LocalBackend(_Job(config, lambda spec: None).spec)  # type: ignore[arg-type,return-value]
    try:
        backend.start(0)
        _wait_for(backend, WorkerReady, 120)
        backend.send(0, RunBlock(Block(0, 0, 64)))
        _wait_for(backend, BlockStarted, _BOUND_S)
        backend.send(0, Cancel(0, 0))
        backend.send(0, RunBlock(Block(1, 64, 128)))
        said = _wait_for(backend, BlockStarted, _BOUND_S)  # block 0 was dropped: 1 starts
        assert [m.block for m in said if isinstance(m, BlockStarted)] == [1]
        assert not [m for m in said if isinstance(m, BlockDone)]
        assert not (out / part_name(0)).exists()
        worker = backend._procs[0]
        backend.stop(0)  # the job is over: block 1, still running, is dropped too
        worker.join(_BOUND_S)
        assert worker.exitcode == 0, "the worker did not stop by itself"
        assert not (out / part_name(1)).exists()
    finally:
        backend.close()
