"""Chaos: a 20,000-row `minilm` job on 2 local workers while a bounded loop kills a random
worker every few seconds, stops another for a while (SIGSTOP, then SIGCONT) and kills the
driver once with SIGKILL (then the same command resumes). It reports the kills survived,
rows lost and duplicated (must be 0), whether the output is identical to a fault-free run's,
and the time against that run.

Then one of the 2 workers is slowed 4x by the test hook (`DISTINFER_TEST_SLOW_WORKER`): the
job's time with speculation, without it, and the ideal `rows / (sum of the workers' measured
rates)`, the rates taken from the speculating run's own report. Target: with speculation
within 1.15x of that ideal. Times are the jobs' steady parts (from the first worker ready to
the end), so that start-up, the same for all, does not blur the ratios.

    .venv/bin/python benchmarks/chaos.py [--rows 20000] [--seed 1] [--json chaos.json]

Not covered here: the same chaos on a Ray cluster (the Ray backend's own tests kill nodes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
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


def command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "distinfer.cli", "run", "--model", "minilm", "--input", str(data),
            "--output", str(out), "--workers", "2", "--threads-per-worker", "1", "--strategy", "data",
            "--batch-size", "32", "--block-size", "512", "--max-restarts", "50"]  # fmt: skip


def workers_of(driver: int) -> list[int]:
    """The driver's live worker processes (spawned children), through /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        worker = b"spawn_main" in cmdline and b"resource_tracker" not in cmdline
        if int(stat[1]) == driver and stat[0] != "Z" and worker:
            found.append(int(entry.name))
    return sorted(found)


def table(out: Path) -> tuple[np.ndarray, np.ndarray]:
    t = ds.dataset(str(out)).to_table().sort_by("row")
    return t.column("row").to_numpy(), np.stack(t.column("embedding").to_numpy(zero_copy_only=False))


def steady_s(out: Path) -> float:
    report = json.loads((out / "_report.json").read_text())
    return float(report["wall_s"] - report["startup_s"])


def chaos(data: Path, out: Path, rng: random.Random, events: int) -> dict[str, Any]:
    """The job under `events` chaos events, a few seconds apart: worker kills, worker stops
    (2-4 s), and one driver kill (the job then resumed by the same command)."""
    started = time.monotonic()
    proc = subprocess.Popen(command(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
            workers = workers_of(proc.pid)
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
                    proc = subprocess.Popen(command(data, out), stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, text=True)  # fmt: skip
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--events", type=int, default=8, help="chaos events (at most 10)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="distinfer-chaos-") as folder:
        tmp = Path(folder)
        data = corpus(tmp / "verses.txt", args.rows)
        t = time.monotonic()
        clean = subprocess.run(command(data, tmp / "clean"), capture_output=True, text=True)
        if clean.returncode != 0:
            raise SystemExit(f"the fault-free job failed: {clean.stderr}")
        clean_s = time.monotonic() - t
        faults = chaos(data, tmp / "chaos", rng, args.events)
        rows, got = table(tmp / "chaos")
        want_rows, want = table(tmp / "clean")
        lost = int(args.rows - len(np.unique(rows)))
        duplicated = int(len(rows) - len(np.unique(rows)))
        identical = bool(np.array_equal(rows, want_rows) and np.array_equal(got, want))
        diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("nan")
        slow = slowed(data, tmp, args.rows)
    result = {"rows": args.rows, "clean_wall_s": clean_s, **faults, "rows_lost": lost,
              "rows_duplicated": duplicated, "identical": identical, "max_abs_diff": diff,
              "chaos_over_clean": faults["wall_s"] / clean_s, "slow_worker": slow}  # fmt: skip
    print(f"chaos: {faults['worker_kills']} worker kills, {faults['worker_stops']} stops, "
          f"{faults['driver_kills']} driver kill(s) survived; rows lost {lost}, duplicated {duplicated}; "
          f"output identical to the fault-free run: {'yes' if identical else f'no (max diff {diff:.2g})'}; "
          f"time {faults['wall_s']:.1f} s vs {clean_s:.1f} s fault-free ({faults['wall_s'] / clean_s:.2f}x)")
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
