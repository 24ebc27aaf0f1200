"""The timeline plot (PNG) of a simulated job: what each worker did over time.

Top: one row per worker (a bar per interval: starting, useful block, duplicate copy, block
lost with its worker); with more than `MAX_ROWS` workers, rows are groups of consecutive
worker ids shaded by the share of the group busy. Bottom: how many workers were starting,
busy with useful work, with copies, with runs later lost, sampled at 1,000 instants.

matplotlib is imported here only (`pip install matplotlib`, in the dev extra), so that
`import distinfer` stays light; without it `write_timeline` raises a one-line ConfigError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from distinfer.errors import ConfigError
from distinfer.simulation.results import LOST, STARTING, USEFUL, WASTED, JobResult

__all__ = ["MAX_ROWS", "write_timeline"]

MAX_ROWS = 200
_SAMPLES = 1000
_COLOURS = {STARTING: "#bbbbbb", USEFUL: "#3b75af", WASTED: "#ef8636", LOST: "#c53a32"}
_NAMES = {STARTING: "starting", USEFUL: "useful", WASTED: "duplicate copy", LOST: "lost with its worker"}


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--timeline needs matplotlib: pip install matplotlib") from None
    return plt


def write_timeline(result: JobResult, path: str | Path) -> Path:
    """Draw `result.timeline` (simulate with timeline=True) to a PNG at `path`."""
    if result.timeline is None:
        raise ValueError("the result has no timeline: simulate with timeline=True")
    plt = _pyplot()
    line = result.timeline
    worker = np.frombuffer(line.worker, dtype=np.int32) if len(line) else np.zeros(0, np.int32)
    start = np.frombuffer(line.start, dtype=np.float64) if len(line) else np.zeros(0)
    end = np.frombuffer(line.end, dtype=np.float64) if len(line) else np.zeros(0)
    kind = np.frombuffer(line.kind, dtype=np.int8) if len(line) else np.zeros(0, np.int8)
    horizon = max(result.makespan_s, 1e-9)
    end = np.minimum(end, horizon)  # a replacement may still be starting when the job ends
    ids = int(worker.max()) + 1 if len(worker) else 1
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), height_ratios=(3, 1), sharex=True)
    if ids <= MAX_ROWS:
        for k, colour in _COLOURS.items():
            chosen = kind == k
            if chosen.any():
                top.barh(
                    worker[chosen],
                    end[chosen] - start[chosen],
                    left=start[chosen],
                    height=0.8,
                    color=colour,
                    label=_NAMES[k],
                    linewidth=0,
                )
        top.set_ylabel("worker")
        top.set_ylim(ids - 0.5, -0.5)
        top.legend(loc="upper right", fontsize="small")
    else:
        group = -(-ids // MAX_ROWS)
        busy = (kind == USEFUL) | (kind == WASTED) | (kind == LOST)
        raster = _coverage(worker[busy] // group, start[busy], end[busy], -(-ids // group), horizon)
        image = top.imshow(
            raster / group,
            aspect="auto",
            cmap="Blues",
            vmin=0,
            vmax=1,
            interpolation="nearest",
            extent=(0, horizon, ids, 0),
        )
        fig.colorbar(image, ax=top, label=f"share busy (groups of {group} workers)")
        top.set_ylabel("worker id")
    times = (np.arange(_SAMPLES) + 0.5) * horizon / _SAMPLES
    for k in (STARTING, USEFUL, WASTED, LOST):
        chosen = kind == k
        active = np.searchsorted(np.sort(start[chosen]), times, side="right") - np.searchsorted(
            np.sort(end[chosen]), times, side="right"
        )
        bottom.plot(times, active, color=_COLOURS[k], label=_NAMES[k], linewidth=1)
    bottom.set_xlim(0, horizon)
    bottom.set_xlabel("simulated time (s)")
    bottom.set_ylabel("workers")
    bottom.legend(loc="upper right", fontsize="small")
    top.set_title(
        f"{result.label}: makespan {result.makespan_s:.2f} s, ideal {result.ideal_s:.2f} s, "
        f"utilisation {result.utilisation:.0%}, tail {result.tail_s:.2f} s"
    )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _coverage(row: Any, start: Any, end: Any, rows: int, horizon: float) -> Any:
    """How many intervals cover each (row, sample instant): a difference array, then a cumsum."""
    dt = horizon / _SAMPLES
    first = np.clip(np.ceil(start / dt - 0.5), 0, _SAMPLES).astype(np.int64)
    last = np.clip(np.ceil(end / dt - 0.5), 0, _SAMPLES).astype(np.int64)
    diff = np.zeros((rows, _SAMPLES + 1))
    np.add.at(diff, (row, first), 1)
    np.add.at(diff, (row, last), -1)
    return np.cumsum(diff, axis=1)[:, :_SAMPLES]
