"""The real `distinfer` command as a subprocess: a job end to end, and the errors a user sees."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

HELPERS = Path(__file__).parent.parent / "helpers"


def distinfer(*args: str, cwd: Path | None = None, cache: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(HELPERS)}
    if cache is not None:
        env["DISTINFER_CACHE"] = str(cache)
        env.pop("DISTINFER_PROFILES", None)  # profiles in the cache folder given
    return subprocess.run(
        [sys.executable, "-m", "distinfer.cli", *args], capture_output=True, text=True,
        timeout=300, env=env, cwd=cwd,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("distinfer: error: ")
    return lines[0]


def test_run_minilm_end_to_end(small_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = distinfer("run", "--model", "minilm", "--input", str(small_corpus), "--output",
                       str(out), "--workers", "2", "--block-size", "128")
    assert result.returncode == 0, result.stderr
    assert "300 rows" in result.stderr and "worker 0" in result.stderr
    table = ds.dataset(str(out)).to_table()
    assert table.num_rows == 300
    assert table.schema.field("embedding").type.list_size == 384
    report = json.loads((out / "_report.json").read_text())
    assert report["rows"] == 300 and report["workers"] == 2


def test_bad_rows_within_the_limit_exit_0_and_over_it_fail_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.txt"
    path.write_bytes(b"one\ntwo\n\xff three\nfour\n\xfe five\nsix\n")
    out = tmp_path / "out"
    args = ("run", "--model", "decoder-tiny", "--input", str(path), "--output", str(out), "--workers", "1",
            "--strategy", "data", "--block-size", "3", "--min-block-size", "3")  # a bad row in each block
    over = distinfer(*args, "--max-bad-rows", "1")
    assert one_line_error(over).startswith("distinfer: error: 2 bad rows, over --max-bad-rows 1 (1 row); "
                                           "the first: rows.txt line 3 is not valid UTF-8 text")
    bad = distinfer(*args, "--max-bad-rows", "ten")
    assert "--max-bad-rows must be a whole number of rows or a percentage" in one_line_error(bad)
    ok = distinfer(*args, "--max-bad-rows", "40%")  # resumes the failed job
    assert ok.returncode == 0, ok.stderr
    assert "2 bad row(s) set aside in " in ok.stderr and "_errors/; the first: rows.txt line 3" in ok.stderr
    assert ds.dataset(str(out)).to_table().column("row").to_pylist() == [0, 1, 3, 5]


def test_job_file_with_flag_override(vectors: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, data = vectors
    job = tmp_path / "job.toml"
    job.write_text(f'[run]\nmodel = "toy_models:mlp"\ninput = "{path.name}"\noutput = "out"\n'
                   "workers = 3\nbatch_size = 8\n")
    result = distinfer("run", "--config", str(job), "--workers", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "_report.json").read_text())
    assert report["workers"] == 1 and report["rows"] == len(data)


def test_yaml_job_file(vectors: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _data = vectors
    job = tmp_path / "job.yaml"
    job.write_text(f"model: toy_models:mlp\ninput: {path}\noutput: {tmp_path / 'y'}\n")
    assert distinfer("run", "--config", str(job)).returncode == 0


@pytest.mark.parametrize(
    ("make_args", "expected"),
    [
        (lambda d, v: ["--model", "minilm", "--input", str(d / "nope.txt")], r"'.*nope.txt' does not exist"),
        (lambda d, v: ["--model", "toy_models:mlp", "--input", str(v), "--column", "txt"], r"no column 'txt'"),
        (lambda d, v: ["--model", "nosuchmodel", "--input", str(v)], r"unknown model 'nosuchmodel'"),
        (lambda d, v: ["--model", str(d / "junk.onnx"), "--input", str(v)], r"junk.onnx: not a readable ONNX file"),
        (lambda d, v: ["--model", "no_such_module:f", "--input", str(v)], r"cannot import 'no_such_module'"),
        (lambda d, v: ["--model", "toy_models:not_a_module", "--input", str(v)], r"not a torch.nn.Module"),
        (lambda d, v: ["--model", "toy_models:mlp", "--input", str(d / "narrow.npy")], r"shape \[32, 12\].*check --column"),
        (lambda d, v: ["--model", "toy_models:mlp", "--input", str(d / "bad.jsonl"), "--column", "x"], r"bad.jsonl line 3"),
        (lambda d, v: ["--model", "toy_models:mlp", "--input", str(v), "--workers", "0"], r"--workers must be"),
        (lambda d, v: ["--input", str(v)], r"missing --model"),
    ],
    ids=["missing-file", "unknown-column", "unknown-model", "unreadable-onnx", "bad-factory",
         "factory-not-module", "shape-mismatch", "malformed-jsonl", "bad-option", "no-model"],
)
def test_bad_input_gives_one_line_error(
    make_args: object, expected: str, tmp_path: Path, vectors: tuple[Path, np.ndarray]
) -> None:
    path, _ = vectors
    (tmp_path / "junk.onnx").write_bytes(b"this is not an onnx file")
    np.save(tmp_path / "narrow.npy", np.zeros((32, 12), dtype=np.float32))
    (tmp_path / "bad.jsonl").write_text('{"x": [1.0]}\n{"x": [2.0]}\n{"x": [3.0\n')
    args = make_args(tmp_path, path)  # type: ignore[operator]
    out = tmp_path / "out"
    result = distinfer("run", *args, "--output", str(out))
    import re

    line = one_line_error(result)
    assert re.search(expected, line), line
    manifest = out / "_manifest.json"
    if manifest.exists():
        assert json.loads(manifest.read_text())["complete"] is False


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = distinfer("run", "--model", "minilm", "--input", str(tmp_path / "nope.txt"),
                       "--output", str(tmp_path / "o"), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_help_documents_every_option() -> None:
    result = distinfer("run", "--help")
    assert result.returncode == 0
    for flag in ("--model", "--input", "--output", "--workers", "--batch-size",
                 "--threads-per-worker", "--column", "--field", "--config", "--overwrite"):
        assert flag in result.stdout


def test_bench_prints_a_baseline(vectors: tuple[Path, np.ndarray]) -> None:
    path, _ = vectors
    result = distinfer("bench", "--model", "toy_models:mlp", "--input", str(path), "--rows", "256")
    assert result.returncode == 0, result.stderr
    assert "rows/s" in result.stdout and "--baseline-throughput" in result.stdout


def test_plan_balances_decoder_stages_within_memory() -> None:
    result = distinfer("plan", "--model", "decoder-tiny", "--stages", "3", "--batch-size", "2", "--seq-len", "16")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("decoder-tiny: 8 layers")
    assert sum(1 for line in lines if line[:1].isdigit()) == 3  # one row per stage
    assert "bubble with 8 micro-batches: 20.0%" in result.stdout


def test_plan_explicit_cuts_and_impossible_memory_limit() -> None:
    result = distinfer("plan", "--model", "decoder-tiny", "--cuts", "2,5", "--batch-size", "2", "--seq-len", "8")
    assert result.returncode == 0, result.stderr
    assert "embedding..block 0" in result.stdout and "block 1..block 3" in result.stdout
    line = one_line_error(distinfer("plan", "--model", "decoder-tiny", "--worker-memory", "100KiB",
                                    "--batch-size", "2", "--seq-len", "8"))
    assert "--worker-memory" in line


def test_plan_measures_once_and_run_auto_takes_the_top_plan(small_corpus: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = distinfer("plan", "--model", "decoder-tiny", "--input", str(small_corpus), "--json", cache=cache)
    assert first.returncode == 0, first.stderr
    assert "profiling decoder-tiny" in first.stderr
    assert len(list((cache / "profiles").glob("*.json"))) == 1
    plans = json.loads(first.stdout)["plans"]
    top = next(p for p in plans if not p["refused"])
    assert top["rows_per_s"] > 0 and top["latency_s"] > 0 and top["memory_bytes"] > 0 and top["reasons"]
    # measured: the ring, all-reduces over shm and gloo, and (Ray installed) an actor call
    links = json.loads(first.stdout)["links"]
    assert all(math.isfinite(v) and v > 0 for v in links.values()), links
    again = distinfer("plan", "--model", "decoder-tiny", "--input", str(small_corpus), cache=cache)
    assert again.returncode == 0, again.stderr
    assert "profiling" not in again.stderr  # the cached profile
    assert "links: stage to stage" in again.stdout and ", gloo " in again.stdout
    assert "; Ray object store " in again.stdout
    ranked = [line.split() for line in again.stdout.splitlines() if line[:2] == "1 "]
    assert ranked and ranked[0][1] == top["strategy"].split(" x ")[0]
    out = tmp_path / "out"
    run = distinfer("run", "--model", "decoder-tiny", "--input", str(small_corpus), "--output", str(out),
                    "--strategy", "auto", cache=cache)
    assert run.returncode == 0, run.stderr
    assert "--strategy auto chose " + top["strategy"] in run.stderr and "profiling" not in run.stderr
    table = ds.dataset(str(out)).to_table()
    assert sorted(table.column("row").to_pylist()) == list(range(300))


def test_ctrl_c_then_the_same_command_resumes(vectors: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    import signal
    import time

    path, data = vectors
    out = tmp_path / "out"
    args = [sys.executable, "-m", "distinfer.cli", "run", "--model", "toy_models:slow_mlp", "--input",
            str(path), "--output", str(out), "--workers", "2", "--batch-size", "16", "--block-size", "64"]
    # 0.3 s a batch: the job has seconds left when the signal comes, even on a loaded machine
    env = {**os.environ, "PYTHONPATH": str(HELPERS), "TOY_DELAY_S": "0.3"}
    # SIGINT back to its default in the child: a shell's background job (nohup ... &) starts
    # with SIGINT ignored, and Python keeps an ignored SIGINT ignored
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("part-*.parquet"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted; run the same command again to resume" in stderr
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] is False and manifest["committed"]

    env["TOY_DELAY_S"] = "0"
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    report = json.loads((out / "_report.json").read_text())
    assert report["rows_resumed"] > 0 and report["rows"] + report["rows_resumed"] == len(data)
    rows = ds.dataset(str(out)).to_table().column("row").to_numpy()
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(data)))
