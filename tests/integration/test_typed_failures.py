"""A failure caused by the input is a typed result, not a lost worker: a model that raises in a
pipeline's later stage or stage 0, or on the ranks of a tensor-parallel group, fails that block
(or serving batch) with the error as it was raised (kind, fatality), naming the input's absolute
rows; the group stays up, in step, and its next block equals the model's output."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from fake_serving import fake_server
from poison_family import MARK, POISON_MODEL, register

import distinfer
from distinfer.backends.local import LocalBackend
from distinfer.config import RunConfig
from distinfer.data.blocks import block_sizes
from distinfer.driver.job import run_job
from distinfer.errors import JobFailedError, ModelInputError, RowsError
from distinfer.messages import BlockFailed, WorkerLost, WorkerMessage, WorkerSpec
from distinfer.models import parse_model
from distinfer.models.base import StageTimer, run_block
from distinfer.models.decoder import DecoderRunner
from distinfer.report import JobReport
from distinfer.serving.config import ServeConfig
from distinfer.serving.main import worker_spec
from distinfer.worker.pipeline import PipelineRunner
from distinfer.worker.replica import name_rows
from distinfer.worker.tensor import TensorParallelRunner

register()

BATCH = 16
BLOCK = 64  # every block: min_block_size too
ROWS = 192  # three blocks: 0-63, 64-127, 128-191


class Watched(LocalBackend):
    """The local backend, recording the workers it starts and what they say."""

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self.started: list[int] = []
        self.said: list[WorkerMessage] = []

    def start(self, worker: int) -> None:
        self.started.append(worker)
        super().start(worker)

    def receive(self, timeout: float) -> list[WorkerMessage]:
        got = super().receive(timeout)
        self.said.extend(got)
        return got


def run_watched(**options: Any) -> tuple[Callable[[], Watched], Callable[[], JobReport]]:
    """(the job's backend, once it ran; running the job) for a job of three 64-row blocks."""
    backends: list[Watched] = []

    def factory(spec: WorkerSpec) -> Watched:
        backends.append(Watched(spec))
        return backends[-1]

    config = RunConfig.build({"workers": 1, "batch_size": BATCH, "block_size": BLOCK, "min_block_size": BLOCK,
                              **options})
    assert block_sizes(ROWS, BLOCK, BLOCK) == [BLOCK] * 3
    return (lambda: backends[0]), (lambda: run_job(config, factory))


def assert_no_worker_lost(backend: Watched) -> None:
    assert backend.started == [0], "a replacement worker was started"
    assert not [m for m in backend.said if isinstance(m, WorkerLost)]


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "_manifest.json").read_text())  # type: ignore[no-any-return]


# -- error naming --------------------------------------------------------------------------


def test_a_bad_token_id_row_names_its_absolute_row(tmp_path: Path) -> None:
    ids = np.random.default_rng(0).integers(0, 500, (200, 12)).astype(np.int64)
    ids[137, 3] = -1  # padding followed by ids: not a valid row
    path = tmp_path / "badids.npy"
    np.save(path, ids)
    out = tmp_path / "out"
    with pytest.raises(ModelInputError) as caught:
        distinfer.run(model="decoder-tiny", input=str(path), output=str(out), workers=1)
    message = str(caught.value)
    assert isinstance(caught.value, distinfer.DistinferError)
    assert message.startswith("badids.npy row 137: "), message
    assert "row 73" not in message and "block" not in message and message.count("137") == 1
    assert manifest(out)["complete"] is False


# -- pipelines -----------------------------------------------------------------------------


def guarded_spec() -> Any:
    spec = parse_model("toy_models:guarded_mlp")
    return spec.family.staged(spec)


@pytest.fixture(scope="module")
def pipeline() -> Iterator[PipelineRunner]:
    # guarded_mlp's first layers and their inf guard in stage 0, its NaN guard in stage 1
    runner = PipelineRunner(guarded_spec(), ((0, 4), (4, 8)), 1)
    yield runner
    runner.close()


def vectors(rows: int) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((rows, 16)).astype(np.float32)


def test_a_later_stage_that_raises_fails_the_block_and_the_pipeline_goes_on(pipeline: PipelineRunner) -> None:
    data = vectors(64)
    want = run_block(pipeline, {"input": data}, BATCH, StageTimer())
    bad = data.copy()
    bad[20, 3] = np.nan  # micro-batch 1 (rows 16-31), streamed last: the fill-and-drain order moves it
    for _ in range(2):
        with pytest.raises(RowsError) as caught:
            run_block(pipeline, {"input": bad}, BATCH, StageTimer())
        assert caught.value.error.kind == "AssertionError" and not caught.value.error.fatal
        assert caught.value.batch == 1 and caught.value.rows == tuple(range(16, 32))
        assert caught.value.error.message == "a result row is NaN"
        got = run_block(pipeline, {"input": data}, BATCH, StageTimer())  # links still aligned
        np.testing.assert_array_equal(got["output"], want["output"])


def test_stage_0_that_raises_collects_what_it_sent_then_raises(pipeline: PipelineRunner) -> None:
    data = vectors(64)
    want = run_block(pipeline, {"input": data}, BATCH, StageTimer())
    bad = data.copy()
    bad[40, 0] = np.inf  # stage 0's guard, on micro-batch 2: micro-batches 0 and 2 were sent before it
    with pytest.raises(RowsError) as caught:
        run_block(pipeline, {"input": bad}, BATCH, StageTimer())
    assert caught.value.error.kind == "AssertionError" and caught.value.rows == tuple(range(32, 48))
    both = bad.copy()
    both[5, 0] = np.nan  # micro-batch 0 fails in stage 1, then micro-batch 2 in stage 0
    with pytest.raises(RowsError) as caught:
        run_block(pipeline, {"input": both}, BATCH, StageTimer())
    assert caught.value.rows == tuple(range(16))
    got = run_block(pipeline, {"input": data}, BATCH, StageTimer())
    np.testing.assert_array_equal(got["output"], want["output"])
    stats = pipeline.group_stats()
    assert stats is not None and stats.micro_batches == 4


def test_a_pipeline_job_fails_the_block_on_the_same_group(tmp_path: Path) -> None:
    data = vectors(ROWS)
    data[150, 7] = np.nan  # block 2 (128-191), micro-batch 1: rows 144-159
    path = tmp_path / "rows.npy"
    np.save(path, data)
    out = tmp_path / "out"
    backend, go = run_watched(model="toy_models:guarded_mlp", input=str(path), output=str(out),
                              strategy="pipeline", stages=2)
    # Not the input's fault as far as distinfer knows (an AssertionError): retried, on the same group.
    with pytest.raises(JobFailedError, match=r"failed 3 times; last error: AssertionError: rows\.npy rows "
                                             r"144-159: a result row is NaN$"):
        go()
    watched = backend()
    assert_no_worker_lost(watched)
    failed = [m for m in watched.said if isinstance(m, BlockFailed)]
    assert [(m.worker, m.block) for m in failed] == [(0, 2)] * 3
    assert manifest(out)["complete"] is False


# -- tensor parallelism --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tensor_group() -> Iterator[TensorParallelRunner]:
    tp = TensorParallelRunner(parse_model("decoder-tiny"), 2, 1)
    yield tp
    tp.close()


def test_ranks_that_all_raise_at_the_same_point_stay_in_step(
    tensor_group: TensorParallelRunner, corpus_lines: list[str]
) -> None:
    texts = {"text": corpus_lines[:40]}
    want = run_block(tensor_group, texts, 8, StageTimer())
    batches = tensor_group.prepare(texts, 8).batches
    ids, mask = batches[2]
    ids = ids.clone()
    ids[1, 0] = 10**6  # past the vocabulary: every rank's (replicated) embedding raises, before any collective
    with pytest.raises(RowsError) as caught:
        tensor_group.forward_many([batches[0], batches[1], (ids, mask), batches[3]])
    assert caught.value.error.kind == "IndexError" and not caught.value.error.fatal and caught.value.batch == 2
    got = run_block(tensor_group, texts, 8, StageTimer())
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value)


def test_rank_0_raising_after_the_last_collective_stays_in_step(
    tensor_group: TensorParallelRunner, corpus_lines: list[str]
) -> None:
    texts = {"text": corpus_lines[:40]}
    want = run_block(tensor_group, texts, 8, StageTimer())
    model = tensor_group._model
    calls = []

    def third_fails(ids: torch.Tensor, mask: torch.Tensor) -> Any:
        out = model(ids, mask)
        calls.append(len(ids))
        if len(calls) == 3:
            raise ModelInputError("refused", row=1)
        return out

    tensor_group._model = third_fails
    try:
        with pytest.raises(RowsError) as caught:
            run_block(tensor_group, texts, 8, StageTimer())
    finally:
        tensor_group._model = model
    prepared = tensor_group.prepare(texts, 8)
    assert prepared.order is not None and len(calls) == len(prepared.batches)  # the block went on to its end
    first = sum(len(b[0]) for b in prepared.batches[:2])
    assert caught.value.error.kind == "ModelInputError" and caught.value.error.fatal
    assert caught.value.rows == (int(prepared.order[first + 1]),)
    got = run_block(tensor_group, texts, 8, StageTimer())
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value)


# -- the poison family: fatal input errors in every strategy -------------------------------


def poisoned_lines(corpus_lines: list[str], row: int) -> list[str]:
    lines = list(corpus_lines[:ROWS])
    lines[row] = f"{lines[row]} {MARK}"
    return lines


def micro_batch_of(lines: list[str], row: int) -> list[int]:
    """The input rows of the micro-batch that holds `row` (text rows are sorted by length)."""
    start = row - row % BLOCK
    prepared = DecoderRunner("tiny").prepare({"text": lines[start : start + BLOCK]}, BATCH)
    assert prepared.order is not None
    offset = 0
    for ids, _ in prepared.batches:
        chosen = [start + int(r) for r in prepared.order[offset : offset + len(ids)]]
        if row in chosen:
            return chosen
        offset += len(ids)
    raise AssertionError("row not found")


@pytest.mark.parametrize("options", [{"strategy": "pipeline", "stages": 2},
                                     {"strategy": "tensor", "tensor_parallel": 2}, {}],
                         ids=["pipeline", "tensor", "data"])
def test_a_poisoned_row_fails_the_job_once_naming_its_micro_batch(
    tmp_path: Path, corpus_lines: list[str], options: dict[str, Any]
) -> None:
    lines = poisoned_lines(corpus_lines, 137)
    path = tmp_path / "verses.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    backend, go = run_watched(model=POISON_MODEL, input=str(path), output=str(out), **options)
    with pytest.raises(ModelInputError) as caught:
        go()
    rows = micro_batch_of(lines, 137)
    names = name_rows(rows)
    assert str(caught.value) == (f"verses.txt {names} ({name_rows([r + 1 for r in rows], 'line')}): "
                                 f"a row holds the marked character {MARK!r}")
    assert re.search(r"\b137\b", names) and "block" not in str(caught.value)
    watched = backend()
    assert_no_worker_lost(watched)
    assert [m.block for m in watched.said if isinstance(m, BlockFailed)] == [2]  # fatal: once
    assert manifest(out)["complete"] is False


@pytest.mark.parametrize("options", [{"strategy": "pipeline", "stages": 2},
                                     {"strategy": "tensor", "tensor_parallel": 2}],
                         ids=["pipeline", "tensor"])
def test_a_model_parallel_replica_answers_400_then_serves_the_next_request(
    corpus_lines: list[str], options: dict[str, Any]
) -> None:
    texts = corpus_lines[:4]
    want = run_block(DecoderRunner("tiny"), {"text": texts}, 64, StageTimer())
    config = ServeConfig(model=POISON_MODEL, replicas=1, max_batch_size=8, **options)
    with fake_server(LocalBackend(worker_spec(config)), ready_timeout=120, replicas=1, max_batch_size=8) as s:
        bad = requests.post(s.url + "/text", json=[texts[0], f"{texts[1]} {MARK}", texts[2]], timeout=60)
        assert bad.status_code == 400, bad.text
        assert "a row holds the marked character" in bad.json()["error"]
        good = requests.post(s.url + "/text", json=texts, timeout=60)
        assert good.status_code == 200, good.text
        assert s.server.restarts == 0 and s.server.ready_count() == 1
    np.testing.assert_allclose(np.asarray(good.json()["outputs"]["hidden"], dtype=np.float32), want["hidden"],
                               rtol=1e-5, atol=1e-5)
