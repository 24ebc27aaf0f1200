"""The planner against real runs: predicted and measured throughput and latency, per case.

For each case, in one run on this machine (nothing else should be running):
  plan      `distinfer plan --json` (the profile measured first, or taken from the cache;
            `--refresh-profile` measures again), the ranked plans
  runs      the top plan and the main alternatives (the best plan of every other strategy,
            the top plan's neighbour at another batch size, then the next plans in rank),
            each a real
            `distinfer run` with the plan's own flags, each in its own driver process
  compare   throughput: the run's rows/s once its first worker was ready against the plan's
            rows/s; latency: one batch's time in the run, per batch of the plan's size
            (a data-parallel worker's preprocessing and model time; a pipeline's stages'
            busy and communication time, summed; a tensor-parallel group's forward time;
            a group's padded batches may be cut smaller by length, so its time is taken
            per row x the batch size) against the plan's batch latency

The cases (the issue's): `minilm` over 4,000 verses; `decoder-base` with and without a
latency target (the target is 0.7 x the top plan's batch latency, so that another plan must
be chosen); `decoder-1b` under `--worker-memory 2GiB`; an ONNX model (a seeded 8-layer
residual MLP of width 1024, exported by torch.onnx, over 200,000 vectors); `gemma3-270m`
generating 32 tokens for each of 128 verses (`--ignore-eos`, so that every row's output
length is known). For generation the batch size is the running sequences, the throughput
is rows/s (tokens/s = rows/s x 32), and the latency is the time per output token: the
engine's time over its steps in the run, against the plan's step time.

Targets (2-core machine): median |predicted - measured| / measured <= 10% for throughput and
<= 15% for latency, no case over 25%, and in every case the top plan measured best or within
5% of the best.

    .venv/bin/python benchmarks/plan_accuracy.py [--cases minilm,onnx] [--json plan_accuracy.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "examples" / "kjv-verses.txt"
DISTINFER = [sys.executable, "-m", "distinfer.cli"]


@dataclass
class Case:
    name: str
    model: str
    rows: int
    plan_args: list[str] = field(default_factory=list)
    block_size: int = 1024
    latency_from: str | None = None  # the case whose top plan sets this one's latency target


CASES = [
    Case("minilm", "minilm", 4000),
    Case("decoder-base", "decoder-base", 256, block_size=16),
    Case("decoder-base-latency", "decoder-base", 256, block_size=16, latency_from="decoder-base"),
    Case("decoder-1b-2GiB", "decoder-1b", 16, ["--worker-memory", "2GiB"], block_size=16),
    Case("onnx-mlp", "onnx", 200_000, block_size=20_000),
    Case("gemma3-270m", "gemma3-270m", 128, ["--max-tokens", "32", "--ignore-eos"], block_size=32),
]


def verses(path: Path, rows: int) -> Path:
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    out = [lines[i % len(lines)] for i in range(rows)]
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def onnx_model(tmp: Path, rows: int) -> tuple[Path, Path]:
    """A seeded residual MLP as an ONNX file, and `rows` vectors for it as .npy."""
    import numpy as np
    import torch

    class Block(torch.nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.relu(self.fc(x))

    torch.manual_seed(0)
    width = 1024
    model = torch.nn.Sequential(
        torch.nn.Linear(256, width), *[Block(width) for _ in range(8)], torch.nn.Linear(width, 16)
    ).eval()
    path = tmp / "mlp.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(2, 256),),
        str(path),
        input_names=["input"],
        output_names=["y"],
        dynamic_axes={"input": {0: "batch"}, "y": {0: "batch"}},
        dynamo=False,
    )
    data = tmp / "vectors.npy"
    np.save(data, np.random.default_rng(0).standard_normal((rows, 256), dtype=np.float32))
    return path, data


def plans(case: Case, model: str, data: Path, extra: list[str], refresh: bool) -> dict[str, Any]:
    cmd = [
        *DISTINFER,
        "plan",
        "--model",
        model,
        "--input",
        str(data),
        "--json",
        "--block-size",
        str(case.block_size),
        *case.plan_args,
        *extra,
    ]
    if refresh:
        cmd.append("--refresh-profile")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{case.name}: distinfer plan failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def choose(ranked: list[dict[str, Any]], most: int) -> list[dict[str, Any]]:
    """The top plan, the best of every other strategy, the top's other batch sizes, then
    the next plans in rank while fewer than `most` are picked."""
    usable = [p for p in ranked if not p["refused"]]
    if not usable:
        return []
    top = usable[0]
    picked = [top]
    for p in usable[1:]:
        if p["strategy"] not in {q["strategy"] for q in picked}:
            picked.append(p)
    for p in usable[1:]:
        same = (p["strategy"], p["replicas"], p["stages"], p["ranks"], p["threads"])
        if (
            same == (top["strategy"], top["replicas"], top["stages"], top["ranks"], top["threads"])
            and p not in picked
        ):
            picked.append(p)
            break
    for p in usable[1:]:  # too few alternatives: the next plans in rank
        if len(picked) < most and p not in picked:
            picked.append(p)
    return picked[:most]


def measured_latency(report: dict[str, Any], batch_size: int) -> float | None:
    """One batch's time in the run (see the module's docstring), the workers' mean."""
    values = []
    for w in report["worker_stats"]:
        group, gen = w.get("group"), w.get("generation")
        if gen and gen["steps"]:  # text generation: one step makes every running sequence's next token
            values.append(gen["model_s"] / gen["steps"])
        elif group and w["rows"]:  # per `batch_size` rows (a group may cut smaller batches)
            if group["kind"] == "stage":
                values.append((sum(group["busy_s"]) + sum(group["comm_s"])) * batch_size / w["rows"])
            else:
                values.append(group["wall_s"] * batch_size / w["rows"])
        elif w["rows"]:
            seconds = w["seconds"]
            batches = math.ceil(w["rows"] / batch_size)
            values.append((seconds.get("preprocess", 0.0) + seconds.get("model", 0.0)) / batches)
    return statistics.mean(values) if values else None


def run_plan(case: Case, model: str, data: Path, plan: dict[str, Any], out: Path) -> dict[str, Any]:
    cmd = [
        *DISTINFER,
        "run",
        "--model",
        model,
        "--input",
        str(data),
        "--output",
        str(out),
        "--block-size",
        str(case.block_size),
        "--overwrite",
        *plan["run_args"],
        *case.plan_args,
    ]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {
            "error": done.stderr.strip().splitlines()[-1]
            if done.stderr.strip()
            else f"exit {done.returncode}"
        }
    report = json.loads((out / "_report.json").read_text())
    rows = report["rows"]
    steady = rows / max(1e-9, report["wall_s"] - report["startup_s"])
    return {
        "rows_per_s": steady,
        "latency_s": measured_latency(report, plan["batch_size"]),
        "wall_s": time.perf_counter() - t,
        "startup_s": report["startup_s"],
    }


def error(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or not measured:
        return None
    return abs(predicted - measured) / measured


def label(p: dict[str, Any]) -> str:
    inner = (
        f"{p['stages']} stages" if p["stages"] > 1 else f"{p['ranks']} ranks" if p["ranks"] > 1 else "1 proc"
    )
    return f"{p['strategy']} {p['replicas']}x({inner} x {p['threads']}t) b{p['batch_size']}"


def fmt(x: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if x is None else f"{x * scale:,.{digits}f}"


def run_case(
    case: Case, tmp: Path, args: argparse.Namespace, tops: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    if case.model == "onnx":
        model_path, data = onnx_model(tmp, case.rows)
        model = str(model_path)
    else:
        model, data = case.model, verses(tmp / f"{case.name}.txt", case.rows)
    extra: list[str] = []
    if case.latency_from:
        base = tops.get(case.latency_from)
        if base is None:
            why = f"needs the {case.latency_from} case first"
            return {"case": case.name, "rows": case.rows, "skipped": why}
        target_ms = 0.7 * base["latency_s"] * 1e3
        extra = ["--latency-target", f"{target_ms:.0f}ms"]
    t = time.perf_counter()
    planned = plans(case, model, data, extra, args.refresh_profile)
    plan_s = time.perf_counter() - t
    picked = choose(planned["plans"], args.plans)
    if not picked:
        return {"case": case.name, "rows": case.rows, "skipped": "no usable plan", "plan_s": plan_s}
    tops[case.name] = picked[0]
    rows = []
    for i, p in enumerate(picked):
        got = run_plan(case, model, data, p, tmp / f"{case.name}-{i}")
        rows.append(
            {
                "plan": label(p),
                "top": i == 0,
                "predicted_rows_per_s": p["rows_per_s"],
                "predicted_latency_s": p["latency_s"],
                **got,
                "throughput_error": error(p["rows_per_s"], got.get("rows_per_s")),
                "latency_error": error(p["latency_s"], got.get("latency_s")),
            }
        )
        print(
            f"  {case.name}: {rows[-1]['plan']}: predicted {p['rows_per_s']:.1f} rows/s, measured "
            f"{fmt(got.get('rows_per_s'))}",
            file=sys.stderr,
            flush=True,
        )
    ok = [r for r in rows if r.get("rows_per_s")]
    best = max((r["rows_per_s"] for r in ok), default=None)
    top = rows[0].get("rows_per_s")
    return {
        "case": case.name,
        "model": model if case.model != "onnx" else "mlp.onnx",
        "rows": case.rows,
        "extra": extra + case.plan_args,
        "plan_s": plan_s,
        "runs": rows,
        "top_within_5pct": bool(top and best and top >= 0.95 * best),
    }


def table(result: dict[str, Any]) -> str:
    head = f"{result['case']} ({result['rows']:,} rows {' '.join(result.get('extra', []))})".rstrip()
    if "skipped" in result:
        return f"{head}: skipped, {result['skipped']}"
    lines = [
        head,
        f"  {'plan':<42} {'rows/s pred':>11} {'meas':>8} {'err':>6} "
        f"{'lat ms pred':>11} {'meas':>8} {'err':>6}",
    ]
    for r in result["runs"]:
        mark = "*" if r["top"] else " "
        if "error" in r:
            lines.append(f" {mark}{r['plan']:<42} failed: {r['error']}")
            continue
        lines.append(
            f" {mark}{r['plan']:<42} {r['predicted_rows_per_s']:>11,.1f} {fmt(r['rows_per_s']):>8} "
            f"{fmt(r['throughput_error'], 100, 0):>5}% {fmt(r['predicted_latency_s'], 1e3):>11} "
            f"{fmt(r['latency_s'], 1e3):>8} {fmt(r['latency_error'], 100, 0):>5}%"
        )
    lines.append(f"  top plan measured best or within 5%: {'yes' if result['top_within_5pct'] else 'NO'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cases",
        default=",".join(c.name for c in CASES),
        help=f"comma-separated, of: {', '.join(c.name for c in CASES)} (default all)",
    )
    parser.add_argument(
        "--plans", type=int, default=3, help="plans run per case: the top and alternatives (3)"
    )
    parser.add_argument("--refresh-profile", action="store_true", help="measure every profile again")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    wanted = args.cases.split(",")
    unknown = set(wanted) - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    results: list[dict[str, Any]] = []
    tops: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="plan-accuracy-") as tmp:
        for case in CASES:
            if case.name in wanted or (case.name in {c.latency_from for c in CASES if c.name in wanted}):
                print(f"{case.name} ...", file=sys.stderr, flush=True)
                results.append(run_case(case, Path(tmp), args, tops))
    print()
    for r in results:
        print(table(r))
        print()
    runs = [x for r in results for x in r.get("runs", []) if "error" not in x]
    thr = [x["throughput_error"] for x in runs if x["throughput_error"] is not None]
    lat = [x["latency_error"] for x in runs if x["latency_error"] is not None]
    summary = {
        "median_throughput_error": statistics.median(thr) if thr else None,
        "median_latency_error": statistics.median(lat) if lat else None,
        "worst_error": max(thr + lat, default=None),
        "top_within_5pct": all(r["top_within_5pct"] for r in results if "runs" in r),
        "wall_s": time.perf_counter() - started,
    }
    checks = [
        ("median throughput error <= 10%", summary["median_throughput_error"], 0.10),
        ("median latency error <= 15%", summary["median_latency_error"], 0.15),
        ("no run over 25%", summary["worst_error"], 0.25),
    ]
    for name, value, limit in checks:
        verdict = "-" if value is None else ("met" if value <= limit else "MISSED")
        print(f"{name}: {fmt(value, 100, 1)}% {verdict}")
    print(f"top plan best or within 5% in every case: {'met' if summary['top_within_5pct'] else 'MISSED'}")
    print(f"whole run {summary['wall_s'] / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
