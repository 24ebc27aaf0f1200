"""Pipeline parallelism on the local backend: stage processes hold only their layers and
the output equals the unsplit model; the memory-limit refusal for data parallelism."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

import distinfer
from distinfer.models.base import Runner, StageTimer, run_block
from distinfer.models.decoder import DecoderRunner
from distinfer.models.minilm import MiniLMRunner


def outputs(out: Path) -> dict[str, np.ndarray]:
    table = ds.dataset(str(out)).to_table().sort_by("row")
    return {name: np.asarray(table.column(name).to_pylist()) for name in table.column_names}


_REFERENCES: dict[str, dict[str, np.ndarray]] = {}


def reference(model: str, lines: list[str]) -> dict[str, np.ndarray]:
    """The unsplit model's outputs in one process."""
    if model not in _REFERENCES:
        runner: Runner = DecoderRunner("tiny") if model == "decoder-tiny" else MiniLMRunner()
        _REFERENCES[model] = run_block(runner, {"text": lines}, 16, StageTimer())
    return _REFERENCES[model]


@pytest.mark.parametrize(("model", "workers", "stages", "cuts"), [
    ("decoder-tiny", 1, 2, None), ("decoder-tiny", 1, 3, None), ("decoder-tiny", 2, 2, None),
    ("decoder-tiny", 1, None, (3, 6)), ("minilm", 1, 2, None), ("minilm", 1, 3, None),
], ids=["decoder-2-stages", "decoder-3-stages", "decoder-hybrid-2x2", "decoder-explicit-cuts", "minilm-2-stages",
        "minilm-3-stages"])
def test_pipeline_equals_the_unsplit_model(
    small_corpus: Path, tmp_path: Path, corpus_lines: list[str], model: str,
    workers: int, stages: int | None, cuts: tuple[int, ...] | None, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO, logger="distinfer")  # the API logs the cut, and prints nothing
    out = tmp_path / "out"
    report = distinfer.run(model=model, input=str(small_corpus), output=str(out), workers=workers,
                           strategy="pipeline", stages=stages, cuts=cuts, batch_size=16, block_size=128)
    assert report.rows == 300
    got = outputs(out)
    want = reference(model, corpus_lines[:300])
    np.testing.assert_array_equal(got["row"], np.arange(300))
    for name, value in want.items():
        torch.testing.assert_close(torch.tensor(got[name], dtype=torch.from_numpy(value).dtype),
                                   torch.from_numpy(value))
    p = len(cuts) + 1 if cuts else stages
    assert f"pipeline of {p} stages for {model}" in caplog.text
    assert "pipeline of" not in capfd.readouterr().err
    # The report shows what each stage did: busy and communication time, peak memory, the bubble.
    for w in report.worker_stats:
        assert w.group is not None and w.group.kind == "stage" and len(w.group.members) == p
        assert all(b > 0 for b in w.group.busy_s) and all(c > 0 for c in w.group.comm_s[:-1])
        assert all(r > 0 for r in w.group.peak_rss)
        assert 0 < w.group.theoretical_bubble < 1 and 0 <= w.group.measured_bubble < 1


def test_data_strategy_refuses_a_model_larger_than_worker_memory(tmp_path: Path, small_corpus: Path) -> None:
    with pytest.raises(distinfer.ConfigError, match=r"'decoder-1b' has 4.6 GiB of weights, more than "
                                                    r"--worker-memory 2GiB leaves.*--strategy pipeline --stages 4"):
        distinfer.run(model="decoder-1b", input=str(small_corpus), output=str(tmp_path / "o"),
                      worker_memory="2GiB", strategy="data")


def test_pipeline_needs_more_layers_than_stages(tmp_path: Path, small_corpus: Path) -> None:
    with pytest.raises(distinfer.ConfigError, match=r"'minilm' has 7 layers .* too few for 8 stages; use --stages 7"):
        distinfer.run(model="minilm", input=str(small_corpus), output=str(tmp_path / "o"), strategy="pipeline",
                      stages=8)


def test_each_stage_process_stays_within_worker_memory(tmp_path: Path, corpus_lines: list[str]) -> None:
    # decoder-base holds 515 MiB of weights: more than --worker-memory 1GiB leaves for a model
    # (512 MiB after the runtime's reserve), so data parallelism is refused and the pipeline
    # needs 2 stages; each stage process must peak below 1 GiB, runtime included.
    data = tmp_path / "in.txt"
    data.write_text("\n".join(corpus_lines[:40]) + "\n")
    options = dict(model="decoder-base", input=str(data), worker_memory="1GiB", batch_size=4, block_size=20)
    with pytest.raises(distinfer.ConfigError, match=r"'decoder-base' has 515 MiB of weights.*--stages 2"):
        distinfer.run(**options, output=str(tmp_path / "data"), strategy="data")
    # the default strategy (auto, no profile) cuts it into the fewest stages that fit
    report = distinfer.run(**options, output=str(tmp_path / "pipe"), workers=1)
    [worker] = report.worker_stats
    assert worker.group is not None and len(worker.group.peak_rss) == 2
    assert all(0 < peak <= 2**30 for peak in worker.group.peak_rss), worker.group.peak_rss


@pytest.mark.parametrize("model", ["toy_models:deep_mlp", "toy_models:residual_net"])
def test_a_traced_pytorch_model_in_stages_equals_the_whole(
    vectors: tuple[Path, np.ndarray], tmp_path: Path, model: str
) -> None:
    from distinfer.models.torch_runner import TorchRunner

    path, data = vectors
    report = distinfer.run(model=model, input=str(path), output=str(tmp_path / "out"), workers=1,
                           strategy="pipeline", stages=3, batch_size=32, block_size=128)
    assert report.rows == len(data)
    got = outputs(tmp_path / "out")
    want = run_block(TorchRunner(model), {"input": data}, 32, StageTimer())
    torch.testing.assert_close(torch.tensor(got["output"], dtype=torch.float32), torch.from_numpy(want["output"]))


def test_an_onnx_model_cut_into_two_stages_equals_the_whole(vectors: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    from toy_models import deep_mlp

    path, data = vectors
    model = tmp_path / "mlp.onnx"
    torch.onnx.export(deep_mlp(), (torch.zeros(2, 16),), str(model), input_names=["input"], output_names=["y"],
                      dynamic_axes={"input": {0: "n"}, "y": {0: "n"}}, dynamo=False)
    options = dict(model=str(model), input=str(path), batch_size=32, block_size=128)
    report = distinfer.run(**options, output=str(tmp_path / "pipe"), workers=1, strategy="pipeline", stages=2)
    assert report.worker_stats[0].group is not None and len(report.worker_stats[0].group.members) == 2
    distinfer.run(**options, output=str(tmp_path / "whole"), workers=1)
    got, want = outputs(tmp_path / "pipe"), outputs(tmp_path / "whole")
    np.testing.assert_array_equal(got["row"], np.arange(len(data)))
    torch.testing.assert_close(torch.tensor(got["y"]), torch.tensor(want["y"]))
