"""`distinfer simulate`: the real scheduler and the real request queue in simulated time.

No processes and no clock: every figure below is a pure function of the inputs and the seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from distinfer.errors import ConfigError
from distinfer.scheduling import (
    Assign,
    BlockDone,
    BlockStarted,
    Cancel,
    Scheduler,
    SchedulerConfig,
    WorkerReady,
)
from distinfer.simulation import ClusterSpec, Fault, JobSpec, WorkerKind, simulate_job
from distinfer.simulation._workers import finish_time
from distinfer.simulation.cli import job_inputs, run
from distinfer.simulation.results import tail_seconds
from distinfer.simulation.serving import ServeSpec, simulate_serving


def uniform_job(rows: int, block: int, **options: object) -> JobSpec:
    return JobSpec(rows=rows, block_size=block, min_block_size=block, **options)  # type: ignore[arg-type]


# --- the batch job: exact figures ----------------------------------------------------------


@pytest.mark.parametrize(
    ("workers", "blocks", "prefetch"),
    [(1, 5, 2), (4, 40, 2), (4, 42, 2), (7, 100, 1), (16, 16, 3), (5, 3, 2)],
)
def test_identical_workers_without_faults_take_the_ideal_rounded_up_to_whole_blocks(
    workers: int, blocks: int, prefetch: int
) -> None:
    per_row, block, overhead, start_up = 0.002, 50, 0.01, 3.0
    cluster = ClusterSpec.uniform(workers, per_row, start_up_s=start_up)
    result = simulate_job(
        cluster, uniform_job(blocks * block, block, block_overhead_s=overhead, prefetch=prefetch)
    )
    block_s = overhead + block * per_row
    assert result.ok and result.committed == blocks
    assert result.makespan_s == pytest.approx(start_up + math.ceil(blocks / workers) * block_s, rel=1e-12)
    assert result.ideal_s == pytest.approx(blocks * block_s / workers, rel=1e-12)
    assert result.lower_bound_s == pytest.approx(start_up + result.ideal_s)
    assert result.runs == blocks and result.duplicate_runs == 0 and result.lost_runs == 0
    if blocks % workers == 0:  # no granularity loss: busy all the time after start-up
        assert result.makespan_s == pytest.approx(result.lower_bound_s, rel=1e-12)
        assert result.utilisation == pytest.approx(result.ideal_s / result.makespan_s, rel=1e-9)


def test_a_stopped_worker_resumes_where_it_was() -> None:
    # One worker, one 1 s block, frozen from 0.25 s to 5.25 s: it ends 5 s late.
    cluster = ClusterSpec.uniform(1, 0.01, faults=(Fault.parse("stop:0@0.25-5.25"),))
    result = simulate_job(cluster, uniform_job(100, 100))
    assert result.makespan_s == pytest.approx(6.0)


def test_finish_time_integrates_the_progress_rate_over_stop_and_slow_windows() -> None:
    windows = ((1.0, 2.0, 0.0), (3.0, 5.0, 0.5))
    assert finish_time(0.0, 0.5, windows) == 0.5
    assert finish_time(0.0, 1.5, windows) == 2.5  # 1 s before the stop, 0.5 s after it
    assert finish_time(0.0, 3.0, windows) == pytest.approx(5.0)  # 1 + 1 + 2 x 0.5
    assert finish_time(0.0, 3.5, windows) == pytest.approx(5.5)
    assert finish_time(1.5, 0.1, windows) == pytest.approx(2.1)


def test_a_killed_workers_block_is_run_again_and_no_block_is_lost_or_run_twice() -> None:
    # 4 workers, 1 s blocks, prefetch 1 (so nothing is stolen); worker 1 dies 0.5 s into its
    # third block. Its block goes back to pending and a replacement (ready 2 s later) joins.
    cluster = ClusterSpec.uniform(4, 0.01, start_up_s=1.0, faults=(Fault.parse("kill:1@3.5"),))
    result = simulate_job(cluster, uniform_job(40 * 100, 100, prefetch=1))
    assert result.ok and result.committed == 40
    assert (result.deaths, result.restarts, result.lost_runs) == (1, 1, 1)
    assert result.lost_s == pytest.approx(0.5)
    assert (
        result.runs == 40 + 1 and result.duplicate_runs == 0
    )  # the lost block ran once more, nothing else did
    assert result.makespan_s > 1.0 + 10.0  # the lost half-second and the replacement's start cost time


def test_the_job_fails_when_workers_die_faster_than_replacements_are_allowed() -> None:
    cluster = ClusterSpec.uniform(2, 0.01, faults=(Fault.parse("kill:0@0.5"), Fault.parse("kill:1@0.5")))
    result = simulate_job(cluster, uniform_job(1000, 100, max_restarts=0))
    assert not result.ok and result.error is not None and "all workers were lost" in result.error


def test_stragglers_lengthen_the_tail_and_stealing_shortens_it() -> None:
    kinds = (WorkerKind("fast", 8, 0.001),)
    job = uniform_job(400 * 100, 100, prefetch=4)
    plain = simulate_job(ClusterSpec(kinds, seed=3), job)
    slow = ClusterSpec(kinds, straggler_share=0.25, straggler_factor=10.0, seed=3)
    stealing = simulate_job(slow, job)
    no_steal = simulate_job(slow, JobSpec(**{**_fields(job), "steal": False}))
    assert stealing.tail_s > plain.tail_s
    assert stealing.steals > 0 and no_steal.steals == 0
    assert no_steal.makespan_s > stealing.makespan_s
    assert no_steal.tail_s > stealing.tail_s


def test_the_schedulers_speculation_copies_the_block_a_straggler_holds() -> None:
    # 4 workers, one 20x slower; few big blocks: the straggler's block decides the makespan.
    cluster = ClusterSpec((WorkerKind("w", 4, 0.001),), straggler_share=0.25, straggler_factor=20.0, seed=1)
    job = uniform_job(12 * 1000, 1000)
    base = simulate_job(cluster, JobSpec(**{**_fields(job), "speculate": False}))
    spec = simulate_job(cluster, job)  # on by default, as in `distinfer run`
    assert spec.ok and spec.committed == 12
    assert spec.backups >= 1 and spec.backups_won >= 1
    assert spec.makespan_s < base.makespan_s


def test_a_block_frozen_at_the_tail_is_copied_once_it_is_late_and_the_copy_stops_the_original() -> None:
    # 2 workers, 8 blocks of 1 s; worker 1 is frozen from 2.5 s to 30 s with its block half done
    cluster = ClusterSpec((WorkerKind("w", 2, 0.01),), faults=(Fault("stop", 1, 2.5, 30.0),))
    job = uniform_job(800, 100, prefetch=1)
    off = simulate_job(cluster, JobSpec(**{**_fields(job), "speculate": False}))
    on = simulate_job(cluster, job)
    assert off.makespan_s > 30.0 and off.backups == 0  # the job waits for the thaw
    # worker 0 runs the other blocks until 5 s, when the frozen one (begun at 2 s) has run 3x a
    # block's typical second: it copies it, done at 6 s; the original, cancelled, ran 4 s for nothing
    assert on.backups == 1 and on.backups_won == 1 and on.makespan_s == pytest.approx(6.0)
    assert on.committed == 8 and on.wasted_s == pytest.approx(4.0)


def test_the_same_seed_gives_the_same_result_and_another_seed_another() -> None:
    cluster = ClusterSpec(
        (WorkerKind("a", 30, 0.002), WorkerKind("b", 20, 0.001)),
        speed_sigma=0.3,
        mtbf_s=50.0,
        straggler_share=0.1,
        latency_s=0.001,
        seed=7,
    )
    job = JobSpec(rows=200_000, block_size=500, max_restarts=100)
    first, again = simulate_job(cluster, job), simulate_job(cluster, job)
    assert first.to_dict() == again.to_dict()
    other = simulate_job(ClusterSpec(**{**_fields(cluster), "seed": 8}), job)
    assert other.makespan_s != first.makespan_s
    assert first.deaths > 0 and first.ok


def test_tail_is_the_time_the_last_percent_of_blocks_took() -> None:
    assert tail_seconds([float(t) for t in range(1, 201)]) == 2.0  # 200 blocks: the last 2
    assert tail_seconds([5.0]) == 5.0
    assert tail_seconds([]) == 0.0


def test_the_scheduler_without_stealing_leaves_a_dry_worker_idle() -> None:
    sched = Scheduler({0: 10, 1: 10, 2: 10}, [0, 1], SchedulerConfig(prefetch=2, steal=False), now=0.0)
    sched.start(0.0)
    assert sched.handle(WorkerReady(0), 0.0) == [Assign(0, 0), Assign(0, 1)]
    assert sched.handle(WorkerReady(1), 0.0) == [Assign(1, 2)]
    sched.handle(BlockStarted(1, 2), 0.0)
    assert sched.handle(BlockDone(1, 2), 1.0) == []  # block 1 is not started on 0, but stays there
    stealing = Scheduler({0: 10, 1: 10, 2: 10}, [0, 1], SchedulerConfig(prefetch=2), now=0.0)
    for event in (WorkerReady(0), WorkerReady(1), BlockStarted(1, 2)):
        stealing.handle(event, 0.0)
    assert stealing.handle(BlockDone(1, 2), 1.0) == [Cancel(0, 1), Assign(1, 1)]


# --- serving ----------------------------------------------------------------------------


def test_serving_under_capacity_sheds_nothing_and_answers_in_about_the_service_time() -> None:
    spec = ServeSpec(
        rate=20.0,
        per_row_s=0.004,
        batch_overhead_s=0.006,
        replicas=2,
        max_queue_delay_s=0.0,
        duration_s=60.0,
        seed=2,
    )
    result = simulate_serving(spec)
    assert result.offered > 1000 and result.answered == result.offered and result.shed_share == 0.0
    one_row = 0.006 + 0.004
    assert result.latency_s["p50"] == pytest.approx(one_row, rel=1e-6)  # most find a replica idle
    assert result.latency_s["p99"] < 3 * one_row


def test_serving_three_times_over_capacity_sheds_the_excess() -> None:
    spec = ServeSpec(
        rate=1.0, per_row_s=0.004, batch_overhead_s=0.006, replicas=2, max_batch_size=8, duration_s=30.0
    )
    spec = ServeSpec(**{**_fields(spec), "rate": 3 * spec.capacity})
    result = simulate_serving(spec)
    assert result.shed_share > 0.5
    assert result.answered / result.duration_s < 1.05 * spec.capacity
    assert result.latency_s["max"] <= spec.timeout_s  # admitted requests meet their deadline
    assert result.mean_batch_rows > 7.5  # full batches under load


# --- inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "flag"),
    [
        (lambda: JobSpec(rows=10, block_size=0), "--block-size"),
        (lambda: JobSpec(rows=-1), "--rows"),
        (lambda: JobSpec(rows=10, block_size=8, min_block_size=9), "--min-block-size"),
        (lambda: JobSpec(rows=10, prefetch=0), "--prefetch"),
        (lambda: ClusterSpec.uniform(0, 0.001), "--workers"),
        (lambda: ClusterSpec.uniform(2, 0.0), "--per-row-ms"),
        (lambda: ClusterSpec.uniform(2, 0.001, straggler_share=1.5), "--stragglers"),
        (lambda: ClusterSpec.uniform(2, 0.001, mtbf_s=0.0), "--mtbf-s"),
        (lambda: ClusterSpec.uniform(2, 0.001, speed_sigma=float("nan")), "--speed-sigma"),
        (lambda: ClusterSpec.uniform(2, 0.001, faults=(Fault.parse("kill:5@1"),)), "--fault"),
        (
            lambda: ClusterSpec.uniform(
                2, 0.001, faults=(Fault.parse("stop:0@1-3"), Fault.parse("slow:0@2-4x2"))
            ),
            "--fault",
        ),
        (lambda: Fault.parse("kill:1"), "--fault"),
        (lambda: Fault.parse("stop:1@5"), "--fault"),
        (lambda: Fault.parse("stop:1@5-4"), "--fault"),
        (lambda: Fault.parse("slow:1@1-2x0.5"), "--fault slow"),
        (lambda: ServeSpec(rate=0.0, per_row_s=0.001), "--rate"),
        (lambda: ServeSpec(rate=1.0, per_row_s=0.001, max_batch_size=0), "--max-batch-size"),
    ],
)
def test_bad_inputs_name_the_flag(make: object, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        make()  # type: ignore[operator]


def _args(**values: object) -> dict[str, object]:
    return {"rows": 1000, "per_row_ms": 1.0, **values}


def test_the_cli_reads_the_cluster_file_and_the_profile(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(
        '[[node]]\nkind = "a"\ncount = 3\ncores = 8\nspeed = 2.0\n'
        '[[node]]\nkind = "b"\ncount = 2\ncores = 4\n'
    )
    spec, job = job_inputs(_args(cluster=str(cluster), threads_per_worker=2))
    assert [(k.name, k.count, k.per_row_s) for k in spec.kinds] == [("a", 12, 0.0005), ("b", 4, 0.001)]
    profile = tmp_path / "profile.json"
    profile.write_text(
        json.dumps({"per_row_s": {"a": 0.002, "b": 0.004}, "start_up_s": 4.0, "block_overhead_s": 0.02})
    )
    spec, job = job_inputs(
        {"rows": 10, "cluster": str(cluster), "profile": str(profile), "workers_per_node": 1}
    )
    assert [(k.count, k.per_row_s) for k in spec.kinds] == [(3, 0.002), (2, 0.004)]
    assert (spec.start_up_s, job.block_overhead_s) == (4.0, 0.02)
    with pytest.raises(ConfigError, match="--threads-per-worker"):
        job_inputs(_args(cluster=str(cluster), threads_per_worker=5))
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        job_inputs(_args(cluster=str(tmp_path / "missing.toml")))
    with pytest.raises(ConfigError, match="--rows"):
        job_inputs({"per_row_ms": 1.0})
    with pytest.raises(ConfigError, match="--per-row-ms"):
        job_inputs({"rows": 10})


def test_the_cli_prints_a_report_json_and_a_timeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(_args(workers=3, block_size=100, fault=["kill:1@0.05"], compare=True)) == 0
    text = capsys.readouterr().out
    assert "makespan" in text and "stealing off" in text and "speculation on" in text
    assert run(_args(workers=3, block_size=100, json=True)) == 0
    data = json.loads(capsys.readouterr().out)
    assert (
        data["results"][0]["committed"] == data["results"][0]["blocks"] == 11
        and data["results"][0]["ok"] is True
    )
    assert run({"serve": True, "rate": 50.0, "per_row_ms": 2.0, "duration_s": 5.0, "json": True}) == 0
    assert json.loads(capsys.readouterr().out)["shed_share"] == 0.0
    pytest.importorskip("matplotlib")
    png = tmp_path / "timeline.png"
    assert run(_args(workers=3, block_size=100, timeline=str(png))) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fields(spec: object) -> dict[str, object]:
    return {name: getattr(spec, name) for name in spec.__dataclass_fields__}  # type: ignore[attr-defined]
