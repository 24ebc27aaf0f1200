"""Chaos: a 20,000-row `minilm` job on 2 local workers, then on 2 Ray workers (a 2-node Ray
cluster started here, one CPU per node), while a bounded loop kills a random worker every few
seconds, stops another for a while (SIGSTOP, then SIGCONT) and kills the driver once with
SIGKILL (then the same command resumes). It reports the kills survived, rows lost and
duplicated (must be 0), whether the output is identical to a fault-free run's on the same
backend, and the time against that run. On Ray a worker is the actor's process on its node.

Then one of the 2 workers is slowed 4x by the test hook (`DISTINFER_TEST_SLOW_WORKER`): the
job's time with speculation, without it, and the ideal `rows / (sum of the workers' measured
rates)`, the rates taken from the speculating run's own report. Target: with speculation
within 1.15x of that ideal. Times are the jobs' steady parts (from the first worker ready to
the end), so that start-up, the same for all, does not blur the ratios.

    .venv/bin/python benchmarks/chaos.py [--rows 20000] [--seed 1] [--backends local,ray] [--json chaos.json]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "examples" / "kjv-verses.txt"
SLOW_ENV = "DISTINFER_TEST_SLOW_WORKER"


def corpus(path: Path, rows: int) -> Path:
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(itertools.islice(itertools.cycle(lines), rows)) + "\n", encoding="utf-8")
    return path


def command(data: Path, out: Path, address: str | None) -> list[str]:
    ray = ["--backend", "ray", "--address", address] if address else []
    return [sys.executable, "-m", "distinfer.cli", "run", "--model", "minilm", "--input", str(data),
            "--output", str(out), "--workers", "2", "--threads-per-worker", "1", "--strategy", "data",
            "--batch-size", "32", "--block-size", "512", "--max-restarts", "50", *ray]  # fmt: skip


def workers_of(driver: int, ray: bool) -> list[int]:
    """The live worker processes: the driver's spawned children, or (on Ray) the processes of
    the replica actors, wherever their raylet started them (all on this machine here)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if ray:
            worker = cmdline.startswith(b"ray::") and b"DistinferReplica" in cmdline
        else:
            spawned = b"spawn_main" in cmdline and b"resource_tracker" not in cmdline
            worker = int(stat[1]) == driver and spawned
        if stat[0] not in "ZT" and worker:
            found.append(int(entry.name))
    return sorted(found)


def table(out: Path) -> tuple[np.ndarray, np.ndarray]:
    t = ds.dataset(str(out)).to_table().sort_by("row")
    return t.column("row").to_numpy(), np.stack(t.column("embedding").to_numpy(zero_copy_only=False))


def steady_s(out: Path) -> float:
    report = json.loads((out / "_report.json").read_text())
    return float(report["wall_s"] - report["startup_s"])


def chaos(data: Path, out: Path, rng: random.Random, events: int, address: str | None) -> dict[str, Any]:
    """The job under `events` chaos events, a few seconds apart: worker kills, worker stops
    (2-4 s), and one driver kill (the job then resumed by the same command)."""
    started = time.monotonic()
    cmd = command(data, out, address)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kills = stops = driver_kills = 0
    stopped: list[tuple[float, int]] = []
    plan = ["kill", "stop", "kill", "driver", "stop", "kill", "kill", "stop", "kill", "kill"][:events]
    next_at = time.monotonic() + rng.uniform(6.0, 9.0)  # once the workers are up
    while True:
        now = time.monotonic()
        for until, pid in [s for s in stopped if s[0] <= now]:
            stopped.remove((until, pid))
            _signal(pid, signal.SIGCONT)
        if proc.poll() is not None:
            if proc.returncode != 0:
                raise SystemExit(f"the chaos job failed: {proc.stderr.read() if proc.stderr else ''}")
            break
        if plan and now >= next_at:
            workers = workers_of(proc.pid, address is not None)
            if workers:
                what = plan.pop(0)
                if what == "kill":
                    _signal(rng.choice(workers), signal.SIGKILL)
                    kills += 1
                elif what == "stop":
                    pid = rng.choice(workers)
                    _signal(pid, signal.SIGSTOP)
                    stopped.append((now + rng.uniform(2.0, 4.0), pid))
                    stops += 1
                else:  # the driver: SIGKILL, then the same command resumes
                    for _, pid in stopped:
                        _signal(pid, signal.SIGCONT)
                    stopped.clear()
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    driver_kills += 1
                    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            next_at = now + rng.uniform(3.0, 6.0)
        time.sleep(0.05)
    for _, pid in stopped:
        _signal(pid, signal.SIGCONT)
    return {"worker_kills": kills, "worker_stops": stops, "driver_kills": driver_kills,
            "wall_s": time.monotonic() - started}  # fmt: skip


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # it ended on its own meanwhile


def slowed(data: Path, tmp: Path, rows: int) -> dict[str, Any]:
    """One of 2 workers slowed 4x: with speculation, without, and the ideal."""
    sys.path.insert(0, str(REPO / "src"))
    import distinfer

    os.environ[SLOW_ENV] = "1:4"
    try:
        options = dict(model="minilm", input=str(data), workers=2, threads_per_worker=1, strategy="data",
                       batch_size=32, block_size=512)  # fmt: skip
        on = distinfer.run(**options, output=str(tmp / "spec-on"))
        off = distinfer.run(**options, output=str(tmp / "spec-off"), speculation=False)
    finally:
        os.environ.pop(SLOW_ENV, None)
    rates = [w.rate or 0.0 for w in on.worker_stats]
    ideal = rows / sum(rates)
    with_spec, without = on.wall_s - on.startup_s, off.wall_s - off.startup_s
    return {
        "worker_rates": rates, "ideal_s": ideal, "with_speculation_s": with_spec, "without_s": without,
        "with_over_ideal": with_spec / ideal, "without_over_ideal": without / ideal,
        "speculated": on.speculated, "won": on.speculation_won, "wasted_worker_s": on.speculation_wasted_s,
    }  # fmt: skip


@contextlib.contextmanager
def ray_cluster() -> Iterator[str]:
    """A 2-node Ray cluster on this machine (a head with no CPU, two 1-CPU nodes): its address."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()  # type: ignore[no-untyped-call]


def one_backend(data: Path, tmp: Path, rng: random.Random, args: argparse.Namespace,
                address: str | None) -> dict[str, Any]:  # fmt: skip
    """A fault-free run and a run under chaos on one backend, compared."""
    name = "ray" if address else "local"
    t = time.monotonic()
    clean = subprocess.run(command(data, tmp / "clean", address), capture_output=True, text=True)
    if clean.returncode != 0:
        raise SystemExit(f"the fault-free job on {name} failed: {clean.stderr}")
    clean_s = time.monotonic() - t
    faults = chaos(data, tmp / "chaos", rng, args.events, address)
    rows, got = table(tmp / "chaos")
    want_rows, want = table(tmp / "clean")
    lost = int(args.rows - len(np.unique(rows)))
    duplicated = int(len(rows) - len(np.unique(rows)))
    identical = bool(np.array_equal(rows, want_rows) and np.array_equal(got, want))
    diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("nan")
    print(f"chaos on {name}: {faults['worker_kills']} worker kills, {faults['worker_stops']} stops, "
          f"{faults['driver_kills']} driver kill(s) survived; rows lost {lost}, duplicated {duplicated}; "
          f"output identical to the fault-free run: {'yes' if identical else f'no (max diff {diff:.2g})'}; "
          f"time {faults['wall_s']:.1f} s vs {clean_s:.1f} s fault-free ({faults['wall_s'] / clean_s:.2f}x)",
          flush=True)  # fmt: skip
    return {"clean_wall_s": clean_s, **faults, "rows_lost": lost, "rows_duplicated": duplicated,
            "identical": identical, "max_abs_diff": diff, "chaos_over_clean": faults["wall_s"] / clean_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--events", type=int, default=8, help="chaos events (at most 10)")
    parser.add_argument("--backends", default="local,ray", help="comma-separated: local, ray")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    result: dict[str, Any] = {"rows": args.rows}
    with tempfile.TemporaryDirectory(prefix="distinfer-chaos-") as folder:
        tmp = Path(folder)
        data = corpus(tmp / "verses.txt", args.rows)
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            if backend == "ray":
                with ray_cluster() as address:
                    result[backend] = one_backend(data, tmp / backend, rng, args, address)
            else:
                result[backend] = one_backend(data, tmp / backend, rng, args, None)
        slow = slowed(data, tmp, args.rows)
    result["slow_worker"] = slow
    rates = ", ".join(f"{r:.1f}" for r in slow["worker_rates"])
    verdict = "met" if slow["with_over_ideal"] <= 1.15 else "MISSED"
    print(f"one worker slowed 4x (rates {rates} rows/s): "
          f"with speculation {slow['with_speculation_s']:.1f} s ({slow['with_over_ideal']:.2f}x the ideal "
          f"{slow['ideal_s']:.1f} s; target <= 1.15x: {verdict}), "
          f"without {slow['without_s']:.1f} s ({slow['without_over_ideal']:.2f}x); {slow['speculated']} "
          f"copied, {slow['won']} won, {slow['wasted_worker_s']:.1f} worker-s wasted")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
