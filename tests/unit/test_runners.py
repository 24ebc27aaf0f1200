"""Runners in this process: column binding and the errors for inputs that do not fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distinfer import ModelError, ModelInputError
from distinfer.models import StageTimer, parse_model, run_block
from distinfer.models.onnx_runner import OnnxRunner


@pytest.fixture(scope="module")
def two_input_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    class Add(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a * 2 + b

    path = tmp_path_factory.mktemp("onnx") / "add.onnx"
    torch.onnx.export(Add(), (torch.zeros(2, 4), torch.zeros(2, 4)), str(path),
                      input_names=["a", "b"], output_names=["sum"],
                      dynamic_axes={"a": {0: "n"}, "b": {0: "n"}, "sum": {0: "n"}}, dynamo=False)
    return path


def test_onnx_inputs_bind_by_name_and_ints_are_cast(two_input_onnx: Path) -> None:
    runner = OnnxRunner(two_input_onnx, threads=1)
    assert runner.bind(["id", "b", "a"], None) == {"a": "a", "b": "b"}
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    b = np.ones((3, 4), dtype=np.float64)
    out = run_block(runner, {"a": a, "b": b}, 2, StageTimer())
    np.testing.assert_allclose(out["sum"], a * 2 + 1)


def test_onnx_binding_errors_say_what_to_do(two_input_onnx: Path) -> None:
    runner = OnnxRunner(two_input_onnx, threads=1)
    with pytest.raises(ModelInputError, match=r"no column for model input\(s\) b .*available: a, c"):
        runner.bind(["a", "c"], None)
    with pytest.raises(ModelInputError, match="--column names one"):
        runner.bind(["a", "b"], "a")


def test_onnx_shape_and_type_mismatches(two_input_onnx: Path) -> None:
    runner = OnnxRunner(two_input_onnx, threads=1)
    with pytest.raises(ModelInputError, match=r"'a' expects shape \[N, 4\] .* shape \[5\]"):
        runner.prepare({"a": np.zeros((2, 5)), "b": np.zeros((2, 4))}, 8)
    with pytest.raises(ModelInputError, match="holds text"):
        runner.prepare({"a": ["x", "y"], "b": np.zeros((2, 4))}, 8)
    with pytest.raises(ModelInputError, match=r"expects float32 but .* holds complex128"):
        runner.prepare({"a": np.zeros((2, 4), dtype=complex), "b": np.zeros((2, 4))}, 8)


def test_unreadable_model_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"nope")
    with pytest.raises(ModelError, match="cannot load ONNX model"):
        OnnxRunner(junk, threads=1)
    with pytest.raises(ModelError, match="does not exist"):
        parse_model(str(tmp_path / "missing.onnx"))
    with pytest.raises(ModelError, match="unknown model 'bert-huge'"):
        parse_model("bert-huge")


def test_parse_model_kinds(tmp_path: Path) -> None:
    assert parse_model("minilm").kind == "minilm"
    assert parse_model("pkg.mod:make").kind == "torch"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "m.pt"))
    assert parse_model(str(tmp_path / "m.pt")).kind == "torch"
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ModelError, match=r"not a TorchScript or torch\.export archive"):
        parse_model(str(tmp_path / "empty.pt"))


def test_decoder_names() -> None:
    assert parse_model("decoder").kind == "decoder"
    assert parse_model("decoder-1b").kind == "decoder"
    with pytest.raises(ModelError, match="unknown decoder size 'huge'"):
        parse_model("decoder-huge")
