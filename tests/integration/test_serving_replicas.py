"""Serving over real local replica processes for the models that are not text: an ONNX
file's answers equal ONNX Runtime's, rows of concurrent requests merged into one batch; a
PyTorch model (input shapes unknown) is refused with what to do instead."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from fake_serving import fake_server

from distinfer.backends.local import LocalBackend
from distinfer.errors import ConfigError
from distinfer.models.base import StageTimer, run_block
from distinfer.models.onnx_runner import OnnxRunner
from distinfer.serving.config import ServeConfig
from distinfer.serving.main import worker_spec


def test_an_onnx_model_served_equals_onnx_runtime(tmp_path: Path) -> None:
    from toy_models import deep_mlp

    model = tmp_path / "mlp.onnx"
    torch.onnx.export(deep_mlp(), (torch.zeros(2, 16),), str(model), input_names=["input"], output_names=["y"],
                      dynamic_axes={"input": {0: "n"}, "y": {0: "n"}}, dynamo=False)
    data = np.random.default_rng(1).standard_normal((12, 16)).astype(np.float32)
    want = run_block(OnnxRunner(model, 1), {"input": data}, 64, StageTimer())["y"]
    config = ServeConfig(model=str(model), replicas=1, max_queue_delay_ms=100)
    with fake_server(LocalBackend(worker_spec(config)), ready_timeout=120, replicas=1,
                     max_queue_delay_ms=100) as s:
        meta = requests.get(s.url + "/v2/models/fake", timeout=10).json()
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 16]}]

        def infer(rows: np.ndarray) -> np.ndarray:
            body = {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                                "data": rows.reshape(-1).tolist()}]}
            r = requests.post(s.url + "/v2/models/fake/infer", data=json.dumps(body), timeout=60)
            assert r.status_code == 200, r.text
            [out] = r.json()["outputs"]
            return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])

        with ThreadPoolExecutor(4) as pool:
            got = np.concatenate(list(pool.map(infer, np.split(data, 4))))
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want))
        assert s.metric("distinfer_batch_size_sum") / s.metric("distinfer_batch_size_count") > 3
        assert s.server.queue.group_lengths  # an ONNX model pays for padding: similar rows go together

        wrong = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.0] * 8}]}
        r = requests.post(s.url + "/v2/models/fake/infer", json=wrong, timeout=10)
        assert r.status_code == 400 and "shape" in r.json()["error"]


def test_a_pytorch_model_is_refused_with_what_to_do() -> None:
    with pytest.raises(ConfigError, match=r"export it to ONNX"):
        worker_spec(ServeConfig(model="toy_models:deep_mlp"))


@pytest.mark.parametrize("options", [{"strategy": "pipeline", "stages": 2}, {"strategy": "tensor", "tensor_parallel": 2}],
                         ids=["pipeline", "tensor"])
def test_a_model_parallel_replica_serves_like_the_whole_model(options: dict[str, object],
                                                               corpus_lines: list[str]) -> None:
    from distinfer.models.decoder import DecoderRunner

    texts = corpus_lines[:12]
    want = run_block(DecoderRunner("tiny"), {"text": texts}, 64, StageTimer())
    config = ServeConfig(model="decoder-tiny", replicas=1, max_batch_size=8, **options)  # type: ignore[arg-type]
    backend = LocalBackend(worker_spec(config))
    with fake_server(backend, ready_timeout=120, replicas=1, max_batch_size=8) as s, ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda i: requests.post(s.url + "/text", json=texts[i : i + 4], timeout=60),
                                range(0, 12, 4)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    hidden = torch.tensor([row for a in answers for row in a.json()["outputs"]["hidden"]])
    torch.testing.assert_close(hidden, torch.from_numpy(want["hidden"]))
    assert [t for a in answers for t in a.json()["outputs"]["next_token"]] == want["next_token"].tolist()


def test_minilm_replicas_take_requests_in_arrival_order(corpus_lines: list[str]) -> None:
    """minilm runs its batches packed, so the queue need not group rows by length; the
    answers still equal the batch engine's."""
    from distinfer.models.minilm import MiniLMRunner

    texts = corpus_lines[:24]
    want = run_block(MiniLMRunner(), {"text": texts}, 64, StageTimer())["embedding"]
    config = ServeConfig(model="minilm", replicas=1, max_batch_size=8)
    with fake_server(LocalBackend(worker_spec(config)), ready_timeout=120, replicas=1, max_batch_size=8) as s, \
            ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: requests.post(s.url + "/text", json=texts[i : i + 4], timeout=60),
                                range(0, 24, 4)))
        assert not s.server.queue.group_lengths
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    got = np.array([row for a in answers for row in a.json()["outputs"]["embedding"]], dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
