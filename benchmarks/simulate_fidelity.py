"""The simulator against real runs: the same job with one worker killed and one stopped.

For each backend (local processes, and a 2-node Ray cluster started here), in one run on
this machine (nothing else should be running):
  calibrate  `distinfer run` of the job without faults: a worker's seconds per row (its
             busy time over its rows, the workers' mean) and its start-up (`load_s`)
  faults     the same job again; once its workers are up, one is killed (SIGKILL) at
             `--kill-at` s and another stopped (SIGSTOP) from `--stop-at` for `--stop-for` s
             (times from the first worker process seen); the job's wall time is measured
  simulate   `distinfer simulate` with the calibrated per-row cost and start-up, the same
             rows, block size, workers and the faults at the times they were applied:
             its makespan against the measured wall time (and, as a check, the fault-free
             job's against its simulation)

Target: the simulated makespan within 10% of the measured one.

    .venv/bin/python benchmarks/simulate_fidelity.py [--backends local,ray] [--rows 6000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "examples" / "kjv-verses.txt"
DISTINFER = [sys.executable, "-m", "distinfer.cli"]


def verses(path: Path, rows: int) -> Path:
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[i % len(lines)] for i in range(rows)) + "\n", encoding="utf-8")
    return path


def workers_of(driver: int, backend: str) -> list[int]:
    """The live worker processes of a job: the driver's spawned children (local) or the Ray
    actor processes of distinfer's replicas."""
    found = []
    if backend == "local":
        try:
            procs = psutil.Process(driver).children()
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            try:
                if "spawn_main" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p.pid)
            except psutil.Error:
                continue
        return sorted(found)
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if "DistinferReplica" in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p.pid)
    return sorted(found)


class Faults(threading.Thread):
    """Kill one worker and stop another at times counted from the first worker seen."""

    def __init__(self, driver: int, backend: str, kill_at: float, stop_at: float, stop_for: float) -> None:
        super().__init__(daemon=True)
        self.driver, self.backend = driver, backend
        self.kill_at, self.stop_at, self.stop_for = kill_at, stop_at, stop_for
        self.t0: float | None = None
        self.applied: list[str] = []
        self.done = threading.Event()

    def _wait(self, until: float) -> bool:
        while time.monotonic() < until:
            if self.done.is_set():
                return False
            time.sleep(0.01)
        return True

    def run(self) -> None:
        while not self.done.is_set():
            pids = workers_of(self.driver, self.backend)
            if pids:
                self.t0 = time.monotonic()
                break
            time.sleep(0.01)
        if self.t0 is None:
            return
        initial = []
        while len(initial) < 2 and not self.done.is_set() and time.monotonic() - self.t0 < 120:
            initial = workers_of(self.driver, self.backend)
            time.sleep(0.05)
        if len(initial) < 2 or not self._wait(self.t0 + self.kill_at):
            return
        os.kill(initial[0], signal.SIGKILL)
        self.applied.append(f"kill:0@{time.monotonic() - self.t0:.2f}")
        if not self._wait(self.t0 + self.stop_at):
            return
        os.kill(initial[1], signal.SIGSTOP)
        began = time.monotonic() - self.t0
        self._wait(self.t0 + self.stop_at + self.stop_for)
        os.kill(initial[1], signal.SIGCONT)
        self.applied.append(f"stop:1@{began:.2f}-{time.monotonic() - self.t0:.2f}")


def run_job(
    args: argparse.Namespace, data: Path, out: Path, backend: str, address: str | None, faults: bool
) -> dict[str, Any]:
    cmd = [
        *DISTINFER,
        "run",
        "--model",
        args.model,
        "--input",
        str(data),
        "--output",
        str(out),
        "--strategy",
        "data",
        "--workers",
        "2",
        "--threads-per-worker",
        "1",
        "--block-size",
        str(args.block_size),
        "--overwrite",
        "--backend",
        backend,
    ]
    if address:
        cmd += ["--address", address]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    injector = Faults(proc.pid, backend, args.kill_at, args.stop_at, args.stop_for) if faults else None
    if injector:
        injector.start()
    try:
        _, err = proc.communicate(timeout=args.timeout_s)
    finally:
        if injector:
            injector.done.set()
            injector.join(timeout=10)
    if proc.returncode != 0:
        raise SystemExit(f"{backend} job failed:\n{err[-3000:]}")
    report = json.loads((out / "_report.json").read_text())
    workers = [w for w in report["worker_stats"] if w["rows"]]
    busy = [sum(v for k, v in w["seconds"].items() if k != "idle") / w["rows"] for w in workers]
    loads = [w["load_s"] for w in report["worker_stats"] if w.get("ready")]
    return {
        "wall_s": report["wall_s"],
        "startup_s": report["startup_s"],
        "rows": report["rows"],
        "per_row_s": statistics.mean(busy),
        "load_s": statistics.mean(loads) if loads else 0.0,
        "restarts": report.get("restarts", 0),
        "faults": injector.applied if injector else [],
        "offset_s": max(0.0, report["startup_s"] - min(loads)) if loads else 0.0,
    }


def simulate(args: argparse.Namespace, calib: dict[str, Any], faults: list[str], offset: float) -> float:
    cmd = [
        *DISTINFER,
        "simulate",
        "--workers",
        "2",
        "--rows",
        str(args.rows),
        "--block-size",
        str(args.block_size),
        "--per-row-ms",
        f"{calib['per_row_s'] * 1e3:.4f}",
        "--start-up-s",
        f"{calib['startup_s']:.3f}",
        "--restart-s",
        f"{calib['load_s']:.3f}",
        "--json",
    ]
    for f in faults:  # shift from the first worker's spawn to the job's clock
        kind, rest = f.split(":")
        w, times = rest.split("@")
        shifted = "-".join(f"{float(t) + offset:.2f}" for t in times.split("-"))
        cmd += ["--fault", f"{kind}:{w}@{shifted}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"distinfer simulate failed:\n{done.stderr[-2000:]}")
    return float(json.loads(done.stdout)["results"][0]["makespan_s"])


def one_backend(args: argparse.Namespace, backend: str, tmp: Path, data: Path) -> dict[str, Any]:
    cluster = None
    address = None
    if backend == "ray":
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        address = cluster.address
    try:
        calib = run_job(args, data, tmp / f"{backend}-calib", backend, address, faults=False)
        print(
            f"  {backend}: fault-free {calib['wall_s']:.1f} s, {calib['per_row_s'] * 1e3:.2f} ms/row, "
            f"start-up {calib['startup_s']:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        faulty = run_job(args, data, tmp / f"{backend}-faults", backend, address, faults=True)
        print(
            f"  {backend}: with {', '.join(faulty['faults'])}: {faulty['wall_s']:.1f} s, "
            f"{faulty['restarts']} restart(s)",
            file=sys.stderr,
            flush=True,
        )
    finally:
        if cluster is not None:
            cluster.shutdown()
    sim_clean = simulate(args, calib, [], 0.0)
    sim_faults = simulate(args, calib, faulty["faults"], faulty["offset_s"])
    return {
        "backend": backend,
        "calibration": calib,
        "faulty": faulty,
        "simulated_clean_s": sim_clean,
        "simulated_faults_s": sim_faults,
        "clean_error": abs(sim_clean - calib["wall_s"]) / calib["wall_s"],
        "faults_error": abs(sim_faults - faulty["wall_s"]) / faulty["wall_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", default="local,ray", help="comma-separated: local, ray (default both)")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--rows", type=int, default=6000, help="verses in the job (default 6000)")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--kill-at", type=float, default=8.0, help="s after the first worker (default 8)")
    parser.add_argument("--stop-at", type=float, default=14.0, help="s after the first worker (default 14)")
    parser.add_argument("--stop-for", type=float, default=3.0, help="seconds stopped (default 3)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="one job at most")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="sim-fidelity-") as tmp:
        data = verses(Path(tmp) / "verses.txt", args.rows)
        for backend in args.backends.split(","):
            print(f"{backend} ...", file=sys.stderr, flush=True)
            results.append(one_backend(args, backend, Path(tmp), data))
    print(f"{args.model}, {args.rows} rows in blocks of {args.block_size}, 2 workers x 1 thread")
    print(f"{'backend':<8} {'job':<34} {'measured s':>10} {'simulated s':>11} {'error':>6}")
    for r in results:
        rows = [
            ("fault-free", r["calibration"]["wall_s"], r["simulated_clean_s"], r["clean_error"]),
            (
                " ".join(r["faulty"]["faults"]),
                r["faulty"]["wall_s"],
                r["simulated_faults_s"],
                r["faults_error"],
            ),
        ]
        for name, real, sim, err in rows:
            print(f"{r['backend']:<8} {name:<34} {real:>10.2f} {sim:>11.2f} {err:>6.1%}")
    worst = max(r["faults_error"] for r in results)
    print(
        f"simulated makespan with faults within 10% of the measured: {'met' if worst <= 0.10 else 'MISSED'} "
        f"(worst {worst:.1%})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
