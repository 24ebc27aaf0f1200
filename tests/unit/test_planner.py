"""The planner over fixed profiles: no process, no clock. It must choose as the cost model
says, respect memory limits, refuse impossible layouts with the reason, and rank hybrids."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from distinfer.errors import ConfigError
from distinfer.planning.cluster import Cluster, NodeKind, load_cluster, parse_bandwidth
from distinfer.planning.costmodel import (
    RUNTIME_RESERVE,
    _scaled_layers,
    allreduce_s,
    bubble,
    contention,
    estimate_tensor,
    single_rate,
    tensor_efficiency,
)
from distinfer.planning.cuts import LayerCost
from distinfer.planning.describe import describe_plans, plans_json
from distinfer.planning.planner import MODEL_PARALLEL_MARGIN, Plan, Workload, make_plans
from distinfer.planning.profiles import Links, Profile, Rate

MiB, GiB = 2**20, 2**30


def _layers(n: int = 8, weight: int = 64 * MiB, act: int = MiB) -> tuple[LayerCost, ...]:
    return (
        LayerCost("embedding", 0.001, weight, act),
        *(LayerCost(f"block {i}", 0.010, weight, act) for i in range(n)),
        LayerCost("head", 0.001, weight, 1000),
    )


def _profile(
    one: float = 100.0, two_threads: float = 160.0, pair: float = 90.0, cores: int = 2, **kw: object
) -> Profile:
    """One process: `one` rows/s at 1 thread, `two_threads` at 2; two at once: `pair` each."""
    layers = _layers()
    base = {
        "model": "m",
        "machine": "test",
        "cores": cores,
        "rates": (Rate(1, 32, one), Rate(2, 32, two_threads), Rate(1, 32, pair, processes=2)),
        "layers": layers,
        "layer_batch": 32,
        "weight_bytes": sum(c.weight_bytes for c in layers),
        "worker_rss": sum(c.weight_bytes for c in layers) + RUNTIME_RESERVE,
        "startup_s": 4.0,
        "links": Links(shm_latency_s=1e-4, shm_bytes_per_s=1e9, allreduce_latency_s=1e-4, allreduce_bytes_per_s=1e9),
        "strategies": ("data", "pipeline", "tensor"),
        "tensor_ranks": (2,),
    }
    base.update(kw)
    return Profile(**base)  # type: ignore[arg-type]


def _node(cores: int = 2, memory: int = 16 * GiB, count: int = 1, speed: float = 1.0, kind: str = "n") -> NodeKind:
    return NodeKind(kind, count, cores, memory, speed=speed)


def _local(cores: int = 2, memory: int = 16 * GiB) -> Cluster:
    return Cluster((_node(cores, memory),), local=True)


def _top(plans: list[Plan]) -> Plan:
    return next(p for p in plans if not p.refused)


def test_interpolation_and_contention_follow_the_measurements() -> None:
    prof = _profile()
    assert single_rate(prof, 1, 32) == 100.0 and single_rate(prof, 2, 32) == 160.0
    assert single_rate(prof, 1, 4) == 100.0  # flat beyond the measured batch sizes
    assert contention(prof, 1, 1, 2) == 1.0
    assert contention(prof, 2, 1, 2) == pytest.approx(0.9)
    assert contention(prof, 4, 1, 2) == pytest.approx(0.9 * 2 / 4)  # oversubscribed: time-shared
    assert bubble(2, 8) == pytest.approx(1 / 9)
    # a ring: 2 (k-1) steps of latency, 2 (k-1)/k of the bytes over the bandwidth
    assert allreduce_s(prof, 1e6, 2) == pytest.approx(2 * 1e-4 + 1e6 / 1e9)


def test_data_parallel_replicas_beat_threads_when_contention_costs_less_than_threading() -> None:
    # two one-thread replicas: 2 x 90 = 180 rows/s against one two-thread process: 160
    plans = make_plans(_profile(), _local(), Workload(rows=18_000))
    top = _top(plans)
    assert (top.strategy, top.replicas, top.threads) == ("data", 2, 1)
    assert top.rows_per_s == pytest.approx(180.0)
    assert top.job_s == pytest.approx(18_000 / 180.0 + 4.0)
    assert top.latency_s == pytest.approx(32 / 90.0)
    # ... and the other way round when threads scale better than processes share the cores
    top = _top(make_plans(_profile(two_threads=195.0), _local(), Workload(rows=1000)))
    assert (top.strategy, top.replicas, top.threads) == ("data", 1, 2)


def test_the_pipeline_prediction_is_the_bottleneck_stage_with_its_bubble() -> None:
    prof = _profile()
    # blocks of 256 from the first (no ramp): 4 blocks of 250 rows, 8 micro-batches of 32 each
    plans = make_plans(prof, _local(), Workload(rows=1000, block_size=256, min_block_size=256))
    [pipe] = [p for p in plans if p.strategy == "pipeline" and p.threads == 1]
    assert pipe.stages == 2 and pipe.cuts == (5,)  # embedding + 4 blocks | 4 blocks + head: equal
    per_batch = 32 / (100.0 * 0.9)  # the whole model's time for a batch, 2 busy processes
    stage = per_batch * 0.041 / 0.082 + 1e-4 + MiB / 1e9
    micro = 8
    last = stage - MiB / 1e9 - 1e-4  # the last stage sends nothing on
    # the first micro-batch through both stages, then one bottleneck step for each other
    assert pipe.rows_per_s == pytest.approx(32 * micro / (stage + last + (micro - 1) * stage), rel=1e-6)
    assert pipe.latency_s == pytest.approx(stage + last, rel=1e-6)
    assert pipe.rows_per_s < _top(plans).rows_per_s  # data parallel is better here


def test_the_pipeline_prediction_counts_the_bubbles_of_the_jobs_small_first_and_last_blocks() -> None:
    from distinfer.data.blocks import block_sizes

    prof = _profile()
    plans = make_plans(prof, _local(), Workload(rows=1000, block_size=256))  # ramp from 32 rows
    [pipe] = [p for p in plans if p.strategy == "pipeline" and p.threads == 1]
    assert pipe.batch_size == 32
    sizes = block_sizes(1000, 256, 32)
    assert sizes == [32, 64, 128, 184, 184, 184, 128, 64, 32]
    micro = [math.ceil(s / 32) for s in sizes]

    def stage(m: int) -> float:  # a block of one micro-batch keeps one stage busy at a time
        per_batch = 32 / (100.0 * (1.0 if m == 1 else 0.9))
        return per_batch * 0.041 / 0.082 + 1e-4 + MiB / 1e9

    def block_s(m: int) -> float:  # the last stage sends nothing on
        return stage(m) + (stage(m) - 1e-4 - MiB / 1e9) + (m - 1) * stage(m)

    expected = sum(m * 32 for m in micro) / sum(block_s(m) for m in micro)
    assert pipe.rows_per_s == pytest.approx(expected, rel=1e-6)
    assert "bubble 22% over the job's blocks of 1 to 6 micro-batches" in " ".join(pipe.reasons)
    # a job of two one-batch blocks: every block is all fill and drain
    [small] = [
        p
        for p in make_plans(prof, _local(), Workload(rows=16, block_size=16, batch_sizes=(8,)))
        if p.strategy == "pipeline" and p.threads == 1
    ]
    one_step = 8 / 100.0 * 0.041 / 0.082 + 1e-4 + MiB / 4 / 1e9  # activations at 8 of 32 rows
    assert small.rows_per_s == pytest.approx(8 / (2 * one_step - 1e-4 - MiB / 4 / 1e9), rel=1e-6)
    assert "bubble (p-1)/(m+p-1) = 50% with 1 micro-batches a block" in " ".join(small.reasons)


def test_a_model_larger_than_the_worker_memory_is_cut_into_enough_stages() -> None:
    layers = _layers(weight=400 * MiB)  # 10 layers of 400 MiB: 3.9 GiB
    prof = _profile(layers=layers, weight_bytes=10 * 400 * MiB, worker_rss=10 * 400 * MiB + RUNTIME_RESERVE)
    node = _node(cores=4, memory=32 * GiB)
    work = Workload(rows=1000, worker_memory=2 * GiB)
    plans = make_plans(prof, Cluster((node,), local=True), work)
    data = [p for p in plans if p.strategy == "data"]
    assert data and all("--worker-memory" in p.refused for p in data)
    top = _top(plans)
    # 2 GiB less the 512 MiB runtime reserve holds 3 layers of 400 MiB (with stage 0's reserve, 2)
    assert top.stages >= 4 and top.memory_bytes <= 2 * GiB
    assert any("model 3.9 GiB > worker memory 2 GiB, so at least 4 stages" in r for r in top.reasons), top.reasons
    assert all(p.memory_bytes <= 2 * GiB for p in plans if not p.refused)


def test_impossible_layouts_are_refused_with_the_reason() -> None:
    layers = _layers(weight=3 * GiB)  # every layer alone is over the limit
    prof = _profile(layers=layers, weight_bytes=10 * 3 * GiB, worker_rss=31 * GiB)
    plans = make_plans(prof, _local(memory=64 * GiB), Workload(rows=10, worker_memory=2 * GiB))
    assert plans and all(p.refused for p in plans)
    assert any("--worker-memory" in p.refused for p in plans)
    # a node too small for the processes is named too
    plans = make_plans(_profile(worker_rss=3 * GiB), _local(memory=4 * GiB), Workload(rows=10))
    two = [p for p in plans if p.strategy == "data" and p.replicas == 2]
    assert two and all("need more than n's 4 GiB" in p.refused for p in two)
    assert _top(plans).replicas == 1


def test_a_latency_target_chooses_tensor_parallel_and_says_what_it_costs() -> None:
    # tensor: each rank computes half a batch; 2 x 0.9 contention; 20 all-reduces of 1 MiB
    prof = _profile(two_threads=120.0, rates=(Rate(1, 8, 90.0), Rate(1, 32, 100.0), Rate(2, 8, 100.0),
                                              Rate(2, 32, 120.0), Rate(1, 8, 85.0, 2), Rate(1, 32, 90.0, 2)))
    free = _top(make_plans(prof, _local(), Workload(rows=1000)))
    assert free.strategy == "data" and free.batch_size == 32
    plans = make_plans(prof, _local(), Workload(rows=1000, latency_target_s=0.06))
    top = _top(plans)
    assert top.latency_s <= 0.06 and top.strategy == "tensor" and top.batch_size == 8
    assert any("latency target" in r and "throughput" in r for r in top.reasons), top.reasons
    assert all(p.latency_s > 0.06 for p in plans if p.refused and "latency target" in p.refused)
    assert free.rows_per_s > top.rows_per_s


def test_a_measured_tensor_group_replaces_the_ideal_split() -> None:
    base = (Rate(1, 2, 100.0), Rate(1, 32, 100.0), Rate(2, 2, 105.0), Rate(2, 32, 160.0),
            Rate(1, 2, 90.0, 2), Rate(1, 32, 90.0, 2))  # fmt: skip
    ideal = _profile(rates=base)
    assert tensor_efficiency(ideal, 2, 2, 2) == 1.0  # nothing measured: the formula alone
    # the real group: 60% of the formula's rate at batch 2, all of it at batch 32
    at2, at32 = (estimate_tensor(ideal, 1, 2, 1, b, 2).rows_per_s for b in (2, 32))
    prof = _profile(rates=(*base, Rate(1, 2, 0.6 * at2, ranks=2), Rate(1, 32, at32, ranks=2)))
    assert tensor_efficiency(prof, 2, 2, 2) == pytest.approx(0.6)
    assert tensor_efficiency(prof, 2, 8, 2) == pytest.approx(0.8)  # halfway in log b
    est = estimate_tensor(prof, 1, 2, 1, 2, 2)
    assert est.rows_per_s == pytest.approx(0.6 * at2) and est.latency_s == pytest.approx(2 / (0.6 * at2))
    assert estimate_tensor(prof, 1, 2, 1, 32, 2).rows_per_s == pytest.approx(at32)
    # a group's rate is not a lone process's: data-parallel and contention ignore it
    assert single_rate(prof, 1, 2) == 100.0 and contention(prof, 2, 1, 2, 2) == contention(ideal, 2, 1, 2, 2)
    # a latency target that the ideal split meets (15 ms) and the measured group does not (26 ms)
    work = Workload(rows=1000, batch_sizes=(2,), latency_target_s=0.018)
    assert _top(make_plans(ideal, _local(), work)).strategy == "tensor"
    tensor = [p for p in make_plans(prof, _local(), work) if p.strategy == "tensor"]
    assert tensor and all("latency target" in p.refused for p in tensor)


def test_hybrids_rank_by_the_cost_model_on_a_four_core_node() -> None:
    rates = (Rate(1, 32, 100.0), Rate(2, 32, 170.0), Rate(4, 32, 260.0), Rate(1, 32, 80.0, processes=4))
    prof = _profile(rates=rates, cores=4)
    plans = [p for p in make_plans(prof, _local(cores=4), Workload(rows=1000)) if not p.refused]
    by_key = {(p.strategy, p.replicas, p.stages, p.ranks, p.threads): p for p in plans}
    # 4 busy one-thread processes run at 0.8x each: 2 pipelines of 2 stages, 4 replicas, ...
    four = by_key[("data", 4, 1, 1, 1)]
    assert four.rows_per_s == pytest.approx(4 * 80.0)
    hybrid = by_key[("data x pipeline", 2, 2, 1, 1)]
    assert hybrid.processes == 4 and hybrid.rows_per_s < four.rows_per_s
    assert ("data x tensor", 2, 1, 2, 1) in by_key
    # best first, ties 2%, a model-parallel plan's throughput less its margin
    ranked = [p.rows_per_s / (1 + MODEL_PARALLEL_MARGIN if p.stages * p.ranks > 1 else 1) for p in plans]
    assert all(a >= b * (1 - 0.021) for a, b in itertools.pairwise(ranked))
    assert plans[0] is four


@pytest.mark.parametrize("group_rate, tensor_first", [(185.0, False), (200.0, True)])
def test_a_model_parallel_plan_must_beat_data_parallel_by_its_margin(group_rate: float, tensor_first: bool) -> None:
    # two one-thread replicas make 2 x 90 = 180 rows/s; one 2-rank group measured at `group_rate`
    rates = (Rate(1, 32, 100.0), Rate(2, 32, 170.0), Rate(1, 32, 90.0, processes=2),
             Rate(1, 32, group_rate, ranks=2))  # fmt: skip
    plans = [p for p in make_plans(_profile(rates=rates), _local(), Workload(rows=1000, batch_sizes=(32,)))
             if not p.refused]  # fmt: skip
    data = next(p for p in plans if p.strategy == "data" and p.replicas == 2)
    tensor = next(p for p in plans if p.strategy == "tensor")
    assert tensor.rows_per_s > data.rows_per_s  # 3% and 11% faster
    assert plans[0] is (tensor if tensor_first else data)
    if not tensor_first:
        assert "must gain over data parallel" in " ".join(tensor.reasons)


def test_a_cluster_sums_its_nodes_and_runs_the_best_count_on_each_kind(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[node]]\nkind = "small"\ncount = 48\ncores = 2\nmemory = "8GiB"\n\n'
                    '[[node]]\nkind = "fast"\ncount = 16\ncores = 2\nmemory = "8GiB"\nspeed = 1.5\n'
                    'network = "25Gbit/s"\n')
    cluster = load_cluster(path)
    assert cluster.node_count == 64 and not cluster.local
    assert cluster.nodes[1].network == pytest.approx(25e9 / 8)
    plans = make_plans(_profile(), cluster, Workload(rows=1_000_000))
    top = _top(plans)
    assert top.per_node == (("small", 2), ("fast", 2))
    assert top.rows_per_s == pytest.approx(48 * 180.0 + 16 * 1.5 * 180.0)
    assert top.replicas == 128
    text = describe_plans(plans, _profile(), cluster, Workload(rows=1_000_000), 3)
    assert "64" not in text.splitlines()[0] and "2/node on small" in text
    data = plans_json(plans, _profile(), cluster, Workload(rows=1_000_000))
    assert json.loads(json.dumps(data))["plans"][0]["per_node"] == {"small": 2, "fast": 2}
    # on Ray each block is an actor call: 1,024 rows at 90 rows/s (x1.5 on the fast kind) plus 2 x 0.5 s
    slow_calls = _profile(links=Links(ray_latency_s=0.5, ray_bytes_per_s=1e9))
    called = _top(make_plans(slow_calls, cluster, Workload(rows=1_000_000, block_size=1024)))
    replica = {speed: 1024 / (1024 / (speed * 90.0) + 1.0) for speed in (1.0, 1.5)}
    assert called.rows_per_s == pytest.approx(96 * replica[1.0] + 32 * replica[1.5])
    # ... but not on this machine, where workers are local processes
    local = _top(make_plans(slow_calls, _local(), Workload(rows=1000)))
    assert local.rows_per_s == _top(make_plans(_profile(), _local(), Workload(rows=1000))).rows_per_s


@pytest.mark.parametrize(("text", "message"), [
    ("[[node]]\ncount = 2\n", "the field 'kind' is required"),
    ('[[node]]\nkind = "a"\ncount = 0\n', "count must be an integer >= 1"),
    ('[[node]]\nkind = "a"\ncount = 1\nspeed = -1\n', "speed must be a number > 0"),
    ('[[node]]\nkind = "a"\ncount = 1\nmemory = "lots"\n', "expected a size like 3GiB"),
    ('[[node]]\nkind = "a"\ncount = 1\nnetwork = "fast"\n', "expected a bandwidth like 10Gbit/s"),
    ('[[node]]\nkind = "a"\ncount = 1\ncpus = 4\n', "unknown field 'cpus'"),
    ('[[node]]\nkind = "a"\ncount = 1\n[[node]]\nkind = "a"\ncount = 1\n', "node kinds must be unique"),
    ("kind = 'a'\n", "expected one or more [[node]] tables"),
    ("[[node]\n", "not a valid TOML file"),
])
def test_a_bad_cluster_file_names_the_file_and_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_cluster(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_bandwidths_read_bits_and_bytes() -> None:
    assert parse_bandwidth("10Gbit/s", "x") == parse_bandwidth("10Gbps", "x") == pytest.approx(1.25e9)
    assert parse_bandwidth("1.25GB/s", "x") == pytest.approx(1.25e9)
    assert parse_bandwidth(5e8, "x") == 5e8


def test_a_profile_survives_its_json_round_trip(tmp_path: Path) -> None:
    prof = _profile(layers_by_batch=((1, tuple(0.5 for _ in _layers())),))
    prof.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == prof
    (tmp_path / "bad.json").write_text("{")
    assert Profile.load(tmp_path / "bad.json") is None


def test_the_profile_sample_is_runs_of_rows_spread_over_the_whole_input(tmp_path: Path) -> None:
    from distinfer.data.sources import open_source, read_block
    from distinfer.driver.profiling import SAMPLE_CHUNKS, _sample_blocks, sample_rows

    path = tmp_path / "lines.txt"
    path.write_text("".join(f"row {i}\n" for i in range(10_000)), encoding="utf-8")
    source = open_source(str(path))
    blocks = _sample_blocks(source, 256)
    assert len(blocks) == SAMPLE_CHUNKS and all(b.rows == 256 // SAMPLE_CHUNKS for b in blocks)
    starts = [b.start for b in blocks]
    assert starts == sorted(set(starts)) and starts[0] == 0
    assert starts[-1] > 10_000 * (SAMPLE_CHUNKS - 1) / SAMPLE_CHUNKS - 256  # the tail is sampled too
    last = read_block(source, blocks[-1], ["text"])["text"]
    assert list(last) == [f"row {i}" for i in range(blocks[-1].start, blocks[-1].stop)]
    short = tmp_path / "short.txt"
    short.write_text("".join(f"row {i}\n" for i in range(100)), encoding="utf-8")
    assert [(b.start, b.stop) for b in _sample_blocks(open_source(str(short)), 256)] == [(0, 100)]
    assert [(b.start, b.rows) for b in _sample_blocks(source, 2)] == [(0, 1), (5000, 1)]
    # as many rows as one thread runs in about 2 s: all 256 of a fast model, 2 of a slow one,
    # and at least 16 where they take at most 8 s
    assert (sample_rows(0.001, 256), sample_rows(0.05, 256), sample_rows(6.0, 256)) == (256, 40, 2)
    assert (sample_rows(0.3, 256), sample_rows(0.9, 256), sample_rows(3.0, 256), sample_rows(0.3, 10)) == (16, 8, 2, 10)
    # a slow model's sample still fills one batch of the smallest measured size, within 40 s
    assert (sample_rows(3.0, 256, 8), sample_rows(6.0, 256, 8), sample_rows(0.3, 256, 8)) == (8, 6, 16)
    assert sample_rows(3.0, 4, 8) == 4  # never more than asked


def test_a_generation_profile_plans_running_sequences_and_the_time_per_token() -> None:
    # rows of 32 tokens; "batch size" = sequences running together
    rates = (Rate(1, 8, 2.0), Rate(1, 32, 4.0), Rate(2, 8, 3.0), Rate(2, 32, 5.0),
             Rate(1, 8, 1.9, 2), Rate(1, 32, 3.6, 2))  # fmt: skip
    prof = _profile(rates=rates, layers=(), strategies=("data",), tensor_ranks=(), tokens_per_row=32.0)
    plans = make_plans(prof, _local(), Workload(rows=128))
    assert {p.strategy for p in plans} == {"data"} and all(p.generates for p in plans)
    top = _top(plans)
    assert (top.replicas, top.threads, top.batch_size) == (2, 1, 32)
    assert top.rows_per_s == pytest.approx(7.2)
    # one step makes one token for each of the 32 running sequences: 32 / (3.6 x 32) s
    assert top.latency_s == pytest.approx(32 / 3.6 / 32)
    assert "--max-running" in top.cli_args() and "--batch-size" not in top.cli_args()
    assert "32 running" in top.shape
    text = describe_plans(plans, prof, _local(), Workload(rows=128), 5)
    assert "7.2 (230)" in text and "per token" in text
    assert plans_json(plans, prof, _local(), Workload(rows=128))["plans"][0]["tokens_per_s"] == pytest.approx(230.4)
    # a time-per-token target of 150 ms: 2 x 32 running (278 ms a token) is refused with the
    # reason, and 2 x 8 running (139 ms) chosen, with what it costs
    tight = make_plans(prof, _local(), Workload(rows=128, latency_target_s=0.15))
    best = _top(tight)
    assert (best.replicas, best.batch_size) == (2, 8) and best.latency_s == pytest.approx(8 / (2.0 * 0.95) / 32)  # contention at batch 8: 1.9 / 2.0
    assert any("one output token takes 278 ms, over the 150 ms" in p.refused for p in tight)
    assert any("cuts one output token" in r and "150 ms latency target" in r for r in best.reasons), best.reasons


def test_a_model_that_needs_more_stages_than_cores_gets_them_one_thread_each() -> None:
    layers = _layers(weight=400 * MiB)  # 3.9 GiB: at least 4 stages of 2 GiB, on 2 cores
    prof = _profile(layers=layers, weight_bytes=10 * 400 * MiB, worker_rss=10 * 400 * MiB + RUNTIME_RESERVE)
    plans = make_plans(prof, _local(cores=2, memory=32 * GiB), Workload(rows=1000, worker_memory=2 * GiB))
    top = _top(plans)
    assert top.stages >= 4 and top.threads == 1 and top.replicas == 1 and top.memory_bytes <= 2 * GiB
    # the stages share 2 cores: their contention is the time-shared one
    assert any(f"{top.stages} busy processes of 1 thread(s) run at 0.45x" in r for r in top.reasons), top.reasons
    assert max(p.stages for p in plans) <= top.stages + 1 <= len(layers)


def test_contention_and_layer_shares_are_taken_at_the_plans_batch_size() -> None:
    rates = (Rate(1, 8, 100.0), Rate(1, 64, 100.0), Rate(1, 8, 95.0, 2), Rate(1, 64, 80.0, 2))
    prof = _profile(rates=rates)
    assert contention(prof, 2, 1, 2, 8) == pytest.approx(0.95)
    assert contention(prof, 2, 1, 2, 64) == pytest.approx(0.80)
    assert contention(prof, 2, 1, 2) == pytest.approx(0.875)  # no batch size: the mean
    # the head is a tenth of the time at batch 8 and half of it at batch 1: the cut moves
    layers = (LayerCost("block 0", 0.45, MiB, MiB), LayerCost("block 1", 0.45, MiB, MiB),
              LayerCost("head", 0.10, MiB, 1000))  # fmt: skip
    prof = _profile(layers=layers, layer_batch=8, layers_by_batch=((1, (0.25, 0.25, 0.5)),))
    at = {b: next(p for p in make_plans(prof, _local(), Workload(rows=64, block_size=64, batch_sizes=(b,)))
                  if p.stages == 2 and p.threads == 1) for b in (1, 8)}  # fmt: skip
    assert at[8].cuts == (1,) and at[1].cuts == (2,)


def test_layer_shares_move_to_the_samples_length() -> None:
    # at 64 tokens the attention-heavy block takes half the time; at 256 three quarters
    layers = (LayerCost("block 0", 0.5, MiB, MiB), LayerCost("block 1", 0.4, MiB, MiB),
              LayerCost("head", 0.1, MiB, 1000))  # fmt: skip
    at_256 = (3.0, 0.8, 0.2)  # shares 0.75, 0.2, 0.05
    prof = _profile(layers=layers, layer_batch=8, layer_seq_len=64, layers_by_seq=((256, at_256),))
    same = _scaled_layers(replace(prof, seq_len=64), 8)
    assert [c.seconds for c in same] == pytest.approx([0.5, 0.4, 0.1])
    long = _scaled_layers(replace(prof, seq_len=256), 8)
    assert [c.seconds for c in long] == pytest.approx([0.75, 0.2, 0.05])  # in layer_batch's units
    assert long[0].activation_bytes == 4 * MiB  # 4x the tokens
    half = _scaled_layers(replace(prof, seq_len=128), 8)  # halfway in log L
    assert half[0].seconds == pytest.approx(0.625 / (0.625 + 0.3 + 0.075))
    assert _scaled_layers(replace(prof, seq_len=0), 8) == same  # length unknown: as measured
    # a family measured at one length only (ONNX, PyTorch) is taken as measured, whatever seq_len says
    assert _scaled_layers(replace(prof, seq_len=256, layers_by_seq=()), 8) == same


def test_the_samples_length_is_read_from_its_padded_token_batches() -> None:
    import numpy as np
    import torch

    from distinfer.driver.profiling import padded_length

    ids = [(torch.zeros(32, 10, dtype=torch.long), torch.ones(32, 10)), (torch.zeros(8, 40, dtype=torch.long), None)]
    assert padded_length(ids) == round((32 * 10 + 8 * 40) / 40)
    assert padded_length([{"input_ids": np.zeros((4, 7), dtype=np.int64)}]) == 7
    assert padded_length([np.zeros((4, 16), dtype=np.float32)]) == 0  # vectors, not tokens
    assert padded_length([]) == 0
