"""Speculation in a real job: one of three local workers slowed 5x by the test hook; the job
finishes within 1.3x of the time the two others take alone, with no row lost or duplicated.
The model sleeps per batch (toy_models.slow_mlp), so the times are sleeps, not CPU shares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

import distinfer
from distinfer.worker.replica import SLOW_WORKER_ENV


def test_one_worker_slowed_5x_costs_little_with_speculation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = np.random.default_rng(5).standard_normal((2400, 16)).astype(np.float32)
    path = tmp_path / "rows.npy"
    np.save(path, data)
    monkeypatch.setenv("TOY_DELAY_S", "0.1")  # 150 batches of 16: 7.5 s on two workers
    options = dict(model="toy_models:slow_mlp", input=str(path), batch_size=16, block_size=128,
                   threads_per_worker=1, strategy="data")  # fmt: skip
    two = distinfer.run(**options, workers=2, output=str(tmp_path / "two"))
    monkeypatch.setenv(SLOW_WORKER_ENV, "2:5")  # worker 2 takes 5x as long per block
    three = distinfer.run(**options, workers=3, output=str(tmp_path / "three"))
    baseline = two.wall_s - two.startup_s
    with_slow = three.wall_s - three.startup_s
    assert three.speculated >= 1 and three.speculation_won >= 1, three.summary()
    assert with_slow <= 1.3 * baseline, (with_slow, baseline, three.summary())
    rows = ds.dataset(str(tmp_path / "three")).to_table().column("row").to_numpy()
    np.testing.assert_array_equal(np.sort(rows), np.arange(2400))  # once each
    assert "speculation: " in three.summary()
