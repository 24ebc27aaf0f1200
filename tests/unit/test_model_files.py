"""Bad model files are refused in the driver, before any worker starts, with one line naming
the file and the problem: a truncated ONNX file, a corrupt safetensors or GGUF file, a pickle
where a model program was expected (never unpickled)."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distinfer.errors import ModelError
from distinfer.models import parse_model


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


def _refused(name: str | Path, *needles: str) -> str:
    with pytest.raises(ModelError) as caught:
        parse_model(str(name))
    message = str(caught.value)
    assert "\n" not in message and str(name) in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_a_truncated_onnx_file(tmp_path: Path) -> None:
    good = tmp_path / "good.onnx"
    torch.onnx.export(_mlp(), (torch.randn(2, 16),), str(good), input_names=["x"], output_names=["y"],
                      dynamo=False)
    assert parse_model(str(good)).family.name == "onnx"
    data = good.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    _refused(cut, "not a readable ONNX file", "truncated")


def test_pickles_are_never_loaded_as_models(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> tuple[object, ...]:
            return (Path.touch, (marker,))

    plain = tmp_path / "evil.pt"
    plain.write_bytes(pickle.dumps(Evil()))
    _refused(plain, "a pickle, not a TorchScript", "does not unpickle")
    weights = tmp_path / "weights.pth"
    torch.save(_mlp().state_dict(), weights)
    _refused(weights, "a torch.save() file", "weights_only=True")
    assert not marker.exists(), "a pickle was loaded"
    good = tmp_path / "good.pt"
    torch.jit.save(torch.jit.script(_mlp()), str(good))
    assert parse_model(str(good)).family.name == "torch"
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:-200])
    _refused(cut, "a zip archive cut short")


def _safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path))


def test_corrupt_safetensors_in_a_model_directory(tmp_path: Path) -> None:
    folder = tmp_path / "llm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    weights = folder / "model.safetensors"
    _safetensors(weights, {"w": np.zeros((64, 64), np.float32)})
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    _refused(folder, "model.safetensors: truncated")
    weights.write_bytes(struct.pack("<Q", 10) + b"not json!!" + data[18:])
    _refused(folder, "header is not JSON")
    weights.write_bytes(b"\x00" * 4)
    _refused(folder, "not a safetensors file")


def test_a_truncated_or_foreign_gguf_file(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", np.arange(4096, dtype=np.float32).reshape(64, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    _refused(path, "truncated")
    path.write_bytes(b"PK\x03\x04" + data[4:])
    _refused(path, "not a GGUF file")
