"""The public Python API; the CLI is a thin layer over these functions."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .config import RunConfig
from .report import JobReport

if TYPE_CHECKING:
    from .serving.config import ServeConfig

if TYPE_CHECKING:
    from .driver.advisor import Advice

__all__ = ["bench", "plan", "run", "serve"]


def run(config: RunConfig | None = None, /, **options: Any) -> JobReport:
    """Run a batch job: every input row's prediction, written to a Parquet data set.

    Give a `RunConfig`, or its fields as keywords (keywords override the config's fields)::

        report = distinfer.run(model="minilm", input="corpus.txt", output="out/", workers=2)
        print(report.throughput)

    The layout is `strategy="auto"` unless given: the top plan of `distinfer plan` when a
    profile of the model is cached on this machine (given by keyword, `strategy="auto"`
    measures one first), else data parallel; options given keep their values.

    Raises a `distinfer.DistinferError` subclass with a one-line message on bad input,
    an unusable model or output directory, or a job that cannot finish.
    """
    from .driver.job import run_job

    if config is None:
        config = RunConfig.build(options)
        given = {k.replace("-", "_") for k in options}
    else:
        defaults = RunConfig(model=config.model, input=config.input, output=config.output)
        given = {k for k, v in _as_dict(config).items() if v != getattr(defaults, k)} | set(options)
        if options:
            config = RunConfig.build({**_as_dict(config), **options})
    if config.strategy == "auto":
        from .driver.advisor import announce, auto_layout

        config, line = auto_layout(config, given)
        announce(line)
    return run_job(config)


def plan(
    model: str,
    input: str,
    rows: int | None = None,
    cluster: str | None = None,
    latency_target_s: float | None = None,
    request_rate: float | None = None,
    worker_memory: str | None = None,
    block_size: int = 1024,
    refresh_profile: bool = False,
    input_format: str | None = None,
    column: str | None = None,
    max_tokens: int = 128,
    ignore_eos: bool = False,
    dtype: str = "float32",
) -> Advice:
    """Ranked plans for running `model` over `input` (or `rows` rows like its own) on this
    machine or the `cluster` file: `advice.plans`, best first, each with its predicted
    throughput, job time, batch latency, memory per process and reasons. The model is
    measured on this machine the first time (about a minute), then the profile is cached.
    A text-generation model is measured generating up to `max_tokens` a row (all of them
    with `ignore_eos`) in `dtype`; its plans' batch size is the running sequences."""
    from .driver.advisor import advise
    from .messages import GenerationOptions

    return advise(
        model, input, rows=rows, cluster=cluster, latency_target_s=latency_target_s,
        request_rate=request_rate, worker_memory=worker_memory, block_size=block_size,
        input_format=input_format, column=column, refresh=refresh_profile,
        generation=GenerationOptions(max_tokens=max_tokens, ignore_eos=ignore_eos, dtype=dtype),
    )  # fmt: skip


def serve(config: ServeConfig | None = None, /, **options: Any) -> int:
    """Serve a model over HTTP until SIGTERM or Ctrl-C; returns the exit code (0 after a
    clean drain). Give a `ServeConfig` or its fields as keywords::

        distinfer.serve(model="minilm", replicas=2, port=8000)

    The layout is `strategy="auto"` unless given: the top plan from the profile last
    measured of the model on this machine (`distinfer plan`), else data parallel.

    Needs the serve extra (`pip install 'distinfer[serve]'`)."""
    from .serving.config import ServeConfig

    if config is None:
        config = ServeConfig(**options)
        given = set(options)
    else:
        defaults = ServeConfig(model=config.model)
        given = {k for k, v in _as_dict(config).items() if v != getattr(defaults, k)} | set(options)
        if options:
            config = ServeConfig(**{**_as_dict(config), **options})
    if config.strategy == "auto":
        from .driver.advisor import announce, auto_serve_layout

        config, line = auto_serve_layout(config, given)
        announce(line)
    try:
        from .serving.main import serve as run_server
    except ImportError as exc:
        from .errors import ConfigError

        raise ConfigError(
            f"serving needs {exc.name}; install it with: pip install 'distinfer[serve]'"
        ) from None
    return run_server(config)


def bench(
    model: str,
    input: str,
    rows: int = 512,
    threads: int = 1,
    batch_size: int = 64,
    column: str | None = None,
    input_format: str | None = None,
) -> float:
    """Single-worker throughput (rows/s) of `model` on the first `rows` rows of `input`,
    with `threads` threads: the baseline for the scaling efficiency. Measured in a fresh
    process started as the job's workers are (their malloc settings, `worker/process.py`)."""
    import multiprocessing as mp

    from .worker.process import set_worker_environment

    set_worker_environment()
    with mp.get_context("spawn").Pool(1) as pool:
        rate: float = pool.apply(_bench, (model, input, rows, threads, batch_size, column, input_format))
    return rate


def _bench(
    model: str, input: str, rows: int, threads: int, batch_size: int, column: str | None,
    input_format: str | None,
) -> float:
    """`bench`, in the measuring process."""
    from .data.sources import open_source, plan_blocks
    from .models.base import StageTimer, run_block
    from .models.families import load_runner, parse_model
    from .models.images import with_image_defaults
    from .worker.process import limit_threads
    from .worker.replica import read_inputs

    limit_threads(threads)
    spec = parse_model(model)
    source = open_source(input, input_format)
    runner = with_image_defaults(load_runner(spec, threads), spec, source.format == "images")
    binding = runner.bind(source.columns, column)
    blocks = plan_blocks(source, max(rows, 1), max(rows, 1))
    if not blocks:
        return 0.0
    inputs = read_inputs(source, blocks[0], binding)
    warm = {name: value[:batch_size] for name, value in inputs.items()}
    run_block(runner, warm, batch_size, StageTimer())
    start = time.perf_counter()
    run_block(runner, inputs, batch_size, StageTimer())
    return blocks[0].rows / (time.perf_counter() - start)


def _as_dict(config: RunConfig | ServeConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}
