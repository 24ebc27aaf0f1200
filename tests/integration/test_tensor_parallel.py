"""Tensor parallelism: two rank processes holding half of every block give the same outputs as
the whole model in one process; the group reports per-rank figures; a dead rank ends rank 0's
process (exit code 3) instead of hanging it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

from distinfer.errors import ModelError
from distinfer.models import ModelSpec, parse_model
from distinfer.models.base import Runner, StageTimer, run_block
from distinfer.models.decoder import DecoderRunner
from distinfer.models.families.onnx_file import OnnxFamily
from distinfer.models.minilm import MiniLMRunner
from distinfer.worker.tensor import TensorParallelRunner

ROWS = 100
BATCH = 16


def single(name: str) -> Runner:
    return MiniLMRunner() if name == "minilm" else DecoderRunner(name)


@pytest.fixture(scope="module", params=[("decoder-tiny", "shm"), ("decoder-small", "shm"), ("minilm", "shm"),
                                        ("decoder-tiny", "gloo")], ids=lambda p: "-".join(p))
def runner(request: pytest.FixtureRequest) -> Iterator[tuple[str, TensorParallelRunner]]:
    name, comm = request.param
    tp = TensorParallelRunner(parse_model(name), 2, 1, comm=comm)
    yield name, tp
    tp.close()
    assert not any(proc.is_alive() for proc in tp._group.procs)


def test_two_ranks_equal_the_whole_model(runner: tuple[str, TensorParallelRunner], corpus_lines: list[str]) -> None:
    name, tp = runner
    inputs = {"text": corpus_lines[:ROWS]}
    expected = run_block(single(name), inputs, BATCH, StageTimer())
    got = run_block(tp, inputs, BATCH, StageTimer())
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert len(got[key]) == ROWS
        if value.dtype.kind == "f":
            torch.testing.assert_close(torch.from_numpy(got[key]), torch.from_numpy(value))
        else:
            np.testing.assert_array_equal(got[key], value)

    stats = tp.group_stats()
    assert stats is not None and stats.kind == "rank"
    assert stats.micro_batches == len(tp.prepare(inputs, BATCH).batches)
    assert len(stats.busy_s) == len(stats.comm_s) == len(stats.peak_rss) == 2
    assert all(s > 0 for s in stats.busy_s) and all(s > 0 for s in stats.comm_s)
    assert all(rss > 50 << 20 for rss in stats.peak_rss)
    assert stats.wall_s >= max(b + c for b, c in zip(stats.busy_s, stats.comm_s, strict=True)) * 0.9


def test_models_that_cannot_be_sharded_are_refused_before_any_process_starts() -> None:
    with pytest.raises(ModelError, match=r"8 attention heads .* --tensor-parallel 3 does not divide both"):
        TensorParallelRunner(parse_model("decoder-small"), 3, 1)
    with pytest.raises(ModelError, match="runs with --strategy data or pipeline"):
        TensorParallelRunner(ModelSpec("model.onnx", OnnxFamily()), 2, 1)
    if torch.cuda.device_count() < 2:
        with pytest.raises(ModelError, match=r"puts each rank on a GPU of its own, but this machine has \d"):
            TensorParallelRunner(parse_model("decoder-tiny"), 2, 1, device="cuda")


_VICTIM = """
import sys
from distinfer.models.base import StageTimer, run_block
from distinfer.models import parse_model
from distinfer.worker.tensor import TensorParallelRunner

tp = TensorParallelRunner(parse_model("decoder-tiny"), 2, 1, comm=sys.argv[1])
print(tp._group.procs[0].pid, flush=True)
while True:
    run_block(tp, {"text": ["In the beginning God created the heaven and the earth."] * 32}, 8, StageTimer())
"""


@pytest.mark.parametrize("comm", ["shm", "gloo"])
def test_a_dead_rank_ends_rank_0_with_exit_code_3(comm: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _VICTIM, comm], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        rank_1 = int(proc.stdout.readline())
        os.kill(rank_1, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, err
    assert "distinfer: tensor-parallel group lost: rank 1 died (exit code -9)" in err


@pytest.mark.parametrize("comm", ["auto", "gloo"])
def test_a_tensor_parallel_job_equals_the_unsplit_model(
    small_corpus: Path, tmp_path: Path, corpus_lines: list[str], comm: str
) -> None:
    import distinfer

    report = distinfer.run(model="decoder-tiny", input=str(small_corpus), output=str(tmp_path / "out"), workers=1,
                           strategy="tensor", tensor_parallel=2, tensor_comm=comm, batch_size=16, block_size=128)
    table = ds.dataset(str(tmp_path / "out")).to_table().sort_by("row")
    want = run_block(DecoderRunner("tiny"), {"text": corpus_lines[:300]}, 16, StageTimer())
    np.testing.assert_array_equal(np.asarray(table.column("row")), np.arange(300))
    torch.testing.assert_close(torch.tensor(table.column("hidden").to_pylist()), torch.from_numpy(want["hidden"]))
    np.testing.assert_array_equal(np.asarray(table.column("next_token")), want["next_token"])
    [worker] = report.worker_stats
    assert worker.group is not None and worker.group.kind == "rank" and len(worker.group.members) == 2
    assert all(b > 0 for b in worker.group.busy_s) and all(c > 0 for c in worker.group.comm_s)


def test_models_that_cannot_be_sharded_are_refused_before_any_worker_starts(
    small_corpus: Path, tmp_path: Path
) -> None:
    import distinfer

    with pytest.raises(distinfer.ConfigError, match=r"'decoder-small' has 8 attention heads .* use one of 2, 4, 8"):
        distinfer.run(model="decoder-small", input=str(small_corpus), output=str(tmp_path / "o"),
                      strategy="tensor", tensor_parallel=3)
    with pytest.raises(distinfer.ConfigError, match="add --strategy tensor"):
        distinfer.run(model="decoder-small", input=str(small_corpus), output=str(tmp_path / "o"), strategy="data",
                      tensor_parallel=2)


def test_ranks_that_cannot_run_here_are_refused_before_any_output(small_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    base = [sys.executable, "-m", "distinfer.cli", "run", "--model", "decoder-tiny", "--input", str(small_corpus),
            "--output", str(out), "--strategy", "tensor", "--tensor-parallel", "2", "--no-progress"]
    nccl = subprocess.run([*base, "--tensor-comm", "nccl"], capture_output=True, text=True, timeout=120)
    assert nccl.returncode != 0
    assert "--tensor-comm shm and gloo work on the CPU, nccl with --device cuda" in nccl.stderr
    if torch.cuda.device_count() < 2:
        gpus = subprocess.run([*base, "--device", "cuda"], capture_output=True, text=True, timeout=120)
        assert gpus.returncode != 0
        assert "puts each rank on a GPU of its own, but this machine has" in gpus.stderr
    assert not out.exists()
