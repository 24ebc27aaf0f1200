"""The keras family: a Keras 3 `.keras` file and a TensorFlow SavedModel, built here from one
seeded model, run in real worker processes. With 2 workers the output equals
`model.predict()` (within float tolerance: TensorFlow's kernels may round differently with
other batch sizes and threads), every row once, in order; resume, quarantine, the Ray backend
and serving work as for the other families; a model that cannot be loaded is one line; a
`.keras` file also runs on Keras's torch backend (which needs no TensorFlow)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pytest
import requests
from keras_models import build, predict, rows, write_parquet

import distinfer
from distinfer.errors import ModelError, ModelInputError, RowsError
from distinfer.models import parse_model
from distinfer.models.base import StageTimer, run_block

if importlib.util.find_spec("tensorflow") is None:  # the `tensorflow` extra
    pytest.skip("TensorFlow is not installed", allow_module_level=True)
if importlib.util.find_spec("ray") is not None:
    from test_ray_backend import cluster  # noqa: F401  (the Ray tests' cluster, reused)

pytestmark = pytest.mark.filterwarnings(  # Keras's own predict(), the reference, on numpy 2
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

N = 300
JOB = dict(workers=2, batch_size=16, block_size=64, min_block_size=64)
ONE = {**JOB, "workers": 1}  # where the worker count is not the point: less start-up on 2 cores


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    keras_file, saved = build(tmp_path_factory.mktemp("keras"))
    return {"keras": keras_file, "saved_model": saved}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> tuple[Path, dict[str, Any]]:
    """300 rows as Parquet, and `model.predict()` over them."""
    values = rows(N)
    path = write_parquet(tmp_path_factory.mktemp("data") / "rows.parquet", values)
    return path, predict(models["keras"], values)


def read(out: Path) -> dict[str, np.ndarray]:
    table = ds.dataset(str(out)).to_table().sort_by("row")
    return {name: np.asarray(table.column(name).to_pylist()) for name in table.column_names}


def assert_equals_predict(got: dict[str, np.ndarray], want: dict[str, Any], which: list[int]) -> None:
    np.testing.assert_array_equal(got["row"], which)
    assert sorted(got) == ["row", "score", "vector"], "every output, under its name"
    for name in ("score", "vector"):
        np.testing.assert_allclose(got[name].reshape(len(which), -1), want[name][which], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["keras", "saved_model"])
def test_two_workers_equal_predict(kind: str, models: dict[str, Path], data: tuple[Path, dict[str, Any]],
                                   tmp_path: Path) -> None:
    path, want = data
    out = tmp_path / "out"
    report = distinfer.run(model=str(models[kind]), input=str(path), output=str(out), **JOB)
    assert report.rows == N and sum(w.rows for w in report.worker_stats) == N
    assert_equals_predict(read(out), want, list(range(N)))
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] and sum(manifest["committed"].values()) == N


def test_resume_recomputes_only_the_lost_blocks_and_a_changed_model_is_another(
    models: dict[str, Path], data: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, want = data
    saved = shutil.copytree(models["saved_model"], tmp_path / "saved_model")
    out = tmp_path / "out"
    options = dict(model=str(saved), input=str(path), output=str(out), **ONE)
    distinfer.run(**options)
    # as if interrupted before blocks 1 and 3 were committed
    manifest = json.loads((out / "_manifest.json").read_text())
    lost = sum(manifest["committed"].pop(b) for b in ("1", "3"))
    manifest["complete"] = False
    (out / "_manifest.json").write_text(json.dumps(manifest))
    for b in (1, 3):
        (out / f"part-{b:06d}.parquet").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    report = distinfer.run(**options)
    assert (report.rows, report.rows_resumed) == (lost, N - lost)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in kept} == kept
    assert_equals_predict(read(out), want, list(range(N)))
    # the model exported again into its directory is another model, whose job would not resume
    # this output (the manifest keeps the identity; the refusal itself is the engine's)
    before = parse_model(str(saved)).identity()
    assert json.loads((out / "_manifest.json").read_text())["job"]["files"] == before["files"]
    (saved / "variables" / "variables.index").touch()
    assert parse_model(str(saved)).identity() != before


def test_a_row_the_model_refuses_is_set_aside(models: dict[str, Path], data: tuple[Path, dict[str, Any]],
                                              tmp_path: Path) -> None:
    _, want = data
    values = rows(N)
    values["category"][70] = 99  # past the embedding's 10 rows: the forward pass raises
    path = write_parquet(tmp_path / "bad.parquet", values)
    out = tmp_path / "out"
    report = distinfer.run(model=str(models["keras"]), input=str(path), output=str(out), max_bad_rows=1, **ONE)
    good = [r for r in range(N) if r != 70]
    assert report.bad_rows == 1
    assert_equals_predict(read(out), want, good)
    (bad,) = ds.dataset(str(out / "_errors")).to_table().to_pylist()
    assert (bad["row"], bad["stage"], bad["error_type"]) == (70, "model", "ModelInputError")
    assert bad["message"].startswith("bad.parquet row 70: the model refuses these rows: ") and "[0, 10)" in bad["message"]
    # without an allowance, the rows are named in one line (here in this process)
    spec = parse_model(str(models["keras"]))
    with pytest.raises(RowsError, match=r"^the model refuses these rows: .*not in \[0, 10\)$") as caught:
        run_block(spec.family.runner(spec, 1, "cpu"), {k: v[64:80] for k, v in values.items()}, 16, StageTimer())
    assert caught.value.rows == tuple(range(16)) and caught.value.error.kind == "ModelInputError"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed")
def test_on_ray_equals_predict(cluster: Any, models: dict[str, Path],
                               data: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    path, want = data
    out = tmp_path / "out"
    report = distinfer.run(model=str(models["saved_model"]), input=str(path), output=str(out), backend="ray",
                           threads_per_worker=1, **JOB)
    assert report.rows == N
    assert_equals_predict(read(out), want, list(range(N)))


def test_served_answers_equal_predict(models: dict[str, Path], data: tuple[Path, dict[str, Any]]) -> None:
    from fake_serving import fake_server

    from distinfer.backends.local import LocalBackend
    from distinfer.serving.config import ServeConfig
    from distinfer.serving.main import worker_spec

    _, want = data
    values = rows(N)
    config = ServeConfig(model=str(models["keras"]), replicas=1, max_queue_delay_ms=50)
    with fake_server(LocalBackend(worker_spec(config)), ready_timeout=120, replicas=1, max_queue_delay_ms=50) as s:
        meta = requests.get(s.url + "/v2/models/fake", timeout=10).json()
        assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 16]},
                                  {"name": "category", "datatype": "INT64", "shape": [-1]}]
        body = {"inputs": [
            {"name": "features", "shape": [5, 16], "datatype": "FP32", "data": values["features"][:5].ravel().tolist()},
            {"name": "category", "shape": [5], "datatype": "INT64", "data": values["category"][:5].tolist()},
        ]}  # fmt: skip
        r = requests.post(s.url + "/v2/models/fake/infer", json=body, timeout=60)
        assert r.status_code == 200, r.text
        got = {o["name"]: np.asarray(o["data"], dtype=np.float32).reshape(o["shape"]) for o in r.json()["outputs"]}
        assert sorted(got) == ["score", "vector"]
        for name, value in got.items():
            np.testing.assert_allclose(value, want[name][:5], rtol=1e-5, atol=1e-6)
        body["inputs"][0]["data"] = values["features"][:5, :8].ravel().tolist()
        body["inputs"][0]["shape"] = [5, 8]
        r = requests.post(s.url + "/v2/models/fake/infer", json=body, timeout=10)
        assert r.status_code == 400 and "does not fit the model's [-1, 16]" in r.json()["error"]


def test_unloadable_models_are_one_line_naming_the_file(models: dict[str, Path], tmp_path: Path) -> None:
    import tensorflow as tf

    from distinfer.models.keras_runner import KerasRunner

    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a model")
    cut = tmp_path / "cut.keras"
    cut.write_bytes(models["keras"].read_bytes()[:2000])
    unsigned = tmp_path / "unsigned"
    module = tf.Module()
    module.v = tf.Variable(1.0)
    tf.saved_model.save(module, str(unsigned))
    for model, message in [(junk, "not a Keras 3 model file (not a zip archive)"),
                           (cut, "not a Keras 3 model file (a zip archive cut short)"),
                           (unsigned, "a SavedModel without a 'serving_default' signature")]:  # fmt: skip
        with pytest.raises(ModelError) as caught:
            parse_model(str(model))
        assert str(caught.value).startswith(f"{model}: {message}") and "\n" not in str(caught.value)
    with pytest.raises(ModelError, match=rf"^{re.escape(str(unsigned))}: the SavedModel has no 'serving_default' "):
        KerasRunner(unsigned, 1)  # the workers' own check, should the driver's miss
    # a Keras archive whose model cannot be built: the worker's error ends the job, in one line
    empty = tmp_path / "empty.keras"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("config.json", "{}")
    np.save(tmp_path / "x.npy", np.zeros((4, 16), dtype=np.float32))
    with pytest.raises(ModelError, match=rf"^cannot load Keras model '{re.escape(str(empty))}': [^\n]+$"):
        distinfer.run(model=str(empty), input=str(tmp_path / "x.npy"), output=str(tmp_path / "out"), workers=1)


def test_inputs_are_checked_by_name_type_and_shape(models: dict[str, Path]) -> None:
    spec = parse_model(str(models["keras"]))
    runner = spec.family.runner(spec, 1, "cpu")
    assert runner.bind(["id", "category", "features"], None) == {"features": "features", "category": "category"}
    with pytest.raises(ModelInputError, match=r"no column for model input\(s\) category"):
        runner.bind(["features", "id"], None)
    good = rows(4)
    for inputs, message in [({**good, "features": good["features"][:, :8]}, r"'features' expects shape \[N, 16\]"),
                            ({**good, "category": good["features"]}, r"'category' expects shape \[N\]"),
                            ({**good, "features": ["a"] * 4}, "takes numbers but its column holds text")]:  # fmt: skip
        with pytest.raises(ModelInputError, match=message):
            runner.prepare(inputs, 16)
    for strategy in ("pipeline", "tensor"):
        with pytest.raises(ModelError, match="runs with --strategy data"):
            spec.family.staged(spec) if strategy == "pipeline" else spec.family.sharded(spec)


def test_a_keras_file_runs_on_the_torch_backend(
    models: dict[str, Path], data: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, want = data
    monkeypatch.setenv("KERAS_BACKEND", "torch")  # the backend taken where TensorFlow is not installed
    out = tmp_path / "out"
    distinfer.run(model=str(models["keras"]), input=str(path), output=str(out), **ONE)
    assert_equals_predict(read(out), want, list(range(N)))
