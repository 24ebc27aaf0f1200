"""`--strategy auto`, the default: the layout from a cached profile (no process is started;
the profiles are written by the test), data parallel with a hint when there is none, and
the options the user gave kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from distinfer.config import RunConfig
from distinfer.driver.advisor import auto_layout, auto_serve_layout
from distinfer.driver.profiling import _latest_path, latest_profile
from distinfer.errors import ConfigError
from distinfer.models.families import parse_model
from distinfer.planning.cluster import this_machine
from distinfer.planning.profiles import Profile, Rate, machine_key
from distinfer.serving.config import ServeConfig

MODEL = "decoder-tiny"


def _cache(profile_rates: tuple[Rate, ...], startup_s: float = 1.0) -> Profile:
    """A profile of MODEL saved as its latest on this machine (measured over another input)."""
    node = this_machine().nodes[0]
    key = machine_key(node.cores, node.memory)
    profile = Profile(model=MODEL, machine=key, cores=node.cores, rates=profile_rates,
                      weight_bytes=1 << 20, worker_rss=1 << 28, startup_s=startup_s)  # fmt: skip
    profile.save(_latest_path(key, parse_model(MODEL), None))
    return profile


# two one-thread processes beat one of all cores' threads, batch 32 the fastest
RATES = (Rate(1, 8, 80.0), Rate(1, 32, 100.0), Rate(2, 8, 120.0), Rate(2, 32, 150.0),
         Rate(1, 8, 75.0, 2), Rate(1, 32, 95.0, 2))  # fmt: skip


@pytest.fixture(autouse=True)
def no_profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTINFER_PROFILES", str(tmp_path / "profiles"))


@pytest.fixture
def config(tmp_path: Path) -> RunConfig:
    text = tmp_path / "rows.txt"
    text.write_text("".join(f"row {i}\n" for i in range(100)), encoding="utf-8")
    return RunConfig(model=MODEL, input=str(text), output=str(tmp_path / "out"))


def test_the_default_is_auto_and_without_a_profile_it_runs_data_parallel_and_says_how_to_plan(
    config: RunConfig,
) -> None:
    assert config.strategy == "auto"
    laid, line = auto_layout(config, set())
    assert laid.strategy == "data" and laid.workers == config.workers and laid.batch_size == config.batch_size
    assert "no profile of decoder-tiny on this machine yet" in line and "distinfer plan --model decoder-tiny" in line


@pytest.mark.skipif(this_machine().nodes[0].cores < 2, reason="the plans compared need 2 cores")
def test_a_profile_measured_over_another_input_chooses_the_layout(config: RunConfig) -> None:
    _cache(RATES)
    assert latest_profile(parse_model(MODEL)) is not None
    laid, line = auto_layout(config, set())
    assert (laid.strategy, laid.workers, laid.threads_per_worker, laid.batch_size) == ("data", 2, 1, 32)
    assert line.startswith("--strategy auto chose data: 2 replica(s)")
    # an option given is kept, and the rest come from the best plan that agrees with it
    given = RunConfig(model=MODEL, input=config.input, output=config.output, workers=1)
    laid, _ = auto_layout(given, {"workers"})
    assert (laid.workers, laid.threads_per_worker, laid.batch_size) == (1, 2, 32)
    given = RunConfig(model=MODEL, input=config.input, output=config.output, batch_size=8)
    laid, _ = auto_layout(given, {"batch_size"})
    assert (laid.workers, laid.threads_per_worker, laid.batch_size) == (2, 1, 8)


def test_without_a_profile_a_model_larger_than_the_worker_memory_is_cut_into_stages(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("a row\n", encoding="utf-8")
    big = RunConfig(model="decoder-1b", input=str(tmp_path / "x.txt"), output=str(tmp_path / "o"),
                    worker_memory="2GiB")  # fmt: skip
    laid, line = auto_layout(big, {"worker_memory"})
    assert laid.strategy == "pipeline" and laid.stages is None  # the fewest stages that fit
    assert "4.6 GiB of weights is more than --worker-memory 2GiB" in line


def test_stages_or_ranks_given_name_the_strategy_without_planning(config: RunConfig) -> None:
    _cache(RATES)
    piped = RunConfig(model=MODEL, input=config.input, output=config.output, stages=2)
    assert auto_layout(piped, {"stages"}) == (RunConfig(**{**_fields(piped), "strategy": "pipeline"}), "")
    ranked = RunConfig(model=MODEL, input=config.input, output=config.output, tensor_parallel=2)
    assert auto_layout(ranked, {"tensor_parallel"})[0].strategy == "tensor"
    with pytest.raises(ConfigError, match="add --strategy pipeline"):
        RunConfig(model=MODEL, input=config.input, output=config.output, strategy="data", stages=2)


def test_a_server_plans_from_the_latest_profile_or_says_how_to_make_one() -> None:
    serve = ServeConfig(model=MODEL)
    assert serve.strategy == "auto"
    laid, line = auto_serve_layout(serve, set())
    assert laid.strategy == "data" and laid.replicas == 2 and "no profile of decoder-tiny" in line
    with pytest.raises(ConfigError, match=r"serve --strategy auto: no profile of decoder-tiny.*distinfer plan"):
        auto_serve_layout(serve, {"strategy"})
    if this_machine().nodes[0].cores >= 2:
        _cache(RATES)
        laid, line = auto_serve_layout(serve, set())
        assert (laid.strategy, laid.replicas, laid.threads_per_replica) == ("data", 2, 1)
        assert "--strategy auto chose data" in line
        laid, _ = auto_serve_layout(ServeConfig(model=MODEL, replicas=1), {"replicas"})
        assert laid.replicas == 1


@pytest.mark.skipif(this_machine().nodes[0].cores < 2, reason="the plans compared need 2 cores")
def test_a_server_plans_for_its_latency_target_and_request_rate() -> None:
    with pytest.raises(ConfigError, match="--latency-target and --request-rate are planned from a profile"):
        auto_serve_layout(ServeConfig(model=MODEL, latency_target_s=0.15), set())
    _cache(RATES)
    # batch 32 takes over 200 ms in every layout; batch 8 fits 150 ms, and sets the batches' size
    laid, line = auto_serve_layout(ServeConfig(model=MODEL, latency_target_s=0.15), set())
    assert laid.max_batch_size == 8 and "--strategy auto chose" in line
    laid, _ = auto_serve_layout(ServeConfig(model=MODEL), set())
    assert laid.max_batch_size == ServeConfig(model=MODEL).max_batch_size  # no target: left as given
    laid, _ = auto_serve_layout(ServeConfig(model=MODEL, request_rate=140), set())
    assert (laid.replicas, laid.threads_per_replica) == (2, 1)  # only 2 one-thread replicas make 140/s
    with pytest.raises(ConfigError, match=r"no layout of decoder-tiny can run here: .*under the requested 1000"):
        auto_serve_layout(ServeConfig(model=MODEL, request_rate=1000), set())
    with pytest.raises(ConfigError, match="--latency-target must be > 0"):
        ServeConfig(model=MODEL, latency_target_s=0)


def _fields(config: RunConfig) -> dict[str, object]:
    from dataclasses import fields

    return {f.name: getattr(config, f.name) for f in fields(config)}


def test_a_latency_target_has_smaller_batches_measured(config: RunConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    from distinfer.driver import advisor
    from distinfer.driver.profiling import LATENCY_BATCHES, ProfileRequest

    asked: list[ProfileRequest] = []

    def profile(req: ProfileRequest, refresh: bool = False, measure: bool = True) -> Profile:
        asked.append(req)
        node = this_machine().nodes[0]
        rates = tuple(Rate(1, b, 80.0 * b / (b + 8)) for b in req.batch_sizes)
        return Profile(model=MODEL, machine="test", cores=node.cores, rates=rates, weight_bytes=1 << 20,
                       worker_rss=1 << 28)  # fmt: skip

    monkeypatch.setattr(advisor, "get_profile", profile)
    plain = advisor.advise(MODEL, config.input)
    assert asked[-1].batch_sizes == (8, 32, 64) and min(p.batch_size for p in plain.plans) == 8
    # at 80 b / (b + 8) rows/s one batch of 8 takes 0.2 s, one of 4 0.15 s
    aimed = advisor.advise(MODEL, config.input, latency_target_s=0.18)
    assert asked[-1].batch_sizes == (*LATENCY_BATCHES, 8, 32, 64)
    assert aimed.top.batch_size == 4 and aimed.top.latency_s == pytest.approx(0.15)
