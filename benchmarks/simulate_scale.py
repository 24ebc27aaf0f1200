"""How fast `distinfer simulate` is at scale: 10,000 heterogeneous workers, up to 1,000,000 blocks.

    .venv/bin/python benchmarks/simulate_scale.py [--blocks 1000 100000 1000000] [--workers 10000]

Four node kinds (different per-row costs), a lognormal speed spread (sigma 0.25), 1% of the
workers stragglers 5x slower, random deaths (a mean time between failures sized for about 0.2%
of the workers to die during the job) with replacements, 1 ms messages. Blocks are
`rows_per_block` rows; the job's rows are blocks x rows_per_block. For each size it prints the
wall time, the events the scheduler handled and the events the simulator processed (and their
rates), and the makespan against the ideal. Target: the 1,000,000-block run under 60 s.
"""

from __future__ import annotations

import argparse
import sys
import time

from distinfer.simulation import ClusterSpec, JobSpec, WorkerKind, simulate_job

TARGET_S = 60.0
#: (kind, share of the workers, seconds per row)
KINDS = (("c8", 0.4, 0.004), ("c16", 0.3, 0.003), ("gpu", 0.2, 0.001), ("old", 0.1, 0.008))


def cluster(workers: int, blocks: int, rows_per_block: int, seed: int) -> ClusterSpec:
    counts = [round(share * workers) for _, share, _ in KINDS]
    counts[0] += workers - sum(counts)
    kinds = tuple(WorkerKind(name, n, cost) for (name, _, cost), n in zip(KINDS, counts, strict=True))
    throughput = sum(n / cost for (_, _, cost), n in zip(KINDS, counts, strict=True))
    job_s = 5.0 + blocks * rows_per_block / throughput  # start-up + ideal
    return ClusterSpec(
        kinds,
        start_up_s=5.0,
        restart_s=5.0,
        speed_sigma=0.25,
        mtbf_s=500 * job_s,  # about 0.2% of the workers die during the job
        straggler_share=0.01,
        straggler_factor=5.0,
        latency_s=0.001,
        loss_detect_s=0.5,
        seed=seed,
    )


def measure(workers: int, blocks: int, rows_per_block: int, seed: int) -> float:
    spec = cluster(workers, blocks, rows_per_block, seed)
    job = JobSpec(
        rows=blocks * rows_per_block,
        block_size=rows_per_block,
        min_block_size=rows_per_block,
        max_restarts=workers,
    )
    t0 = time.perf_counter()
    result = simulate_job(spec, job)
    wall = time.perf_counter() - t0
    print(
        f"{blocks:>9,} blocks on {workers:,} workers: wall {wall:7.2f} s; "
        f"scheduler events {result.scheduler_events:,} ({result.scheduler_events / wall:,.0f}/s); "
        f"simulated events {result.simulated_events:,} ({result.simulated_events / wall:,.0f}/s)"
    )
    print(
        f"{'':>9}  makespan {result.makespan_s:.2f} s vs ideal {result.ideal_s:.2f} s "
        f"(start-up + ideal {result.lower_bound_s:.2f} s), tail {result.tail_s:.2f} s, "
        f"{result.deaths} deaths, {result.lost_runs} blocks re-run, {result.steals} steals, "
        f"{result.duplicate_runs} duplicates; ok={result.ok}"
    )
    return wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=10_000)
    parser.add_argument("--rows-per-block", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    walls = {n: measure(args.workers, n, args.rows_per_block, args.seed) for n in args.blocks}
    big = max(walls)
    if big >= 1_000_000:
        passed = walls[big] < TARGET_S
        print(
            f"{'PASS' if passed else 'FAIL'}: {big:,} blocks in {walls[big]:.1f} s (target < {TARGET_S:g} s)"
        )
        return 0 if passed else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
