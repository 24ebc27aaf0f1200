"""Speculation in a real job: one of three local workers slowed 5x by the test hook. The
slow worker's last block is copied to a fast one, the copy commits, the original stops
mid-block, and every row is written once with the outputs of a job without the slow worker.
The model sleeps per batch (toy_models.slow_mlp), so the slow worker is slow whatever the
machine. How much time speculation saves is measured by benchmarks/speculation.py, not
here (a unit test must not depend on timing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

import distinfer
from distinfer.worker.replica import SLOW_WORKER_ENV


def _table(out: Path) -> tuple[np.ndarray, np.ndarray]:
    table = ds.dataset(str(out)).to_table().sort_by("row")
    return table.column("row").to_numpy(), np.stack(table.column("output").to_numpy(zero_copy_only=False))


def test_one_worker_slowed_5x_is_overtaken_at_the_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = np.random.default_rng(5).standard_normal((2400, 16)).astype(np.float32)
    path = tmp_path / "rows.npy"
    np.save(path, data)
    monkeypatch.setenv("TOY_DELAY_S", "0.1")  # 150 batches of 16: 7.5 s on two workers
    options = dict(model="toy_models:slow_mlp", input=str(path), batch_size=16, block_size=128,
                   threads_per_worker=1, strategy="data")  # fmt: skip
    distinfer.run(**options, workers=2, output=str(tmp_path / "two"))  # the reference
    monkeypatch.setenv(SLOW_WORKER_ENV, "2:5")  # worker 2 takes 5x as long per block
    three = distinfer.run(**options, workers=3, output=str(tmp_path / "three"))
    assert three.speculated >= 1 and three.speculation_won >= 1, three.summary()
    slow = next(w for w in three.worker_stats if w.worker == 2)
    assert slow.rows < 2400 // 3, three.summary()  # it was not waited for
    rows, got = _table(tmp_path / "three")
    want_rows, want = _table(tmp_path / "two")
    np.testing.assert_array_equal(rows, np.arange(2400))  # every row once
    np.testing.assert_array_equal(want_rows, rows)
    np.testing.assert_allclose(got, want, rtol=0, atol=0)  # same model, same rows, same process kind
    assert "speculation: " in three.summary()
