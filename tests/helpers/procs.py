"""Finding and killing worker processes from a test, through /proc (Linux)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def worker_pids(parent: int, marker: bytes = b"spawn_main") -> list[int]:
    """Live worker processes whose parent is `parent` and whose command line has `marker`
    (spawned local workers by default; Ray actor processes show as `ray::DistinferReplica`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        state = stat.rsplit(")", 1)[1].split()[0]
        if ppid == parent and marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return sorted(found)


def wait_for(predicate: object, timeout: float, what: str) -> None:
    """Poll `predicate` (a callable) every 50 ms until true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def kill(pid: int, sig: int) -> None:
    os.kill(pid, sig)
