"""Speculation against one slow worker: 3 local workers, one slowed 5x by the test hook
(`DISTINFER_TEST_SLOW_WORKER`), against the same job on the 2 other workers alone, with
speculation on and off. Target: with speculation, within 1.3x of the 2-worker time.

The model sleeps 0.1 s per batch of 16 rows (tests/helpers/toy_models.py: slow_mlp), so the
workers' speeds are sleeps, not shares of this machine's 2 cores, and 3 workers compare
fairly with 2. Times are the jobs' steady parts (from the first worker ready to the end);
each layout runs `--repeats` times, interleaved, and the medians are compared.

    .venv/bin/python benchmarks/speculation.py [--rows 2400] [--repeats 3] [--json spec.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
HELPERS = REPO / "tests" / "helpers"
SLOW_ENV = "DISTINFER_TEST_SLOW_WORKER"


def job(data: Path, out: Path, workers: int, slow: bool, speculation: bool) -> Any:
    import distinfer

    if slow:
        os.environ[SLOW_ENV] = f"{workers - 1}:5"
    try:
        return distinfer.run(model="toy_models:slow_mlp", input=str(data), output=str(out), workers=workers,
                             threads_per_worker=1, strategy="data", batch_size=16, block_size=128,
                             speculation=speculation)  # fmt: skip
    finally:
        os.environ.pop(SLOW_ENV, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    sys.path[:0] = [str(REPO / "src"), str(HELPERS)]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])
    os.environ["TOY_DELAY_S"] = "0.1"
    layouts = {"two": (2, False, True), "three_slow": (3, True, True), "three_slow_off": (3, True, False)}
    times: dict[str, list[float]] = {name: [] for name in layouts}
    won = speculated = 0
    with tempfile.TemporaryDirectory(prefix="distinfer-spec-") as folder:
        tmp = Path(folder)
        data = tmp / "rows.npy"
        np.save(data, np.random.default_rng(5).standard_normal((args.rows, 16)).astype(np.float32))
        for repeat in range(args.repeats):
            for name, (workers, slow, speculation) in layouts.items():
                report = job(data, tmp / f"{name}-{repeat}", workers, slow, speculation)
                times[name].append(report.wall_s - report.startup_s)
                if name == "three_slow":
                    won, speculated = won + report.speculation_won, speculated + report.speculated
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio, ratio_off = median["three_slow"] / median["two"], median["three_slow_off"] / median["two"]
    verdict = "met" if ratio <= 1.3 else "MISSED"
    print(f"{args.rows} rows, medians of {args.repeats}: 2 workers {median['two']:.2f} s; "
          f"3 workers with one slowed 5x: speculation on {median['three_slow']:.2f} s ({ratio:.2f}x; "
          f"target <= 1.3x: {verdict}), off {median['three_slow_off']:.2f} s ({ratio_off:.2f}x); "
          f"{speculated} copies, {won} won")
    if args.json:
        args.json.write_text(json.dumps({"rows": args.rows, "times_s": times, "median_s": median,
                                         "on_over_two": ratio, "off_over_two": ratio_off,
                                         "speculated": speculated, "won": won}, indent=1))


if __name__ == "__main__":
    main()
