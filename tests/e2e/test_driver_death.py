"""A driver killed with SIGKILL at random points: the same command resumes, the output equals a
fault-free run's (no row lost or duplicated), the parts written before each kill are reused,
and no worker outlives its driver by more than 5 s."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
from procs import worker_pids

HELPERS = Path(__file__).parent.parent / "helpers"


def _command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "distinfer.cli", "run", "--model", "toy_models:slow_mlp", "--input", str(data),
            "--output", str(out), "--workers", "2", "--batch-size", "16", "--block-size", "64",
            "--strategy", "data"]  # fmt: skip


def _table(out: Path) -> tuple[np.ndarray, np.ndarray]:
    t = ds.dataset(str(out)).to_table().sort_by("row")
    return t.column("row").to_numpy(), np.stack(t.column("output").to_numpy(zero_copy_only=False))


def _parts(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}


def test_sigkill_the_driver_at_random_points_then_resume(tmp_path: Path) -> None:
    data = np.random.default_rng(7).standard_normal((2400, 16)).astype(np.float32)
    path = tmp_path / "rows.npy"
    np.save(path, data)
    env = {**os.environ, "PYTHONPATH": str(HELPERS), "TOY_DELAY_S": "0"}
    clean = subprocess.run(_command(path, tmp_path / "clean"), env=env, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    env["TOY_DELAY_S"] = "0.2"  # 150 batches: about 15 s of work, many runs' worth at one kill each

    out = tmp_path / "out"
    rng = random.Random(3)
    kills = 0
    written: list[dict[str, int]] = []  # the parts on disk at each kill
    for _ in range(12):  # bounded: a kill at a random point of each run until the job is done
        proc = subprocess.Popen(_command(path, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + rng.uniform(0.5, 4.0)
        workers: list[int] = []
        while time.monotonic() < deadline and proc.poll() is None:
            workers = worker_pids(proc.pid) or workers
            time.sleep(0.02)
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
        written.append(_parts(out))
        gone_by = time.monotonic() + 5.0
        while time.monotonic() < gone_by and any(_alive(w) for w in workers):
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)], "a worker outlived its killed driver by 5 s"
    else:
        last = subprocess.run(_command(path, out), env=env, capture_output=True, text=True, timeout=300)
        assert last.returncode == 0, last.stderr
    assert kills >= 5, f"only {kills} kills landed before the job finished"
    # the work committed before each kill is reused: those parts were never written again
    final = _parts(out)
    before = sum(len(parts) for parts in written)
    kept = sum(final.get(name) == mtime for parts in written for name, mtime in parts.items())
    assert before and kept >= 0.95 * before, f"only {kept} of {before} parts written before a kill were kept"
    rows, values = _table(out)
    want_rows, want = _table(tmp_path / "clean")
    np.testing.assert_array_equal(rows, np.arange(len(data)))
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(values, want)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
