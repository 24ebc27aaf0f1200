"""Config building and job files; the report's arithmetic and the progress bar."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from distinfer import ConfigError, RunConfig
from distinfer.config import load_job_file
from distinfer.report import JobReport, Progress, WorkerStats


def test_build_accepts_dashes_and_rejects_unknown_options() -> None:
    config = RunConfig.build({"model": "m", "input": "i", "output": "o", "batch-size": 8})
    assert config.batch_size == 8
    with pytest.raises(ConfigError, match="unknown option 'batchsize'"):
        RunConfig.build({"model": "m", "input": "i", "output": "o", "batchsize": 8})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("workers", 0, "--workers must be"), ("batch_size", -1, "--batch-size must be"),
     ("block_size", 1.5, "--block-size must be"), ("device", "tpu", "--device must be"),
     ("max_restarts", -1, "--max-restarts must be")],
)
def test_out_of_range_options_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.build({"model": "m", "input": "i", "output": "o", field: value})


def test_missing_required_option_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="missing --output"):
        RunConfig.build({"model": "m", "input": "i"})


def test_threads_default_divides_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert RunConfig("m", "i", "o", workers=3).threads == 2
    assert RunConfig("m", "i", "o", workers=16).threads == 1
    assert RunConfig("m", "i", "o", workers=2, threads_per_worker=3).threads == 3


def test_job_file_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('[run]\nmodel = "minilm"\ninput = "data/in.txt"\noutput = "/abs/out"\n')
    options = load_job_file(str(job))
    assert options["input"] == str(tmp_path / "data" / "in.txt")
    assert options["output"] == "/abs/out"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [("job.toml", "model = [", "not valid"), ("job.yaml", "model: [", "not valid YAML"),
     ("job.json", "{}", "must end in"), ("job.yaml", "- a\n- b\n", "table of options")],
)
def test_bad_job_files_are_refused(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_job_file(str(path))


def test_missing_job_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_job_file("/nonexistent/job.toml")


def test_report_fractions_efficiency_and_json(tmp_path: Path) -> None:
    w = WorkerStats(0, pid=41, host="here", ready=True)
    w.add_block(100, {"read": 0.1, "preprocess": 1.0, "model": 8.0, "write": 0.4}, 5.0)
    w.add_block(100, {"model": 0.4, "idle": 0.1}, 10.0)
    assert w.rows == 200 and w.blocks == 2
    f = w.fractions()
    assert f["model"] == pytest.approx(0.84)
    assert f["other"] == pytest.approx(0.0)
    assert w.overhead_fraction == pytest.approx(1 - 0.94)
    report = JobReport("out", "m", "in", "local", 2, 1, rows=200, wall_s=3.0, startup_s=1.0,
                       baseline_throughput=40.0, worker_stats=[w])
    assert report.throughput == pytest.approx(200 / 3)
    assert report.steady_throughput == pytest.approx(100)
    assert report.efficiency == pytest.approx(100 / 80)
    saved = json.loads(json.dumps(report.to_dict()))
    assert saved["efficiency"] == pytest.approx(1.25)
    assert saved["worker_stats"][0]["rows"] == 200
    assert "scaling efficiency 125%" in report.summary()


def test_report_names_a_worker_that_never_became_ready() -> None:
    done = WorkerStats(0, pid=41, host="here", ready=True)
    done.add_block(500, {"model": 1.0}, 2.0)
    loading = WorkerStats(1, not_ready="still loading when the job ended")
    report = JobReport("out", "m", "in", "local", 2, 1, rows=500, wall_s=3.0, worker_stats=[done, loading])
    lines = report.summary().splitlines()
    assert "  worker 0 (here pid 41): 500 rows" in "\n".join(lines)
    assert "  worker 1: not ready: still loading when the job ended" in lines
    assert "pid 0" not in report.summary()
    saved = report.to_dict()["worker_stats"]
    assert [w["ready"] for w in saved] == [True, False]
    assert saved[1]["not_ready"] == "still loading when the job ended"


def test_a_worker_more_than_twice_as_slow_as_the_others_is_flagged() -> None:
    def worker(i: int, rows: int, model_s: float) -> WorkerStats:
        w = WorkerStats(i, pid=40 + i, host="here", ready=True)
        w.add_block(rows, {"read": 0.5, "model": model_s, "write": 0.5, "idle": 30.0}, 40.0)
        return w

    # rows per working second (idle excluded): 100, 95, 30
    workers = [worker(0, 1000, 9.0), worker(1, 950, 9.0), worker(2, 300, 9.0)]
    report = JobReport("out", "m", "in", "local", 3, 1, rows=2250, wall_s=40.0, worker_stats=workers)
    assert report.slow_workers() == pytest.approx({2: 97.5 / 30})
    assert report.to_dict()["slow_workers"] == pytest.approx({"2": 97.5 / 30})
    lines = report.summary().splitlines()
    assert "SLOW: 3.2x slower than the median of the other workers" in next(x for x in lines if "worker 2" in x)
    assert not any("SLOW" in x for x in lines if "worker 0" in x or "worker 1" in x)
    # two workers, one 1.9x slower: not flagged; a worker with no rows is never flagged
    pair = [worker(0, 1900, 9.0), worker(1, 1000, 9.0), WorkerStats(2, ready=True)]
    assert JobReport("out", "m", "in", "local", 3, 1, worker_stats=pair).slow_workers() == {}


def test_progress_draws_only_when_enabled() -> None:
    stream = io.StringIO()
    bar = Progress(100, enabled=True, stream=stream)
    bar.update(50, force=True)
    bar.close(100)
    text = stream.getvalue()
    assert "50/100 rows" in text and "100/100 rows" in text and text.endswith("\n")
    quiet = io.StringIO()
    Progress(100, stream=quiet).close(100)  # StringIO is not a terminal
    assert quiet.getvalue() == ""
