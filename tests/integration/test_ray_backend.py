"""The Ray backend on a local multi-node Ray cluster (head + 1-CPU nodes in this machine):
same output as the local backend, exactly-once output when a node is lost, and a clear
error when no node can host a worker."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from procs import wait_for, worker_pids

import distinfer

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # The head offers no CPU, so every worker actor lands on a (removable) worker node.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def table(out: Path) -> dict[str, np.ndarray]:
    t = ds.dataset(str(out)).to_table().sort_by("row")
    return {name: np.asarray(t.column(name).to_pylist()) for name in t.column_names}


def test_minilm_on_ray_equals_local_backend(cluster: Cluster, small_corpus: Path, tmp_path: Path) -> None:
    options = dict(model="minilm", input=str(small_corpus), workers=2, threads_per_worker=1,
                   batch_size=32, block_size=128)
    ray_report = distinfer.run(**options, output=str(tmp_path / "ray"), backend="ray")
    distinfer.run(**options, output=str(tmp_path / "local"))
    on_ray, local = table(tmp_path / "ray"), table(tmp_path / "local")
    np.testing.assert_array_equal(on_ray["row"], np.arange(300))
    torch.testing.assert_close(torch.tensor(on_ray["embedding"]), torch.tensor(local["embedding"]))
    nodes = {w.host.split("node ")[-1] for w in ray_report.worker_stats}
    assert len(nodes) == 2, f"the two workers should run on the two nodes, got {nodes}"


def test_onnx_on_ray_equals_local_backend(
    cluster: Cluster, vectors: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    import toy_models

    path, _ = vectors
    model = tmp_path / "mlp.onnx"
    torch.onnx.export(toy_models.mlp(), (torch.randn(4, 16),), str(model), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, dynamo=False)
    options = dict(model=str(model), input=str(path), workers=2, batch_size=16, block_size=64)
    distinfer.run(**options, output=str(tmp_path / "ray"), backend="ray")
    distinfer.run(**options, output=str(tmp_path / "local"))
    torch.testing.assert_close(torch.tensor(table(tmp_path / "ray")["y"]),
                               torch.tensor(table(tmp_path / "local")["y"]))


def _node_with_a_worker(cluster: Cluster) -> object | None:
    for node in cluster.worker_nodes:
        raylet = node.all_processes["raylet"][0].process.pid
        if worker_pids(raylet, b"DistinferReplica"):
            return node
    return None


def test_lost_node_gives_exactly_once_output(
    cluster: Cluster, vectors: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    import toy_models

    path, data = vectors
    out = tmp_path / "out"
    cluster.add_node(num_cpus=1)  # room for the replacement worker
    cluster.wait_for_nodes()
    removed: list[object] = []

    def remove_a_node_with_a_worker() -> None:
        wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 2, 120, "two finished blocks")
        wait_for(lambda: _node_with_a_worker(cluster) is not None, 30, "a node hosting a worker")
        node = _node_with_a_worker(cluster)
        cluster.remove_node(node, allow_graceful=False)
        removed.append(node)

    thread = threading.Thread(target=remove_a_node_with_a_worker, daemon=True)
    thread.start()
    try:
        # ~4 s of work per worker, so that the node goes while blocks are in flight
        report = distinfer.run(model="toy_models:very_slow_mlp", input=str(path), output=str(out),
                               workers=2, backend="ray", batch_size=16, block_size=64, start_timeout_s=120)
    finally:
        thread.join(timeout=10)
    assert removed, "no node was removed during the job"
    assert report.restarts == 1
    assert sum(1 for w in report.worker_stats if "lost" in w.lost) == 1
    got = table(out)
    np.testing.assert_array_equal(got["row"], np.arange(len(data)))  # none lost, none twice
    with torch.inference_mode():
        reference = toy_models.mlp()(torch.from_numpy(data))
    torch.testing.assert_close(torch.tensor(got["output"], dtype=torch.float32), reference)
    assert json.loads((out / "_manifest.json").read_text())["complete"] is True


def test_unplaceable_workers_fail_fast_with_a_clear_message(
    cluster: Cluster, vectors: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    path, _ = vectors
    start = time.monotonic()
    with pytest.raises(distinfer.JobFailedError, match=r"Ray placed no worker: each asks for CPU 1, tpu 1"):
        distinfer.run(model="toy_models:mlp", input=str(path), output=str(tmp_path / "o"),
                      backend="ray", worker_resources={"tpu": 1}, start_timeout_s=3)
    assert time.monotonic() - start < 30


def test_ray_backend_without_ray_says_how_to_install(tmp_path: Path, vectors: tuple[Path, np.ndarray]) -> None:
    path, _ = vectors
    code = ("import sys; sys.modules['ray'] = None; from distinfer.cli import main; "
            f"sys.exit(main(['run', '--model', 'toy_models:mlp', '--input', {str(path)!r}, "
            f"'--output', {str(tmp_path / 'o')!r}, '--backend', 'ray']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("distinfer: error: --backend ray needs Ray; install it with: "
                                     "pip install 'distinfer[ray]'")


def test_pipeline_stages_on_two_ray_nodes_equal_local(cluster: Cluster, small_corpus: Path, tmp_path: Path) -> None:
    # Each node offers one CPU and each stage asks for one, so the two stages of the one
    # pipeline run on two different nodes; activations travel through Ray's object store.
    options = dict(model="decoder-tiny", input=str(small_corpus), workers=1, strategy="pipeline", stages=2,
                   batch_size=16, block_size=128)
    report = distinfer.run(**options, output=str(tmp_path / "ray"), backend="ray")
    [worker] = report.worker_stats
    assert worker.group is not None and len(worker.group.members) == 2
    nodes = {member.split(" node ")[-1] for member in worker.group.members}
    assert len(nodes) == 2, worker.group.members
    assert all(c > 0 for c in worker.group.comm_s)
    distinfer.run(model="decoder-tiny", input=str(small_corpus), output=str(tmp_path / "local"), batch_size=16,
                  block_size=128)
    on_ray, local = table(tmp_path / "ray"), table(tmp_path / "local")
    torch.testing.assert_close(torch.tensor(on_ray["hidden"]), torch.tensor(local["hidden"]))


def test_serving_on_ray_replicas_answers_like_the_batch_engine(cluster: Cluster, corpus_lines: list[str]) -> None:
    import requests
    import torch
    from fake_serving import fake_server

    from distinfer.backends.ray import RayBackend, RayOptions
    from distinfer.models.base import StageTimer, run_block
    from distinfer.models.minilm import MiniLMRunner
    from distinfer.serving.config import ServeConfig
    from distinfer.serving.main import worker_spec

    config = ServeConfig(model="minilm", replicas=2, backend="ray", max_batch_size=8)
    backend = RayBackend(worker_spec(config), RayOptions())
    texts = corpus_lines[:16]
    with fake_server(backend, ready_timeout=180, replicas=2, max_batch_size=8) as s:
        assert requests.get(s.url + "/v2/health/ready", timeout=10).json()["replicas_ready"] == 2
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: requests.post(s.url + "/text", json=texts[i : i + 4], timeout=60),
                                    range(0, 16, 4)))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        got = torch.tensor([row for a in answers for row in a.json()["outputs"]["embedding"]])
    want = run_block(MiniLMRunner(), {"text": texts}, 8, StageTimer())["embedding"]
    torch.testing.assert_close(got, torch.from_numpy(want))


def test_a_ray_pipeline_stage_that_raises_fails_the_block_and_goes_on(cluster: Cluster) -> None:
    from distinfer.errors import RowsError
    from distinfer.models import parse_model
    from distinfer.models.base import StageTimer, run_block
    from distinfer.worker.pipeline import PipelineRunner
    from distinfer.worker.stage_links import _RayLinks

    spec = parse_model("toy_models:guarded_mlp")  # its NaN guard is in the last stage
    runner = PipelineRunner(spec.family.staged(spec), ((0, 4), (4, 8)), 1, transport="ray",
                            stage_options={"num_cpus": 1})
    try:
        data = np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)
        want = run_block(runner, {"input": data}, 16, StageTimer())
        bad = data.copy()
        bad[20, 3] = np.nan
        with pytest.raises(RowsError) as caught:
            run_block(runner, {"input": bad}, 16, StageTimer())
        assert caught.value.error.kind == "AssertionError" and caught.value.rows == tuple(range(16, 32))
        assert isinstance(runner.links, _RayLinks) and not runner.links.pending  # no call left behind
        got = run_block(runner, {"input": data}, 16, StageTimer())
        np.testing.assert_array_equal(got["output"], want["output"])
    finally:
        runner.close()


def test_generation_on_ray_equals_the_local_backend(
    cluster: Cluster, corpus_lines: list[str], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A (small, seeded) Llama model generating on Ray: data-parallel replicas on the two
    nodes, and a pipeline whose two stages are actors on the two nodes, write what the local
    backend writes."""
    pytest.importorskip("transformers")
    from tiny_llm import make_tiny_llm

    folder = make_tiny_llm(tmp_path_factory.mktemp("llama"), "llama", corpus_lines)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": line}) + "\n" for line in corpus_lines[:12]))
    options = dict(model=str(folder), input=str(prompts), max_tokens=12, block_size=4, min_block_size=4)
    distinfer.run(**options, output=str(tmp_path / "local"), workers=1)
    local = table(tmp_path / "local")
    for name, extra in {"data": dict(workers=2, threads_per_worker=1),
                        "pipeline": dict(workers=1, strategy="pipeline", stages=2, threads_per_worker=1)}.items():
        report = distinfer.run(**options, **extra, output=str(tmp_path / name), backend="ray")
        on_ray = table(tmp_path / name)
        np.testing.assert_array_equal(on_ray["row"], np.arange(12))
        assert on_ray["completion"].tolist() == local["completion"].tolist(), name
        assert report.generation is not None and report.generation.generated_tokens > 0
        if name == "pipeline":
            [worker] = report.worker_stats
            assert worker.group is not None and len(worker.group.members) == 2


def test_bad_rows_are_set_aside_on_ray_as_locally(cluster: Cluster, small_corpus: Path, tmp_path: Path) -> None:
    lines = small_corpus.read_bytes().splitlines()
    lines[7] = b"\xff\xfe not UTF-8"
    lines[250] = b"caf\xe9"
    path = tmp_path / "bad.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    options = dict(model="decoder-tiny", input=str(path), workers=2, batch_size=16, block_size=64,
                   strategy="data", max_bad_rows=2)
    report = distinfer.run(**options, output=str(tmp_path / "ray"), backend="ray")
    distinfer.run(**options, output=str(tmp_path / "local"))
    on_ray, local = table(tmp_path / "ray"), table(tmp_path / "local")
    np.testing.assert_array_equal(on_ray["row"], [r for r in range(300) if r not in (7, 250)])
    torch.testing.assert_close(torch.tensor(on_ray["hidden"]), torch.tensor(local["hidden"]))
    errors = ds.dataset(str(tmp_path / "ray" / "_errors")).to_table().sort_by("row").to_pylist()
    assert [(e["row"], e["stage"]) for e in errors] == [(7, "read"), (250, "read")]
    assert errors[0]["message"] == "bad.txt line 8 is not valid UTF-8 text; re-encode the file as UTF-8"
    assert report.bad_rows == 2


def _replica_pids(cluster: Cluster) -> set[int]:
    """The live Ray worker processes hosting a distinfer replica, on every node."""
    return {pid for node in cluster.worker_nodes
            for pid in worker_pids(node.all_processes["raylet"][0].process.pid, b"DistinferReplica")}  # fmt: skip


def test_a_driver_killed_on_ray_leaves_no_worker_and_the_job_resumes(
    cluster: Cluster, vectors: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    """Ray ends the actors a driver owned when that driver dies (they are not detached); the
    same command, run again, reuses the parts already written and gives exactly-once output."""
    import toy_models

    path, data = vectors
    out = tmp_path / "out"
    command = [sys.executable, "-m", "distinfer.cli", "run", "--model", "toy_models:very_slow_mlp",
               "--input", str(path), "--output", str(out), "--workers", "2", "--backend", "ray",
               "--address", cluster.address, "--batch-size", "16", "--block-size", "64"]  # fmt: skip
    before = _replica_pids(cluster)
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 2 or driver.poll() is not None, 120,
                 "two finished blocks")  # fmt: skip
        assert driver.poll() is None, "the job ended before the driver could be killed"
        replicas = _replica_pids(cluster) - before
        assert replicas, "no replica process found"
        driver.kill()
        driver.wait(timeout=30)
    finally:
        driver.kill()
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    wait_for(lambda: not (_replica_pids(cluster) & replicas), 5.0, "the replicas to end with their driver")
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    final = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert all(final[name] == mtime for name, mtime in written.items()), "a committed part was written again"
    got = table(out)
    np.testing.assert_array_equal(got["row"], np.arange(len(data)))  # none lost, none twice
    with torch.inference_mode():
        reference = toy_models.mlp()(torch.from_numpy(data))
    torch.testing.assert_close(torch.tensor(got["output"], dtype=torch.float32), reference)
