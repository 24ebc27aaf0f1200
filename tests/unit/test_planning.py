"""The pipeline planner: exact balanced cuts (against brute force), memory limits, sizes, profiling.

No processes; the profiling tests time tiny layers for a few milliseconds.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distinfer.errors import ConfigError
from distinfer.models.profile import measure_layers, module_bytes, profile_layers, tensor_bytes
from distinfer.planning import (
    LayerCost,
    PipelinePlan,
    Stage,
    balanced_cut,
    explicit_cut,
    format_bytes,
    min_stages_for_memory,
    parse_memory,
)

GiB = 2**30


def layers(
    seconds: Sequence[float], weights: Sequence[int] = (), acts: Sequence[int] = ()
) -> list[LayerCost]:
    n = len(seconds)
    weights = list(weights) or [0] * n
    acts = list(acts) or [0] * n
    return [
        LayerCost(f"l{i}", float(s), w, a)
        for i, (s, w, a) in enumerate(zip(seconds, weights, acts, strict=True))
    ]


# --- brute force, written independently of the planner -------------------------------------


def stage_memory(costs: Sequence[LayerCost], a: int, b: int) -> int:
    held = [c.activation_bytes for c in costs[a:b]] + ([costs[a - 1].activation_bytes] if a else [])
    return sum(c.weight_bytes for c in costs[a:b]) + 2 * max(held)


def all_splits(
    costs: Sequence[LayerCost], stages: int, limit: int | None
) -> list[tuple[float, int, tuple[int, ...]]]:
    """(bottleneck, bytes crossing cuts, cuts) of every split that fits the limit."""
    n, found = len(costs), []
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = list(itertools.pairwise([0, *cuts, n]))
        if limit is not None and any(stage_memory(costs, a, b) > limit for a, b in bounds):
            continue
        bottleneck = max(sum(c.seconds for c in costs[a:b]) for a, b in bounds)
        found.append((bottleneck, sum(costs[c - 1].activation_bytes for c in cuts), cuts))
    return found


costs_strategy = st.lists(
    st.tuples(st.integers(0, 20), st.integers(0, 10), st.integers(0, 10)), min_size=1, max_size=7
).map(lambda rows: [LayerCost(f"l{i}", float(s), w, a) for i, (s, w, a) in enumerate(rows)])


def limits(costs: Sequence[LayerCost]) -> st.SearchStrategy[int]:
    """Limits at and just below some stage's memory: where a split starts or stops fitting."""
    memories = {stage_memory(costs, a, b) for a, b in itertools.combinations(range(len(costs) + 1), 2)}
    return st.sampled_from(sorted(memories)).flatmap(lambda m: st.sampled_from([m, max(m - 1, 0)]))


@settings(max_examples=400, deadline=None)
@given(costs=costs_strategy, stages=st.integers(1, 4), data=st.data())
def test_balanced_cut_matches_brute_force(costs: list[LayerCost], stages: int, data: st.DataObject) -> None:
    limit = data.draw(st.none() | limits(costs), label="limit")
    if stages > len(costs):
        with pytest.raises(ConfigError, match="more than the model's"):
            balanced_cut(costs, stages, limit)
        return
    splits = all_splits(costs, stages, limit)
    if not splits:
        with pytest.raises(ConfigError, match="--worker-memory"):
            balanced_cut(costs, stages, limit)
        assert limit is not None
        need = min_stages_for_memory(costs, limit)
        assert need is None or need > stages
        return
    plan = balanced_cut(costs, stages, limit)
    best = min(s[0] for s in splits)
    fewest = min(s[1] for s in splits if s[0] == best)
    assert plan.bottleneck_s == best
    assert plan.cuts() in {s[2] for s in splits if s[:2] == (best, fewest)}
    assert len(plan.stages) == stages
    for s in plan.stages:
        assert s.memory_bytes == stage_memory(costs, s.start, s.stop)
        assert s.seconds == sum(c.seconds for c in costs[s.start : s.stop])
        assert limit is None or s.memory_bytes <= limit


@settings(max_examples=300, deadline=None)
@given(costs=costs_strategy, data=st.data())
def test_min_stages_for_memory_matches_brute_force(costs: list[LayerCost], data: st.DataObject) -> None:
    limit = data.draw(limits(costs), label="limit")
    fitting = [k for k in range(1, len(costs) + 1) if all_splits(costs, k, limit)]
    assert min_stages_for_memory(costs, limit) == (fitting[0] if fitting else None)


# --- balanced cuts ------------------------------------------------------------------------


def test_heavy_layer_is_balanced_against_the_rest() -> None:
    costs = layers([1, 1, 1, 10, 1, 1])
    two = balanced_cut(costs, 2)
    assert two.cuts() == (3,)
    assert [s.seconds for s in two.stages] == [3.0, 12.0]
    three = balanced_cut(costs, 3)
    assert three.cuts() == (3, 4)  # the heavy layer alone
    assert three.bottleneck_s == 10.0
    assert three.total_s == 15.0
    assert balanced_cut(costs, 1).cuts() == ()
    assert balanced_cut(costs, 6).cuts() == (1, 2, 3, 4, 5)


def test_ties_on_time_go_to_the_cut_that_sends_fewer_bytes() -> None:
    assert balanced_cut(layers([1, 0, 1], acts=[100, 10, 1]), 2).cuts() == (2,)
    assert balanced_cut(layers([1, 0, 1], acts=[10, 100, 1]), 2).cuts() == (1,)


def test_memory_limit_moves_the_cut() -> None:
    # the worked example of the module note
    costs = layers([2e-3, 3e-3, 4e-3, 1e-3], [3 * GiB, GiB, GiB, GiB], [GiB // 10] * 4)
    assert balanced_cut(costs, 2).cuts() == (2,)
    limited = balanced_cut(costs, 2, memory_limit=4 * GiB)
    assert limited.cuts() == (1,)
    assert limited.bottleneck_s == pytest.approx(8e-3)
    assert all(s.memory_bytes <= 4 * GiB for s in limited.stages)


def test_a_layer_larger_than_the_limit_is_reported() -> None:
    costs = layers([2e-3, 3e-3, 4e-3, 1e-3], [3 * GiB, GiB, GiB, GiB], [GiB // 10] * 4)
    with pytest.raises(ConfigError) as err:
        balanced_cut(costs, 2, memory_limit=3 * GiB)
    message = str(err.value)
    assert "'l0'" in message and "3.2 GiB" in message and "3 GiB" in message
    assert "no number of stages fits" in message and "larger --worker-memory" in message
    assert "\n" not in message
    assert min_stages_for_memory(costs, 3 * GiB) is None


def test_too_few_stages_for_the_limit_names_the_minimum() -> None:
    costs = layers([1, 1, 1, 1], [2 * GiB] * 4)
    limit = parse_memory("4.5GiB")
    assert min_stages_for_memory(costs, limit) == 2
    with pytest.raises(ConfigError) as err:
        balanced_cut(costs, 1, memory_limit=limit)
    message = str(err.value)
    assert "largest layer 'l0': 2 GiB" in message  # the first of equals
    assert "4.5 GiB" in message and "--stages 2" in message and "at least 8 GiB" in message
    assert balanced_cut(costs, 2, memory_limit=limit).cuts() == (2,)


@pytest.mark.parametrize(
    ("stages", "match"),
    [(7, "--stages 7 is more than the model's 6 layers; use --stages 6"), (0, "at least 1")],
)
def test_impossible_stage_counts(stages: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        balanced_cut(layers([1] * 6), stages)


def test_no_layers() -> None:
    with pytest.raises(ConfigError, match="no layers"):
        balanced_cut([], 1)
    with pytest.raises(ConfigError, match="no layers"):
        explicit_cut([], [])


# --- explicit cuts ------------------------------------------------------------------------


def test_explicit_cuts() -> None:
    plan = explicit_cut(layers([1, 2, 3, 4, 5, 6]), [2, 4])
    assert [(s.start, s.stop, s.seconds) for s in plan.stages] == [(0, 2, 3.0), (2, 4, 7.0), (4, 6, 11.0)]
    assert plan.cuts() == (2, 4)
    assert explicit_cut(layers([1, 2]), []).cuts() == ()


@pytest.mark.parametrize(
    ("cuts", "match"),
    [
        ([0], "0 is not a layer index from 1 to 5"),
        ([6], "6 is not a layer index"),
        ([-1], "-1 is not a layer index"),
        ([3, 2], "strictly increasing, got 3 then 2"),
        ([2, 2], "strictly increasing"),
    ],
)
def test_invalid_explicit_cuts(cuts: list[int], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        explicit_cut(layers([1] * 6), cuts)


def test_explicit_cuts_check_memory_and_suggest_cuts_that_fit() -> None:
    costs = layers([1, 1, 1, 1], [2 * GiB] * 4)
    with pytest.raises(ConfigError, match=r"stage 0 \(layers 0\.\.2\) needs 6 GiB.*--cuts 2"):
        explicit_cut(costs, [3], memory_limit=5 * GiB)
    with pytest.raises(ConfigError, match="fewest stages that fit is 4"):
        explicit_cut(costs, [2], memory_limit=3 * GiB)
    assert explicit_cut(costs, [2], memory_limit=4 * GiB).cuts() == (2,)


# --- the plan -----------------------------------------------------------------------------


@pytest.mark.parametrize(("p", "m", "expected"), [(2, 8, 1 / 9), (1, 5, 0.0), (4, 1, 3 / 4), (4, 13, 3 / 16)])
def test_bubble(p: int, m: int, expected: float) -> None:
    plan = balanced_cut(layers([1] * p), p)
    assert plan.bubble(m) == pytest.approx(expected)


def test_bubble_needs_a_micro_batch() -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        balanced_cut(layers([1, 1]), 2).bubble(0)


def test_describe_lists_every_stage() -> None:
    costs = layers([1e-3, 1e-3, 1e-3, 10e-3, 1e-3, 1e-3], [GiB] * 6, [1024] * 6)
    plan = balanced_cut(costs, 3)
    text = plan.describe([c.name for c in costs])
    lines = text.splitlines()
    assert lines[0].split() == ["stage", "layers", "time", "memory", "of", "ideal"]
    assert lines[1].split()[:2] == ["0", "l0..l2"]
    assert lines[2].split()[:4] == ["1", "l3", "10.000", "ms"]
    assert lines[3].split()[:2] == ["2", "l4..l5"]
    assert "200%" in lines[2]  # 10 ms against an ideal of 15 / 3 = 5 ms
    assert "bottleneck 10.000 ms" in lines[-1]
    assert "0..2" in plan.describe()  # indices when no names are given


def test_plan_rejects_gaps() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        PipelinePlan((Stage(0, 2, 1.0, 0), Stage(3, 4, 1.0, 0)))
    with pytest.raises(ValueError, match="contiguous"):
        PipelinePlan(())


def test_layer_cost_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        LayerCost("x", -1.0, 0, 0)
    with pytest.raises(ValueError):
        LayerCost("x", float("nan"), 0, 0)
    with pytest.raises(ValueError):
        LayerCost("x", 1.0, -1, 0)


# --- sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("3GiB", 3 * GiB),
        ("512MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("2000000", 2_000_000),
        ("3g", 3 * GiB),
        ("3G", 3 * GiB),
        (" 2 gib ", 2 * GiB),
        ("1kb", 1000),
        ("1Ki", 1024),
        ("10B", 10),
        (".5MiB", 2**19),
        ("1TiB", 2**40),
    ],
)
def test_parse_memory(text: str, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["abc", "", "3XB", "-1GiB", "1.2.3", "GiB", "inf", "nan"])
def test_parse_memory_rejects_junk(text: str) -> None:
    with pytest.raises(ConfigError, match="--worker-memory: expected a size like 3GiB or 512MiB"):
        parse_memory(text)


def test_parse_memory_messages() -> None:
    with pytest.raises(ConfigError) as err:
        parse_memory("abc")
    assert str(err.value) == "--worker-memory: expected a size like 3GiB or 512MiB, got 'abc'"
    with pytest.raises(ConfigError, match="more than 0"):
        parse_memory("0GiB")
    with pytest.raises(ConfigError, match=r"^--stage-memory:"):
        parse_memory("x", option="--stage-memory")


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (3 * GiB, "3 GiB"),
        (5 * 2**40, "5 TiB"),
        (-2048, "-2 KiB"),
    ],
)
def test_format_bytes(size: int, text: str) -> None:
    assert format_bytes(size) == text


@pytest.mark.parametrize("size", [1, 1000, 123_456_789, 3 * GiB + 12345])
def test_format_bytes_parses_back_within_rounding(size: int) -> None:
    assert parse_memory(format_bytes(size)) == pytest.approx(size, rel=0.05)


# --- profiling ----------------------------------------------------------------------------


def test_tensor_bytes_of_arrays_and_containers() -> None:
    a = np.zeros((3, 4), dtype=np.float32)
    assert tensor_bytes(a) == 48
    assert tensor_bytes((a, [a], {"x": a, "n": None})) == 144
    assert tensor_bytes("text") == 0
    assert module_bytes(object()) == 0


def test_measure_plain_callables() -> None:
    def spin(n: int) -> Callable[[Any], Any]:
        return lambda x: (sum(range(n)), x)[1]

    seconds = measure_layers([spin(100), spin(200_000), spin(10_000)], 0, repeats=3)
    assert len(seconds) == 3
    assert seconds[0] < seconds[2] < seconds[1]
    with pytest.raises(ValueError, match="repeats"):
        measure_layers([spin(1)], 0, repeats=0)


def test_measure_torch_layers_in_cost_order() -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    w = torch.randn(128, 128) / 12

    def matmuls(k: int) -> Callable[[Any], Any]:
        def layer(x: Any) -> Any:
            for _ in range(k):
                x = torch.tanh(x @ w)
            return x

        return layer

    # One thread: on a busy machine a second thread waits for a core and times turn to noise.
    # Costs 4x apart in a shuffled order keep the check about order, not about exact ratios.
    ks = [16, 1, 64, 4]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds = measure_layers([matmuls(k) for k in ks], torch.randn(128, 128), repeats=5)
    finally:
        torch.set_num_threads(threads)
    assert sorted(range(len(ks)), key=seconds.__getitem__) == sorted(range(len(ks)), key=ks.__getitem__)


def test_torch_sizes_and_profile() -> None:
    torch = pytest.importorskip("torch")
    nn = torch.nn
    assert module_bytes(nn.Linear(4, 3)) == (12 + 3) * 4
    assert module_bytes(nn.BatchNorm1d(4)) == (4 + 4) * 4 + (4 + 4) * 4 + 8  # weights, running stats, count
    shared = nn.Linear(2, 2)
    assert module_bytes(nn.Sequential(shared, shared)) == module_bytes(shared)
    assert tensor_bytes({"a": torch.zeros(2, 3), "b": (torch.zeros(4, dtype=torch.int64),)}) == 24 + 32

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    costs = profile_layers(list(model), torch.randn(5, 4), names=["fc1", "relu", "fc2"], repeats=2)
    assert [c.name for c in costs] == ["fc1", "relu", "fc2"]
    assert [c.weight_bytes for c in costs] == [60, 0, 32]
    assert [c.activation_bytes for c in costs] == [60, 60, 40]
    assert all(c.seconds > 0 for c in costs)
    plan = balanced_cut(costs, 2)
    assert len(plan.stages) == 2 and "fc" in plan.describe([c.name for c in costs])
    with pytest.raises(ValueError, match="2 names for 3 layers"):
        profile_layers(list(model), torch.randn(5, 4), names=["a", "b"])
