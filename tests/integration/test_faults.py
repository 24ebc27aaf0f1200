"""Worker loss: a worker killed with SIGKILL mid-job loses and duplicates nothing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from procs import kill, wait_for, worker_pids

import distinfer


def test_sigkilled_worker_is_replaced_and_output_is_exact(
    vectors: tuple[Path, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import toy_models

    monkeypatch.setenv("TOY_DELAY_S", "0.03")  # ~0.3 s per 64-row block
    path, data = vectors
    out = tmp_path / "out"
    killed: list[int] = []

    def killer() -> None:
        wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 2, 60, "two finished blocks")
        victim = worker_pids(os.getpid())[0]
        kill(victim, signal.SIGKILL)
        killed.append(victim)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    report = distinfer.run(model="toy_models:slow_mlp", input=str(path), output=str(out),
                           workers=2, batch_size=16, block_size=64, min_block_size=32)
    thread.join(timeout=5)
    assert killed, "the test did not get to kill a worker"
    assert report.restarts == 1
    assert any("SIGKILL" in w.lost for w in report.worker_stats)

    table = ds.dataset(str(out)).to_table().sort_by("row")
    rows = table.column("row").to_numpy()
    np.testing.assert_array_equal(rows, np.arange(len(data)))  # none lost, none twice
    with torch.inference_mode():
        reference = toy_models.mlp()(torch.from_numpy(data))
    got = torch.tensor(np.asarray(table.column("output").to_pylist(), dtype=np.float32))
    torch.testing.assert_close(got, reference)
    assert json.loads((out / "_manifest.json").read_text())["complete"] is True


def test_workers_that_keep_dying_fail_the_job_with_a_clear_error(
    vectors: tuple[Path, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOY_DELAY_S", "0.2")
    path, _ = vectors
    out = tmp_path / "out"
    stop = threading.Event()

    def keep_killing() -> None:
        while not stop.is_set():
            for pid in worker_pids(os.getpid()):
                with contextlib.suppress(ProcessLookupError):
                    kill(pid, signal.SIGKILL)
            stop.wait(0.1)

    thread = threading.Thread(target=keep_killing, daemon=True)
    thread.start()
    try:
        with pytest.raises(distinfer.JobFailedError, match=r"SIGKILL|died"):
            distinfer.run(model="toy_models:slow_mlp", input=str(path), output=str(out),
                          workers=1, max_restarts=2, start_timeout_s=60)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert json.loads((out / "_manifest.json").read_text())["complete"] is False
