"""`distinfer simulate`: arguments -> `ClusterSpec` / `JobSpec` / `ServeSpec` -> a report.

`add_parser(sub)` adds the subcommand to the CLI's subparsers; `run(args)` takes the parsed
arguments as a dict (as `distinfer.cli.main` passes them) and returns the exit status: 0, or
1 when the simulated job fails (out of replacements, a poison block). Errors in the inputs
raise `ConfigError` naming the flag. A profile file (`--profile`) is JSON::

    {"per_row_s": 0.0074,                    # or {"c8": 0.0074, "c16": 0.005} per node kind,
     "start_up_s": 4.5, "restart_s": 4.5,    #   or "rows_per_s" (one worker's throughput)
     "block_overhead_s": 0.02}

Flags override the profile. Without a per-kind cost, a kind's cost is the profile's (or
--per-row-ms) divided by the kind's `speed` in the cluster file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from distinfer.errors import ConfigError
from distinfer.simulation.spec import ClusterSpec, Fault, JobSpec, WorkerKind

__all__ = ["add_parser", "run"]

_EXAMPLES = """examples:
  distinfer simulate --workers 2 --rows 4000 --block-size 256 --per-row-ms 7.4 --start-up-s 5 \\
      --fault kill:1@10 --fault stop:0@3-8
  distinfer simulate --cluster cluster.toml --rows 100000000 --block-size 1000 --profile profile.json \\
      --speed-sigma 0.2 --mtbf-s 36000 --stragglers 0.01 --straggler-factor 5 --compare --timeline out.png
  distinfer simulate --serve --rate 300 --replicas 2 --per-row-ms 5 --batch-overhead-ms 10
"""


#: (group, [(flag, type, default, help)]): bool = a switch, list = repeatable, Path = a file name
_OPTIONS: list[tuple[str, list[tuple[str, type, Any, str]]]] = [
    (
        "workers",
        [
            (
                "--cluster",
                Path,
                None,
                "cluster file (.toml/.json, [[node]] tables: kind, count, cores, speed); "
                "default: --workers identical workers",
            ),
            ("--workers", int, None, "identical workers when there is no --cluster (default 2)"),
            ("--threads-per-worker", int, 1, "with --cluster: workers per node = cores // this (default 1)"),
            (
                "--workers-per-node",
                int,
                None,
                "with --cluster: workers per node, instead of cores // threads",
            ),
            ("--per-row-ms", float, None, "milliseconds per row on one worker at speed 1 (or --profile)"),
            (
                "--profile",
                Path,
                None,
                "JSON: per_row_s (a number or per node kind) or rows_per_s, start_up_s, "
                "restart_s, block_overhead_s",
            ),
            ("--start-up-s", float, None, "from a worker's start to its WorkerReady (default 0)"),
            ("--restart-s", float, None, "a replacement's start-up (default: --start-up-s)"),
            ("--speed-sigma", float, 0.0, "lognormal sigma of the per-worker speed spread (default 0)"),
            ("--mtbf-s", float, None, "mean time between failures of one worker (default: no random deaths)"),
            ("--stragglers", float, 0.0, "share of the workers slow all along, 0..1 (default 0)"),
            ("--straggler-factor", float, 4.0, "how many times slower a straggler is (default 4)"),
            (
                "--fault",
                list,
                None,
                "kill:W@T, stop:W@T1-T2 (SIGSTOP..SIGCONT) or slow:W@T1-T2xF; seconds; repeatable",
            ),
            ("--latency-ms", float, 0.0, "one-way message time between the driver and a worker (default 0)"),
            ("--loss-detect-ms", float, 0.0, "from a worker's death to the backend's WorkerLost (default 0)"),
            ("--seed", int, 0, "seed of the speeds, stragglers, deaths and arrivals (default 0)"),
        ],
    ),
    (
        "batch job",
        [
            ("--rows", int, None, "rows in the job"),
            ("--block-size", int, 1024, "rows per block (default 1024)"),
            (
                "--min-block-size",
                int,
                None,
                "rows in the first and last blocks, as for 'run' (default: min(64, --block-size))",
            ),
            ("--block-overhead-ms", float, None, "fixed cost of a block on top of its rows (default 0)"),
            ("--prefetch", int, 2, "blocks queued per worker, the running one included (default 2)"),
            ("--max-restarts", int, 3, "replacement workers over the job (default 3)"),
            ("--max-block-attempts", int, 3, "a block lost or failed this often fails the job (default 3)"),
            ("--start-timeout", float, 600.0, "no worker ready this long fails the job (default 600)"),
            ("--no-steal", bool, None, "turn tail stealing off"),
            ("--no-speculation", bool, None, "turn speculation at the tail off (on by default, as in 'run')"),
            ("--compare", bool, None, "also simulate with stealing toggled and with speculation toggled"),
        ],
    ),
    (
        "serving (--serve)",
        [
            ("--serve", bool, None, "simulate a server instead of a batch job"),
            ("--rate", float, None, "requests per second (Poisson arrivals)"),
            ("--replicas", int, 2, "replicas (default 2)"),
            ("--duration-s", float, 30.0, "seconds of arrivals (default 30)"),
            ("--batch-overhead-ms", float, 0.0, "fixed cost of a model call (default 0)"),
            ("--rows-per-request", int, 1, "rows in each request (default 1)"),
            ("--max-batch-size", int, 32, "rows merged into one model call (default 32)"),
            (
                "--max-queue-delay-ms",
                float,
                10.0,
                "how long the oldest request waits for company (default 10)",
            ),
            ("--max-queue", int, 512, "rows allowed to wait (default 512)"),
            ("--timeout-ms", float, 1000.0, "a request's deadline (default 1000)"),
        ],
    ),
    (
        "output",
        [
            ("--json", bool, None, "print the figures as JSON instead of text"),
            ("--timeline", Path, None, "batch job: write a PNG of the workers over time (needs matplotlib)"),
        ],
    ),
]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `simulate` to the CLI's subcommands."""
    p = sub.add_parser(
        "simulate",
        help="simulate a batch job (the real scheduler) or a server (the real batcher) in simulated time",
        description=(
            "Drive the real scheduler (the same state machine 'distinfer run' uses) over a simulated "
            "cluster in simulated time, and report the makespan against the ideal "
            "rows / (sum of the workers' throughputs), the utilisation, the tail (the time the last 1% "
            "of blocks took), the blocks re-run after failures, and the effect of stealing and "
            "speculation (--compare). With --serve, run a Poisson request stream through the server's "
            "real queue (admission, batch formation) against simulated replicas and report latency "
            "percentiles and the share of requests shed."
        ),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for title, options in _OPTIONS:
        group = p.add_argument_group(title)
        for flag, kind, default, text in options:
            if kind is bool:
                group.add_argument(flag, action="store_true", help=text)
            elif kind is list:
                group.add_argument(flag, action="append", default=[], metavar="SPEC", help=text)
            elif kind is Path:
                group.add_argument(flag, metavar="FILE", help=text)
            else:
                group.add_argument(flag, type=kind, default=default, help=text)
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def run(args: dict[str, Any]) -> int:
    """Carry out `distinfer simulate` with the parsed arguments; see the module docstring."""
    if args.get("serve"):
        return _serve(args)
    from distinfer.simulation.batch import simulate_job

    cluster, job = job_inputs(args)
    timeline = args.get("timeline")
    variants = [job]
    if args.get("compare"):
        variants += [
            _replace(job, steal=not job.steal),
            _replace(job, steal=True, speculate=not job.speculate),
        ]
    results = [simulate_job(cluster, v, timeline=bool(timeline) and i == 0) for i, v in enumerate(variants)]
    if timeline:
        from distinfer.simulation.timeline import write_timeline

        write_timeline(results[0], timeline)
    if args.get("json"):
        print(json.dumps({"results": [r.to_dict() for r in results]}, indent=2))
    else:
        print("\n".join(r.describe() for r in results))
        if len(results) == 3:
            print(_comparison(results))
        if timeline:
            print(f"timeline: {timeline}")
    return 0 if results[0].ok else 1


def _replace(job: JobSpec, **changes: Any) -> JobSpec:
    from dataclasses import replace

    return replace(job, **changes)


def _comparison(results: list[Any]) -> str:
    base, other, spec = results

    def delta(a: Any, b: Any) -> str:
        return f"makespan {b.makespan_s - a.makespan_s:+.3f} s, tail {b.tail_s - a.tail_s:+.3f} s"

    return f"compared with the first: {other.label}: {delta(base, other)}; {spec.label}: {delta(base, spec)}"


def _profile(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--profile {path}: cannot read it ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--profile {path}: not valid JSON: {exc}") from None
    known = {"per_row_s", "rows_per_s", "start_up_s", "restart_s", "block_overhead_s"}
    if not isinstance(data, dict) or set(data) - known:
        raise ConfigError(f"--profile {path}: expected an object with some of {', '.join(sorted(known))}")
    return data


def _costs(args: dict[str, Any], profile: dict[str, Any]) -> float | dict[str, float]:
    """Seconds per row: one number (at speed 1) or a number per node kind."""
    if args.get("per_row_ms") is not None:
        return float(args["per_row_ms"]) / 1e3
    if "per_row_s" in profile:
        value = profile["per_row_s"]
    elif "rows_per_s" in profile:
        rate = profile["rows_per_s"]
        value = {k: 1.0 / v for k, v in rate.items()} if isinstance(rate, dict) else 1.0 / rate
    else:
        raise ConfigError("missing --per-row-ms (or a --profile with per_row_s or rows_per_s)")
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()}
    return float(value)


def job_inputs(args: dict[str, Any]) -> tuple[ClusterSpec, JobSpec]:
    """The cluster and the job the arguments describe (no simulation)."""
    if args.get("rows") is None:
        raise ConfigError("missing --rows: how many rows the job has")
    profile = _profile(args.get("profile"))
    costs = _costs(args, profile)

    def pick(flag: str, key: str, scale: float = 1.0, default: float | None = 0.0) -> float | None:
        if args.get(flag) is not None:
            return float(args[flag]) * scale
        return float(profile[key]) if key in profile else default

    faults = tuple(Fault.parse(text) for text in args.get("fault") or ())
    cluster = ClusterSpec(
        kinds=_kinds(args, costs),
        start_up_s=pick("start_up_s", "start_up_s") or 0.0,
        restart_s=pick("restart_s", "restart_s", default=None),
        speed_sigma=args.get("speed_sigma", 0.0),
        mtbf_s=args.get("mtbf_s"),
        straggler_share=args.get("stragglers", 0.0),
        straggler_factor=args.get("straggler_factor", 4.0),
        faults=faults,
        latency_s=args.get("latency_ms", 0.0) / 1e3,
        loss_detect_s=args.get("loss_detect_ms", 0.0) / 1e3,
        seed=args.get("seed", 0),
    )
    job = JobSpec(
        rows=args["rows"],
        block_size=args.get("block_size", 1024),
        min_block_size=args.get("min_block_size"),
        block_overhead_s=pick("block_overhead_ms", "block_overhead_s", 1e-3) or 0.0,
        prefetch=args.get("prefetch", 2),
        steal=not args.get("no_steal", False),
        speculate=not args.get("no_speculation", False),
        max_restarts=args.get("max_restarts", 3),
        max_block_attempts=args.get("max_block_attempts", 3),
        start_timeout_s=args.get("start_timeout", 600.0),
    )
    return cluster, job


def _kinds(args: dict[str, Any], costs: float | dict[str, float]) -> tuple[WorkerKind, ...]:
    if not args.get("cluster"):
        if isinstance(costs, dict):
            raise ConfigError("--profile: per-kind costs need a --cluster with those kinds")
        workers = args.get("workers") or 2
        return ClusterSpec.uniform(workers, costs).kinds
    if args.get("workers") is not None:
        raise ConfigError("--workers is for a simulation without --cluster; use --workers-per-node")
    from distinfer.planning.cluster import load_cluster

    cluster = load_cluster(args["cluster"])
    threads = args.get("threads_per_worker", 1)
    per_node = args.get("workers_per_node")
    if per_node is not None and (not isinstance(per_node, int) or per_node < 1):
        raise ConfigError(f"--workers-per-node must be a whole number >= 1, got {per_node!r}")
    if not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"--threads-per-worker must be a whole number >= 1, got {threads!r}")
    kinds = []
    for node in cluster.nodes:
        count = per_node if per_node is not None else node.cores // threads
        if count < 1:
            raise ConfigError(
                f"--threads-per-worker {threads}: node kind {node.kind!r} has only {node.cores} cores"
            )
        if isinstance(costs, dict):
            if node.kind not in costs:
                raise ConfigError(
                    f"--profile: no per_row_s for node kind {node.kind!r} (has {', '.join(costs)})"
                )
            cost = costs[node.kind]
        else:
            cost = costs / node.speed
        if not (math.isfinite(cost) and cost > 0):
            raise ConfigError(f"--per-row-ms must be > 0 (node kind {node.kind!r}: {cost * 1e3:g} ms)")
        kinds.append(WorkerKind(node.kind, node.count * count, cost))
    return tuple(kinds)


def _serve(args: dict[str, Any]) -> int:
    from distinfer.simulation.serving import ServeSpec, simulate_serving

    if args.get("rate") is None:
        raise ConfigError("missing --rate: requests per second to simulate")
    costs = _costs(args, _profile(args.get("profile")))
    if isinstance(costs, dict):
        raise ConfigError("--serve: give one --per-row-ms (replicas are alike)")
    spec = ServeSpec(
        rate=args["rate"],
        per_row_s=costs,
        replicas=args.get("replicas", 2),
        duration_s=args.get("duration_s", 30.0),
        batch_overhead_s=args.get("batch_overhead_ms", 0.0) / 1e3,
        rows_per_request=args.get("rows_per_request", 1),
        max_batch_size=args.get("max_batch_size", 32),
        max_queue_delay_s=args.get("max_queue_delay_ms", 10.0) / 1e3,
        max_queue=args.get("max_queue", 512),
        timeout_s=args.get("timeout_ms", 1000.0) / 1e3,
        speed_sigma=args.get("speed_sigma", 0.0),
        latency_s=args.get("latency_ms", 0.0) / 1e3,
        seed=args.get("seed", 0),
    )
    result = simulate_serving(spec)
    if args.get("json"):
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.describe())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m distinfer.simulation.cli ...`: the subcommand on its own (until it is wired in)."""
    parser = argparse.ArgumentParser(prog="distinfer")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = vars(parser.parse_args(["simulate", *(argv if argv is not None else sys.argv[1:])]))
    args.pop("command")
    args.pop("debug", None)
    try:
        return run(args)
    except ConfigError as exc:
        print(f"distinfer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
