"""The real `distinfer serve --model minilm` as a subprocess, on 127.0.0.1: answers equal to
the batch engine's (JSON and binary), batching across clients, shedding under overload, a
killed replica replaced, and SIGTERM draining to exit code 0."""

from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import requests
from procs import wait_for

import distinfer

INFER = "/v2/models/minilm/infer"


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def stderr(self) -> str:
        return self.log.read_text()

    def metric(self, name: str) -> float:
        text = requests.get(self.url + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def start_server(tmp: Path, *args: str) -> Server:
    log = tmp / f"serve-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "distinfer.cli", "serve", "--model", "minilm", "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    url = ""

    def listening() -> bool:
        nonlocal url
        assert proc.poll() is None, log.read_text()
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", log.read_text())
        url = found.group(1) if found else ""
        return bool(url)

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        return requests.get(url + "/v2/health/ready", timeout=5).status_code == 200

    try:
        wait_for(listening, 60, "the server to listen")
        wait_for(ready, 120, "the server to be ready")
    except BaseException:
        proc.kill()
        raise
    return Server(proc, url, log)


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("serve"), "--replicas", "2", "--max-batch-size", "16",
                     "--max-queue-delay-ms", "20")
    yield s
    stop(s)


def infer_body(texts: list[str]) -> dict[str, object]:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}


def embeddings(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    [out] = response.json()["outputs"]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def test_answers_equal_the_batch_engine(server: Server, corpus_lines: list[str], tmp_path: Path) -> None:
    import torch

    texts = corpus_lines[100:124]
    data = tmp_path / "in.txt"
    data.write_text("\n".join(texts) + "\n")
    distinfer.run(model="minilm", input=str(data), output=str(tmp_path / "out"), workers=1)
    table = ds.dataset(str(tmp_path / "out")).to_table().sort_by("row")
    want = torch.tensor(table.column("embedding").to_pylist())

    # JSON, in three requests of eight rows
    got = np.concatenate([embeddings(requests.post(server.url + INFER, json=infer_body(texts[i : i + 8]),
                                                   timeout=30)) for i in range(0, 24, 8)])
    torch.testing.assert_close(torch.from_numpy(got), want)

    # binary tensors both ways (the protocol's binary data extension)
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    header = json.dumps({"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "embedding", "parameters": {"binary_data": True}}]}).encode()
    r = requests.post(server.url + INFER, data=header + raw, timeout=30,
                      headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    binary = np.frombuffer(r.content[n:], dtype="<f4").reshape(len(texts), -1)
    torch.testing.assert_close(torch.from_numpy(binary.copy()), want)

    # the text route
    r = requests.post(server.url + "/text", json={"text": texts[0]}, timeout=30)
    torch.testing.assert_close(torch.tensor(r.json()["outputs"]["embedding"]), want[0])


def test_existing_v2_clients_work_unchanged(server: Server, corpus_lines: list[str]) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    host = server.url.removeprefix("http://")
    client = httpclient.InferenceServerClient(host)
    assert client.is_server_ready() and client.is_model_ready("minilm")
    texts = np.array([t.encode() for t in corpus_lines[:4]], dtype=object)
    text = httpclient.InferInput("text", [4], "BYTES")
    text.set_data_from_numpy(texts, binary_data=True)
    result = client.infer("minilm", [text], outputs=[httpclient.InferRequestedOutput("embedding", binary_data=True)])
    got = result.as_numpy("embedding")
    want = embeddings(requests.post(server.url + INFER, json=infer_body(corpus_lines[:4]), timeout=30))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    client.close()


def test_concurrent_clients_are_batched(server: Server, corpus_lines: list[str]) -> None:
    before_sum, before_count = server.metric("distinfer_batch_size_sum"), server.metric("distinfer_batch_size_count")
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda t: requests.post(server.url + INFER, json=infer_body([t]), timeout=30),
                                corpus_lines[:64]))
    assert all(a.status_code == 200 for a in answers)
    rows = server.metric("distinfer_batch_size_sum") - before_sum
    batches = server.metric("distinfer_batch_size_count") - before_count
    assert rows == 64 and rows / batches > 1


def test_overload_is_shed_quickly_while_admitted_requests_meet_their_deadline(
    server: Server, corpus_lines: list[str]
) -> None:
    deadline_s = 0.25

    def one(text: str) -> tuple[int, float]:
        body = {**infer_body([text]), "parameters": {"timeout": int(deadline_s * 1e6)}}
        t = time.monotonic()
        r = requests.post(server.url + INFER, json=body, timeout=30)
        return r.status_code, time.monotonic() - t

    def answered(within: str) -> float:  # the server's own clock: 200s answered within `within` s
        bucket = f'distinfer_request_latency_seconds_bucket{{model="minilm",le="{within}"}}'
        text = requests.get(server.url + "/metrics", timeout=10).text
        return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(bucket)), 0.0)

    before = (answered("0.4"), answered("+Inf"))
    with ThreadPoolExecutor(48) as pool:
        results = list(pool.map(one, corpus_lines[:400]))
    codes = [c for c, _ in results]
    shed = sorted(s for c, s in results if c == 429)
    assert set(codes) <= {200, 429, 504}, codes
    assert shed and 200 in codes
    # refused at once rather than after waiting out the deadline (a client's clock, loosely:
    # this process's 48 threads and a busy machine add their own delays)
    assert shed[len(shed) // 2] < 4 * deadline_s
    # admitted requests meet their deadline, by the server's own clock
    in_time, total = answered("0.4") - before[0], answered("+Inf") - before[1]
    assert total and in_time / total >= 0.9, (in_time, total)
    assert requests.get(server.url + "/v2/health/ready", timeout=10).status_code == 200


def test_a_killed_replica_is_replaced_and_no_request_fails(server: Server, corpus_lines: list[str]) -> None:
    pids = [int(p) for p in re.findall(r"replica \d+ ready \(pid (\d+)", server.stderr())]
    victim = pids[0]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(requests.post, server.url + INFER, json=infer_body([t]), timeout=60)
                   for t in corpus_lines[:80]]
        time.sleep(0.3)
        subprocess.run(["kill", "-9", str(victim)], check=True)
        codes = [f.result().status_code for f in futures]
    assert codes == [200] * 80
    assert "replica lost" in server.stderr()

    def two_ready() -> bool:
        return requests.get(server.url + "/v2/health/ready", timeout=5).json()["replicas_ready"] == 2

    wait_for(two_ready, 120, "a replacement replica")
    assert len(re.findall(r"replica \d+ ready", server.stderr())) == 3


def test_sigterm_drains_and_exits_0(tmp_path: Path, corpus_lines: list[str]) -> None:
    s = start_server(tmp_path, "--replicas", "1", "--max-queue-delay-ms", "200")
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(requests.post, s.url + INFER, json=infer_body([t]), timeout=60)
                       for t in corpus_lines[:4]]
            time.sleep(0.05)  # queued: the batch waits for company
            s.proc.send_signal(signal.SIGTERM)
            codes = [f.result().status_code for f in futures]
        assert codes == [200] * 4
        assert s.proc.wait(timeout=60) == 0
        assert "draining" in s.stderr() and "drained" in s.stderr()
    finally:
        stop(s)


def serve_error(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "distinfer.cli", "serve", *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    return result


def test_bad_options_get_one_line_errors() -> None:
    unknown = serve_error("--model", "nope", "--port", "0")
    assert unknown.stderr.strip().startswith("distinfer: error: unknown model 'nope'")
    batch = serve_error("--model", "minilm", "--max-batch-size", "0")
    assert batch.returncode == 2 and "--max-batch-size must be a whole number >= 1" in batch.stderr
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = serve_error("--model", "minilm", "--port", str(port))
    assert f"cannot listen on 127.0.0.1:{port}" in busy.stderr and "pick another --port" in busy.stderr
