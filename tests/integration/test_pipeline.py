"""Pipeline parallelism on the local backend: stage processes hold only their layers and
the output equals the unsplit model; the memory-limit refusal for data parallelism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

import distinfer
from distinfer.models.base import StageTimer, run_block
from distinfer.models.decoder import DecoderRunner


def outputs(out: Path) -> dict[str, np.ndarray]:
    table = ds.dataset(str(out)).to_table().sort_by("row")
    return {name: np.asarray(table.column(name).to_pylist()) for name in table.column_names}


@pytest.fixture(scope="module")
def reference(corpus_lines: list[str]) -> dict[str, np.ndarray]:
    return run_block(DecoderRunner("tiny"), {"text": corpus_lines[:300]}, 16, StageTimer())


@pytest.mark.parametrize(("workers", "stages", "cuts"), [(1, 2, None), (1, 3, None), (2, 2, None), (1, None, (3, 6))],
                         ids=["2-stages", "3-stages", "hybrid-2x2", "explicit-cuts"])
def test_pipeline_equals_the_unsplit_model(
    small_corpus: Path, tmp_path: Path, reference: dict[str, np.ndarray],
    workers: int, stages: int | None, cuts: tuple[int, ...] | None, capfd: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    report = distinfer.run(model="decoder-tiny", input=str(small_corpus), output=str(out), workers=workers,
                           strategy="pipeline", stages=stages, cuts=cuts, batch_size=16, block_size=128)
    assert report.rows == 300
    got = outputs(out)
    np.testing.assert_array_equal(got["row"], np.arange(300))
    torch.testing.assert_close(torch.tensor(got["hidden"], dtype=torch.float32),
                               torch.from_numpy(reference["hidden"]))
    np.testing.assert_array_equal(got["next_token"], reference["next_token"])
    printed = capfd.readouterr().err
    assert f"pipeline of {len(cuts) + 1 if cuts else stages} stages for decoder-tiny" in printed


def test_data_strategy_refuses_a_model_larger_than_worker_memory(tmp_path: Path, small_corpus: Path) -> None:
    with pytest.raises(distinfer.ConfigError, match=r"'decoder-1b' has 4.6 GiB of weights, more than "
                                                    r"--worker-memory 2GiB leaves.*--strategy pipeline --stages 4"):
        distinfer.run(model="decoder-1b", input=str(small_corpus), output=str(tmp_path / "o"),
                      worker_memory="2GiB")


def test_pipeline_needs_a_model_that_can_be_cut(tmp_path: Path, small_corpus: Path) -> None:
    with pytest.raises(distinfer.ConfigError, match="'minilm' runs with --strategy data"):
        distinfer.run(model="minilm", input=str(small_corpus), output=str(tmp_path / "o"), strategy="pipeline")
